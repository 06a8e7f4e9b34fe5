"""The kernel's own noinstr C, run past the entry assembly (the default), against the contract
stubs that stood in for it (--c-stubs).

The C mutants (tests/mutants.py C_MUTANTS) re-create bugs of that C from the kernel's history;
each must be caught by `diff` of the mutant against the pristine build with the C running, and
each went unseen while stubs stood in for the C.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mutants import C_MUTANTS, Mutant, build_mutant

from entrycheck.explore.check import STOPPED_DONE, CheckConfig
from entrycheck.explore.diff import SiteMap, diff_results
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.guards import KERNEL_BREAKPOINT_CAPABILITY, kernel_breakpoint_capability
from entrycheck.kernel.kconfig import parse_request
from entrycheck.kernel.targets import resolve_target
from entrycheck.kernel.targets import KernelBuild
from entrycheck.session import object_ref, run_check

CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]


def _new_violations(pristine: KernelBuild, mutant_build: KernelBuild, mutant: Mutant, c_stubs: bool) -> list:
    old, new = object_ref(pristine, c_stubs=c_stubs), object_ref(mutant_build, c_stubs=c_stubs)
    cfg = mutant.config()
    a, b = run_check(old, cfg, workers=1), run_check(new, cfg, workers=1)
    for r in (a, b):
        assert not r.errors and r.stopped_because == STOPPED_DONE and r.runs > 0, r.errors
    fs = cfg.feature_sets[0]
    sites = SiteMap(old.load().image(fs), new.load().image(fs))
    return [f for f in diff_results(a, b, sites).new_violations if f.invariant == mutant.invariant]


@pytest.mark.kernel
@pytest.mark.parametrize("mutant", C_MUTANTS, ids=[m.name for m in C_MUTANTS])
def test_a_bug_in_the_noinstr_c_is_caught_only_when_the_c_runs(
        built_kernels: dict[str, KernelBuild], copy_tree: Callable[[Path, Path], Path], mutant: Mutant) -> None:
    pristine = built_kernels[mutant.kernel] if not mutant.kconfig else \
        resolve_target(f"debian:{mutant.kernel}", request=parse_request(None, mutant.kconfig))
    build = build_mutant(mutant, pristine, copy_tree)
    assert build.noinstr_object is not None and pristine.noinstr_object is not None
    caught = _new_violations(pristine, build, mutant, c_stubs=False)
    assert caught, f"{mutant.name} ({mutant.description}) escaped {mutant.invariant} with the C running"
    if mutant.name == "c-bad-iret-frame-not-copied":     # fixup_bad_iret's BUG_ON(!user_mode(new_stack))
        assert any(f.message.startswith("BUG at arch/x86/kernel/traps.c:") for f in caught), caught
    assert not _new_violations(pristine, build, mutant, c_stubs=True), \
        f"{mutant.name}: the contract stubs saw it too, so it proves nothing about running the C"


@pytest.mark.kernel
def test_review_of_a_patch_to_the_c_runs_it_and_catches_the_bug(kernel612: KernelBuild, tmp_path: Path) -> None:
    """`review` of a patch that breaks do_syscall_64's SYSRET verdict (CVE-2012-0217's check, C in
    6.12): the patched C runs, the hunk is reported as run, and the new violation fails the review."""
    mutant = next(m for m in C_MUTANTS if m.name == "c-sysret-to-noncanonical")
    assert kernel612.source_tree is not None
    original = (kernel612.source_tree / mutant.file).read_text()
    patch = tmp_path / "sysret.patch"
    patch.write_text("".join(difflib.unified_diff(
        original.splitlines(keepends=True), mutant.mutated_text(kernel612.source_tree).splitlines(keepends=True),
        f"a/{mutant.file}", f"b/{mutant.file}")))
    out = tmp_path / "review.json"
    p = subprocess.run(CLI + ["review", "debian:6.12", "--patch", str(patch), "--depth", "1", "--scenarios", "syscall",
                              "--features", "none", "--vectors", "nmi", "--json", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    new = [v for v in doc["new_violations"] if v["invariant"] == "emulation-fault"]
    assert any("non-canonical" in v["message"] and "ret_rip=0x800000000000" in v["scenario"] for v in new), new
    hunks = doc["patch"]["hunks"]
    assert hunks and all(h["verdict"] == "ran" for h in hunks), hunks


@pytest.mark.kernel
@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_c_stubs_gives_the_stub_model_and_the_default_runs_the_c(built_kernels: dict[str, KernelBuild],
                                                                  series: str, tmp_path: Path) -> None:
    """--c-stubs is the model from before the C ran (the same findings as the stub ObjectRef);
    without it the check runs the build's noinstr C (its functions are on the traces)."""
    build = built_kernels[series]
    args = ["--depth", "1", "--features", "pti,pcid", "--scenarios", "syscall,nmi-from-kernel,db-from-user",
            "--workers", "1"]
    stubs, c = tmp_path / "stubs.json", tmp_path / "c.json"
    for extra, path in ((["--c-stubs"], stubs), ([], c)):
        p = subprocess.run(CLI + ["check", f"debian:{series}", *args, *extra, "--json", str(path)],
                           capture_output=True, text=True)
        assert p.returncode in (0, 1), p.stderr[-2000:]
    cfg = CheckConfig(scenarios=("syscall", "nmi-from-kernel", "db-from-user"),
                      feature_sets=(FeatureSet.parse("pti,pcid"),), depth=1)
    ref = run_check(object_ref(build, c_stubs=True), cfg, workers=1)
    doc = json.loads(stubs.read_text())
    assert doc["runs"] == ref.runs
    assert sorted((f["invariant"], f["site"]) for f in doc["violations"]) == \
        sorted((f.invariant, f.site) for f in ref.findings)
    c_doc = json.loads(c.read_text())
    assert c_doc["runs"] != doc["runs"]
    # The #DB from user mode: sync_regs' instructions are where the C-mode root cause shows.
    c_sites = {f["site"] for f in c_doc["violations"] if f["invariant"] == "ist-reentered"}
    assert any(s.startswith("sync_regs+") for s in c_sites), c_sites
    assert {f["site"] for f in doc["violations"] if f["invariant"] == "ist-reentered"} >= {"sync_regs"}


