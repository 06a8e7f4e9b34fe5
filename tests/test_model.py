"""The privileged-state model's pure functions (no Unicorn, no kernel)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from entrycheck.kernelabi.linux import SYSCALL_MASK, ist_index
from entrycheck.machine import model
from entrycheck.machine.model import (NOFLUSH, CpuState, Frame, FrameError, IretFault, MsrError, Vector, deliver, iret,
                                      rdmsr, swapgs, sysret, write_cr3, wrmsr)

KERNEL_PGD = 0xA0C0000


def state(**kw) -> CpuState:
    base = CpuState(cr3=KERNEL_PGD | 2, pcide=True, fsgsbase=False, cpl=0, ss=0x18, gs_base=0xFFFF888000100000,
                    kernel_gs_base=0x7F0000000000, spec_ctrl=0, mcg_status=0, nmi_blocked=False,
                    nmi_pending=False, stale=frozenset())
    return replace(base, **kw)


pcids = st.integers(min_value=0, max_value=0xFFF)
values = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(value=values, pcide=st.booleans())
def test_noflush_is_honoured_and_never_stored(value: int, pcide: bool) -> None:
    s, w = write_cr3(state(pcide=pcide), value)
    assert s.cr3 == value & ~NOFLUSH
    assert not s.cr3 & NOFLUSH
    assert w.noflush == (pcide and bool(value & NOFLUSH))


@given(pcid=pcids, stale=st.frozensets(pcids, max_size=5))
def test_flushing_write_clears_only_the_new_pcid(pcid: int, stale: frozenset[int]) -> None:
    s, w = write_cr3(state(stale=stale | {pcid}), KERNEL_PGD | pcid)
    assert pcid not in s.stale
    assert s.stale == stale - {pcid}
    assert w.flushed == (pcid,)
    assert not w.redundant


@given(pcid=pcids, stale=st.frozensets(pcids, max_size=5))
def test_noflush_write_keeps_staleness_and_reports_a_stale_pcid_made_current(pcid: int, stale) -> None:
    before = state(stale=stale)
    s, w = write_cr3(before, KERNEL_PGD | pcid | NOFLUSH)
    assert s.stale == stale
    assert w.stale_made_current == (pcid in stale)


def test_without_pcide_every_write_flushes_everything() -> None:
    s, w = write_cr3(state(pcide=False, stale=frozenset({2, 0x802})), KERNEL_PGD | NOFLUSH)
    assert s.stale == frozenset()
    assert not w.noflush


def test_redundant_means_unchanged_and_nothing_stale() -> None:
    s0 = state()
    _, w = write_cr3(s0, s0.cr3 | NOFLUSH)
    assert w.redundant
    _, w = write_cr3(s0, s0.cr3)               # a flushing write of the same value, nothing stale
    assert w.redundant
    _, w = write_cr3(state(stale=frozenset({2})), s0.cr3)
    assert not w.redundant                     # it flushed something
    _, w = write_cr3(s0, s0.cr3 | model.PTI_USER_PGTABLE)
    assert not w.redundant


@given(gs=values.filter(model.canonical), kgs=values.filter(model.canonical))
def test_swapgs_is_an_involution(gs: int, kgs: int) -> None:
    s = state(gs_base=gs, kernel_gs_base=kgs)
    assert swapgs(s).gs_base == kgs and swapgs(s).kernel_gs_base == gs
    assert swapgs(swapgs(s)) == s


def test_msrs() -> None:
    s, w = wrmsr(state(), model.MSR_SPEC_CTRL, 1)
    assert s.spec_ctrl == 1 and not w.redundant
    _, w = wrmsr(s, model.MSR_SPEC_CTRL, 1)
    assert w.redundant
    assert rdmsr(s, model.MSR_SPEC_CTRL) == 1
    with pytest.raises(MsrError):
        rdmsr(s, 0x1234)
    with pytest.raises(MsrError):
        wrmsr(s, model.MSR_GS_BASE, 1 << 60)   # not canonical: #GP


def test_delivery_from_user_uses_the_stack_top_and_blocks_nmis() -> None:
    user = state(cpl=3, ss=0x2B)
    s, frame, rsp, flags = deliver(user, Vector.NMI, rip=0x401000, rsp=0x7FFF0000, rflags=0x246 | model.RFLAGS_TF,
                                   error_code=None, stack_top=0xFFFFFE0000006008, ist=True)
    assert s.cpl == 0 and s.nmi_blocked
    assert frame == Frame(None, 0x401000, model.USER_CS, 0x246 | model.RFLAGS_TF, 0x7FFF0000, model.USER_DS)
    assert rsp == 0xFFFFFE0000006000 - 5 * 8       # aligned down to 16, then five words
    assert not flags & (model.RFLAGS_IF | model.RFLAGS_TF)


def test_error_code_vectors_push_six_words_and_mc_sets_mcip() -> None:
    s, frame, rsp, _ = deliver(state(), Vector.DF, rip=1, rsp=2, rflags=2, error_code=0, stack_top=0x10000, ist=True)
    assert len(frame.words()) == 6 and rsp == 0x10000 - 48
    s, _, _, _ = deliver(state(), Vector.MC, rip=1, rsp=2, rflags=2, error_code=None, stack_top=0x10000, ist=True)
    assert s.mcip and not model.can_deliver(s, Vector.MC)


def test_any_iret_unblocks_nmis_and_checks_the_frame() -> None:
    s = state(nmi_blocked=True)
    assert not iret(s, Frame(None, 0xFFFFFFFF81000000, model.KERNEL_CS, 2, 0xFFFFC90000010000, 0)).nmi_blocked
    assert iret(s, Frame(None, 0x401000, model.USER_CS, 2, 0x7FFF0000, model.USER_DS)).cpl == 3
    with pytest.raises(IretFault):
        iret(s, Frame(None, 0x401000, 0x77, 2, 0, 0))
    with pytest.raises(IretFault):
        iret(s, Frame(None, 1 << 60, model.KERNEL_CS, 2, 0, 0))


@pytest.mark.parametrize("frame, code", [
    (Frame(None, 0x0000800000000000, model.USER_CS, 0x246, 0x7FFF0000, model.USER_DS), 0),   # non-canonical RIP
    (Frame(None, 0x401000, model.USER_CS, 0x246, 0x7FFF0000, 0), 0),                       # null SS to CPL 3
    (Frame(None, 0x401000, model.USER_CS, 0x246, 0x7FFF0000, 0x18), 0x18),                 # kernel SS to CPL 3
    (Frame(None, 0x401000, 0x2B, 0x246, 0x7FFF0000, model.USER_DS), 0x28),                 # data segment as CS
])
def test_a_faulting_iret_raises_gp_with_nmis_already_unblocked(frame: Frame, code: int) -> None:
    """SDM Vol. 3A 6.7.1: the IRET unblocks NMIs even when it faults, so the #GP handler can
    be interrupted by an NMI at once (the nested-NMI code has to cope with it)."""
    with pytest.raises(IretFault) as got:
        iret(state(nmi_blocked=True, nmi_pending=True), frame)
    assert got.value.vector is Vector.GP and got.value.error_code == code
    assert not got.value.cpu.nmi_blocked and got.value.cpu.nmi_pending and got.value.cpu.cpl == 0
    assert Vector.GP.error_code and ist_index(Vector.GP) == 0        # delivered on the current stack, with an error code


def test_a_32_bit_user_code_segment_is_a_valid_iret_target() -> None:
    assert iret(state(), Frame(None, 0x8048000, model.USER32_CS, 0x246, 0xFFFF0000, model.USER_DS)).cpl == 3


def test_the_syscall_mask_is_what_linux_programs() -> None:
    """syscall_init(): CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID; a user RFLAGS with every
    bit user space can set, plus RF and IF, arrives in the kernel as just the fixed bit."""
    user = model.USER_SETTABLE_FLAGS | model.RFLAGS_IF | model.RFLAGS_RF | model.RFLAGS_FIXED
    assert (user & ~SYSCALL_MASK) | model.RFLAGS_FIXED == model.RFLAGS_FIXED
    assert SYSCALL_MASK == 0x257FD5


def test_sysret_refuses_a_non_canonical_rip() -> None:
    assert sysret(state(), 0x401000).cpl == 3
    with pytest.raises(FrameError):
        sysret(state(), 0x0000800000000000)
