"""A whole check: scenarios x feature sets x handler-effect branches, cut into units and merged
(entrycheck/session.py spreads the units over processes or a Dask cluster).

Work is cut into units: one feature set, one scenario, one effect branch, and — when
several workers share the work — one part of the injection points of the scenario's
path (every n-th boundary, so parts cost about the same).  Units are independent and
deterministic, so they can run in this process, in a process pool or on a Dask
cluster and the merged result is the same: results are put back in exploration
order (feature set, scenario, branch, boundary), and a run budget is applied to that
order afterwards.

Units are handed to workers in batches: when there are enough feature sets to keep
every worker busy, all units of one feature set go to one worker as one batch, so
they share one explorer and its memo of handler runs (split across workers, each
would run again what another has already run); otherwise every unit is its own batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from collections import Counter
from typing import Iterable, Iterator, Mapping, Sequence

from entrycheck.errors import InputError
from entrycheck.explore.engine import ExploreConfig, Group, UnitResult
from entrycheck.explore.paths import NO_COST, Cost, Finding, PathResult, PathTable, sum_costs
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario
from entrycheck.image.features import FeatureSet
from entrycheck.kernelabi.stubs import Effect
from entrycheck.machine.events import DELIVERABLE as INJECTABLE
from entrycheck.machine.model import VECTOR_BY_NAME, Vector

STOPPED_DONE, STOPPED_BUDGET, STOPPED_ERROR = "done", "budget", "error"

# The command line's default nesting depth.  With the kernel's noinstr C running, every C
# instruction of a handler is a boundary, and a depth-2 check costs tens of times its depth-1
# check (with the contract stubs: a few times); depth 1 with the C is what a default run affords.
CLI_DEPTH = 1


@dataclass(frozen=True)
class CheckConfig(ExploreConfig):
    """A whole check: what to explore (the engine's settings, ExploreConfig, are declared there
    once, defaults included) and the check's own settings."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    feature_sets: tuple[FeatureSet, ...] = ()
    effects: tuple[Effect, ...] = ()      # each an extra branch besides "no effect"
    max_runs: int | None = None
    user_values: bool = True              # also explore the hostile user values the code tells apart
    user_depth: int = 1                   # nesting depth for those (at most --depth)
    irq_flush: bool = True                # interrupt scenarios also run with tlb-shootdown
    # per feature set: (set, the CPU and boot options that have it or "", the rule it breaks or "")
    configurations: tuple[tuple[str, str, str], ...] = ()
    # sets of feature_sets explored at depth 0 whatever the depth: their paths and those paths'
    # mispredicted branches (the preset CPUs a default check adds for the speculation checks)
    paths_only: tuple[FeatureSet, ...] = ()
    # entry code the object has that no feature set runs, each with how to check it
    not_checked: tuple[str, ...] = ()

    def depth_of(self, fs: FeatureSet) -> int:
        """The nesting depth ``fs`` is explored to."""
        return 0 if fs in self.paths_only else self.depth

    def sets_at_depth(self) -> int:
        """How many feature sets are explored to the check's depth (the others: at depth 0)."""
        return sum(1 for fs in self.feature_sets if self.depth_of(fs) == self.depth)

    def infeasible_sets(self) -> dict[str, str]:
        """The feature sets run under --allow-infeasible, with the rule each breaks."""
        return {fs: rule for fs, _, rule in self.configurations if rule}

    def explore_config(self) -> ExploreConfig:
        return ExploreConfig(**{f.name: getattr(self, f.name) for f in fields(ExploreConfig)})

    def branches(self, sc=None) -> tuple[frozenset[Effect], ...]:
        """The handler-effect branches of a scenario: none, and each asked for.  An interrupt may
        be a TLB-shootdown IPI, so interrupt scenarios also run with tlb-shootdown (and any
        interrupt injected on their paths is one too)."""
        effects = self.effects
        if sc is not None and sc.vector is Vector.IRQ and self.irq_flush and Effect.TLB_SHOOTDOWN not in effects:
            effects = effects + (Effect.TLB_SHOOTDOWN,)
        return (frozenset(),) + tuple(frozenset({e}) for e in effects)


@dataclass(frozen=True)
class Unit:
    index: int                 # position of (features, scenario, branch) in exploration order
    features: FeatureSet
    scenario: str
    effects: frozenset[Effect]
    part: int = 0              # which boundaries of the scenario's path: those with index % parts == part
    parts: int = 1
    depth: int | None = None   # the nesting depth, when not the check's (user-value variants)


