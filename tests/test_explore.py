"""The explorer and `entrycheck check` on the real kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from entrycheck.explore.check import CheckConfig, make_batches, make_units
from entrycheck.session import ObjectRef, run_check
from entrycheck.image.decode import decode_one
from entrycheck.image.features import FeatureSet, all_model_feature_sets
from entrycheck.kernelabi.stubs import Effect
from entrycheck.machine.model import Vector
from entrycheck.props.invariants import INVARIANTS

pytestmark = pytest.mark.kernel
CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]


def ref(build) -> ObjectRef:
    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)


def keys(result) -> set:
    return {f.key() for f in result.findings}


def fsets(*names: str) -> tuple[FeatureSet, ...]:
    return tuple(FeatureSet.parse(n) for n in names)


@pytest.mark.parametrize("series, cfg", [
    ("6.1", CheckConfig(scenarios=("db-from-user", "nmi-from-kernel", "syscall"), depth=1,
                        feature_sets=fsets("kernel_ibrs", "pti,pcid"))),
    ("6.12", CheckConfig(scenarios=("nmi-from-kernel", "mc-from-kernel", "irq-from-user"), depth=1,
                         feature_sets=fsets("pti,pcid"), effects=(Effect.SWITCH_KERNEL_ASID,))),
    ("6.12", CheckConfig(scenarios=("mc-from-kernel",), depth=2, vectors=(Vector.NMI,),
                         feature_sets=fsets("pti,pcid"), effects=(Effect.SWITCH_KERNEL_ASID,))),
])
def test_pruned_and_brute_force_exploration_find_the_same(built_kernels, series: str, cfg: CheckConfig) -> None:
    from dataclasses import replace

    pruned = run_check(ref(built_kernels[series]), cfg)
    brute = run_check(ref(built_kernels[series]), replace(cfg, prune=False))
    assert pruned.findings, "the comparison needs findings to compare"
    assert keys(pruned) == keys(brute)
    assert pruned.converged > 0 and brute.converged == 0
    # Pruning never drops a path, it only stops runs early.
    assert {(p.scenario, p.features, p.injections) for p in pruned.paths} <= \
        {(p.scenario, p.features, p.injections) for p in brute.paths}
    # Path costs agree: a converged run's recorded continuation stands for its rest.
    brute_cost = {(p.scenario, p.features, p.effects, p.injections): p.cost.cr3_json() for p in brute.paths}
    for p in pruned.paths:
        assert p.cost.cr3_json() == brute_cost[(p.scenario, p.features, p.effects, p.injections)]


def test_a_finding_shown_before_is_not_run_again_for_its_trace(built_kernels, monkeypatch) -> None:
    """A leaf whose findings the merge would not show (an earlier one of its boundary has each
    key) is not replayed for an instruction trace: the findings, their traces and how many paths
    showed each are those of replaying every such leaf."""
    from entrycheck import session
    from entrycheck.explore.findings import Findings

    cfg = CheckConfig(scenarios=("mc-from-kernel",), depth=2, vectors=(Vector.NMI,),
                      feature_sets=fsets("pti,pcid"), effects=(Effect.SWITCH_KERNEL_ASID,))
    session.reset()
    short = run_check(ref(built_kernels["6.12"]), cfg)
    session.reset()
    monkeypatch.setattr(Findings, "shown_before", lambda *args: False)
    full = run_check(ref(built_kernels["6.12"]), cfg)
    session.reset()
    assert short.findings and all(f.trace for f in short.findings)
    assert [f.to_json() for f in short.findings] == [f.to_json() for f in full.findings]
    assert [f.key() for f in short.raw_findings] == [f.key() for f in full.raw_findings]
    assert short.executed < full.executed


def test_a_nested_nmi_that_repeats_its_outer_nmi_rejoins_a_siblings_run(built_kernels) -> None:
    """6.12's NMI entry (DEBUG_ENTRY) unblocks NMIs with an IRET to repeat_nmi, so inside an #MC
    that interrupts the NMI handler from there on an NMI arrives at every boundary; it finds an
    NMI executing and sets the outer NMI to repeat, a change the rest of the run reads, so it
    rejoins no recorded run.  The first such leaf of an #MC run is recorded and every later one
    rejoins it (``Sibling``): each path ends, costs and writes CR3 as running it to its end does,
    with the same findings, and the leaves run to their end are a few."""
    from dataclasses import replace

    from entrycheck import session
    from entrycheck.explore.scenarios import SCENARIOS

    build = built_kernels["6.12"]
    fs = FeatureSet.parse("pti,pcid")
    cfg = CheckConfig(scenarios=("nmi-from-kernel",), depth=2, vectors=(Vector.MC, Vector.NMI), feature_sets=(fs,))
    got = {}
    session.reset()
    for prune in (True, False):
        ex = session.explorer(session.object_ref(build), replace(cfg, prune=prune), fs)
        # Every 40th boundary of the NMI's path from the 37th: NMIs are unblocked at each.
        r = ex.explore(SCENARIOS["nmi-from-kernel"], part=37, parts=40)
        paths = {p.injections: (p.outcome, p.cost, p.end_state, p.cr3_trace) for p in r.table.rows()}
        got[prune] = (r, paths, {f.key() for f in r.findings})
    session.reset()
    (pruned, kept, found), (brute, every, all_found) = got[True], got[False]
    assert pruned.beside > 1000 and brute.beside == 0
    assert len(kept) - pruned.converged < len(every) / 10
    assert found == all_found
    assert kept.keys() <= every.keys() and len(kept) > len(every) * 0.9
    assert {k: every[k] for k in kept} == kept


def test_a_recorded_run_stops_where_it_rejoins_its_parents_or_a_siblings(built_kernels) -> None:
    """Depth 3: an NMI's run recorded for the exceptions injected into it stops where its return
    reaches the state its parent run had there, or a sibling's run had (a nested NMI inside the
    NMI handler, after its IRET to repeat_nmi); the rest of that run stands for its own and for
    the paths injected into it that return there.  Every path ends, costs and writes CR3 as
    running everything to its end does (one boundary of the #MC's path, to keep it short)."""
    from dataclasses import replace

    from entrycheck import session
    from entrycheck.explore.scenarios import SCENARIOS

    build = built_kernels["6.12"]
    fs = FeatureSet.parse("pti,pcid")
    cfg = CheckConfig(scenarios=("mc-from-kernel",), depth=3, vectors=(Vector.NMI,), feature_sets=(fs,))
    got = {}
    session.reset()
    for prune in (True, False):
        ex = session.explorer(session.object_ref(build), replace(cfg, prune=prune), fs)
        r = ex.explore(SCENARIOS["mc-from-kernel"], part=5, parts=200)
        got[prune] = (r, {p.injections: (p.outcome, p.cost, p.end_state, p.cr3_trace, p.converged)
                          for p in r.table.rows()})
    session.reset()
    (pruned, kept), (brute, every) = got[True], got[False]
    joined = [chain for chain, p in kept.items() if len(chain) == 2 and p[4]]
    assert len(joined) > 100 and pruned.beside > 100
    assert pruned.executed < brute.executed / 10
    assert {f.key() for f in pruned.findings} == {f.key() for f in brute.findings}
    assert kept.keys() <= every.keys()
    assert {k: every[k][:4] for k in kept} == {k: p[:4] for k, p in kept.items()}


def _db_breakpoint_on_top_of_stack(finding) -> bool:
    """The other genuine pristine finding: a #DB from user mode whose handler, still on the #DB
    IST stack, calls sync_regs, which reads the per-cpu top of stack (cpu_current_top_of_stack in
    6.1, pcpu_hot in 6.12): a breakpoint there, which within_cpu_entry() does not refuse, traps
    into a second #DB on the same stack."""
    if finding.invariant != "ist-reentered" or finding.scenario != "db-from-user" or finding.site != "sync_regs":
        return False
    if [i.spec() for i in finding.injections] != ["db@sync_regs"]:
        return False
    db = [p.text for p in finding.preconditions if p.kind == "db"]
    return len(db) == 1 and db[0].startswith(("a kernel data breakpoint on pcpu_hot (per-cpu, read by sync_regs)",
                                              "a kernel data breakpoint on cpu_current_top_of_stack (per-cpu, "
                                              "read by sync_regs)"))


def _db_breakpoint_on_spec_ctrl(loaded, finding) -> bool:
    """The genuine pristine finding: a #DB trap right after a read of x86_spec_ctrl_current
    while the #DB handler itself still runs on its IST stack (kernel_ibrs): a #DB from user mode,
    or the single-step #DB of a SYSENTER with TF set (the user value rflags=...TF)."""
    sysenter_tf = finding.scenario.startswith("sysenter[") and "rflags=" in finding.scenario
    if finding.scenario != "db-from-user" and not sysenter_tf or "kernel_ibrs" not in finding.features:
        return False
    if [i.vector.label for i in finding.injections] != ["db"]:
        return False
    image = loaded.image(FeatureSet.parse(finding.features))
    at = image.parse_location(finding.injections[0].at)
    start, _ = image.symbol_range(finding.injections[0].at.split("+")[0])
    prev = None
    from entrycheck.image.decode import sweep

    for ins in sweep(image.read(start, at - start), start):
        prev = ins
    rel = image.relocation_in(prev.address, prev.size)
    return prev.gs and rel is not None and rel.symbol == "x86_spec_ctrl_current"


@pytest.mark.slow
def test_pristine_kernels_depth_1_all_feature_sets(built_kernels) -> None:
    from entrycheck.image import load_build

    for series, build in built_kernels.items():
        result = run_check(ref(build), CheckConfig(feature_sets=all_model_feature_sets(), depth=1), workers=2)
        assert result.stopped_because == "done" and result.runs > 10000
        loaded = load_build(build)
        unexplained = [f for f in result.findings if not _db_breakpoint_on_spec_ctrl(loaded, f)
                       and not _db_breakpoint_on_top_of_stack(f)]
        assert unexplained == [], [(f.invariant, f.scenario, f.features, f.site, f.message) for f in unexplained]
        # Only feature sets with kernel_ibrs read x86_spec_ctrl_current on the #DB IST stack;
        # sync_regs reads the top of stack there on every set.  Each is reported as its
        # root cause alone.
        assert {f.invariant for f in result.findings} == {"ist-reentered"}
        assert all("kernel_ibrs" in f.features or f.site == "sync_regs" for f in result.findings)
        assert len({f.features for f in result.raw_findings if f.site == "sync_regs"}) == 16


def test_switch_kernel_asid_shows_what_the_seed_relies_on(kernel61, kernel612) -> None:
    cfg = CheckConfig(scenarios=("nmi-from-kernel", "mc-from-kernel", "db-from-kernel"), depth=0,
                      feature_sets=fsets("pti,pcid", "pti"), effects=(Effect.SWITCH_KERNEL_ASID,))
    old = run_check(ref(kernel61), cfg)
    new = run_check(ref(kernel612), cfg)
    assert not old.findings
    found = {(f.scenario, f.invariant) for f in new.findings}
    assert found == {(s, "context-not-restored") for s in cfg.scenarios}
    assert all(f.effects == ("switch-kernel-asid",) and "CR3" in f.message for f in new.findings)
    # Without the effect, 6.12 is clean on the same paths.
    from dataclasses import replace

    assert not run_check(ref(kernel612), replace(cfg, effects=())).findings


def test_workers_give_the_same_result_as_serial(kernel612, tmp_path) -> None:
    # Four feature sets for two workers: each set's units go to one worker as one batch.
    sets = ("pti,pcid", "kernel_ibrs", "pti", "pti,pcid,fsgsbase")
    args = [str(kernel612.object_path), "--depth", "1", *[a for f in sets for a in ("--features", f)],
            "--scenarios", "db-from-user,syscall,nmi-from-kernel"]
    units = make_units(CheckConfig(scenarios=("db-from-user", "syscall", "nmi-from-kernel"), depth=1,
                                   feature_sets=fsets(*sets)))
    assert len(make_batches(units, 2)) == 4
    out = {}
    for workers in ("1", "2"):
        path = tmp_path / f"w{workers}.json"
        proc = subprocess.run(CLI + ["check", *args, "--workers", workers, "--json", str(path)],
                              capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr         # the kernel_ibrs #DB finding
        out[workers] = path.read_bytes()
    assert out["1"] == out["2"]
    doc = json.loads(out["1"])
    for key in ("target", "kernel_version", "feature_sets", "runs", "violations", "cr3", "stopped_because"):
        assert key in doc
    assert set(doc["cr3"]) >= {"writes", "flushing_writes", "redundant_writes"}
    v = doc["violations"][0]
    assert set(v) >= {"invariant", "scenario", "features", "injections", "trace"}
    assert v["trace"] and all(isinstance(line, str) for line in v["trace"])


@pytest.mark.slow
def test_depth_2_split_work_and_a_killed_dask_worker_give_the_serial_json(kernel61, tmp_path) -> None:
    """At depth 2 the scenarios' boundaries are split into parts across workers; the JSON is
    byte-identical to a serial run's, in a process pool and on a Dask cluster one of whose
    workers is killed (SIGKILL) while it explores."""
    import os
    import signal
    import time
    from collections import Counter

    from dask.distributed import Client, LocalCluster

    # The contract stubs: depth 2 with the kernel's C is beyond a test's time (bench.py kernel-c).
    args = ["check", "debian:6.1", "--depth", "2", "--features", "pti,pcid", "--c-stubs"]

    def run(name: str, *extra: str, wait=None) -> bytes:
        path = tmp_path / f"{name}.json"
        proc = subprocess.Popen(CLI + args + list(extra) + ["--json", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait:
            wait(proc)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 1, err[-2000:]       # stock 6.1 has depth-2 findings
        return path.read_bytes()

    serial = run("serial", "--workers", "1")
    assert json.loads(serial)["violations"]
    assert run("pool", "--workers", "2") == serial

    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:

        def kill_one_worker_mid_run(proc) -> None:
            def states(dask_scheduler) -> dict:
                return dict(Counter(ts.state for ts in dask_scheduler.tasks.values()))

            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                seen = client.run_on_scheduler(states)
                if seen.get("memory", 0) >= 2 and seen.get("processing", 0) >= 2:
                    addr, pid = sorted(client.run(os.getpid).items())[0]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(addr=addr, pid=pid, states=seen)
                    return
                time.sleep(0.05)

        on_dask = run("dask", "--scheduler", cluster.scheduler_address, wait=kill_one_worker_mid_run)
        assert killed, "the run ended before a worker could be killed"
        client.wait_for_workers(2, timeout=60)
        assert killed["pid"] not in client.run(os.getpid).values()     # the nanny started a new one
    assert on_dask == serial


def test_a_finding_replays_from_its_json(kernel61, tmp_path) -> None:
    path = tmp_path / "check.json"
    subprocess.run(CLI + ["check", str(kernel61.object_path), "--depth", "1", "--features", "kernel_ibrs",
                          "--scenarios", "db-from-user", "--json", str(path)], capture_output=True, check=False)
    doc = json.loads(path.read_text())
    assert doc["violations"]
    proc = subprocess.run(CLI + ["trace", str(kernel61.object_path), "--finding", f"{path}:0", "--json", "-"],
                          capture_output=True, text=True, check=True)
    replay = json.loads(proc.stdout)
    assert doc["violations"][0]["invariant"] in {v["invariant"] for v in replay["violations"]}


def test_exit_codes_and_bad_input(kernel612) -> None:
    obj = str(kernel612.object_path)
    clean = subprocess.run(CLI + ["check", obj, "--depth", "0", "--features", "pti,pcid"], capture_output=True,
                           text=True)
    assert clean.returncode == 0 and "Verdict: clean" in clean.stdout
    for args, needle in [(["--scenarios", "warp"], "unknown scenario"), (["--vectors", "nmi,xx"], "unknown vector"),
                         (["--handler-effects", "teleport"], "unknown handler effect"),
                         (["--features", "pti,flux"], "unknown CPU feature"), (["--vectors", "vc"], "no entry point")]:
        proc = subprocess.run(CLI + ["check", obj, "--depth", "0", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_budget_stops_exploration(kernel612) -> None:
    result = run_check(ref(kernel612), CheckConfig(feature_sets=fsets("pti,pcid"), depth=1, max_runs=40))
    assert result.runs == 40 and result.stopped_because == "budget"


@pytest.mark.parametrize("name", sorted(INVARIANTS))
def test_explain(name: str) -> None:
    proc = subprocess.run(CLI + ["check", "--explain", name], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith(name) and INVARIANTS[name].rationale.split()[0] in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80


def test_db_injection_follows_watchable_accesses(kernel612) -> None:
    """By default #DB arrives only as a trap after an instruction whose data access a
    breakpoint may watch — never after one that touches only the cpu_entry_area."""
    result = run_check(ref(kernel612), CheckConfig(scenarios=("nmi-from-kernel",), feature_sets=fsets("pti,pcid"),
                                                   depth=1, vectors=(Vector.DB,)))
    anywhere = run_check(ref(kernel612), CheckConfig(scenarios=("nmi-from-kernel",), feature_sets=fsets("pti,pcid"),
                                                     depth=1, vectors=(Vector.DB,), db_anywhere=True))
    watched = {p.injections for p in result.paths if p.injections}
    every = {p.injections for p in anywhere.paths if p.injections}
    assert watched < every
    from entrycheck.image import load_build

    from entrycheck.kernelabi.stubs import c_footprint
    from entrycheck.kernelabi.world import build_world

    image = load_build(kernel612).image(FeatureSet.parse("pti,pcid"))
    world = build_world(image)
    functions = image.loaded.resolution.functions
    in_c = [link for (link,) in watched if link.at in functions]
    # Inside C code only where the function reads per-cpu data a breakpoint may watch (exc_nmi
    # before local_db_save() clears DR7).
    assert in_c and all(c_footprint(world, link.at) for link in in_c)
    for (link,) in watched:
        if link.at not in functions:
            at = image.parse_location(link.at)
            assert decode_one(image.read(at, 16), at) is not None


def test_dask_scheduler_gives_the_same_result_as_serial(kernel612) -> None:
    from dask.distributed import LocalCluster

    # Four sets for two workers: one batch per feature set.
    cfg = CheckConfig(scenarios=("nmi-from-kernel", "syscall"), depth=1,
                      feature_sets=fsets("pti,pcid", "pti", "kernel_ibrs", "pti,pcid,fsgsbase"))
    assert len(make_batches(make_units(cfg), 2)) == 4
    serial = run_check(ref(kernel612), cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        distributed = run_check(ref(kernel612), cfg, scheduler=cluster.scheduler_address)
    assert [p.cost.to_json() for p in distributed.paths] == [p.cost.to_json() for p in serial.paths]
    assert [(p.scenario, p.features, p.injections) for p in distributed.paths] == \
        [(p.scenario, p.features, p.injections) for p in serial.paths]
    assert keys(distributed) == keys(serial)


def test_a_fault_of_the_model_stops_one_unit_not_the_check(kernel612, monkeypatch) -> None:
    from entrycheck.explore import engine

    real = engine.Explorer.explore

    def explore(self, sc, effects=frozenset(), part=0, parts=1, depth=None):
        if sc.name == "mc-from-kernel":
            raise RuntimeError("model broke")
        return real(self, sc, effects, part, parts, depth)

    monkeypatch.setattr(engine.Explorer, "explore", explore)
    result = run_check(ref(kernel612), CheckConfig(scenarios=("syscall", "mc-from-kernel", "nmi-from-kernel"),
                                                   feature_sets=fsets("pti,pcid"), depth=0))
    assert result.stopped_because == "error"
    assert len(result.errors) == 1 and "mc-from-kernel" in result.errors[0] and "model broke" in result.errors[0]
    assert {p.scenario for p in result.paths} == {"syscall", "nmi-from-kernel"} | set(result.user_values)
    assert any(v.startswith("syscall[") for v in result.user_values)


def test_a_fault_while_finding_user_values_is_an_error_of_the_check(kernel612, monkeypatch) -> None:
    from entrycheck.explore import userstate

    def derive(explorer, sc, vectors):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(userstate, "derive", derive)
    result = run_check(ref(kernel612), CheckConfig(scenarios=("syscall",), feature_sets=fsets("pti"), depth=0))
    assert result.stopped_because == "error" and not result.user_values
    assert result.errors == ["user values of syscall on pti: RuntimeError: probe broke"]
    assert {p.scenario for p in result.paths} == {"syscall"}
