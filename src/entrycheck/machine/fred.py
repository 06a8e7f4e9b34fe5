"""FRED (Flexible Return and Event Delivery) as the model's pure functions: event delivery by stack
level and ERETS/ERETU (SDM Vol. 3, the FRED chapter; Bochs' cpu/fred.cc as a reference model).
What Linux programs for it comes in a ``FredConfig`` (kernelabi/linux.py, kernelabi/world.py)."""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.machine.model import (KERNEL_DS, MCG_STATUS_MCIP, USER32_CS, CpuState, Vector, canonical,
                                      swapgs)

FRED_EXTERNAL, FRED_NMI, FRED_HW_EXCEPTION, FRED_SOFT_INT, FRED_OTHER = 0, 2, 3, 4, 7
FRED_SS_STI, FRED_SS_SYSCALL, FRED_SS_NMI = 1 << 16, 1 << 17, 1 << 18


@dataclass(frozen=True)
class FredConfig:
    """What Linux programs for FRED (arch/x86/kernel/fred.c): the ring-3 entry (the ring-0 one is
    256 bytes on), the stack of each level (RSP0: the task stack; RSP1..3: the #DB, NMI and #DF
    stacks), each exception's level (#DB 1, NMI 2, #MC 2, #DF 3), external interrupts' level (0) and
    the red zone below the interrupted RSP (FRED_CONFIG_REDZONE: one 64-byte line)."""

    entry: int
    rsp: tuple[int, int, int, int]
    levels: tuple[tuple[int, int], ...]         # (vector, level)
    redzone: int = 64
    int_level: int = 0

    def level_of(self, vector: int) -> int:
        return dict(self.levels).get(vector, 0)


def fred_event(vector: Vector) -> tuple[int, int]:
    """(FRED event type, vector number) of what entrycheck delivers."""
    if vector is Vector.SYSCALL:
        return FRED_OTHER, 1
    if vector is Vector.SYSENTER:
        return FRED_OTHER, 2
    if vector is Vector.INT80:
        return FRED_SOFT_INT, 0x80
    if vector is Vector.IRQ:
        return FRED_EXTERNAL, int(vector)
    if vector is Vector.NMI:
        return FRED_NMI, 2
    return FRED_HW_EXCEPTION, int(vector)


def fred_deliver(s: CpuState, vector: Vector, cfg: FredConfig, *, rip: int, rsp: int, rflags: int, cs: int,
                 ss: int, error_code: int) -> tuple[CpuState, list[int], int, int]:
    """FRED event delivery: (state, the 8 words pushed lowest first, new RSP, new RIP).

    From ring 3 the stack level is 0 (RSP0) unless the event is #DF; from ring 0 it is the larger of
    the current level and the event's, and the stack changes only when the level rises; otherwise
    the frame goes below the interrupted RSP less the red zone, aligned to 64 bytes, so it never
    overwrites the outer frame.  CS carries the old level, SS the event (bits 16-18, and the type and
    vector in 32-63); RFLAGS is cleared; from ring 3 GS is swapped; an NMI blocks NMIs."""
    etype, number = fred_event(vector)
    user = s.cpl == 3
    old_csl = 0 if user else s.csl
    if user and vector is not Vector.DF:
        level = 0
    elif etype == FRED_EXTERNAL:
        level = cfg.int_level
    elif etype in (FRED_NMI, FRED_HW_EXCEPTION):
        level = cfg.level_of(number)
    else:
        level = 0
    new_csl = max(level, old_csl)
    if user or new_csl > old_csl:
        top = cfg.rsp[new_csl]
    else:
        top = (rsp - cfg.redzone) & ~0x3F
    aug_ss = ss | (number << 32) | (etype << 48)
    if etype in (FRED_SOFT_INT, FRED_OTHER):
        aug_ss |= FRED_SS_SYSCALL
    if etype == FRED_NMI:
        aug_ss |= FRED_SS_NMI
    words = [error_code, rip, cs | (old_csl << 16), rflags, rsp, aug_ss, 0, 0]
    new = s.but(cpl=0, ss=0 if user else s.ss, csl=new_csl,
                nmi_blocked=s.nmi_blocked or etype == FRED_NMI,
                mcg_status=s.mcg_status | (MCG_STATUS_MCIP if vector is Vector.MC else 0))
    if user:
        new = swapgs(new).but(ss=KERNEL_DS)
    return new, words, top - 64, cfg.entry + (0 if user else 256)


class EretFault(Exception):
    """ERETS/ERETU the CPU refuses (#GP(0))."""


def eret(s: CpuState, words: list[int], to_user: bool) -> CpuState:
    """ERETS (``to_user`` False) or ERETU from the frame ``words`` (error code first).  Only an
    ERET whose frame says it returns from an NMI (SS bit 18) unblocks NMIs."""
    _, rip, cs, rflags, rsp, ss = words[:6]
    if not canonical(rip) and (not to_user or (cs & 0xFFFF) != USER32_CS):
        raise EretFault(f"ERET to a non-canonical RIP {rip:#x}")
    unblock = bool(ss & FRED_SS_NMI)
    if to_user:
        if s.csl != 0:
            raise EretFault(f"ERETU at stack level {s.csl} (only level 0 may return to ring 3)")
        if cs & 3 != 3 or ss & 3 != 3:
            raise EretFault(f"ERETU to CS {cs & 0xFFFF:#x} / SS {ss & 0xFFFF:#x}, not ring 3")
        new = swapgs(s).but(cpl=3, ss=ss & 0xFFFF, compat=(cs & 0xFFFF) == USER32_CS)
    else:
        if cs & 3:
            raise EretFault(f"ERETS to CS {cs & 0xFFFF:#x}, not ring 0")
        new = s.but(csl=min(s.csl, (cs >> 16) & 3))
    return new.but(nmi_blocked=s.nmi_blocked and not unblock)


__all__ = ["FredConfig", "fred_event", "fred_deliver", "eret", "EretFault", "FRED_EXTERNAL", "FRED_NMI",
           "FRED_HW_EXCEPTION", "FRED_SOFT_INT", "FRED_OTHER", "FRED_SS_STI", "FRED_SS_SYSCALL", "FRED_SS_NMI"]
