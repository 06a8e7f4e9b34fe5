"""The privileged CPU state Unicorn does not model for us, as plain data + pure functions.

Every operation takes a ``CpuState`` and returns a new one plus an event that says
what happened (for traces, counts and invariants).  Nothing here knows about
Unicorn; the adapter applies these functions at the instructions it hooks.

Facts honoured (DESIGN.md §3): CR3 bit 63 (NOFLUSH) is acted on and never stored;
PCID = CR3[11:0] when CR4.PCIDE; a write without NOFLUSH flushes the new PCID (all
PCIDs without PCIDE); TLB staleness is tracked per PCID so that a skipped flush is
seen whatever the kernel's own flush mask says; NMI delivery blocks NMIs until the
next IRET, any IRET; an NMI arriving while blocked is latched (one at most); #MC
sets MCG_STATUS.MCIP until the handler clears it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from entrycheck.image.layout import KERNEL_CS, KERNEL_DS, USER32_CS, USER_CS, USER_DS, canonical  # noqa: F401

NOFLUSH = 1 << 63
CR3_PCID_MASK = 0xFFF
PTI_USER_PGTABLE = 1 << 12
PTI_USER_PCID = 1 << 11

MSR_SPEC_CTRL = 0x48
MSR_PRED_CMD = 0x49
MSR_MCG_STATUS = 0x17A
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MCG_STATUS_MCIP = 1 << 2
SPEC_CTRL_IBRS = 1

RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_ID = 1 << 21
RFLAGS_FIXED = 1 << 1
# The RFLAGS bits user space can change with POPF at CPL 3, IOPL 0 (IF and IOPL it cannot).
USER_SETTABLE_FLAGS = (RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_TF | RFLAGS_DF
                       | RFLAGS_OF | RFLAGS_NT | RFLAGS_AC | RFLAGS_ID)



class Vector(enum.IntEnum):
    """Exception vectors entrycheck delivers, with the Linux IDT's IST use."""

    DB = 1
    NMI = 2
    DF = 8
    GP = 13           # raised by the machine (a faulting IRET), never injected
    PF = 14
    MC = 18
    VC = 29
    IRQ = 32          # a device interrupt, vector 0x20 (its stub in irq_entries_start pushes it)
    INT80 = 0x80      # int $0x80 from a 32-bit task (a software interrupt: a scenario start, never injected)
    SYSCALL = 0x101   # under FRED, SYSCALL is an event too (type "other", vector 1): a scenario start
    SYSENTER = 0x102  # under FRED, SYSENTER likewise (type "other", vector 2)
    MISPREDICT = 0x103  # not an exception: the explorer runs the other side of a conditional branch

    @property
    def label(self) -> str:
        return VECTOR_NAMES[self]

    @property
    def error_code(self) -> bool:
        """Whether delivery pushes an error code."""
        return self in _ERROR_CODE

    @property
    def frame_bytes(self) -> int:
        """What delivery pushes in 64-bit mode: SS, RSP, RFLAGS, CS, RIP and an error code."""
        return 48 if self in _ERROR_CODE else 40


_ERROR_CODE = frozenset({Vector.DF, Vector.GP, Vector.PF, Vector.VC})
VECTOR_NAMES = {Vector.DB: "db", Vector.NMI: "nmi", Vector.DF: "df", Vector.GP: "gp",
                Vector.PF: "pf", Vector.MC: "mc", Vector.VC: "vc", Vector.IRQ: "irq", Vector.INT80: "int80",
                Vector.SYSCALL: "syscall", Vector.SYSENTER: "sysenter", Vector.MISPREDICT: "mispredict"}
VECTOR_BY_NAME = {v: k for k, v in VECTOR_NAMES.items()}


