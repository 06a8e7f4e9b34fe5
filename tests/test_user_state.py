"""What user space controls: hostile user values, faulting returns, maskable interrupts."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import capstone
import pytest

from entrycheck.errors import InputError
from entrycheck.session import ObjectRef
from entrycheck.explore.delivery import DeliveryPolicy
from entrycheck.machine.model import Vector
from entrycheck.explore.engine import DEFAULT_VECTORS, Explorer, ExploreConfig
from entrycheck.explore.replay import trace
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, SCENARIOS, scenario
from entrycheck.explore.userstate import derive
from entrycheck.image import layout
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.targets import KernelBuild
from entrycheck.kernelabi.stubs import sysret_allowed
from entrycheck.kernelabi.world import build_world
from entrycheck.machine import events as ev
from entrycheck.machine.model import RFLAGS_IF
from entrycheck.machine.state import REG_NAMES, RFLAGS

CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
NON_CANONICAL = 1 << 47


def explorer(build: KernelBuild, features: str) -> Explorer:
    ref = ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)
    return Explorer(build_world(ref.load().image(FeatureSet.parse(features))), ExploreConfig())


# --------------------------------------------------------------------------- no kernel needed


def test_user_values_are_part_of_the_scenario_name() -> None:
    sc = scenario("syscall[rsp=0x7ffd0000, ret_rip=0x800000000000]")
    assert sc.base == "syscall" and sc.user.rsp == 0x7FFD0000 and sc.user.ret_rip == NON_CANONICAL
    assert sc.name == "syscall[rsp=0x7ffd0000,ret_rip=0x800000000000]"
    assert scenario(sc.name) == sc                                  # the name round-trips
    assert sc.user.user_return() == (("ip", NON_CANONICAL), ("rcx", NON_CANONICAL))
    assert scenario("syscall").user.items() == ()


@pytest.mark.parametrize("name, needle", [
    ("syscall[foo=1]", "is not FIELD=VALUE"),
    ("syscall[rsp=0x10", "user values go in brackets"),
    ("syscall[rsp=zz]", "is not a number"),
    ("syscall[rsp=0x11]", "not 8-byte aligned"),
    ("syscall[rflags=0x3246]", "bits user space cannot set"),          # IOPL 3
    ("syscall[gsbase=0x800000000000]", "not canonical"),
    ("nmi-from-kernel[rsp=0x1000]", "from kernel mode has no user values"),
    ("nmi-from-user[ret_rip=0x1000]", "only SYSCALL scenarios"),
    ("syscall[ret_ss=0x18]", "not a selector with RPL 3"),
    ("nosuch[rsp=0x1000]", "unknown scenario 'nosuch'"),
])
def test_bad_user_values_are_one_clear_error(name: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle.replace("[", r"\[")):
        scenario(name)


def test_do_syscall_64s_sysret_verdict_is_6_12s() -> None:
    ok = {"rcx": 0x401000, "ip": 0x401000, "r11": 0x246, "flags": 0x246, "cs": layout.USER_CS, "ss": layout.USER_DS}
    assert sysret_allowed(ok)
    for change in ({"rcx": 0x401001}, {"r11": 0x202}, {"cs": 0x23}, {"ss": 0x18},
                   {"ip": layout.TASK_SIZE_MAX, "rcx": layout.TASK_SIZE_MAX},
                   {"ip": NON_CANONICAL, "rcx": NON_CANONICAL},
                   {"flags": 0x346, "r11": 0x346}, {"flags": 0x10246, "r11": 0x10246}):
        assert not sysret_allowed({**ok, **change}), change


def _log(pcs, flags):
    regs = []
    for f in flags:
        r = [0] * len(REG_NAMES)
        r[RFLAGS] = f
        regs.append(tuple(r))
    return SimpleNamespace(pcs=pcs, regs=regs)


def test_an_irq_needs_if_and_waits_out_the_sti_shadow() -> None:
    code = {0x10: b"\xfb", 0x11: b"\x90", 0x12: b"\x90", 0x20: b"\x9d"}     # sti; nop; nop ... popf
    ex = SimpleNamespace(image=SimpleNamespace(read=lambda addr, n: code[addr][:n], code_section=code.get))
    window = DeliveryPolicy.irq_window
    log = _log([0x10, 0x11, 0x12], [0x2, 0x2 | RFLAGS_IF, 0x2 | RFLAGS_IF])
    assert not window(ex, log, 0)           # IF=0 before the STI
    assert not window(ex, log, 1)           # IF=1, but in the STI's shadow
    assert window(ex, log, 2)               # one instruction later
    # STI with IF already set has no shadow; POPF never has one.
    assert window(ex, _log([0x10, 0x11], [0x2 | RFLAGS_IF] * 2), 1)
    assert window(ex, _log([0x20, 0x11], [0x2, 0x2 | RFLAGS_IF]), 1)


def test_an_irq_is_delivered_where_if_is_set_outside_the_sti_shadow() -> None:
    """The explorer and the user-value search deliver what DeliveryPolicy.allowed admits: an IRQ
    at the boundary after the STI's shadow, none before (IF=0) or inside the shadow."""
    from entrycheck.machine.model import CpuState

    code = {0x10: b"\xfb", 0x11: b"\x90", 0x12: b"\x90"}                  # sti; nop; nop
    policy = DeliveryPolicy.__new__(DeliveryPolicy)
    policy.image = SimpleNamespace(read=lambda addr, n: code[addr][:n], code_section=code.get)
    policy.world = SimpleNamespace(config=SimpleNamespace(idt={Vector.IRQ: 0xFFFFFFFF81000000}))
    policy.config = ExploreConfig()
    cpu = CpuState(cr3=2, pcide=True, fsgsbase=False, cpl=0, ss=0x18, gs_base=0, kernel_gs_base=0, spec_ctrl=0,
                   mcg_status=0, nmi_blocked=False, nmi_pending=False, stale=frozenset())
    log = _log([0x10, 0x11, 0x12], [0x2, 0x2 | RFLAGS_IF, 0x2 | RFLAGS_IF])
    log.start, log.cpus, log.outstanding = 100, [cpu] * 3, [()] * 3
    assert [policy.allowed(Vector.IRQ, log, 100 + i, frozenset(), False) for i in range(3)] == [False, False, True]


