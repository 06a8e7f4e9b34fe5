"""The FRED model (machine/fred.py): one test per rule of the SDM's FRED event delivery and
ERETS/ERETU pseudocode (Bochs' cpu/fred.cc follows the same), no Unicorn, no kernel."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from entrycheck.machine import fred
from entrycheck.machine.fred import EretFault, FredConfig, eret, fred_deliver
from entrycheck.machine.model import CpuState, Vector

ENTRY = 0xFFFF_FFFF_8100_4000
RSP = (0xFFFF_C900_0001_4000, 0xFFFF_FE00_0000_C000, 0xFFFF_FE00_0000_9000, 0xFFFF_FE00_0000_3000)
CFG = FredConfig(ENTRY, RSP, ((1, 1), (2, 2), (18, 2), (8, 3)))     # Linux: #DB 1, NMI 2, #MC 2, #DF 3
USER_GS, KERNEL_GS = 0x7F00_0000_0000, 0xFFFF_8880_0010_0000


def cpu(**kw) -> CpuState:
    base = CpuState(cr3=2, pcide=True, fsgsbase=False, cpl=0, ss=0x18, gs_base=KERNEL_GS, kernel_gs_base=USER_GS,
                    spec_ctrl=0, mcg_status=0, nmi_blocked=False, nmi_pending=False, stale=frozenset())
    return replace(base, **kw)


def user() -> CpuState:
    return cpu(cpl=3, ss=0x2B, gs_base=USER_GS, kernel_gs_base=KERNEL_GS)


def deliver(s: CpuState, vector: Vector, rsp: int = 0xFFFF_C900_0001_3E08, cs: int = 0x10, ss: int = 0x18):
    return fred_deliver(s, vector, CFG, rip=0x1234, rsp=rsp, rflags=0x246, cs=cs, ss=ss, error_code=7)


@pytest.mark.parametrize("vector", [Vector.NMI, Vector.MC, Vector.DB, Vector.PF, Vector.IRQ, Vector.SYSCALL])
def test_an_event_from_ring_3_uses_level_0_and_rsp0_and_swaps_gs(vector: Vector) -> None:
    s, words, new_rsp, rip = deliver(user(), vector, rsp=0x7FFD_0000, cs=0x33, ss=0x2B)
    assert (s.cpl, s.csl, new_rsp + 64, rip) == (0, 0, RSP[0], ENTRY)
    assert (s.gs_base, s.kernel_gs_base) == (KERNEL_GS, USER_GS)
    assert words[2] & 0xFFFF == 0x33 and words[2] >> 16 & 3 == 0


def test_df_from_ring_3_still_takes_its_own_level() -> None:
    s, _, new_rsp, _ = deliver(user(), Vector.DF, rsp=0x7FFD_0000, cs=0x33, ss=0x2B)
    assert (s.csl, new_rsp + 64) == (3, RSP[3])


@pytest.mark.parametrize("vector,level", [(Vector.DB, 1), (Vector.NMI, 2), (Vector.MC, 2), (Vector.DF, 3)])
def test_an_event_that_raises_the_level_switches_to_that_levels_stack(vector: Vector, level: int) -> None:
    s, words, new_rsp, rip = deliver(cpu(), vector)
    assert (s.csl, new_rsp + 64, rip) == (level, RSP[level], ENTRY + 256)
    assert words[2] >> 16 & 3 == 0            # CS carries the level it interrupted


@given(rsp=st.integers(min_value=0xFFFF_FE00_0000_8000, max_value=0xFFFF_FE00_0000_8FF8).map(lambda v: v & ~7))
def test_at_the_same_level_the_frame_goes_below_the_red_zone_aligned_to_64(rsp: int) -> None:
    # An #MC inside the NMI handler: both level 2, so no stack switch and the outer frame survives.
    s, words, new_rsp, _ = deliver(cpu(csl=2), Vector.MC, rsp=rsp)
    top = new_rsp + 64
    assert top == (rsp - 64) & ~0x3F and top + 0 <= rsp - 64
    assert s.csl == 2 and words[2] >> 16 & 3 == 2 and words[4] == rsp


@given(rsp=st.integers(min_value=0xFFFF_FE00_0000_8000, max_value=0xFFFF_FE00_0000_8FF8).map(lambda v: v & ~7))
def test_a_lower_level_event_keeps_the_current_level_and_its_stack(rsp: int) -> None:
    # A #DB (level 1) inside the NMI handler (level 2): no stack switch, neither to level 1's stack
    # nor back to the top of level 2's, which holds the NMI's frame: the frame goes below the red zone.
    s, words, new_rsp, _ = deliver(cpu(csl=2), Vector.DB, rsp=rsp)
    assert s.csl == 2 and words[2] >> 16 & 3 == 2 and words[4] == rsp
    assert new_rsp + 64 == (rsp - 64) & ~0x3F and new_rsp + 64 not in (RSP[1], RSP[2])


def test_the_frame_is_eight_words_with_the_event_in_ss() -> None:
    _, words, _, _ = deliver(cpu(), Vector.NMI)
    assert len(words) == 8 and words[0] == 7 and words[1] == 0x1234 and words[3] == 0x246
    assert words[5] & fred.FRED_SS_NMI and (words[5] >> 32) & 0xFF == 2 and (words[5] >> 48) & 0xF == fred.FRED_NMI
    _, sys_words, _, _ = deliver(user(), Vector.SYSCALL, rsp=0x7FFD_0000, cs=0x33, ss=0x2B)
    assert sys_words[5] & fred.FRED_SS_SYSCALL and not sys_words[5] & fred.FRED_SS_NMI
    assert (sys_words[5] >> 48) & 0xF == fred.FRED_OTHER and (sys_words[5] >> 32) & 0xFF == 1


def test_nmi_delivery_blocks_nmis_and_mc_sets_mcip() -> None:
    assert deliver(cpu(), Vector.NMI)[0].nmi_blocked
    assert deliver(cpu(), Vector.MC)[0].mcip and not deliver(cpu(), Vector.MC)[0].nmi_blocked


def test_only_an_eret_from_an_nmi_frame_unblocks_nmis() -> None:
    inside_nmi = cpu(nmi_blocked=True, csl=2)
    _, mc_words, _, _ = deliver(inside_nmi, Vector.MC, rsp=0xFFFF_FE00_0000_8E00)
    after_mc = eret(inside_nmi, mc_words, to_user=False)           # the #MC handler's ERETS
    assert after_mc.nmi_blocked                                   # unlike IRET: still blocked
    _, nmi_words, _, _ = deliver(cpu(), Vector.NMI)
    assert not eret(cpu(nmi_blocked=True, csl=2), nmi_words, to_user=False).nmi_blocked


def test_erets_never_raises_the_level() -> None:
    words = [0, 0x1234, 0x10 | (3 << 16), 0x2, 0xFFFF_C900_0001_3000, 0x18]
    assert eret(cpu(csl=1), words, to_user=False).csl == 1
    assert eret(cpu(csl=2), [0, 0x1234, 0x10 | (1 << 16), 0x2, 0, 0x18], to_user=False).csl == 1


def test_eretu_needs_level_0_and_a_ring_3_frame_and_swaps_gs() -> None:
    frame = [0, 0x401000, 0x33, 0x246, 0x7FFD_0000, 0x2B]
    back = eret(cpu(), frame, to_user=True)
    assert (back.cpl, back.gs_base, back.kernel_gs_base, back.compat) == (3, USER_GS, KERNEL_GS, False)
    assert eret(cpu(), [0, 0x8049A2C, 0x23, 0x246, 0xFFFF_CF80, 0x2B], to_user=True).compat
    with pytest.raises(EretFault, match="stack level 2"):
        eret(cpu(csl=2), frame, to_user=True)
    with pytest.raises(EretFault, match="not ring 3"):
        eret(cpu(), [0, 0x401000, 0x10, 0x246, 0x7FFD_0000, 0x18], to_user=True)
    with pytest.raises(EretFault, match="non-canonical"):
        eret(cpu(), [0, 1 << 47, 0x33, 0x246, 0x7FFD_0000, 0x2B], to_user=True)


def test_a_system_call_is_an_event_of_type_other() -> None:
    assert fred.fred_event(Vector.SYSCALL) == (fred.FRED_OTHER, 1)
    assert fred.fred_event(Vector.SYSENTER) == (fred.FRED_OTHER, 2)
    assert fred.fred_event(Vector.INT80) == (fred.FRED_SOFT_INT, 0x80)
    assert fred.fred_event(Vector.IRQ) == (fred.FRED_EXTERNAL, 0x20)