@dataclass(frozen=True)
class CpuState:
    cr3: int                  # as stored: never has NOFLUSH
    pcide: bool               # CR4.PCIDE
    fsgsbase: bool            # CR4.FSGSBASE
    cpl: int
    ss: int
    gs_base: int
    kernel_gs_base: int
    spec_ctrl: int
    mcg_status: int
    nmi_blocked: bool
    nmi_pending: bool
    stale: frozenset[int]     # PCIDs whose TLB entries are stale (need a flushing write)
    compat: bool = False      # the user task runs in compat mode (CS __USER32_CS): what its frames say
    csl: int = 0              # FRED's current stack level (0-3)
    spec: int = 0             # speculation hygiene since the last entry (SPEC_*; tracked only when checked)
    cr2: int = 0              # the last page fault's linear address
    dr6: int = 0xFFFF0FF0     # DR6 (DR6_RESERVED when no debug condition is recorded)
    dr7: int = 0x400          # DR7 (bit 10 always set; armed: a breakpoint enable bit set)

    def __hash__(self) -> int:
        # Model states are dictionary keys of the explorer's memo: hash them once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.cr3, self.pcide, self.fsgsbase, self.cpl, self.ss, self.gs_base, self.kernel_gs_base,
                      self.spec_ctrl, self.mcg_status, self.nmi_blocked, self.nmi_pending, self.stale,
                      self.compat, self.csl, self.spec, self.cr2, self.dr6, self.dr7))
            object.__setattr__(self, "_hash", h)
        return h

    def but(self, **changes) -> "CpuState":
        """A copy with ``changes`` (dataclasses.replace, without its per-call overhead)."""
        new = object.__new__(CpuState)
        d = new.__dict__
        d.update(self.__dict__)
        d.pop("_hash", None)
        for k, v in changes.items():
            if k not in d:
                raise TypeError(f"CpuState has no field {k!r}")
            d[k] = v
        return new

    @property
    def mcip(self) -> bool:
        return bool(self.mcg_status & MCG_STATUS_MCIP)

    @property
    def pcid(self) -> int:
        return self.cr3 & CR3_PCID_MASK if self.pcide else 0

    @property
    def user_cr3(self) -> bool:
        return bool(self.cr3 & PTI_USER_PGTABLE)


@dataclass(frozen=True)
class Cr3Write:
    old: int
    written: int              # the operand, NOFLUSH included
    new: int                  # what CR3 holds afterwards
    noflush: bool
    flushed: tuple[int, ...]  # PCIDs whose stale entries this write flushed (-1: all)
    stale_made_current: bool  # NOFLUSH write that made a stale PCID current
    redundant: bool           # CR3 unchanged and nothing stale to flush


@dataclass(frozen=True)
class MsrWrite:
    msr: int
    old: int | None
    new: int
    redundant: bool           # wrote the value the MSR already held


def decode_cr3(value: int, pcide: bool = True) -> str:
    """'pgd=0x1000000 pcid=0x802 user pgtable, user pcid, NOFLUSH' style description."""
    parts = [f"pgd={value & ~0x1FFF & ((1 << 52) - 1):#x}"]
    if pcide:
        parts.append(f"pcid={value & CR3_PCID_MASK:#x}")
    parts.append("user" if value & PTI_USER_PGTABLE else "kernel")
    if value & NOFLUSH:
        parts.append("NOFLUSH")
    return " ".join(parts)


# --- CR3 ---------------------------------------------------------------------------------
def write_cr3(s: CpuState, value: int) -> tuple[CpuState, Cr3Write]:
    noflush = s.pcide and bool(value & NOFLUSH)
    new = value & ~NOFLUSH & ((1 << 64) - 1)
    pcid = new & CR3_PCID_MASK if s.pcide else 0
    was_stale = pcid in s.stale
    if not s.pcide:
        flushed = tuple(sorted(s.stale)) or ()
        stale = frozenset()
    elif noflush:
        flushed = ()
        stale = s.stale
    else:
        flushed = (pcid,) if was_stale else ()
        stale = s.stale - {pcid}
    event = Cr3Write(s.cr3, value, new, noflush, flushed, noflush and was_stale,
                     redundant=(new == s.cr3 and not was_stale))
    return s.but(cr3=new, stale=stale), event


def invalidate_pcid(s: CpuState, pcid: int) -> CpuState:
    """The kernel invalidated mappings for ``pcid``: its TLB entries are stale now."""
    return s.but(stale=s.stale | {pcid})


# --- GS -------------------------------------------------------------------------------------
def swapgs(s: CpuState) -> CpuState:
    return s.but(gs_base=s.kernel_gs_base, kernel_gs_base=s.gs_base)


def wrgsbase(s: CpuState, value: int) -> CpuState:
    return s.but(gs_base=value)


