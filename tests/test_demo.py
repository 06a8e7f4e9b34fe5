"""`entrycheck demo`: the bundled fixture assembles, loads and runs; its variants come out
as designed; the CR3 cost of the paranoid return is measured; the command is deterministic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from entrycheck.demo import VARIANTS, assemble, find_assembler, run_demo
from entrycheck.explore.replay import parse_injection, trace
from entrycheck.explore.scenarios import scenario
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import load
from entrycheck.image.symbols import SymbolClass
from entrycheck.kernelabi.world import build_world
from entrycheck.machine.events import Cr3Written

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as (binutils) is not installed")

GS_INVARIANTS = {"user-mode-kernel-gs", "percpu-with-user-gs"}
CR3_INVARIANTS = {"user-mode-kernel-cr3", "kernel-memory-under-user-cr3", "stale-tlb"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One in-process demo run; the objects are kept so that reproducers can be replayed."""
    return run_demo(workers=2, keep=tmp_path_factory.mktemp("demo-objects"))


def by_number(result, n):
    return next(v for v in result.variants if v.variant.number == n)


# ---- the fixture itself -------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"variant{v.number}")
def test_fixture_assembles_and_loads_like_an_entry_object(variant, tmp_path):
    obj = assemble(find_assembler(), variant, tmp_path)
    loaded = load(obj)
    for sym in ("entry_SYSCALL_64", "asm_exc_nmi", "asm_exc_machine_check", "asm_exc_debug", "paranoid_entry",
                "paranoid_exit"):
        assert sym in loaded.symbols
    res = loaded.resolution
    for name in ("cpu_tss_rw", "cpu_tlbstate", "pcpu_hot"):
        assert res.classes[name] is SymbolClass.PERCPU
    for name in ("do_syscall_64", "exc_nmi", "exc_machine_check", "exc_debug", "sync_regs"):
        assert res.classes[name] is SymbolClass.FUNCTION
    features = {loaded.features.name_of(e.feature) for e in loaded.alternatives}
    assert features == {"pti", "pcid"}
    plain = loaded.image(FeatureSet.parse("none"))
    pti = loaded.image(FeatureSet.parse("pti,pcid"))
    assert plain.contents[".entry.text"] != pti.contents[".entry.text"]
    assert not [s for s in plain.alt_sites if s.applied is not None]
    assert all(s.applied is not None for s in pti.alt_sites)
    # The SYSCALL path runs clean: kernel CR3 on the way in, user CR3 on the way out.
    world = build_world(pti)
    t = trace(world, scenario("syscall"), ())
    assert t.outcome.value == "returned" and not t.violations
    assert [e.write.new & 0x1FFF for e in t.events if isinstance(e, Cr3Written)] == [0x2, 0x1802]


# ---- the variants' verdicts -----------------------------------------------------------------
def test_safe_variants_are_clean(demo):
    for n in (0, 1):
        v = by_number(demo, n)
        assert v.variant.expect_safe
        assert v.stopped_because == "done"
        assert v.runs > 1000
        assert v.safe, [(f.invariant, f.scenario, f.features, f.injections) for f in v.findings[:5]]


def test_restore_never_is_caught_by_user_mode_kernel_cr3(demo):
    v = by_number(demo, 2)
    found = set(v.invariants())
    assert "user-mode-kernel-cr3" in found
    assert not found & GS_INVARIANTS
    f = v.shortest("user-mode-kernel-cr3")
    assert "pti" in f.features and len(f.injections) == 1
    assert f.injections[0].at.startswith(("syscall_return_via_sysret", "return_to_user_iret"))


def test_forget_swapgs_is_caught_by_user_mode_kernel_gs(demo):
    v = by_number(demo, 3)
    found = set(v.invariants())
    assert "user-mode-kernel-gs" in found
    assert not found & CR3_INVARIANTS


def test_demo_is_as_expected(demo):
    assert demo.as_expected, demo.problems
    assert [v.safe for v in demo.variants] == [True, True, False, False]


def test_reproducers_replay_on_the_kept_objects(demo):
    for n, invariant in ((2, "user-mode-kernel-cr3"), (3, "user-mode-kernel-gs")):
        v = by_number(demo, n)
        f = v.shortest(invariant)
        assert v.object_path is not None and v.object_path.is_file()
        world = build_world(load(v.object_path).image(FeatureSet.parse(f.features)))
        injections = tuple(parse_injection(i.spec(), world.image) for i in f.injections)
        t = trace(world, scenario(f.scenario), injections)
        assert invariant in {x.invariant for x in t.violations}


