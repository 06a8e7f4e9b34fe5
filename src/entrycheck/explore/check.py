"""A whole check: scenarios x feature sets x handler-effect branches, serial or in parallel.

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

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from entrycheck.errors import InputError
from entrycheck.explore.engine import Budget, ExploreConfig, Explorer, Group, UnitResult
from entrycheck.explore.paths import NO_COST, Cost, Finding, PathResult, PathTable
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import LoadedObject, load
from entrycheck.kernelabi.stubs import Effect
from entrycheck.kernelabi.world import build_world
from entrycheck.machine.events import DELIVERABLE as INJECTABLE
from entrycheck.machine.model import VECTOR_BY_NAME, Vector

STOPPED_DONE, STOPPED_BUDGET, STOPPED_ERROR = "done", "budget", "error"


@dataclass(frozen=True)
class ObjectRef:
    """How a worker process finds the object again (a LoadedObject is not shipped).

    ``stamp`` (size and mtime of the files) keeps a rebuilt object at the same path
    from being mistaken for the one loaded before."""

    path: Path
    cpufeatures: Path | None
    asm_offsets: Path | None
    stamp: tuple = ()
    guards: tuple = ()          # (label, CONFIG_X, n) of the iretqs a build option adds (kernel/guards.py)
    refusals: tuple | None = None   # data hw_breakpoint.c refuses breakpoints on (None: the built-in list)

    def __post_init__(self) -> None:
        if not self.stamp:
            stamp = []
            for p in (self.path, self.cpufeatures, self.asm_offsets):
                try:
                    st = Path(p).stat() if p else None
                except OSError:
                    st = None
                stamp.append((st.st_size, st.st_mtime_ns) if st else None)
            object.__setattr__(self, "stamp", tuple(stamp))

    def load(self) -> LoadedObject:
        return _load_cached(self)


_LOADED: dict[ObjectRef, LoadedObject] = {}


def _load_cached(ref: ObjectRef) -> LoadedObject:
    got = _LOADED.get(ref)
    if got is None:
        got = _LOADED[ref] = load(ref.path, cpufeatures=ref.cpufeatures, asm_offsets=ref.asm_offsets)
    return got


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
        total = NO_COST
        for table, a, b in self.segments:
            counts = Counter(table.cost[a:b])
            for cid, n in sorted(counts.items()):
                total = total + table.costs[cid].times(n)
        return total


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
            for sc_name, depth in [(name, None)] + [(v, min(cfg.depth, cfg.user_depth)) for v in own]:
                for effects in cfg.branches(scenario(sc_name)):
                    n = parts if (cfg.depth if depth is None else depth) >= 1 else 1
                    units.extend(Unit(index, fs, sc_name, effects, p, n, depth) for p in range(n))
                    index += 1
    return units


def derive_set(ref: ObjectRef, cfg: CheckConfig, fs: FeatureSet) -> tuple[tuple, tuple[str, ...]]:
    """The user-value variants of each of the check's scenarios on ``fs`` (explore/userstate.py):
    ((scenario, (variant, ...)), ...), and the errors of scenarios it could not run."""
    from entrycheck.explore.userstate import derive

    explorer = _explorer(ref, cfg, fs)
    out, errors = [], []
    for name in cfg.scenarios:
        sc = scenario(name)
        if (sc.needs and sc.needs not in fs) or (sc.vector is not None and sc.vector not in explorer.world.config.idt):
            continue
        try:
            out.append((name, tuple(v.name for v in derive(explorer, sc, cfg.vectors))))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the model: recorded, the check goes on
            _EXPLORERS.pop((ref, fs, cfg.explore_config()), None)
            errors.append(f"user values of {name} on {fs}: {type(exc).__name__}: {exc}")
    return tuple(out), tuple(errors)


def choose_parts(cfg: CheckConfig, workers: int) -> int:
    """How finely to split each scenario: enough pieces for every worker to stay busy at
    depth >= 2 (each worker shares handler runs only within its own pieces)."""
    if cfg.max_runs is not None or workers <= 1 or cfg.depth < 2:
        return 1
    cells = max(1, len(make_units(cfg)))
    return max(1, min(8, -(-8 * workers // cells)))


# Per process: one explorer (world, machine, memo) per feature set, reused across units.
_EXPLORERS: dict[tuple, Explorer] = {}


def _explorer(ref: ObjectRef, cfg: CheckConfig, fs: FeatureSet) -> Explorer:
    key = (ref, fs, cfg.explore_config())
    explorer = _EXPLORERS.get(key)
    if explorer is None:
        if len(_EXPLORERS) > 32:
            _EXPLORERS.clear()
        world = build_world(ref.load().image(fs))
        explorer = _EXPLORERS[key] = Explorer(world, cfg.explore_config())
        explorer.set_guards(ref.guards)
        if ref.refusals is not None:
            explorer.set_refusals(ref.refusals)
    return explorer


def run_unit(ref: ObjectRef, cfg: CheckConfig, unit: Unit, max_runs: int | None = None) -> UnitResult:
    """Explore one unit in this process (also the entry point of worker processes)."""
    key = (ref, unit.features, cfg.explore_config())
    explorer = _explorer(ref, cfg, unit.features)
    explorer.budget = Budget(max_runs)
    try:
        return explorer.explore(scenario(unit.scenario), unit.effects, unit.part, unit.parts, depth=unit.depth)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a fault of the model: recorded, the check goes on
        _EXPLORERS.pop(key, None)           # its machine may be in any state now
        what = f"{unit.scenario} on {unit.features}" + (f" with {','.join(sorted(e.value for e in unit.effects))}"
                                                        if unit.effects else "")
        return UnitResult(PathTable(unit.scenario, unit.features, ()), stopped=STOPPED_ERROR,
                          error=f"{what}: {type(exc).__name__}: {exc}")


def make_batches(units: list[Unit], workers: int) -> list[tuple[int, ...]]:
    """Indices of ``units`` grouped into the batches handed to workers, largest first.

    By feature set when there are at least two per worker (the largest sets, those with
    more features, first, so the last batches to finish are short); else one unit each."""
    by_set: dict[FeatureSet, list[int]] = {}
    for k, u in enumerate(units):
        by_set.setdefault(u.features, []).append(k)
    if workers <= 1 or len(by_set) < 2 * workers:
        return [(k,) for k in range(len(units))]
    order = sorted(by_set, key=lambda fs: -len(fs.names))
    return [tuple(by_set[fs]) for fs in order]


def run_batch(ref: ObjectRef, cfg: CheckConfig, units: list[Unit], max_runs: int | None = None) -> list[UnitResult]:
    """Explore a batch of units in this process, in order; a batch of one feature set's
    units releases its explorer afterwards (no later batch needs it)."""
    out = [run_unit(ref, cfg, u, max_runs) for u in units]
    if len(units) > 1 and len({u.features for u in units}) == 1:
        _EXPLORERS.pop((ref, units[0].features, cfg.explore_config()), None)
    return out


def run_check(ref: ObjectRef, cfg: CheckConfig, *, workers: int = 1, scheduler: str | None = None,
              progress: Callable[[str, int | None, int | None], None] | None = None,
              parts: int | None = None) -> CheckResult:
    loaded = ref.load()
    for fs in cfg.feature_sets:
        fs.validate(loaded.features)
    if not make_units(cfg):
        raise InputError("nothing to check: no feature sets")
    client = None
    if scheduler:
        client = _dask_client(scheduler)
        workers = max(workers, sum(client.nthreads().values()) or 1)
    try:
        variants, derive_errors = _derive_all(ref, cfg, workers, client, progress)
    except BaseException:
        if client is not None:
            client.close()
        raise
    units = make_units(cfg, parts if parts is not None else choose_parts(cfg, workers), variants)
    total = len(units)
    results: list[UnitResult | None] = [None] * total
    done = 0

    def report() -> None:
        if progress:
            progress("exploring", done, total)

    report()
    batches = make_batches(units, workers)
    if client is not None:
        try:
            futures = client.map(run_batch, [ref] * len(batches), [cfg] * len(batches),
                                 [[units[k] for k in b] for b in batches], [cfg.max_runs] * len(batches), pure=False)
            for b, got in zip(batches, client.gather(futures)):
                for k, r in zip(b, got):
                    results[k] = r
        finally:
            client.close()
        done = total
        report()
    elif workers > 1 and total > 1:
        from concurrent.futures import as_completed

        with _process_pool(workers) as pool:
            futures = {pool.submit(run_batch, ref, cfg, [units[k] for k in b], cfg.max_runs): b for b in batches}
            for fut in as_completed(futures):
                for k, r in zip(futures[fut], fut.result()):
                    results[k] = r
                done += len(futures[fut])
                report()
    else:
        for k, u in enumerate(units):
            results[k] = run_unit(ref, cfg, u, cfg.max_runs)
            done += 1
            report()
    result = merge(units, [r for r in results], cfg)
    for fs in cfg.feature_sets:
        for name in cfg.scenarios:
            for v in variants.get((fs, name), ()):
                result.user_values.setdefault(v, []).append(str(fs))
    if derive_errors:
        result.errors[:0] = derive_errors
        result.stopped_because = STOPPED_ERROR
    return result


def _derive_all(ref: ObjectRef, cfg: CheckConfig, workers: int, client,
                progress: Callable[[str, int | None, int | None], None] | None) -> tuple[dict, list[str]]:
    """The user-value variants of every (feature set, scenario), one task per feature set."""
    if not cfg.user_values:
        return {}, []
    sets = list(cfg.feature_sets)
    if progress:
        progress("finding user values", 0, len(sets))
    if client is not None:
        got = client.gather(client.map(derive_set, [ref] * len(sets), [cfg] * len(sets), sets, pure=False))
    elif workers > 1 and len(sets) > 1:
        with _process_pool(workers) as pool:
            got = list(pool.map(derive_set, [ref] * len(sets), [cfg] * len(sets), sets))
    else:
        got = [derive_set(ref, cfg, fs) for fs in sets]
    variants, errors = {}, []
    for fs, (pairs, errs) in zip(sets, got):
        variants.update({(fs, name): names for name, names in pairs})
        errors.extend(errs)
    if progress:
        progress("finding user values", len(sets), len(sets))
    return variants, errors


def _process_pool(workers: int):
    """The local worker pool of both passes (forked, so workers share the loaded object)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=worker_signals)