# --- debug registers and CR2 ----------------------------------------------------------------
DR6_RESERVED = 0xFFFF0FF0
DR6_B0 = 1 << 0               # breakpoint 0's condition was met (a data breakpoint hit)
DR6_BS = 1 << 14              # single step
DR7_FIXED = 0x400
DR7_ENABLES = 0xFF            # L0-L3, G0-G3
# The page fault a scenario (and an injected #PF) takes: a user address the kernel touched.
PF_ADDRESS = 0x0000_0000_0040_2000
# The fault a handler takes when the page-fault handler effect is on (perf reading a user stack).
HANDLER_PF_ADDRESS = 0x0000_7FFD_C0DE_1000


def armed(s: CpuState) -> bool:
    """Whether DR7 enables a breakpoint (a data breakpoint can raise #DB)."""
    return bool(s.dr7 & DR7_ENABLES)


def read_dr(s: CpuState, n: int) -> int:
    """MOV from DRn (DR0-3 hold no address the model uses; DR4/5 alias DR6/7, CR4.DE clear)."""
    if n in (6, 4):
        return s.dr6
    if n in (7, 5):
        return s.dr7
    return 0


def write_dr(s: CpuState, n: int, value: int) -> CpuState:
    if n in (6, 4):
        return s.but(dr6=value & 0xFFFF_FFFF)
    if n in (7, 5):
        return s.but(dr7=(value & 0xFFFF_FFFF) | DR7_FIXED)
    return s


# --- MSRs -----------------------------------------------------------------------------------
class MsrError(Exception):
    """RDMSR/WRMSR of an MSR the model does not have: #GP on real hardware."""


def rdmsr(s: CpuState, msr: int) -> int:
    if msr == MSR_GS_BASE:
        return s.gs_base
    if msr == MSR_KERNEL_GS_BASE:
        return s.kernel_gs_base
    if msr == MSR_SPEC_CTRL:
        return s.spec_ctrl
    if msr == MSR_MCG_STATUS:
        return s.mcg_status
    raise MsrError(f"RDMSR of unmodelled MSR {msr:#x}")


def wrmsr(s: CpuState, msr: int, value: int) -> tuple[CpuState, MsrWrite]:
    value &= (1 << 64) - 1
    if msr in (MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_FS_BASE) and not canonical(value):
        raise MsrError(f"WRMSR {msr:#x} with a non-canonical value {value:#x}")
    if msr == MSR_GS_BASE:
        return s.but(gs_base=value), MsrWrite(msr, s.gs_base, value, s.gs_base == value)
    if msr == MSR_KERNEL_GS_BASE:
        return s.but(kernel_gs_base=value), MsrWrite(msr, s.kernel_gs_base, value,
                                                          s.kernel_gs_base == value)
    if msr == MSR_SPEC_CTRL:
        return s.but(spec_ctrl=value), MsrWrite(msr, s.spec_ctrl, value, s.spec_ctrl == value)
    if msr == MSR_MCG_STATUS:
        return s.but(mcg_status=value), MsrWrite(msr, s.mcg_status, value, s.mcg_status == value)
    if msr == MSR_PRED_CMD:  # IBPB: a command, never redundant
        return s, MsrWrite(msr, None, value, False)
    raise MsrError(f"WRMSR of unmodelled MSR {msr:#x}")


# --- exceptions, IRET, SYSCALL, SYSRET --------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """A hardware exception frame as it sits on the stack (lowest address first)."""

    error_code: int | None
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    def words(self) -> list[int]:
        w = [self.rip, self.cs, self.rflags, self.rsp, self.ss]
        return ([self.error_code] if self.error_code is not None else []) + w


def can_deliver(s: CpuState, vector: Vector) -> bool:
    """Whether hardware would deliver ``vector`` now (NMI may instead be latched)."""
    if vector is Vector.MC:
        return not s.mcip         # a second #MC with MCIP set shuts the machine down
    if vector is Vector.NMI:
        return not s.nmi_blocked
    return True


def recorded(s: CpuState, vector: Vector, single_step: bool = False) -> CpuState:
    """What delivering ``vector`` records besides the frame: a #PF its linear address in CR2, a
    #DB its condition in DR6 (single step: BS; else a data breakpoint: B0; DR6 bits are sticky)."""
    if vector is Vector.PF:
        return s.but(cr2=PF_ADDRESS)
    if vector is Vector.DB:
        return s.but(dr6=s.dr6 | (DR6_BS if single_step else DR6_B0))
    return s