class PathView(Sequence[PathResult]):
    """The paths of a check, in exploration order, made on demand from their tables."""

    def __init__(self, segments: list[tuple[PathTable, int, int]]) -> None:
        self.segments = segments
        self._starts = []
        n = 0
        for _, a, b in segments:
            self._starts.append(n)
            n += b - a
        self._len = n

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        import bisect

        s = bisect.bisect_right(self._starts, index) - 1
        table, a, _ = self.segments[s]
        return table.row(a + index - self._starts[s])

    def __iter__(self) -> Iterator[PathResult]:
        for table, a, b in self.segments:
            yield from table.rows(a, b)


@dataclass
class CheckResult:
    feature_sets: tuple[FeatureSet, ...]
    config: CheckConfig
    segments: list[tuple[PathTable, int, int]] = field(default_factory=list)   # paths, in order
    findings: list[Finding] = field(default_factory=list)          # deduplicated
    raw_findings: list[Finding] = field(default_factory=list)      # before deduplication
    all_findings: int = 0
    runs: int = 0
    converged: int = 0
    skipped: int = 0
    executed: int = 0          # runs the machine really made (depends on how the work was split)
    shared: int = 0            # paths a shared handler run stood for (likewise)
    beside: int = 0            # runs that rejoined a sibling's run (likewise)
    speculated: int = 0        # mispredicted branches followed (swapgs-unfenced), not counted as runs
    stopped_because: str = STOPPED_DONE
    errors: list[str] = field(default_factory=list)
    user_values: dict[str, list[str]] = field(default_factory=dict)   # variant -> feature sets it ran on
    covered: dict[FeatureSet, frozenset[int]] = field(default_factory=dict)   # executed instructions, per set

    @property
    def paths(self) -> PathView:
        return PathView(self.segments)

    def base_paths(self) -> list[PathResult]:
        return [t.row(r) for t, a, b in self.segments for r in range(a, b) if t.link[r] < 0]

    def cost(self, paths: Iterable[PathResult] | None = None) -> Cost:
        """Summed cost of the paths without injection (default) or of ``paths``."""
        total = NO_COST
        for p in (self.base_paths() if paths is None else paths):
            total = total + p.cost
        return total

    def total_cost(self) -> Cost:
        """Summed cost of every path (computed per distinct cost, not per path)."""
        per_cost: Counter = Counter()
        for table, a, b in self.segments:
            for cid, n in Counter(table.cost[a:b]).items():
                per_cost[table.costs[cid]] += n
        return sum_costs(per_cost.items())


def parse_vectors(text: str) -> tuple[Vector, ...]:
    out = []
    for name in (n.strip().lower() for n in text.split(",") if n.strip()):
        if name not in INJECTABLE:
            raise InputError(f"unknown vector {name!r}; choose from {', '.join(INJECTABLE)}")
        out.append(VECTOR_BY_NAME[name])
    if not out:
        raise InputError(f"no vectors given; choose from {', '.join(INJECTABLE)}")
    return tuple(dict.fromkeys(out))


def parse_effects(text: str | None) -> tuple[Effect, ...]:
    if not text or text.strip() in ("none", ""):
        return ()
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        try:
            out.append(Effect(name))
        except ValueError:
            raise InputError(f"unknown handler effect {name!r}; choose from "
                             f"{', '.join(e.value for e in Effect)}") from None
    return tuple(dict.fromkeys(out))


Variants = Mapping[tuple[FeatureSet, str], tuple[str, ...]]


def make_units(cfg: CheckConfig, parts: int = 1, variants: Variants | None = None) -> list[Unit]:
    """The units of a check, in a fixed order: (feature set, scenario, branch, part); each
    scenario's user-value variants (``variants``, from ``derive_set``) follow it."""
    for name in cfg.scenarios:
        scenario(name)
    units = []
    index = 0
    for fs in cfg.feature_sets:
        for name in cfg.scenarios:
            sc = scenario(name)
            if sc.needs and sc.needs not in fs:
                continue
            own = (variants or {}).get((fs, name), ())
            top = cfg.depth_of(fs)
            for sc_name, depth in [(name, None if top == cfg.depth else top)] + \
                    [(v, min(top, cfg.user_depth)) for v in own]:
                for effects in cfg.branches(scenario(sc_name)):
                    n = parts if (cfg.depth if depth is None else depth) >= 1 else 1
                    units.extend(Unit(index, fs, sc_name, effects, p, n, depth) for p in range(n))
                    index += 1
    return units


