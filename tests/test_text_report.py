"""The text report of a check, on results made by hand (no kernel): what a maintainer reads first."""

from __future__ import annotations

from dataclasses import replace

from entrycheck.explore.check import CheckConfig, CheckResult
from entrycheck.explore.paths import Finding
from entrycheck.explore.preconditions import Precondition, Reach
from entrycheck.image.features import FeatureSet
from entrycheck.machine.events import Injection
from entrycheck.machine.model import Vector
from entrycheck.report.text import check_summary

FS = FeatureSet.parse("pti,pcid")


def finding(invariant: str, reach: Reach, site: str) -> Finding:
    pre = (Precondition(Reach.UNPRIVILEGED, "entry", "the entry of scenario syscall"),
           Precondition(reach, "nmi", "an NMI at that instruction"))
    return Finding(invariant, "syscall", FS, (), (Injection(Vector.NMI, site, 1),), site, f"{invariant} at {site}",
                   (), pre)


def test_root_causes_come_first_then_the_easiest_to_reach() -> None:
    """An ist-reentered root cause leads even when a symptom-free finding is easier to reach;
    the others follow easiest first."""
    easy = finding("stale-tlb", Reach.UNPRIVILEGED, "paranoid_exit+0x10")
    hard = finding("context-not-restored", Reach.MACHINE_CHECK, "paranoid_exit+0x20")
    root = finding("ist-reentered", Reach.ROOT, "asm_exc_nmi+0x30")
    result = CheckResult((FS,), CheckConfig(scenarios=("syscall",), feature_sets=(FS,)),
                         findings=[hard, easy, root], all_findings=3, runs=3)
    text = check_summary(result, target="entry_64.o", kernel_version=None)
    # each entry is "INVARIANT: what one fix changes (...)"
    headers = [line.split(":")[0] for line in text.splitlines()
               if line.split(":")[0] in ("ist-reentered", "stale-tlb", "context-not-restored")]
    assert headers == ["ist-reentered", "stale-tlb", "context-not-restored"]


def test_the_nmi_after_verw_corner_case_is_one_group_and_not_a_thing_to_fix() -> None:
    """Returns to user mode after an NMI that followed the exit's VERW, at three exits, are one
    corner case entry_64.S leaves on purpose: one group, counted apart from the things to fix;
    a VERW missing without that NMI stays a thing to fix per exit."""
    from entrycheck.explore.fixes import VERW_CORNER_CASE, group, to_fix
    from entrycheck.props.invariants import VERW_AFTER_NMI

    corner = [Finding("verw-missing", "syscall", FS, (), (Injection(Vector.NMI, s, 1),), s,
                      "SYSRET to user mode after an exception ...: " + VERW_AFTER_NMI, (), ())
              for s in ("entry_SYSRETQ_unsafe_stack+0xa", "native_irq_return_iret", "entry_SYSRETL_compat+0x58")]
    plain = finding("verw-missing", Reach.UNPRIVILEGED, "asm_fred_exit_user+0x10")
    groups = group(corner + [plain])
    assert [g.mechanism for g in groups][0] == VERW_CORNER_CASE and len(groups) == 2
    assert groups[0].documented == VERW_AFTER_NMI and not groups[1].documented
    assert to_fix(groups) == 1
    result = CheckResult((FS,), CheckConfig(scenarios=("syscall",), feature_sets=(FS,)),
                         findings=corner + [plain], all_findings=4, runs=4)
    text = " ".join(check_summary(result, target="entry_64.o", kernel_version=None).split())
    assert "4 distinct (4 before deduplication), 1 thing(s) to fix, 1 corner case(s) the kernel leaves on purpose" \
        in text
    assert "not to fix: the NMI return to kernel mode skips CLEAR_CPU_BUFFERS on purpose" in text


def test_a_check_without_speculation_features_says_speculation_was_not_checked() -> None:
    """The model sets hold no CPU bug: the report says what it did not check and how to."""
    root = finding("ist-reentered", Reach.ROOT, "asm_exc_nmi+0x30")
    for sets, said in (((FS,), True), ((FS, FeatureSet.parse("pcid,fsgsbase,bug_swapgs,fence_swapgs_kernel")), False)):
        result = CheckResult(sets, CheckConfig(scenarios=("syscall",), feature_sets=sets),
                             findings=[root], all_findings=1, runs=1)
        text = " ".join(check_summary(result, target="entry_64.o", kernel_version=None).split())
        assert ("not checked: speculation" in text and "--cpu presets" in text) == said, text