def deliver(s: CpuState, vector: Vector, *, rip: int, rsp: int, rflags: int, error_code: int | None,
            stack_top: int, ist: bool) -> tuple[CpuState, Frame, int, int]:
    """Deliver through a 64-bit interrupt gate: (state, frame, new RSP, new RFLAGS).

    ``stack_top`` is where the frame goes: the IST slot (``ist``: the gate names one), TSS.sp0
    for a CPL change, or the current RSP.  The CPU aligns it to 16 bytes before pushing.
    """
    user = s.cpl == 3
    frame = Frame(error_code if vector.error_code else None, rip,
                  (USER32_CS if s.compat else USER_CS) if user else KERNEL_CS,
                  rflags, rsp, s.ss if not user else USER_DS)
    new_rsp = (stack_top & ~0xF) - 8 * len(frame.words())
    new_flags = (rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)) | RFLAGS_FIXED
    new = s.but(cpl=0, ss=0 if user or ist else s.ss,
                  nmi_blocked=s.nmi_blocked or vector is Vector.NMI,
                  mcg_status=s.mcg_status | (MCG_STATUS_MCIP if vector is Vector.MC else 0))
    return new, frame, new_rsp, new_flags


def latch_nmi(s: CpuState) -> CpuState:
    return s.but(nmi_pending=True)


class FrameError(Exception):
    """SYSRET with state the CPU would refuse (#GP in ring 0)."""


class IretFault(Exception):
    """IRETQ that faults: the CPU delivers ``vector`` with ``error_code`` at the IRET
    instead.  ``cpu`` is the state the fault is delivered from: NMIs are unblocked
    already, since IRET unblocks them even when it faults (SDM Vol. 3A 6.7.1)."""

    def __init__(self, cpu: CpuState, vector: Vector, error_code: int, why: str) -> None:
        super().__init__(why)
        self.cpu, self.vector, self.error_code = cpu, vector, error_code


USER_CODE_SELECTORS = (USER_CS, USER32_CS)


def iret(s: CpuState, frame: Frame) -> CpuState:
    """IRETQ to ``frame`` (error code already popped).  Any IRET unblocks NMIs, a faulting one
    too: that one raises ``IretFault`` (the checks of the SDM's IRET pseudocode, for the
    selectors of Linux's GDT)."""
    s = s.but(nmi_blocked=False)
    rpl = frame.cs & 3
    if frame.cs not in (KERNEL_CS,) + USER_CODE_SELECTORS:
        raise IretFault(s, Vector.GP, frame.cs & ~3, f"IRET to an invalid CS {frame.cs:#x}")
    if rpl < s.cpl:
        raise IretFault(s, Vector.GP, frame.cs & ~3, "IRET to a more privileged level")
    if rpl == 3:
        if frame.ss & ~3 == 0:
            raise IretFault(s, Vector.GP, 0, f"IRET to user mode with a null SS {frame.ss:#x}")
        if frame.ss != USER_DS:
            raise IretFault(s, Vector.GP, frame.ss & ~3, f"IRET to user mode with an invalid SS {frame.ss:#x}")
    if not canonical(frame.rip):
        raise IretFault(s, Vector.GP, 0, f"IRET to a non-canonical RIP {frame.rip:#x}")
    if rpl == 3:
        return s.but(cpl=3, ss=frame.ss, compat=frame.cs == USER32_CS)
    return s.but(cpl=rpl, ss=frame.ss)


def syscall(s: CpuState) -> CpuState:
    """SYSCALL, from 64-bit or compat mode (CS and SS from MSR_STAR either way)."""
    return s.but(cpl=0, ss=KERNEL_DS)


def sysenter(s: CpuState) -> CpuState:
    """SYSENTER: CS/SS from MSR_IA32_SYSENTER_CS, RSP from SYSENTER_ESP, RIP from SYSENTER_EIP;
    only VM, IF and RF are cleared in RFLAGS (``SYSENTER_CLEARS``): TF, NT, AC, DF stay as user
    space set them."""
    return s.but(cpl=0, ss=KERNEL_DS)


