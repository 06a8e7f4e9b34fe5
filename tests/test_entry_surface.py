"""The whole entry surface on real kernels: compat entry, FRED, SEV-ES #VC, and coverage."""

from __future__ import annotations

import pytest

from entrycheck.explore.check import CheckConfig
from entrycheck.session import ObjectRef, object_ref, run_check
from entrycheck.explore.coverage import COPY, coverage
from entrycheck.explore.replay import trace
from entrycheck.explore.scenarios import scenario
from entrycheck.image import load_build
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.kconfig import parse_request
from entrycheck.kernel.targets import KernelBuild, resolve_target
from entrycheck.kernelabi.world import build_world
from entrycheck.machine.events import Delivered, Fault
from entrycheck.machine.model import Vector

pytestmark = pytest.mark.kernel


def ref(build: KernelBuild) -> ObjectRef:
    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)


@pytest.fixture(scope="module")
def fred612() -> KernelBuild:
    return resolve_target("debian:6.12", request=parse_request(None, ["X86_FRED=y"]))


@pytest.fixture(scope="module")
def sev612() -> KernelBuild:
    return resolve_target("debian:6.12", request=parse_request(None, ["AMD_MEM_ENCRYPT=y"]))


def world_of(build: KernelBuild, features: str):
    return build_world(load_build(build).image(FeatureSet.parse(features)))


# --------------------------------------------------------------------------- compat entry


@pytest.mark.parametrize("name,how", [("sysenter", "SYSRETL to compat mode"), ("syscall32", "SYSRETL to compat mode"),
                                      ("int80", "IRET to user mode")])
def test_compat_entries_run_and_return_to_compat_mode(debian_kernel: KernelBuild, name: str, how: str) -> None:
    t = trace(world_of(debian_kernel, "pti,pcid"), scenario(name), ())
    assert (t.outcome.value, t.reason, t.violations) == ("returned", how, ())
    assert t.final_cpu.cpl == 3 and t.final_cpu.compat


def test_sysenter_with_tf_single_steps_the_sysenter_code_only(debian_kernel: KernelBuild) -> None:
    world = world_of(debian_kernel, "pti,pcid")
    t = trace(world, scenario("sysenter[rflags=0x346]"), ())
    steps = [e for e in t.events if isinstance(e, Delivered) and e.single_step]
    start, end = world.sysenter_range
    assert len(steps) > 10 and all(start <= e.frame.rip < end + 8 for e in steps)
    # TF is still set in the saved flags, so do_SYSENTER_32's verdict sends it back through IRET.
    assert (t.outcome.value, t.reason, t.violations) == ("returned", "IRET to user mode", ())


# --------------------------------------------------------------------------- FRED


def test_fred_build_is_clean_with_fred(fred612: KernelBuild) -> None:
    assert [p.name for p in fred612.parts][-1] == "entry_64_fred.o"
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("fred"),), depth=1)
    result = run_check(ref(fred612), cfg, workers=2)
    assert result.stopped_because == "done" and result.runs > 1000
    assert result.findings == [], [(f.invariant, f.scenario, f.site, f.message) for f in result.findings]
    cover = {c.name: c for c in coverage(load_build(fred612).image(FeatureSet.parse("")), fred612.parts,
                                         frozenset().union(*result.covered.values()), (True, False))}
    assert cover["entry_64_fred.o"].percent == 100.0 and cover["entry_64.o"].covered == 0


def test_a_fred_build_booted_without_fred_puts_pt_regs_below_the_padding(fred612: KernelBuild,
                                                                         kernel612: KernelBuild) -> None:
    """CONFIG_X86_FRED reserves two words at the task stack's end (thread_info.h); the IDT entries
    put pt_regs below them, where arch_enter_from_user_mode() checks it.  The padding the world
    uses is the tree's, with and without FRED built."""
    import re

    from entrycheck.kernelabi.linux import stack_padding

    text = (fred612.source_tree / "arch/x86/include/asm/thread_info.h").read_text()
    x86_64 = text[text.index("#else /* x86-64 */"):]
    m = re.search(r"# ifdef CONFIG_X86_FRED\s+#\s*define TOP_OF_KERNEL_STACK_PADDING \((\d+) \* (\d+)\)\s+# else\s+"
                  r"#\s*define TOP_OF_KERNEL_STACK_PADDING 0", x86_64)
    assert m, x86_64[:400]
    assert stack_padding(load_build(fred612).symbols) == int(m.group(1)) * int(m.group(2))
    assert stack_padding(load_build(kernel612).symbols) == 0
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("pti,pcid"),), scenarios=("syscall", "exception-from-user"),
                      depth=0)
    result = run_check(object_ref(fred612), cfg, workers=1)      # the noinstr C runs: its WARNs are checked
    assert result.findings == [], [(f.invariant, f.scenario, f.site, f.message) for f in result.findings]


def test_fred_with_pti_reaches_kernel_memory_with_the_user_page_tables(fred612: KernelBuild) -> None:
    """932d922285ef disables FRED when PTI is forced on: the FRED entry never switches CR3."""
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("fred,pti"),), scenarios=("syscall", "irq-from-user"), depth=0)
    result = run_check(ref(fred612), cfg, workers=1)
    found = [f for f in result.findings if f.invariant == "kernel-memory-under-user-cr3"]
    assert found and all(f.site == "asm_fred_entrypoint_user" for f in found)
    t = trace(world_of(fred612, "fred,pti"), scenario("syscall"), ())
    fault = next(e for e in t.events if isinstance(e, Fault))
    assert "under the user CR3" in fault.message and ".noinstr.text" in fault.message


