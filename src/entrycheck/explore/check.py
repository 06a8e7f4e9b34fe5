"""A whole check: scenarios x feature sets x handler-effect branches, serial or in parallel.

Work is cut into units (one feature set, its scenarios, one effect branch).  Units
are independent and deterministic, so they can run in this process, in a process
pool or on a Dask cluster and the merged result is the same: results are merged
in unit order, and a run budget is applied to that order afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from entrycheck.errors import InputError
from entrycheck.explore.engine import Budget, ExploreConfig, Explorer, UnitResult
from entrycheck.explore.paths import Cost, Finding, PathResult
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import LoadedObject, load
from entrycheck.kernelabi.stubs import Effect
from entrycheck.kernelabi.world import build_world
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
class CheckConfig:
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    feature_sets: tuple[FeatureSet, ...] = ()
    vectors: tuple[Vector, ...] = (Vector.NMI, Vector.MC, Vector.DB)
    depth: int = 2
    db_anywhere: bool = False
    mc_nesting: bool = False
    effects: tuple[Effect, ...] = ()      # each an extra branch besides "no effect"
    prune: bool = True
    max_runs: int | None = None
    budget: int = 20000

    def explore_config(self) -> ExploreConfig:
        return ExploreConfig(vectors=self.vectors, depth=self.depth, db_anywhere=self.db_anywhere,
                             mc_nesting=self.mc_nesting, prune=self.prune, budget=self.budget)

    def branches(self) -> tuple[frozenset[Effect], ...]:
        return (frozenset(),) + tuple(frozenset({e}) for e in self.effects)


@dataclass(frozen=True)
class Unit:
    index: int
    features: FeatureSet
    scenarios: tuple[str, ...]
    effects: frozenset[Effect]


@dataclass
class CheckResult:
    feature_sets: tuple[FeatureSet, ...]
    config: CheckConfig
    paths: list[PathResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)          # deduplicated
    raw_findings: list[Finding] = field(default_factory=list)      # before deduplication
    all_findings: int = 0
    runs: int = 0
    converged: int = 0
    skipped: int = 0
    stopped_because: str = STOPPED_DONE
    errors: list[str] = field(default_factory=list)

    def base_paths(self) -> list[PathResult]:
        return [p for p in self.paths if not p.injections]

    def cost(self, paths: Iterable[PathResult] | None = None) -> Cost:
        total = Cost()
        for p in (self.base_paths() if paths is None else paths):
            total = total + p.cost
        return total


def parse_vectors(text: str) -> tuple[Vector, ...]:
    out = []
    for name in (n.strip().lower() for n in text.split(",") if n.strip()):
        if name not in VECTOR_BY_NAME or VECTOR_BY_NAME[name] in (Vector.PF, Vector.IRQ):
            raise InputError(f"unknown vector {name!r}; choose from nmi, mc, db, df, vc")
        out.append(VECTOR_BY_NAME[name])
    if not out:
        raise InputError("no vectors given; choose from nmi, mc, db, df, vc")
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


def make_units(cfg: CheckConfig) -> list[Unit]:
    """One unit per (feature set, scenario, effect branch), in a fixed order."""
    for name in cfg.scenarios:
        scenario(name)
    units = []
    for fs in cfg.feature_sets:
        for name in cfg.scenarios:
            sc = scenario(name)
            if sc.needs and sc.needs not in fs:
                continue
            for effects in cfg.branches():
                units.append(Unit(len(units), fs, (name,), effects))
    return units


# Per process: one explorer (world + two emulators) per feature set, reused across units.
_EXPLORERS: dict[tuple, Explorer] = {}


def run_unit(ref: ObjectRef, cfg: CheckConfig, unit: Unit, max_runs: int | None = None) -> list[UnitResult]:
    """Explore one unit in this process (also the entry point of worker processes)."""
    key = (ref, unit.features, cfg.explore_config())
    explorer = _EXPLORERS.get(key)
    if explorer is None:
        if len(_EXPLORERS) > 32:
            _EXPLORERS.clear()
        world = build_world(ref.load().image(unit.features))
        explorer = _EXPLORERS[key] = Explorer(world, cfg.explore_config())
    explorer.budget = Budget(max_runs)
    out = []
    for name in unit.scenarios:
        try:
            out.append(explorer.explore(scenario(name), unit.effects))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the model: recorded, the check goes on
            _EXPLORERS.pop(key, None)           # its emulators may be in any state now
            what = f"{name} on {unit.features}" + (f" with {','.join(sorted(e.value for e in unit.effects))}"
                                                    if unit.effects else "")
            out.append(UnitResult(stopped=STOPPED_ERROR, error=f"{what}: {type(exc).__name__}: {exc}"))
    return out


def run_check(ref: ObjectRef, cfg: CheckConfig, *, workers: int = 1, scheduler: str | None = None,
              progress: Callable[[str, int | None, int | None], None] | None = None) -> CheckResult:
    loaded = ref.load()
    for fs in cfg.feature_sets:
        fs.validate(loaded.features)
    units = make_units(cfg)
    if not units:
        raise InputError("nothing to check: no feature sets")
    total = len(units)
    results: list[list[UnitResult] | None] = [None] * total
    done = 0

    def report() -> None:
        if progress:
            progress("exploring", done, total)

    report()
    if scheduler:
        results = _run_dask(ref, cfg, units, scheduler)
        done = total
        report()
    elif workers > 1 and total > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_unit, ref, cfg, u, cfg.max_runs): u.index for u in units}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                done += 1
                report()
    else:
        for u in units:
            results[u.index] = run_unit(ref, cfg, u, cfg.max_runs)
            done += 1
            report()
    return merge(units, [r or [] for r in results], cfg)


def _run_dask(ref: ObjectRef, cfg: CheckConfig, units: list[Unit], scheduler: str) -> list[list[UnitResult]]:
    try:
        from dask.distributed import Client
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise InputError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    try:
        client = Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        futures = client.map(run_unit, [ref] * len(units), [cfg] * len(units), units,
                             [cfg.max_runs] * len(units), pure=False)
        return client.gather(futures)
    finally:
        client.close()


def merge(units: list[Unit], per_unit: list[list[UnitResult]], cfg: CheckConfig) -> CheckResult:
    """Merge unit results in unit order; apply the run budget to that order."""
    result = CheckResult(cfg.feature_sets, cfg)
    remaining = cfg.max_runs
    best: dict[tuple, Finding] = {}
    order: list[tuple] = []
    for unit_results in per_unit:
        for ur in unit_results:
            paths = ur.paths
            if remaining is not None:
                if remaining <= 0:
                    result.stopped_because = STOPPED_BUDGET
                    break
                if len(paths) > remaining:
                    paths = paths[:remaining]
                    result.stopped_because = STOPPED_BUDGET
                remaining -= len(paths)
            if ur.stopped == STOPPED_BUDGET and result.stopped_because != STOPPED_ERROR:
                result.stopped_because = STOPPED_BUDGET
            if ur.stopped == STOPPED_ERROR:
                result.stopped_because = STOPPED_ERROR
                result.errors.append(ur.error)
            kept = {(p.scenario, p.features, p.effects, p.injections) for p in paths}
            result.paths.extend(paths)
            result.runs += len(paths)
            result.converged += sum(1 for p in paths if p.converged)
            result.skipped += ur.skipped
            for f in ur.findings:
                if (f.scenario, f.features, f.effects, f.injections) not in kept:
                    continue
                result.all_findings += 1
                result.raw_findings.append(f)
                key = f.key()
                if key not in best:
                    best[key] = f
                    order.append(key)
                elif len(f.injections) < len(best[key].injections):
                    best[key] = f
    result.findings = [best[k] for k in order]
    return result


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