# What SYSENTER clears in RFLAGS (SDM Vol. 2B, SYSENTER: "RFLAGS.VM, IF, RF <- 0").
SYSENTER_CLEARS = RFLAGS_VM | RFLAGS_IF | RFLAGS_RF


def sysret(s: CpuState, rip: int) -> CpuState:
    if not canonical(rip):
        raise FrameError(f"SYSRET to a non-canonical RIP {rip:#x} (#GP in ring 0)")
    return s.but(cpl=3, ss=USER_DS, compat=False)


def sysretl(s: CpuState) -> CpuState:
    """SYSRET with 32-bit operand size: to compat mode, CS __USER32_CS, SS __USER_DS, RIP = ECX
    (32 bits: no canonical check)."""
    return s.but(cpl=3, ss=USER_DS, compat=True)


# ---- speculation hygiene ---------------------------------------------------------------------
# What the entry code did since the CPU last entered the kernel, as ``CpuState.spec`` bits.  They
# are kept only when a feature set asks for a check that reads them (``SpecConfig``), so that
# every other run's model states compare as before.
SPEC_VERW = 1          # VERW (CLEAR_CPU_BUFFERS) ran since the last entry into the kernel
SPEC_UNTRAINED = 2     # UNTRAIN_RET's call (entry_untrain_ret, srso_*, entry_ibpb) ran since the entry from user mode
SPEC_BHB = 4           # clear_bhb_loop (CLEAR_BRANCH_HISTORY) ran since the entry from user mode
SPEC_SYSCALL = 8       # that entry from user mode was a system call (BHI's clearing is for those)
SPEC_VERW_UNDONE = 16  # a VERW had run, then an entry from kernel mode (NMI, #MC, #DB) returned without one
SPEC_KERNEL = SPEC_UNTRAINED | SPEC_BHB     # ordinary kernel code: its entry did all of it long ago
SPEC_WINDOW = 512      # instructions a mispredicted branch may run ahead (see ExploreConfig.spec_window)


@dataclass(frozen=True)
class SpecConfig:
    """Which speculation-hygiene checks a feature set asks for (kernelabi's ``spec_config``)."""

    swapgs: bool = False        # follow mispredicted branches: swapgs-unfenced
    swapgs_speculates: bool = False   # SWAPGS itself runs speculatively (X86_BUG_SWAPGS)
    verw: bool = False          # verw-missing
    untrain: bool = False       # ret-before-untrain: UNTRAIN_RET before the first RET/indirect branch
    ibrs: bool = False          # ret-before-untrain: IBRS before the first RET/indirect branch of the entry code
    bhb: bool = False           # ret-before-untrain: clear_bhb_loop before a system call's first indirect branch

    @property
    def tracks(self) -> bool:
        """Whether the ``spec`` bits are kept at all."""
        return self.verw or self.untrain or self.bhb

    @property
    def branches(self) -> bool:
        """Whether RETs and indirect branches of the entry code are watched."""
        return self.untrain or self.ibrs or self.bhb


def entered(s: CpuState, from_user: bool, system_call: bool) -> CpuState:
    """The spec bits after an entry into the kernel: any entry may leave kernel data in the CPU's
    buffers (VERW is due again); one from user mode also brings user-trained predictors."""
    if from_user:
        return s.but(spec=SPEC_SYSCALL if system_call else 0)
    return s.but(spec=(s.spec & ~SPEC_VERW) | SPEC_VERW_UNDONE) if s.spec & SPEC_VERW else s


def unmitigated(s: CpuState, cfg: SpecConfig, what: str, ibrs_on: bool) -> tuple[str, ...]:
    """The mitigations a RET ("ret"), an indirect branch ("indirect") or a C call ("c") still
    waits for under ``cfg`` (ibrs_on: SPEC_CTRL has IBRS)."""
    if s.cpl != 0:
        return ()
    out = []
    if cfg.ibrs and what != "c" and not ibrs_on:
        out.append("IBRS_ENTER")
    if cfg.untrain and not s.spec & SPEC_UNTRAINED:
        out.append("UNTRAIN_RET")
    if cfg.bhb and what != "ret" and s.spec & SPEC_SYSCALL and not s.spec & SPEC_BHB:
        out.append("CLEAR_BRANCH_HISTORY")
    return tuple(out)