def test_a_nested_event_at_the_same_fred_level_keeps_the_outer_frame(fred612: KernelBuild) -> None:
    """An #MC inside the NMI handler (both level 2) goes below the NMI's frame, not over it."""
    world = world_of(fred612, "fred")
    from entrycheck.explore.replay import parse_injection

    inj = parse_injection("mc@asm_fred_entrypoint_kernel+0xf", world.image)
    t = trace(world, scenario("nmi-from-kernel"), (inj,))
    nmi, mc = [e for e in t.events if isinstance(e, Delivered)][:2]
    assert (nmi.vector, mc.vector) == (Vector.NMI, Vector.MC)
    assert mc.stack + 64 <= nmi.stack            # the #MC's 8 words lie wholly below the NMI's
    assert t.violations == () and t.outcome.value == "returned"


# --------------------------------------------------------------------------- SEV-ES #VC


def test_vc_scenarios_run_at_depth_2_without_findings(sev612: KernelBuild) -> None:
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("sev_es"), FeatureSet.parse("sev_es,pti,pcid")),
                      scenarios=("vc-from-kernel", "vc-from-user", "syscall"), depth=2,
                      vectors=(Vector.NMI, Vector.MC, Vector.DB, Vector.VC))
    result = run_check(ref(sev612), cfg, workers=2)
    assert result.stopped_because == "done" and result.runs > 10000
    assert result.findings == [], [(f.invariant, f.scenario, f.site) for f in result.findings]


def test_vc_is_injected_only_before_instructions_that_raise_it(sev612: KernelBuild) -> None:
    """Under kernel_ibrs the #VC handler's own IBRS_ENTER writes SPEC_CTRL on the #VC stack: an
    intercepted WRMSR there nests a #VC (a configuration Linux does not run: KERNEL_IBRS is
    Intel's); every #VC the explorer injects is before an RDMSR/WRMSR or another intercepted one."""
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("sev_es,kernel_ibrs"),), scenarios=("vc-from-kernel",),
                      depth=1, vectors=(Vector.VC,))
    result = run_check(ref(sev612), cfg, workers=1)
    image = load_build(sev612).image(FeatureSet.parse("sev_es,kernel_ibrs"))
    sites = {j.at for row in result.paths for j in row.injections}
    assert sites
    assert {image.instruction_text(image.parse_location(s)).split()[0] for s in sites} <= {"rdmsr", "wrmsr"}


def test_entry_ibpb_before_vc_switch_off_ist_nests_a_vc_on_the_vc_stack(sev612: KernelBuild) -> None:
    """Zen 2 booted with retbleed=ibpb, as an SEV-ES guest: paranoid_entry's UNTRAIN_RET_FROM_CALL
    calls entry_ibpb, whose WRMSR of PRED_CMD (not an MSR the VMSA holds) faults with #VC where
    the hypervisor intercepts it — before vc_switch_off_ist has left the #VC stack, so the nested
    #VC overwrites the outer one's frame.  At the default boot (untraining by a return thunk, no
    WRMSR) the same paths are clean."""
    from entrycheck.image.cpus import configuration

    found = {}
    for cmdline in ("retbleed=ibpb", ""):
        fs = FeatureSet.of(configuration("zen2", cmdline).features.names + ("sev_es",))
        cfg = CheckConfig(feature_sets=(fs,), scenarios=("vc-from-kernel",), depth=1, vectors=(Vector.VC,))
        found[cmdline] = run_check(ref(sev612), cfg, workers=1).findings
    assert ("entry_ibpb" in str(configuration("zen2", "retbleed=ibpb").features)
            and "entry_ibpb" not in str(configuration("zen2").features))
    assert [(f.invariant, f.site) for f in found["retbleed=ibpb"]] == [("ist-reentered", "entry_ibpb")]
    assert "vc delivered through IST" in found["retbleed=ibpb"][0].message
    assert found[""] == []


# --------------------------------------------------------------------------- coverage


def test_coverage_names_each_object_and_what_it_missed(kernel612: KernelBuild) -> None:
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("pti,pcid"), FeatureSet.parse("")), depth=1)
    result = run_check(ref(kernel612), cfg, workers=2)
    cover = coverage(load_build(kernel612).image(FeatureSet.parse("")), kernel612.parts,
                     frozenset().union(*result.covered.values()))
    by = {c.name: c for c in cover}
    assert set(by) == {"entry_64.o", "entry_64_compat.o"}
    main = by["entry_64.o"]
    assert 0 < main.covered < main.total and main.copied_percent > 90
    whys = {s.why for s in main.spans}
    assert COPY in whys and any(w and "Xen PV" in w for w in whys)
    # irq_entries_start's other stubs are copies of the one that ran; its first stub ran.
    assert any(s.why == COPY and s.first.startswith("irq_entries_start") for s in main.spans)
    assert by["entry_64_compat.o"].copied_percent == 100.0


def test_a_check_of_a_fred_build_without_fred_says_the_fred_entry_did_not_run(fred612: KernelBuild) -> None:
    """No preset CPU has FRED: a default check of a FRED build runs the IDT entries only and says so."""
    from entrycheck.cli.options import ExploreOptions

    loaded = load_build(fred612)
    said = ExploreOptions().check_config(loaded, fred612.source_tree).not_checked
    assert len(said) == 1 and said[0].startswith("the FRED entry (entry_64_fred.o is built")
    assert not ExploreOptions(features=("fred",)).check_config(loaded, fred612.source_tree).not_checked