@pytest.mark.kernel
def test_who_may_set_a_kernel_breakpoint_is_read_from_the_tree(built_kernels: dict[str, KernelBuild]) -> None:
    for build in built_kernels.values():
        assert build.source_tree is not None
        assert kernel_breakpoint_capability(build.source_tree) == KERNEL_BREAKPOINT_CAPABILITY


@pytest.mark.kernel
def test_the_noinstr_c_of_6_1_int80_reads_the_booted_apic(kernel61: KernelBuild) -> None:
    """6.1's do_int80_emulation asks the APIC driver (apic->read through a retpoline thunk)
    whether vector 0x80 is in service; the booted table gives that driver, and the path returns."""
    cfg = CheckConfig(scenarios=("int80",), feature_sets=(FeatureSet.parse("none"),), depth=0)
    r = run_check(object_ref(kernel61), cfg, workers=1)
    assert not r.errors and r.runs == 1
    assert not r.findings, [f.message for f in r.findings]


def test_trace_steps_through_the_c_with_its_source_lines(kernel61_debug: KernelBuild) -> None:
    """With line info (debian:X.Y+debug keeps the C's DWARF), trace shows the C's own lines."""
    proc = subprocess.run(CLI + ["trace", "debian:6.1+debug", "--scenario", "db-from-kernel", "--features", "pti"],
                          capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    assert "# arch/x86/kernel/traps.c:" in proc.stdout and " exc_debug+" in proc.stdout
    assert "# arch/x86/entry/entry_64.S:" in proc.stdout


def test_the_c_mutant_table_is_well_formed() -> None:
    from entrycheck.explore.scenarios import SCENARIOS
    from entrycheck.props.invariants import INVARIANTS

    assert len({m.name for m in C_MUTANTS}) == len(C_MUTANTS) >= 4
    for m in C_MUTANTS:
        assert m.invariant in INVARIANTS and m.file.endswith(".c"), m.name
        assert {s.split("[")[0] for s in m.scenarios} <= set(SCENARIOS), m.name
        assert m.config().depth in (0, 1), m.name
    assert "cr2-clobbered" in {m.invariant for m in C_MUTANTS}
