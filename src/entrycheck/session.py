"""The application layer: what entrycheck's commands do, for the command line, the demo and the
benchmarks alike, and the state one process keeps while it does it.

* ``STATE``: this process's caches (loaded objects, an explorer per feature set, source-line
  tables) and the output files being written (for the signal handler); ``reset()`` forgets them.
* ``ordered_map``: one piece of work per argument, in this process, in a forked process pool or
  on a Dask cluster; the results come back in the order of the arguments.
* ``run_check``: a check's units spread that way and merged (explore/check.py cuts and merges).
* ``check`` and ``diff``: the check, diff and review commands' work, from a loaded build to the
  results the reports are made of.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from entrycheck.errors import InputError
from entrycheck.explore.check import (STOPPED_ERROR, CheckConfig, CheckResult, Unit, choose_parts, largest_first,
                                      make_batches, make_units, merge)
from entrycheck.explore.engine import Budget, Explorer, UnitResult
from entrycheck.explore.paths import PathTable
from entrycheck.explore.scenarios import scenario
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import LoadedObject, load
from entrycheck.kernelabi.world import build_world

Progress = Callable[[str, "int | None", "int | None"], None]


# ---- this process's state ---------------------------------------------------------------------
@dataclass
class ProcessState:
    """What one process keeps between the pieces of work it does (one command, or a worker's units)."""

    loaded: dict = field(default_factory=dict)        # ObjectRef -> LoadedObject
    explorers: dict = field(default_factory=dict)     # (ObjectRef, FeatureSet, ExploreConfig) -> Explorer
    lines: dict = field(default_factory=dict)         # SourceLines.from_build's cache
    outputs: list = field(default_factory=list)       # the Outputs being committed (abort_outputs)

    def reset(self) -> None:
        self.loaded.clear()
        self.explorers.clear()
        self.lines.clear()
        self.outputs.clear()


STATE = ProcessState()


def reset() -> None:
    """Forget what earlier work loaded: the next command starts as in a new process."""
    STATE.reset()


def abort_outputs() -> None:
    """Undo every commit of output files in progress (from a signal handler)."""
    for out in list(STATE.outputs):
        out.abort()


def outputs():
    """A command's output files (report/outputs.py), undone by ``abort_outputs``."""
    from entrycheck.report.outputs import Outputs

    return Outputs(registry=STATE.outputs)


def source_lines(build, loaded):
    """The DWARF line table of a build's object (report/srclines.py), read once per process."""
    from entrycheck.report.srclines import SourceLines

    return SourceLines.from_build(build, loaded, cache=STATE.lines)


# ---- the object a worker loads ------------------------------------------------------------------
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
    noinstr: object = None          # image/noinstr.py's NoinstrLink: ``path`` holds the noinstr C too

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
        got = STATE.loaded.get(self)
        if got is None:
            got = STATE.loaded[self] = load(self.path, cpufeatures=self.cpufeatures, asm_offsets=self.asm_offsets,
                                            noinstr=self.noinstr)
        return got


def with_c_stubs(build, why: str = "--c-stubs"):
    """``build`` without the noinstr C: its entry objects alone, a contract stub at every call."""
    import dataclasses

    return dataclasses.replace(build, noinstr_object=None, noinstr_info=None, c_note=why)


# Build options under which the noinstr C is not run yet, and why.
C_NOT_MODELLED = {
    "CONFIG_PARAVIRT_XXL": "CONFIG_PARAVIRT_XXL: its CPU operations (debug registers, CR2, interrupt flag) are "
                           "pv_ops calls the kernel patches at boot, which entrycheck does not model yet",
}


def _c_refused(build) -> str | None:
    if build.config_file is None:
        return None
    try:
        text = build.config_file.read_text(errors="replace")
    except OSError:
        return None
    return next((why for option, why in C_NOT_MODELLED.items()
                 if re.search(rf"^{option}=y$", text, flags=re.M)), None)


def kernel_c(build) -> str:
    """One line on what stood past the entry assembly's calls: the kernel's noinstr C, or the
    contract stubs and why."""
    if build.noinstr_object is not None and build.noinstr_info is not None and _c_refused(build) is None:
        import json

        objects = json.loads(build.noinstr_info.read_text()).get("objects", [])
        return (f"the kernel's noinstr C ran ({len(objects)} objects linked with the entry code); stubs stand "
                "only at its calls out of noinstr code")
    why = build.c_note or _c_refused(build) or "the target has no noinstr C objects (a bare object or a tree's own build)"
    return f"contract stubs stood in for the kernel's C ({why})"


def object_ref(build, c_stubs: bool = False) -> ObjectRef:
    """The ObjectRef of a resolved build, with what its source tree says (kernel/guards.py): the
    entry objects linked with the noinstr C they reach where the build has it, unless ``c_stubs``."""
    from entrycheck.kernel.guards import breakpoint_refusals, iret_guards

    path, link = build.object_path, None
    if not c_stubs and build.noinstr_object is not None and build.noinstr_info is not None and \
            _c_refused(build) is None:
        import json

        from entrycheck.image.noinstr import NoinstrLink
        from entrycheck.kernelabi import booted
        from entrycheck.kernelabi.boundary import STUBBED

        info = json.loads(build.noinstr_info.read_text())
        structs = tuple(sorted((name, tuple(sorted(members.items())))
                               for name, members in info.get("structs", {}).items()))
        keys = tuple(sorted((name, bool(k["enabled"])) for name, k in info.get("keys", {}).items()))
        path, link = build.noinstr_object, NoinstrLink(frozenset(info.get("percpu", ())),
                                                       tuple(sorted(info.get("aliases", {}).items())), structs, keys,
                                                       frozenset(info.get("entry_calls", ())),
                                                       tuple(sorted(info.get("constants", {}).items())),
                                                       frozenset(STUBBED) | frozenset(booted.FUNCTIONS))
    return ObjectRef(path, build.cpufeatures_h, build.asm_offsets_h, guards=iret_guards(build.source_tree),
                     refusals=breakpoint_refusals(build.source_tree), noinstr=link)


# ---- spreading work ----------------------------------------------------------------------------
def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def ordered_map(fn: Callable, args: Sequence[tuple], *, workers: int = 1, client=None,
                done: Callable[[int, object], None] | None = None) -> list:
    """``fn(*a)`` for each ``a`` of ``args``: on the Dask ``client`` if given, else in a forked
    process pool of ``workers`` when there are several of both, else here; the results in the
    order of ``args``.  ``done(k, result)`` is called as each piece finishes (on Dask: at the end)."""
    results: list = [None] * len(args)
    if client is not None:
        futures = client.map(fn, *zip(*args), pure=False) if args else []
        for k, got in enumerate(client.gather(futures)):
            results[k] = got
            if done:
                done(k, got)
    elif workers > 1 and len(args) > 1:
        from concurrent.futures import as_completed

        with _process_pool(workers) as pool:
            futures = {pool.submit(fn, *a): k for k, a in enumerate(args)}
            for fut in as_completed(futures):
                k = futures[fut]
                results[k] = fut.result()
                if done:
                    done(k, results[k])
    else:
        for k, a in enumerate(args):
            results[k] = fn(*a)
            if done:
                done(k, results[k])
    return results


def _process_pool(workers: int):
    """A local worker pool (forked, so workers share what this process loaded)."""
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


def dask_client(scheduler: str):
    try:
        from dask.distributed import Client
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise InputError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    try:
        return Client(scheduler, timeout=10)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc


# ---- a check's units (these run in workers too) ---------------------------------------------------
def explorer(ref: ObjectRef, cfg: CheckConfig, fs: FeatureSet) -> Explorer:
    """This process's explorer of ``fs`` (world, machine, memo), made once and reused across units."""
    key = (ref, fs, cfg.explore_config())
    got = STATE.explorers.get(key)
    if got is None:
        if len(STATE.explorers) > 32:
            STATE.explorers.clear()
        world = build_world(ref.load().image(fs))
        got = STATE.explorers[key] = Explorer(world, cfg.explore_config())
        got.set_guards(ref.guards)
        if ref.refusals is not None:
            got.set_refusals(ref.refusals)
    return got


def run_unit(ref: ObjectRef, cfg: CheckConfig, unit: Unit, max_runs: int | None = None) -> UnitResult:
    """Explore one unit in this process."""
    key = (ref, unit.features, cfg.explore_config())
    ex = explorer(ref, cfg, unit.features)
    ex.budget = Budget(max_runs)
    try:
        return ex.explore(scenario(unit.scenario), unit.effects, unit.part, unit.parts, depth=unit.depth)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a fault of the model: recorded, the check goes on
        STATE.explorers.pop(key, None)           # its machine may be in any state now
        what = f"{unit.scenario} on {unit.features}" + (f" with {','.join(sorted(e.value for e in unit.effects))}"
                                                        if unit.effects else "")
        return UnitResult(PathTable(unit.scenario, unit.features, ()), stopped=STOPPED_ERROR,
                          error=f"{what}: {type(exc).__name__}: {exc}")


def run_batch(ref: ObjectRef, cfg: CheckConfig, units: list[Unit], max_runs: int | None = None) -> list[UnitResult]:
    """Explore a batch of units in this process, in order; a batch of one feature set's
    units releases its explorer afterwards (no later batch needs it)."""
    out = [run_unit(ref, cfg, u, max_runs) for u in units]
    if len(units) > 1 and len({u.features for u in units}) == 1:
        STATE.explorers.pop((ref, units[0].features, cfg.explore_config()), None)
    return out


def derive_set(ref: ObjectRef, cfg: CheckConfig, fs: FeatureSet) -> tuple[tuple, tuple[str, ...]]:
    """The user-value variants of each of the check's scenarios on ``fs`` (explore/userstate.py):
    ((scenario, (variant, ...)), ...), and the errors of scenarios it could not run."""
    from entrycheck.explore.userstate import derive

    ex = explorer(ref, cfg, fs)
    out, errors = [], []
    # Variants are explored to this depth; at depth 0 no exception is delivered on their paths,
    # so only what their own paths do tells them apart.
    vectors = cfg.vectors if min(cfg.depth_of(fs), cfg.user_depth) > 0 else ()
    for name in cfg.scenarios:
        sc = scenario(name)
        if (sc.needs and sc.needs not in fs) or (sc.vector is not None and sc.vector not in ex.world.config.idt):
            continue
        try:
            out.append((name, tuple(v.name for v in derive(ex, sc, vectors))))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the model: recorded, the check goes on
            STATE.explorers.pop((ref, fs, cfg.explore_config()), None)
            errors.append(f"user values of {name} on {fs}: {type(exc).__name__}: {exc}")
    return tuple(out), tuple(errors)


def run_check(ref: ObjectRef, cfg: CheckConfig, *, workers: int = 1, scheduler: str | None = None,
              progress: Progress | None = None, parts: int | None = None) -> CheckResult:
    """A whole check: the user values per feature set, then the units, spread as ``ordered_map``
    spreads them, merged in exploration order."""
    loaded = ref.load()
    for fs in cfg.feature_sets:
        fs.validate(loaded.features)
    if not make_units(cfg):
        raise InputError("nothing to check: no feature sets")
    client = None
    if scheduler:
        client = dask_client(scheduler)
        workers = max(workers, sum(client.nthreads().values()) or 1)
    n_parts = parts if parts is not None else choose_parts(cfg, workers)
    try:
        if by_set(cfg, workers):
            variants, derive_errors, units, results = _run_by_set(ref, cfg, n_parts, workers, client, progress)
        else:
            variants, derive_errors = _derive_all(ref, cfg, workers, client, progress)
            units = make_units(cfg, n_parts, variants)
            results = _run_units(ref, cfg, units, workers, client, progress)
    finally:
        if client is not None:
            client.close()
    result = merge(units, results, cfg)
    for fs in cfg.feature_sets:
        for name in cfg.scenarios:
            for v in variants.get((fs, name), ()):
                result.user_values.setdefault(v, []).append(str(fs))
    if derive_errors:
        result.errors[:0] = derive_errors
        result.stopped_because = STOPPED_ERROR
    return result


def _run_units(ref: ObjectRef, cfg: CheckConfig, units: list[Unit], workers: int, client,
               progress: Progress | None) -> list[UnitResult]:
    """The units' results, in their order, their batches (``make_batches``) spread by ``ordered_map``."""
    batches = make_batches(units, workers)
    results: list = [None] * len(units)
    count = [0]

    def finished(k: int, got: list[UnitResult]) -> None:
        for i, r in zip(batches[k], got):
            results[i] = r
        count[0] += len(batches[k])
        if progress:
            progress("exploring", count[0], len(units))

    if progress:
        progress("exploring", 0, len(units))
    ordered_map(run_batch, [(ref, cfg, [units[i] for i in b], cfg.max_runs) for b in batches],
                workers=workers, client=client, done=finished)
    return results


def by_set(cfg: CheckConfig, workers: int) -> bool:
    """Whether each feature set is one task (its user values found, then its units explored, on
    one worker, which then lets its explorer go): when there are at least two sets per worker."""
    return len(cfg.feature_sets) >= 2 * workers


def run_set(ref: ObjectRef, cfg: CheckConfig, fs: FeatureSet, parts: int) -> tuple:
    """One feature set's whole check in this process: its user values, then its units
    (numbered from 0 in exploration order), with the explorer the two share."""
    one = replace(cfg, feature_sets=(fs,))
    pairs, errors = derive_set(ref, one, fs) if cfg.user_values else ((), ())
    units = make_units(one, parts, {(fs, name): names for name, names in pairs})
    return pairs, errors, units, run_batch(ref, cfg, units, cfg.max_runs)


def _run_by_set(ref: ObjectRef, cfg: CheckConfig, parts: int, workers: int, client,
                progress: Progress | None) -> tuple:
    """``run_set`` for every feature set, the sets with more features (the longer ones) handed
    out first; the units numbered and merged in the check's order of sets, as ``make_units``
    numbers them, so the result is the one a serial run gives."""
    sets = list(cfg.feature_sets)
    order = largest_first(sets)
    if workers > 1 and client is None:
        # Forked workers inherit what this process decoded: the instructions of one image,
        # which the others share but for their patched sites (image/decode.py).
        ref.load().image(order[0]).instructions
    done_sets = [0]

    def finished(k: int, got) -> None:
        done_sets[0] += 1
        if progress:
            progress("exploring", done_sets[0], len(sets))

    if progress:
        progress("exploring", 0, len(sets))
    got = ordered_map(run_set, [(ref, cfg, fs, parts) for fs in order], workers=workers, client=client,
                      done=finished)
    per_set = dict(zip(order, got))
    variants, errors, units, results = {}, [], [], []
    for fs in sets:
        pairs, errs, own, res = per_set[fs]
        variants.update({(fs, name): names for name, names in pairs})
        errors.extend(errs)
        offset = units[-1].index + 1 if units else 0
        units.extend(replace(u, index=offset + u.index) for u in own)
        results.extend(res)
    return variants, errors, units, results


def _derive_all(ref: ObjectRef, cfg: CheckConfig, workers: int, client,
                progress: Progress | None) -> tuple[dict, list[str]]:
    """The user-value variants of every (feature set, scenario), one task per feature set."""
    if not cfg.user_values:
        return {}, []
    sets = list(cfg.feature_sets)
    if progress:
        progress("finding user values", 0, len(sets))
    got = ordered_map(derive_set, [(ref, cfg, fs) for fs in sets], workers=workers, client=client)
    variants, errors = {}, []
    for fs, (pairs, errs) in zip(sets, got):
        variants.update({(fs, name): names for name, names in pairs})
        errors.extend(errs)
    if progress:
        progress("finding user values", len(sets), len(sets))
    return variants, errors


# ---- the commands' work ---------------------------------------------------------------------------
@dataclass
class Checked:
    """A check of one build, with what its reports show besides the findings."""

    build: object
    loaded: LoadedObject
    ref: ObjectRef
    result: CheckResult
    redundant: list
    coverage: object
    matches: list                       # per finding, its address-free baseline key
    new: list                           # the findings not in the baseline (all of them without one)
    known: list                         # the findings in the baseline


def check(build, loaded: LoadedObject, cfg: CheckConfig, *, workers: int | None = None,
          scheduler: str | None = None, progress: Progress | None = None, baseline: set | None = None,
          extras: bool = True) -> Checked:
    """The check command's work on a loaded build: the check, its redundant writes explained,
    the coverage of the entry objects, and the findings split by ``baseline`` (``extras``
    False: the check alone, as diff needs it)."""
    from entrycheck.explore import baseline as known_findings

    ref = object_ref(build)
    result = run_check(ref, cfg, workers=workers or default_workers(), scheduler=scheduler, progress=progress)
    result.findings = machine_preconditions(result.findings, build, cfg)
    if not extras:
        return Checked(build, loaded, ref, result, [], None, [], result.findings, [])
    from entrycheck.explore.redundant import redundant_writes

    redundant = redundant_writes(result, lambda fs: build_world(loaded.image(fs)))
    keys_of = known_findings.keys_by_features(loaded)
    matches = [known_findings.finding_key(keys_of(f), f) for f in result.findings]
    new, known = result.findings, []
    if baseline is not None:
        new, known = known_findings.split(result.findings, keys_of, baseline)
    return Checked(build, loaded, ref, result, redundant, coverage(build, loaded, result), matches, new, known)


def machine_preconditions(findings: list, build, cfg: CheckConfig) -> list:
    """The findings with what the machine must be for each (explore/preconditions.py
    for_machine): its configuration, and what the build's tree and .config say about the code
    its path needs; a kernel breakpoint's capability as the tree's hw_breakpoint.c says."""
    from entrycheck.explore.preconditions import Precondition, for_machine
    from entrycheck.image.cpus import witness
    from entrycheck.kernel.guards import KERNEL_BREAKPOINT_CAPABILITY, reach_facts

    facts = reach_facts(build.source_tree, build.config_file)
    named = {fs: cpu for fs, cpu, _ in cfg.configurations}
    cap = facts.get("breakpoint")
    out = []
    for f in findings:
        key = str(f.features)
        if key not in named:
            w = witness(f.features)
            named[key] = w.label if w else ""
        pre = f.preconditions
        if cap and cap != KERNEL_BREAKPOINT_CAPABILITY:
            pre = tuple(Precondition(p.reach, p.kind, p.text.replace(KERNEL_BREAKPOINT_CAPABILITY, cap))
                        for p in pre)
        out.append(replace(f, preconditions=pre + for_machine(f, named[key], facts)))
    return out


def coverage(build, loaded: LoadedObject, result: CheckResult):
    """Per entry object, the instructions the check's recorded paths executed (any feature set)."""
    from entrycheck.explore.coverage import coverage as cover

    executed = frozenset().union(*result.covered.values()) if result.covered else frozenset()
    fred = (any("fred" in fs.names for fs in result.feature_sets), any("fred" not in fs.names
                                                                        for fs in result.feature_sets))
    return cover(loaded.image(FeatureSet.of(())), build.parts, executed, fred)


@dataclass
class Diffed:
    """Two builds checked alike and compared path by path."""

    old: Checked
    new: Checked
    result: object                      # explore/diff.py's DiffResult
    unknown: list                       # the new violations not in the baseline
    in_baseline: list


def diff(old_build, old_loaded: LoadedObject, new_build, new_loaded: LoadedObject, cfg: CheckConfig, *,
         workers: int | None = None, scheduler: str | None = None, progress: Progress | None = None,
         baseline: set | None = None) -> Diffed:
    """The diff and review commands' work: both builds checked with ``cfg``, their paths matched."""
    from entrycheck.explore.diff import SiteMap, diff_results

    old = check(old_build, old_loaded, cfg, workers=workers, scheduler=scheduler, progress=progress, extras=False)
    new = check(new_build, new_loaded, cfg, workers=workers, scheduler=scheduler, progress=progress, extras=False)
    fs0 = cfg.feature_sets[0] if cfg.feature_sets else FeatureSet(())
    result = diff_results(old.result, new.result, SiteMap(old_loaded.image(fs0), new_loaded.image(fs0)))
    unknown, in_baseline = result.new_violations, []
    if baseline is not None:
        from entrycheck.explore import baseline as known_findings

        unknown, in_baseline = known_findings.split(result.new_violations,
                                                    known_findings.keys_by_features(new_loaded), baseline)
    return Diffed(old, new, result, unknown, in_baseline)


@dataclass
class Reviewed:
    """A review: the diff of the build without and with the patches, and what it checked of them."""

    diffed: Diffed
    patch: object                       # explore/patchcover.py's PatchCover


def image_sources(build) -> tuple[str, ...]:
    """The source files of what the build's image holds: the entry objects' and, when the C runs,
    those of the noinstr C objects linked with them."""
    import json

    c = ()
    if build.noinstr_object is not None and build.noinstr_info is not None:
        c = tuple(json.loads(build.noinstr_info.read_text()).get("deps", ()))
    return tuple(build.sources) + c


def review(base, base_loaded: LoadedObject, patched, patched_loaded: LoadedObject, texts, placements,
           cfg: CheckConfig, *, workers: int | None = None, scheduler: str | None = None,
           progress: Progress | None = None, baseline: set | None = None) -> Reviewed:
    """The review command's work: ``diff`` of the two builds, then each hunk of the patches (their
    ``texts``, placed where ``placements`` say) judged by what the explored paths ran of it."""
    from entrycheck.explore.patchcover import cover, hunk_lines
    from entrycheck.kernel.guards import tree_facts
    from entrycheck.kernel.patch import parse_patch

    done = diff(base, base_loaded, patched, patched_loaded, cfg, workers=workers, scheduler=scheduler,
                progress=progress, baseline=baseline)
    hunks = hunk_lines([parse_patch(text, name) for name, text in texts], placements)
    lines = [source_lines(b, lo) if b.debug_info else None for b, lo in ((base, base_loaded),
                                                                          (patched, patched_loaded))]
    sources = frozenset(image_sources(base)) | frozenset(image_sources(patched))
    facts = (tree_facts(base.source_tree), tree_facts(patched.source_tree))
    return Reviewed(done, cover(hunks, sources, done.result.sites, lines[0], lines[1], done.old.result.covered,
                                done.new.result.covered, facts))


__all__ = ["Reviewed", "review", "STATE", "ProcessState", "reset", "abort_outputs", "outputs", "source_lines", "ObjectRef", "object_ref", "with_c_stubs", "kernel_c",
           "default_workers", "ordered_map", "worker_signals", "dask_client", "explorer", "run_unit", "run_batch",
           "derive_set", "run_check", "Checked", "check", "coverage", "Diffed", "diff"]