def worker_signals() -> None:
    """In a worker process: Ctrl-C is the parent's to handle (it kills its workers), and
    SIGTERM ends the worker at once."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dask_client(scheduler: str):
    try:
        from dask.distributed import Client
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise InputError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    try:
        return Client(scheduler, timeout=10)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc


def merge(units: list[Unit], per_unit: list[UnitResult], cfg: CheckConfig) -> CheckResult:
    """Merge unit results in exploration order; apply the run budget to that order."""
    result = CheckResult(cfg.feature_sets, cfg)
    pieces: list[tuple[tuple[int, int], PathTable, Group]] = []
    for unit, ur in zip(units, per_unit):
        result.skipped += ur.skipped
        result.executed += ur.executed
        result.shared += ur.shared
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
            if key not in best:
                best[key] = f
                order.append(key)
            elif len(f.injections) < len(best[key].injections):
                best[key] = f
    result.findings = [_with_windows(best[k], windows.get(k, ())) for k in order]
    return result


def _with_windows(f: Finding, sites) -> Finding:
    """A deduplicated finding whose last link is a machine check: that precondition says in
    how many instructions' window the #MC leads to the same finding."""
    if len(sites) < 2 or not f.preconditions or f.preconditions[-1 - _trailing(f)].kind != "mc":
        return f
    from dataclasses import replace

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


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
