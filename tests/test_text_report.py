"""The text report of a check, on results made by hand (no kernel): what a maintainer reads first."""

from __future__ import annotations

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
