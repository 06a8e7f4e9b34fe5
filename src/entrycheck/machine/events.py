"""What happened during a run: events the machine records, and how a run ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from entrycheck.machine.model import Cr3Write, CpuState, Frame, MsrWrite, Vector


class Outcome(enum.Enum):
    RETURNED = "returned"                  # back in user mode, or back in the scenario's kernel context
    EMULATION_FAULT = "emulation-fault"    # unmapped access, #UD, #GP, a failed stub checkpoint
    NO_RETURN = "no-return"                # step budget exhausted
    STOPPED = "stopped"                    # the controller stopped it (e.g. converged with a known run)


class FaultKind(enum.Enum):
    UNMAPPED = "unmapped"                  # no mapping at all
    USER_CR3 = "kernel-memory-under-user-cr3"   # kernel-only page touched with the user page tables
    USER_GS = "percpu-with-user-gs"        # a %gs: access with the user GSBASE
    UD = "invalid-opcode"
    GP = "general-protection"
    TRAP = "trap"                          # int3 and friends reached
    CHECKPOINT = "checkpoint"              # a stub found the state C code needs missing


@dataclass(frozen=True)
class Injection:
    """An exception delivered and not yet resumed: what it interrupted."""

    vector: Vector
    step: int
    rip: int
    rsp: int
    regs: tuple[int, ...]     # GPRs + RFLAGS at delivery (see emulator.GPRS)
    cpu: CpuState
    chain_index: int          # position in the injection chain (0 = the scenario's own)


@dataclass(frozen=True)
class Event:
    step: int
    pc: int


@dataclass(frozen=True)
class Delivered(Event):
    vector: Vector
    frame: Frame
    stack: int                # RSP after the frame was pushed
    from_latch: bool


@dataclass(frozen=True)
class Latched(Event):
    vector: Vector


@dataclass(frozen=True)
class Resumed(Event):
    injection: Injection
    regs: tuple[int, ...]
    cpu: CpuState


@dataclass(frozen=True)
class Cr3Read(Event):
    value: int


@dataclass(frozen=True)
class Cr3Written(Event):
    write: Cr3Write
    user_view: bool           # the write switched to (or kept) the PTI user page tables


@dataclass(frozen=True)
class MsrRead(Event):
    msr: int
    value: int


@dataclass(frozen=True)
class MsrWritten(Event):
    write: MsrWrite


@dataclass(frozen=True)
class GsChange(Event):
    how: str                  # "swapgs", "wrgsbase", "wrmsr"
    gs_base: int
    kernel_gs_base: int


@dataclass(frozen=True)
class Fence(Event):
    kind: str                 # "verw", "lfence", "mfence", "clac", "stac"


@dataclass(frozen=True)
class StubCall(Event):
    name: str
    return_address: int
    cpu: CpuState
    rsp: int
    note: str = ""


@dataclass(frozen=True)
class Iret(Event):
    frame: Frame
    to_user: bool
    cpu: CpuState | None = None   # the CPU state the IRET left


@dataclass(frozen=True)
class Sysret(Event):
    rip: int


@dataclass(frozen=True)
class Fault(Event):
    kind: FaultKind
    message: str
    address: int | None = None


@dataclass(frozen=True)
class Ended(Event):
    outcome: Outcome
    reason: str