# ---- the CR3 cost of a paranoid return -----------------------------------------------------
def test_paranoid_return_from_kernel_context_cr3_writes(demo):
    always, only_user = by_number(demo, 0), by_number(demo, 1)
    assert {(c.scenario, c.features) for c in always.costs} == {
        (s, fs) for s in ("nmi-from-kernel", "mc-from-kernel", "db-from-kernel") for fs in ("pti", "pti,pcid")}
    for c in always.costs:
        # Before the change: one write of the CR3 already in use, with nothing to flush.
        assert (c.writes, c.redundant) == (1, 1), c
        assert all(site.startswith("paranoid_exit") for site, _ in c.sites)
    for c in only_user.costs:
        assert c.writes == 0, c


# ---- the command ----------------------------------------------------------------------------
VARIANT_LINE = re.compile(r"^variant (\d)  (.+?)\s+(safe|NOT SAFE)\s+(\d+) runs$")


def test_cli_demo_exits_0_reports_verdicts_and_is_deterministic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "entrycheck.cli", "demo", "--workers", "1", "--json"]
    procs = [subprocess.Popen(cmd + [str(out / f"run{k}.json")], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
    stdout = results[0][0]
    verdicts = {}
    for line in stdout.splitlines():
        assert len(line) <= 80, line
        m = VARIANT_LINE.match(line)
        if m:
            verdicts[int(m.group(1))] = (m.group(2), m.group(3))
    assert verdicts == {0: ("restore always", "safe"), 1: ("restore only a user CR3", "safe"),
                        2: ("restore never", "NOT SAFE"), 3: ("forget SWAPGS", "NOT SAFE")}
    assert "As expected" in stdout
    assert (out / "run1.json").read_bytes() == (out / "run2.json").read_bytes()
    doc = json.loads((out / "run1.json").read_text())
    assert doc["as_expected"] is True and doc["kept_in"] is None
    assert [v["verdict"] for v in doc["variants"]] == ["safe", "safe", "not safe", "not safe"]
    assert list(cwd.iterdir()) == []                     # nothing written where it ran


def test_cli_demo_without_gnu_as_says_install_binutils(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "entrycheck.cli", "demo"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "install binutils" in lines[0]


def test_keep_dir_must_be_creatable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "entrycheck.cli", "demo", "--keep", str(blocker / "sub")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "cannot create" in proc.stderr


def test_fixture_source_ships_with_the_package():
    from importlib import resources

    text = (resources.files("entrycheck.demo") / "mini_entry.S").read_text()
    assert ".section .entry.text" in text and "VARIANT" in text


def test_an_unexpected_outcome_is_reported(demo):
    from dataclasses import replace

    from entrycheck.demo import demo_text

    broken = by_number(demo, 2)
    swapped = tuple(replace(v, findings=broken.findings) if v.variant.number == 1
                    else replace(v, findings=()) if v.variant.number == 3 else v for v in demo.variants)
    bad = replace(demo, variants=swapped)
    assert not bad.as_expected
    assert any("variant 1" in p and "should be safe" in p for p in bad.problems)
    assert any("variant 3" in p and "found nothing" in p for p in bad.problems)
    assert "UNEXPECTED" in demo_text(bad)


def test_trace_replays_the_finding_it_is_given(demo, tmp_path):
    """`trace --finding FILE:N` replays violation N of a check's JSON, not another one: the
    scenario, feature set and injection chain of the replay are violation N's."""
    obj = by_number(demo, 2).object_path
    out = tmp_path / "check.json"
    cli_ = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    subprocess.run(cli_ + ["check", str(obj), "--depth", "1", "--features", "pti,pcid", "--workers", "1",
                           "--json", str(out)], capture_output=True, check=False)
    violations = json.loads(out.read_text())["violations"]
    chosen = [n for n, v in enumerate(violations)
              if (v["scenario"], v["injections"]) != (violations[0]["scenario"], violations[0]["injections"])]
    assert chosen, "the check needs violations with different paths"
    for n in (0, chosen[0], chosen[-1]):
        proc = subprocess.run(cli_ + ["trace", str(obj), "--finding", f"{out}:{n}", "--json", "-"],
                              capture_output=True, text=True, check=True)
        replay = json.loads(proc.stdout)
        v = violations[n]
        assert (replay["scenario"], replay["features"], replay["injections"]) == \
            (v["scenario"], v["features"], v["injections"]), n
        assert v["invariant"] in {x["invariant"] for x in replay["violations"]}