def choose_parts(cfg: CheckConfig, workers: int) -> int:
    """How finely to split each scenario: enough pieces for every worker to stay busy at
    depth >= 2 (each worker shares handler runs only within its own pieces)."""
    if cfg.max_runs is not None or workers <= 1 or cfg.depth < 2:
        return 1
    cells = max(1, len(make_units(cfg)))
    return max(1, min(8, -(-8 * workers // cells)))


def make_batches(units: list[Unit], workers: int) -> list[tuple[int, ...]]:
    """Indices of ``units`` grouped into the batches handed to workers, largest first.

    By feature set when there are at least two per worker (the largest sets, those with
    more features, first, so the last batches to finish are short); else one unit each."""
    by_set: dict[FeatureSet, list[int]] = {}
    for k, u in enumerate(units):
        by_set.setdefault(u.features, []).append(k)
    if workers <= 1 or len(by_set) < 2 * workers:
        return [(k,) for k in range(len(units))]
    return [tuple(by_set[fs]) for fs in largest_first(by_set)]


def largest_first(sets: Iterable[FeatureSet]) -> list[FeatureSet]:
    """Feature sets in the order work on them is handed out: those with more features (the
    longer ones) first, so that the last to finish are short."""
    return sorted(sets, key=lambda fs: -len(fs.names))


def merge(units: list[Unit], per_unit: list[UnitResult], cfg: CheckConfig) -> CheckResult:
    """Merge unit results in exploration order; apply the run budget to that order."""
    result = CheckResult(cfg.feature_sets, cfg)
    pieces: list[tuple[tuple[int, int], PathTable, Group]] = []
    for unit, ur in zip(units, per_unit):
        result.skipped += ur.skipped
        result.executed += ur.executed
        result.shared += ur.shared
        result.beside += ur.beside
        result.speculated += ur.speculated
        if ur.covered:
            result.covered[unit.features] = result.covered.get(unit.features, frozenset()) | ur.covered
        if ur.stopped == STOPPED_ERROR:
            result.errors.append(ur.error)
        if ur.stopped == STOPPED_BUDGET:
            result.stopped_because = STOPPED_BUDGET
        for g in ur.groups:
            pieces.append(((unit.index, g.order), ur.table, g))
    if result.errors:
        result.stopped_because = STOPPED_ERROR
    pieces.sort(key=lambda t: t[0])
    remaining = cfg.max_runs
    best: dict[tuple, Finding] = {}
    order: list[tuple] = []
    windows: dict[tuple, list[str]] = {}      # key -> sites of a last-link #MC leading to it
    shown: dict[tuple, int] = {}              # key -> paths that showed it
    for _, table, g in pieces:
        a, b = g.rows
        findings = g.findings
        if remaining is not None:
            if remaining <= 0:
                if result.stopped_because != STOPPED_ERROR:
                    result.stopped_because = STOPPED_BUDGET
                break
            if b - a > remaining:
                b = a + remaining
                kept = {table.chain(r) for r in range(a, b)}
                findings = [f for f in findings if f.injections in kept]
                if result.stopped_because != STOPPED_ERROR:
                    result.stopped_because = STOPPED_BUDGET
            remaining -= b - a
        if b > a:
            result.segments.append((table, a, b))
            result.runs += b - a
            result.converged += sum(table.converged[a:b])
        for f in findings:
            result.all_findings += 1
            result.raw_findings.append(f)
            key = f.key()
            if f.injections and f.injections[-1].vector is Vector.MC:
                sites = windows.setdefault(key, [])
                if f.injections[-1].at not in sites:
                    sites.append(f.injections[-1].at)
            shown[key] = shown.get(key, 0) + 1
            if key not in best:
                best[key] = f
                order.append(key)
            elif len(f.injections) < len(best[key].injections):
                best[key] = f
    result.findings = [replace(_with_windows(best[k], windows.get(k, ())), paths=shown[k]) for k in order]
    return result


def _with_windows(f: Finding, sites) -> Finding:
    """A deduplicated finding whose last link is a machine check: that precondition says in
    how many instructions' window the #MC leads to the same finding."""
    if len(sites) < 2 or not f.preconditions or f.preconditions[-1 - _trailing(f)].kind != "mc":
        return f
    k = len(f.preconditions) - 1 - _trailing(f)
    shown = ", ".join(sites[:3]) + (f", ... {sites[-1]}" if len(sites) > 3 else "")
    pre = replace(f.preconditions[k], text=f"a machine check at any of {len(sites)} instructions ({shown})")
    return replace(f, preconditions=f.preconditions[:k] + (pre,) + f.preconditions[k + 1:])


def _trailing(f: Finding) -> int:
    """Preconditions after the last link's (build options come last)."""
    n = 0
    for p in reversed(f.preconditions):
        if p.kind not in ("config", "early-iret"):
            break
        n += 1
    return n
