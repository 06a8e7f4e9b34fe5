"""Speculation hygiene: swapgs-unfenced (mispredicted branches followed), verw-missing and
ret-before-untrain, switched on by the features of the mitigations they check.

The model rules are tested without a kernel; the checks on real 6.1/6.12 code: each
mutant of SPEC_MUTANTS (a deleted or moved mitigation) is found by `diff` under a
feature set that enables that mitigation and not under one that leaves it off, and the
stock kernels under every CPU preset have only the findings explained here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mutants import SPEC_MUTANTS, Mutant
from test_mutants import Suite

from entrycheck.cli import cli
from entrycheck.errors import InputError
from entrycheck.explore.check import CheckConfig
from entrycheck.session import run_check
from entrycheck.image.cpus import PRESETS, preset_sets
from entrycheck.image.features import FeatureSet, all_model_feature_sets
from entrycheck.kernel.targets import KernelBuild
from entrycheck.kernelabi.linux import spec_config
from entrycheck.machine import model
from entrycheck.props.invariants import INVARIANTS, VERW_AFTER_NMI

SPEC_INVARIANTS = ("swapgs-unfenced", "verw-missing", "ret-before-untrain")
CPU = model.CpuState(cr3=0x1000, pcide=False, fsgsbase=True, cpl=0, ss=0x18, gs_base=0, kernel_gs_base=0,
                     spec_ctrl=0, mcg_status=0, nmi_blocked=False, nmi_pending=False, stale=frozenset())


def test_the_default_feature_sets_check_no_speculation() -> None:
    """The 16 model sets (pti, pcid, fsgsbase, kernel_ibrs) switch none of it on: no spec bits, no
    mispredicted branches, no RET watching, so a default check costs what it did."""
    assert all(spec_config(fs.names) is None for fs in all_model_feature_sets())


def test_each_check_follows_its_mitigation() -> None:
    cfg = spec_config(["fence_swapgs_kernel"])
    assert cfg.swapgs and not cfg.swapgs_speculates and not cfg.tracks and not cfg.branches
    assert spec_config(["fence_swapgs_kernel", "bug_swapgs"]).swapgs_speculates
    assert spec_config(["fence_swapgs_user"]).swapgs_speculates
    assert spec_config(["clear_cpu_buf"]).verw and not spec_config(["clear_cpu_buf"]).branches
    assert spec_config(["unret"]).untrain and spec_config(["entry_ibpb"]).untrain
    assert spec_config(["clear_bhb_loop"]).bhb
    assert not spec_config(["unret"]).ibrs
    assert spec_config(["kernel_ibrs", "clear_cpu_buf"]).ibrs      # an Intel preset's IBRS


def test_an_entry_resets_what_the_next_return_needs() -> None:
    done = CPU.but(spec=model.SPEC_KERNEL | model.SPEC_VERW)
    from_user = model.entered(done, from_user=True, system_call=True)
    assert from_user.spec == model.SPEC_SYSCALL
    nested = model.entered(done, from_user=False, system_call=False)
    assert not nested.spec & model.SPEC_VERW and nested.spec & model.SPEC_VERW_UNDONE
    assert nested.spec & model.SPEC_KERNEL == model.SPEC_KERNEL       # predictors stay untrained
    quiet = CPU.but(spec=model.SPEC_KERNEL)
    assert model.entered(quiet, from_user=False, system_call=False) is quiet


def test_what_a_ret_an_indirect_branch_and_a_c_call_wait_for() -> None:
    cfg = model.SpecConfig(untrain=True, ibrs=True, bhb=True)
    fresh = CPU.but(spec=model.SPEC_SYSCALL)
    assert model.unmitigated(fresh, cfg, "ret", ibrs_on=False) == ("IBRS_ENTER", "UNTRAIN_RET")
    assert model.unmitigated(fresh, cfg, "indirect", ibrs_on=True) == ("UNTRAIN_RET", "CLEAR_BRANCH_HISTORY")
    assert model.unmitigated(fresh, cfg, "c", ibrs_on=False) == ("UNTRAIN_RET", "CLEAR_BRANCH_HISTORY")
    done = fresh.but(spec=fresh.spec | model.SPEC_UNTRAINED | model.SPEC_BHB)
    assert model.unmitigated(done, cfg, "indirect", ibrs_on=True) == ()
    not_a_syscall = CPU.but(spec=model.SPEC_UNTRAINED)
    assert model.unmitigated(not_a_syscall, cfg, "indirect", ibrs_on=True) == ()
    assert model.unmitigated(fresh.but(cpl=3), cfg, "ret", ibrs_on=False) == ()


def test_cpu_presets() -> None:
    assert "pti" in PRESETS["skylake"].features and "fence_swapgs_user" not in PRESETS["skylake"].features
    assert "fence_swapgs_user" in PRESETS["cascadelake"].features and "pti" not in PRESETS["cascadelake"].features
    assert {"unret", "rethunk"} <= set(PRESETS["zen2"].features.names)
    assert "bug_swapgs" not in PRESETS["zen3"].features             # AMD does not speculate SWAPGS
    assert preset_sets(("zen2,skylake", "zen2")) == (PRESETS["zen2"].features, PRESETS["skylake"].features)
    with pytest.raises(InputError, match="unknown CPU preset .pentium.; choose from sandybridge, skylake"):
        preset_sets(("pentium",))
    for p in PRESETS.values():
        assert spec_config(p.features.names) is not None, p.name


def test_explain_cites_the_commits() -> None:
    for name, commits in (("swapgs-unfenced", ("18ec54fdd6d1", "c07e45553da1", "1367afaa2ee9")),
                          ("verw-missing", ("3c7501722e6b",)), ("ret-before-untrain", ("2dbb887e875b", "7390db8aea0d"))):
        out = CliRunner().invoke(cli, ["check", "--explain", name])
        assert out.exit_code == 0, out.output
        for c in commits:
            assert c in out.output, (name, c)
        assert "Checked when the feature set has" in out.output
    assert set(SPEC_INVARIANTS) <= set(INVARIANTS)


def test_unknown_cpu_preset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "check",
                        str(tmp_path / "x.o"), "--cpu", "pentium"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown CPU preset 'pentium'" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def _fixture_findings(tmp_path: Path, features: str, depth: int = 2):
    """The demo's hand-written entry fixture (GNU as at test time), whose paranoid_entry has the
    conditional SWAPGS of Linux before 18ec54fdd6d1: no LFENCE on either side."""
    from entrycheck.demo.run import VARIANTS, assemble, find_assembler
    from entrycheck.session import ObjectRef

    obj = assemble(find_assembler(), VARIANTS[0], tmp_path)
    result = run_check(ObjectRef(obj, None, None),
                       CheckConfig(scenarios=("nmi-from-kernel", "syscall"), feature_sets=(FeatureSet.parse(features),),
                                   depth=depth, user_values=False))
    return result, {(f.scenario, tuple(i.spec() for i in f.injections), f.site) for f in result.findings
                    if f.invariant == "swapgs-unfenced"}


def test_an_unfenced_conditional_swapgs_is_found_both_ways(tmp_path: Path) -> None:
    """Skipped SWAPGS: an NMI/#MC/#DB in the SYSCALL gap (user GSBASE) whose 'js' in paranoid_entry is
    mispredicted reaches its C handler with the user GSBASE, on any CPU with the kernel fence.
    Speculated SWAPGS: an NMI from kernel mode whose kernel-GSBASE test is mispredicted swaps the user
    GSBASE in, only on a CPU that speculates SWAPGS (bug_swapgs).  Without the features, nothing is
    followed."""
    plain, found = _fixture_findings(tmp_path, "none")
    assert plain.speculated == 0 and not found
    kernel, found = _fixture_findings(tmp_path, "fence_swapgs_kernel")
    assert kernel.speculated > 0 and kernel.runs == plain.runs
    assert ("syscall", ("nmi@entry_SYSCALL_64", "mispredict@paranoid_entry+0x46"), "exc_nmi") in found
    assert all(s == "syscall" for s, _, _ in found), found
    _, found = _fixture_findings(tmp_path, "fence_swapgs_kernel,bug_swapgs")
    assert ("nmi-from-kernel", ("mispredict@paranoid_entry+0x46",), "exc_nmi") in found


def test_depth_0_still_follows_the_paths_mispredicted_branches(tmp_path: Path) -> None:
    """A mispredicted branch is not an injection: at depth 0 the scenario's own path is still
    followed down both sides of each conditional branch (and nothing is injected)."""
    result, found = _fixture_findings(tmp_path, "fence_swapgs_kernel,bug_swapgs", depth=0)
    assert result.speculated > 0
    assert ("nmi-from-kernel", ("mispredict@paranoid_entry+0x46",), "exc_nmi") in found
    assert all(len(i) == 1 for _, i, _ in found), found
    assert len(result.paths) == len(result.config.scenarios)


def test_a_reproducer_loads_the_image_the_check_ran(tmp_path: Path) -> None:
    """A bare object numbered by --tree's cpufeatures.h: the reproduce line check prints carries
    --tree, and running it replays the finding (without it the trace would use other numbers)."""
    from entrycheck.demo.run import VARIANTS, assemble, find_assembler
    from entrycheck.image.features import builtin_table

    obj = assemble(find_assembler(), VARIANTS[0], tmp_path)
    tree = tmp_path / "tree with space"
    (tree / "arch/x86/entry").mkdir(parents=True)
    (tree / "arch/x86/include/asm").mkdir(parents=True)
    (tree / "Makefile").write_text("")
    (tree / "arch/x86/entry/entry_64.S").write_text("")
    defines = ["#define NCAPINTS\t\t\t21"] + [
        f"#define X86_BUG_{name[4:].upper()}\tX86_BUG({number - 21 * 32})" if name.startswith("bug_")
        else f"#define X86_FEATURE_{name.upper()}\t({number // 32}*32+{number % 32})"
        for name, number in builtin_table().numbers.items()]
    (tree / "arch/x86/include/asm/cpufeatures.h").write_text("\n".join(defines) + "\n")
    r = CliRunner().invoke(cli, ["check", str(obj), "--tree", str(tree), "--features", "fence_swapgs_kernel",
                                 "--scenarios", "syscall", "--vectors", "nmi", "--depth", "2", "--no-user-values"])
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    at = lines.index("    reproduce:") + 1
    command = [lines[at]]
    while command[-1].endswith("\\"):             # pasted as printed: a shell joins the lines
        at += 1
        command.append(lines[at])
    argv = shlex.split("\n".join(command).replace("\\\n", ""))
    assert argv[:2] == ["entrycheck", "trace"] and argv[argv.index("--tree") + 1] == str(tree), command
    t = CliRunner().invoke(cli, argv[1:])
    assert t.exit_code == 0 and "swapgs-unfenced at " in t.output, t.output


# ---- real kernels -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite(built_kernels: dict[str, KernelBuild], copy_tree) -> Suite:
    return Suite(built_kernels, copy_tree)


def _diff(suite, mutant: Mutant, features: str, tmp_path: Path) -> tuple[int, list[dict], str]:
    out = tmp_path / f"diff-{features.replace(',', '_')}.json"
    args = ["--depth", str(mutant.depth), "--scenarios", ",".join(mutant.scenarios), "--features", features,
            "--vectors", ",".join(mutant.vectors), "--json", str(out), "--tree", str(suite.kernel(mutant).source_tree)]
    p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "diff",
                        str(suite.kernel(mutant).object_path), str(suite.build(mutant).object_path), *args],
                       capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stdout[-2000:] + p.stderr
    new = [v for v in json.loads(out.read_text())["new_violations"] if v["invariant"] == mutant.invariant]
    return p.returncode, new, p.stdout[-2000:]


@pytest.mark.kernel
@pytest.mark.parametrize("mutant", SPEC_MUTANTS, ids=[m.name for m in SPEC_MUTANTS])
def test_a_mitigation_lost_is_found_only_where_it_is_on(suite, mutant: Mutant, tmp_path: Path) -> None:
    rc, new, text = _diff(suite, mutant, mutant.features[0], tmp_path)
    assert rc == 1 and new, f"{mutant.name} under {mutant.features[0]}: no new {mutant.invariant}\n{text}"
    if mutant.invariant == "swapgs-unfenced":
        assert all(any(j["vector"] == "mispredict" for j in v["injections"]) for v in new), new
    rc, new, text = _diff(suite, mutant, mutant.off[0], tmp_path)
    assert not new, f"{mutant.name} under {mutant.off[0]} (the mitigation off) reported {new[0]['message']}"


def explained(v: dict) -> str | None:
    """Why a finding on a stock kernel under a CPU preset is known, or None."""
    if v["invariant"] == "verw-missing" and VERW_AFTER_NMI in v["message"]:
        return "NMI/#MC/#DB after the exit's VERW: the kernel skips CLEAR_CPU_BUFFERS there on purpose"
    if v["invariant"] == "swapgs-unfenced" and v["site"].startswith("native_irq_return_ldt"):
        return "espfix64 exit: a conditional SWAPGS with no fence before its per-cpu load (without PTI)"
    if v["invariant"] == "ist-reentered" and [j["vector"] for j in v["injections"]][-1:] == ["db"]:
        # A #DB still on its IST stack reads data within_cpu_entry() does not refuse: a breakpoint
        # there traps into a second #DB on the same stack.
        watched = [p["text"] for p in v["preconditions"] if p["kind"] == "db"]
        if len(watched) == 1 and watched[0].startswith(tuple(f"a kernel data breakpoint on {d} (per-cpu"
                                                             for d in UNREFUSED_ON_IST)
                                                       + ("a kernel data breakpoint on task stack ",)):
            return "#DB on the #DB IST stack through data within_cpu_entry() does not refuse"
    return None


# Data the entry code (and sync_regs) reads on the #DB IST stack that hw_breakpoint.c's
# within_cpu_entry() does not refuse: IBRS_ENTER's x86_spec_ctrl_current, the top of stack (6.12's
# const_pcpu_hot alias of pcpu_hot), 6.1 exc_debug's stack canary, and the task stack sync_regs
# copies the frame to (without FSGSBASE, Sandy Bridge, these are the first such reads on the path).
UNREFUSED_ON_IST = ("x86_spec_ctrl_current", "cpu_current_top_of_stack", "pcpu_hot", "const_pcpu_hot+0x18",
                    "fixed_percpu_data+0x28")


@pytest.mark.kernel
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_stock_kernels_under_every_cpu_preset_are_explained(kernel: str, built_kernels: dict[str, KernelBuild],
                                                            tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "check",
                        str(built_kernels[kernel].object_path), "--tree", str(built_kernels[kernel].source_tree),
                        "--cpu", ",".join(PRESETS), "--depth", "1", "--json", str(out)], capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stdout[-2000:] + p.stderr
    doc = json.loads(out.read_text())
    assert doc["mispredicted_branches"] > 1000 and not doc["errors"]
    unexplained = [v for v in doc["violations"] if explained(v) is None]
    assert not unexplained, [(v["invariant"], v["scenario"], v["features"], v["site"], v["message"])
                             for v in unexplained[:5]]
    found = {v["invariant"] for v in doc["violations"]}
    assert "verw-missing" in found                     # the NMI-after-VERW corner case is real and reported


@pytest.mark.kernel
def test_speculation_costs_nothing_without_its_features(built_kernels: dict[str, KernelBuild]) -> None:
    """Under the 16 model sets no branch is followed and no spec bit is kept; a preset follows them."""
    from mutants import object_ref

    ref = object_ref(built_kernels["6.12"])
    plain = run_check(ref, CheckConfig(scenarios=("syscall", "exception-from-user"),
                                       feature_sets=(FeatureSet.parse("pti,pcid"),), depth=1), workers=1)
    spec = run_check(ref, CheckConfig(scenarios=("syscall", "exception-from-user"),
                                      feature_sets=(FeatureSet.parse("pti,pcid,fence_swapgs_kernel"),), depth=1),
                     workers=1)
    assert plain.speculated == 0 and spec.speculated > 0
    assert plain.runs == spec.runs                         # the same paths: mispredicted ones are not runs


@pytest.mark.kernel
def test_trace_replays_a_mispredicted_branch(suite, tmp_path: Path) -> None:
    """A swapgs-unfenced finding replays with `trace --finding`: the branch runs, then its other
    side speculatively up to the C call with the user GSBASE; on the pristine kernel the same
    injection ends at FENCE_SWAPGS_KERNEL_ENTRY's LFENCE."""
    mutant = next(m for m in SPEC_MUTANTS if m.name == "error-entry-kernel-gs-unfenced")
    cli_ = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    out = tmp_path / "check.json"
    mutated = str(suite.build(mutant).object_path)
    p = subprocess.run(cli_ + ["check", mutated, "--features", mutant.features[0], "--scenarios", "exception-from-user",
                               "--vectors", "nmi", "--depth", "1", "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    doc = json.loads(out.read_text())
    n, finding = next((n, v) for n, v in enumerate(doc["violations"]) if v["invariant"] == "swapgs-unfenced")
    p = subprocess.run(cli_ + ["trace", mutated, "--finding", f"{out}:{n}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr          # trace shows; only check and diff judge
    assert "mispredicted: speculatively on at" in p.stdout and "swapgs-unfenced at " in p.stdout
    site = next(i["at"] for i in finding["injections"] if i["vector"] == "mispredict")
    pristine = str(suite.kernel(mutant).object_path)
    p = subprocess.run(cli_ + ["trace", pristine, "--features", mutant.features[0], "--scenario", "exception-from-user",
                               "--inject", f"mispredict@{site}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr
    assert ": LFENCE)" in p.stdout and "violations: none" in p.stdout
    p = subprocess.run(cli_ + ["trace", pristine, "--scenario", "exception-from-user", "--inject",
                               "mispredict@error_entry"], capture_output=True, text=True)
    assert p.returncode == 2 and "not a conditional branch" in p.stderr


@pytest.mark.kernel
def test_the_espfix_fence_fix_is_built_and_verified_before_the_mail_suggests_it(kernel612) -> None:
    """Cascade Lake (no PTI, SWAPGS speculates): the espfix64 exit's SWAPGS class.  The mail's
    fix adds FENCE_SWAPGS_USER_ENTRY after it; the tree is built with it and checked again."""
    p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "check", "debian:6.12",
                        "--cpu", "cascadelake", "--depth", "1", "--scenarios", "irq-from-kernel", "--format", "mail",
                        "--class", "swapgs-unfenced"], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr[-2000:]
    mail = p.stdout
    assert mail.splitlines()[0] == "Subject: [PATCH] x86/entry/64: Fence SWAPGS in the espfix64 return"
    assert "\nFixes: 18ec54fdd6d1\n" in mail
    assert all(len(line.expandtabs(8)) <= 72 for line in mail.splitlines()), \
        [line for line in mail.splitlines() if len(line.expandtabs(8)) > 72]
    m = re.search(r"Verified by entrycheck with the change applied: (\d+) of the (\d+) findings fixed, (\d+) new",
                  " ".join(mail.split()))
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0 and m.group(3) == "0", mail
    assert "+\tFENCE_SWAPGS_USER_ENTRY" in mail and "espfix64: user space returns to a 16-bit SS" in " ".join(
        mail.split())