def test_mail_subjects_are_a_patch_when_the_fix_is_verified_and_fit_72_columns() -> None:
    from entrycheck.report.mail import _ASM_FIXES, Fix, introduced, subject

    fix = Fix("what", "why", "arch/x86/entry/entry_64_fred.S", "", "", True,
              "Clear CPU buffers before ERETU to user mode")
    assert subject(fix, "verw-missing in asm_fred_exit_user") == \
        "Subject: [PATCH] x86/fred: Clear CPU buffers before ERETU to user mode"
    assert subject(None, "verw-missing in asm_fred_exit_user") == \
        "Subject: [BUG] x86/entry: verw-missing in asm_fred_exit_user"
    for entry in _ASM_FIXES:
        patch = Fix("", "", entry[2], "", "", True, entry[-1])
        assert subject(patch, "x").startswith("Subject: [PATCH] x86/"), entry
    long = subject(None, "verw-missing in entry_SYSRETL_compat_unsafe_stack_and_more", "verw-missing")
    assert long == "Subject: [BUG] x86/entry: verw-missing"
    # Where a class comes from: its site, or one of the data its breakpoints watch.
    fred = [finding("verw-missing", Reach.UNPRIVILEGED, "asm_fred_exit_user+0x10")]
    assert introduced(fred)[0] == "6613d82e617d" and introduced(fred)[2]
    db = Precondition(Reach.ROOT, "db", "a kernel data breakpoint on {} (per-cpu)")
    two = [Finding("ist-reentered", "db-from-user", FS, (), (), "sync_regs+0x4", "m", (),
                   (Precondition(db.reach, "db", db.text.format(name)),)) for name in
           ("cpu_current_top_of_stack", "x86_spec_ctrl_current")]
    commit, why, whole = introduced(two)
    assert commit == "1591584e2e76" and not whole and "For x86_spec_ctrl_current: not known" in why
    assert introduced(two[:1])[2]
    assert introduced([finding("stale-tlb", Reach.UNPRIVILEGED, "asm_fred_exit_user+0x10")]) is None


def test_the_mail_of_the_documented_corner_case_suggests_no_fix() -> None:
    from entrycheck.props.invariants import VERW_AFTER_NMI
    from entrycheck.report.mail import write

    f = Finding("verw-missing", "syscall", FS, (), (Injection(Vector.NMI, "entry_SYSRETQ_unsafe_stack+0xa", 1),),
                "entry_SYSRETQ_unsafe_stack+0xa", "SYSRET to user mode after ...: " + VERW_AFTER_NMI, (), ())
    mail = write([f], target="debian:6.12", kernel_version=None, invariant=None, source_tree=None,
                 source_line=lambda f, at: None)
    flat = " ".join(mail.split())
    assert mail.startswith("Subject: [BUG] x86/entry: verw-missing")
    assert "Suggested fix None: the kernel leaves this on purpose: the NMI return to kernel mode skips" in flat
    assert all(len(line.expandtabs(8)) <= 72 for line in mail.splitlines())


def test_sets_explored_at_depth_0_are_counted_and_marked_apart() -> None:
    """A default check's preset CPUs run at depth 0: the headline counts the sets explored to the
    check's depth, a line says what the others are for, and each is marked in the list."""
    preset = FeatureSet.parse("pcid,fsgsbase,bug_swapgs,fence_swapgs_kernel")
    cfg = CheckConfig(scenarios=("syscall",), feature_sets=(FS, preset), depth=1, paths_only=(preset,),
                      configurations=((str(FS), "zen4", ""), (str(preset), "skylake", "")))
    result = CheckResult((FS, preset), cfg, runs=2)
    text = " ".join(check_summary(result, target="entry_64.o", kernel_version=None).split())
    assert "1 scenarios x 1 feature sets" in text
    assert "and the 1 preset CPUs as they boot at depth 0" in text
    assert f"{preset}: skylake (depth 0)" in text and f"{FS}: zen4 (depth 0)" not in text
    at0 = " ".join(check_summary(CheckResult((FS, preset), replace(cfg, depth=0), runs=2), target="entry_64.o",
                                 kernel_version=None).split())
    assert "1 scenarios x 2 feature sets" in at0 and "(depth 0)" not in at0