def test_irq_is_a_default_vector_and_injectable_by_name() -> None:
    from entrycheck.explore.check import parse_vectors
    from entrycheck.machine.model import Vector

    assert Vector.IRQ in DEFAULT_VECTORS and parse_vectors("irq,nmi") == (Vector.IRQ, Vector.NMI)
    assert ev.Injection.parse("irq@entry_SYSCALL_64+0x3").vector is Vector.IRQ


# --------------------------------------------------------------------------- real kernels


@pytest.mark.kernel
def test_the_ist_stacks_are_as_large_as_the_nmi_entry_assumes(debian_kernel: KernelBuild) -> None:
    """asm_exc_nmi tests whether the interrupted RSP lies within EXCEPTION_STKSZ below the top
    of its stack (`subq $EXCEPTION_STKSZ, %rdx`): the model's IST stacks must be that size."""
    w = explorer(debian_kernel, "none").world
    start = w.image.address_of("asm_exc_nmi")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    subs = [ins.operands[1].imm for ins in _insns(md, w.image.read(start, 0x200), start)
            if ins.mnemonic == "sub" and ins.op_str.startswith("rdx,")]
    assert subs == [layout.IST_STACK_SIZE] == [0x2000]
    for top in w.ist_tops.values():
        region = next(r for r in w.config.regions if r.contains(top - 8))
        assert region.start == top - 0x2000 and region.size == 0x2000


def _insns(md, code: bytes, at: int):
    md.detail = True
    return list(md.disasm(code, at))


@pytest.mark.kernel
def test_user_values_the_entry_code_compares_are_derived(kernel61: KernelBuild, kernel612: KernelBuild) -> None:
    """On the stock kernels: a user RSP inside and above the NMI stack (the NMI entry's range test),
    a non-canonical return RIP (6.1's check before SYSRET; 6.12's do_syscall_64), 6.12's
    TASK_SIZE_MAX, 6.1's TF test on R11; and nothing for what no code compares."""
    ex = explorer(kernel61, "pti,pcid")
    nmi_top = ex.world.ist_tops[next(v for v in ex.world.ist_tops if v.label == "nmi")]
    got61 = [v.user for v in derive(ex, scenario("syscall"), DEFAULT_VECTORS)]
    assert {u.rsp for u in got61 if u.rsp} == {nmi_top - 0x40, ex.world.ist_tops[
        next(v for v in ex.world.ist_tops if v.label == "db")] - 0x40}
    assert {u.ret_rip for u in got61 if u.ret_rip} == {NON_CANONICAL}
    assert {u.rflags for u in got61 if u.rflags} == {0x346}
    ex12 = explorer(kernel612, "pti,pcid")
    got612 = [v.user for v in derive(ex12, scenario("syscall"), DEFAULT_VECTORS)]
    assert {u.ret_rip for u in got612 if u.ret_rip} == {layout.TASK_SIZE_MAX, NON_CANONICAL}
    for name in DEFAULT_SCENARIOS:
        if not SCENARIOS[name].from_user:
            assert derive(ex, scenario(name), DEFAULT_VECTORS) == ()
    # Without FSGSBASE a negative GSBASE is never a candidate; with it, no stock code tests its sign.
    assert not any(u.gsbase for u in got61)
    fs = explorer(kernel612, "pti,pcid,fsgsbase")
    assert not any(v.user.gsbase for v in derive(fs, scenario("syscall"), DEFAULT_VECTORS))


@pytest.mark.kernel
def test_a_bad_iret_goes_through_fixup_bad_iret_and_signals(debian_kernel: KernelBuild) -> None:
    """A system call returning to a non-canonical RIP: the IRET faults, #GP is delivered at it in
    kernel mode, error_entry's bad-IRET branch swaps GS and calls fixup_bad_iret, and
    exc_general_protection sends the signal whose handler the path returns to."""
    w = explorer(debian_kernel, "pti,pcid").world
    t = trace(w, scenario(f"syscall[ret_rip={NON_CANONICAL:#x}]"), ())
    kinds = [type(e).__name__ for e in t.events]
    faulted = next(e for e in t.events if isinstance(e, ev.IretFaulted))
    assert faulted.frame.rip == NON_CANONICAL and faulted.vector.label == "gp"
    assert w.image.symbolize(faulted.pc) == "native_irq_return_iret"
    calls = [e.name for e in t.events if isinstance(e, ev.StubCall) and "thunk" not in e.name]
    assert calls[calls.index("fixup_bad_iret"):] == ["fixup_bad_iret", "sync_regs", "exc_general_protection"]
    last = [e for e in t.events if isinstance(e, ev.Iret)][-1]
    assert last.to_user and last.frame.rip == layout.SIGNAL_HANDLER_RIP
    assert t.outcome.value == "returned" and not t.violations, t.violations
    assert kinds.count("Delivered") == 1 and "Fault" not in kinds


@pytest.mark.kernel
def test_a_negative_gsbase_needs_fsgsbase(kernel612: KernelBuild) -> None:
    w = explorer(kernel612, "none").world
    with pytest.raises(InputError, match="needs the fsgsbase feature"):
        trace(w, scenario(f"syscall[gsbase={layout.USER_GSBASE_NEGATIVE:#x}]"), ())
    fs = explorer(kernel612, "fsgsbase").world
    t = trace(fs, scenario(f"syscall[gsbase={layout.USER_GSBASE_NEGATIVE:#x}]"), (ev.Injection.parse(
        "nmi@entry_SYSCALL_64"),))
    assert not t.violations and t.final_cpu.gs_base == layout.USER_GSBASE_NEGATIVE


@pytest.mark.kernel
def test_stock_kernels_take_no_irq_inside_the_entry_code(debian_kernel: KernelBuild, tmp_path) -> None:
    """The stock entry code runs with IF=0 from entry to exit: injecting IRQs adds no run."""
    out = {}
    for vectors in ("nmi", "nmi,irq"):
        p = subprocess.run(CLI + ["check", str(debian_kernel.object_path), "--depth", "1", "--features", "pti,pcid",
                                  "--scenarios", "syscall,nmi-from-kernel", "--vectors", vectors,
                                  "--json", str(tmp_path / f"{vectors}.json")], capture_output=True, text=True)
        assert p.returncode in (0, 1), p.stderr
        out[vectors] = json.loads((tmp_path / f"{vectors}.json").read_text())
    assert out["nmi"]["runs"] == out["nmi,irq"]["runs"] > 100


@pytest.mark.kernel
def test_a_db_held_by_the_mov_ss_shadow_arrives_at_the_syscall_entry(kernel61: KernelBuild) -> None:
    """CVE-2018-8897: a user breakpoint on a MOV SS operand right before SYSCALL raises a #DB that
    the shadow holds until the first instruction of entry_SYSCALL_64 (kernel mode, user GSBASE).
    It is explored there, unprivileged, and the stock kernel's paranoid entry handles it."""
    from dataclasses import replace

    from entrycheck.machine.model import Vector

    ex = explorer(kernel61, "pti,pcid")
    ex.config = replace(ex.config, vectors=(Vector.DB,), depth=1)
    result = ex.explore(scenario("syscall"))
    chains = [result.table.chain(r) for r in range(len(result.table))]
    first = [c for c in chains if c and c[0].at == "entry_SYSCALL_64"]
    assert len(first) == 1 and first[0][0].vector is Vector.DB
    log = base_log(ex, scenario("syscall"))
    assert ex.policy.precondition(log, log.start, Vector.DB, entry=True).text.endswith("(CVE-2018-8897)")
    assert ex.policy.allowed(Vector.DB, log, log.start, frozenset(), entry=True)
    assert not ex.policy.allowed(Vector.DB, log, log.start, frozenset(), entry=False)
    assert not [f for f in result.groups for f in f.findings]


def base_log(ex: Explorer, sc):
    """The step log of the scenario's own recorded path, as the explorer keeps it."""
    from entrycheck.machine.api import Level, Request
    from entrycheck.explore.scenarios import start_state, stub_options

    rec = ex.machine.run(Request(start_state(ex.world, sc, ex.pristine), deliver=sc.vector, level=Level.STEPS,
                                 options=stub_options(sc)))
    return rec.steps
