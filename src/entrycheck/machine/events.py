"""What happened during a run: events the machine records, how a run ended, and injections.

Every event carries the CPU state right after it (``cpu``), so a trace, a report or
an invariant never re-computes the model.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.machine.model import VECTOR_BY_NAME, Cr3Write, CpuState, Frame, MsrWrite, Vector
from entrycheck.machine.state import Interrupted


class Outcome(enum.Enum):
    RETURNED = "returned"                  # back in user mode, or back in the scenario's kernel context
    EMULATION_FAULT = "emulation-fault"    # unmapped access, #UD, #GP, a failed stub checkpoint
    NO_RETURN = "no-return"                # step budget exhausted
    STOPPED = "stopped"                    # the caller's stop rule ended it (e.g. converged with a known run)


class FaultKind(enum.Enum):
    UNMAPPED = "unmapped"                  # no mapping at all
    USER_CR3 = "kernel-memory-under-user-cr3"   # kernel-only page touched with the user page tables
    USER_GS = "percpu-with-user-gs"        # a %gs: access with the user GSBASE
    UD = "invalid-opcode"
    GP = "general-protection"
    TRAP = "trap"                          # int3 and friends reached
    CHECKPOINT = "checkpoint"              # a stub found the state C code needs missing
    UNDEFINED_DATA = "undefined-data"      # C read data no object defines and no booted value gives
    SPECULATIVE_USER_GS = "swapgs-unfenced"   # on a mispredicted path: a %gs: access or C call, user GSBASE


DELIVERABLE = ("nmi", "mc", "db", "irq", "df", "vc")     # --vectors
INJECTABLE = DELIVERABLE + ("mispredict",)                # --inject (a mispredicted conditional branch too)
_SPEC = re.compile(r"^(?P<vec>[a-z]+)@(?P<loc>[^#]+?)(?:#(?P<hit>\d+))?$")


@dataclass(frozen=True, order=True)
class Injection:
    """An exception delivered at an instruction boundary: before the ``hit``-th execution of
    the instruction at ``at`` (sym+off), counted from the previous injection of the chain."""

    vector: Vector
    at: str
    hit: int = 1

    def spec(self) -> str:
        """The --inject syntax that reproduces it: VEC@SYM+OFF[#HIT]."""
        return f"{self.vector.label}@{self.at}" + (f"#{self.hit}" if self.hit != 1 else "")

    def to_json(self) -> dict:
        out: dict = {"vector": self.vector.label, "at": self.at}
        if self.hit != 1:
            out["hit"] = self.hit
        return out

    @staticmethod
    def parse(text: str) -> "Injection":
        """VEC@SYM+OFF[#N] -> Injection (the site is checked against an image elsewhere)."""
        m = _SPEC.match(text.strip())
        if not m:
            raise InputError(f"bad injection {text!r}: expected VEC@SYM+OFF or VEC@SYM+OFF#N, "
                             "e.g. nmi@paranoid_exit+0x43")
        name = m.group("vec").lower()
        if name not in INJECTABLE:
            raise InputError(f"unknown vector {name!r} in {text!r}; choose from {', '.join(INJECTABLE)}")
        hit = int(m.group("hit") or 1)
        if hit < 1:
            raise InputError(f"bad hit count in {text!r}: counts start at 1")
        return Injection(VECTOR_BY_NAME[name], m.group("loc").strip(), hit)

    @staticmethod
    def from_json(doc: object) -> "Injection":
        if not isinstance(doc, dict) or not isinstance(doc.get("vector"), str) or not isinstance(doc.get("at"), str):
            raise InputError("an injection must be an object with 'vector' and 'at'")
        hit = doc.get("hit", 1)
        if not isinstance(hit, int) or isinstance(hit, bool) or hit < 1:
            raise InputError(f"bad hit count {hit!r} in an injection")
        return Injection.parse(f"{doc['vector']}@{doc['at']}#{hit}")


@dataclass(frozen=True)
class Event:
    step: int
    pc: int
    cpu: CpuState             # the model state right after the event


@dataclass(frozen=True)
class Delivered(Event):
    vector: Vector
    frame: Frame
    stack: int                # RSP after the frame was pushed
    from_latch: bool
    single_step: bool = False # a #DB trap the CPU raised because TF was set (not an injection)


@dataclass(frozen=True)
class Latched(Event):
    vector: Vector


@dataclass(frozen=True)
class Resumed(Event):
    injection: Interrupted
    regs: tuple[int, ...]     # CONTEXT_LABELS when the IRET landed


@dataclass(frozen=True)
class Cr3Read(Event):
    value: int


@dataclass(frozen=True)
class Cr2Read(Event):
    value: int
    handling: "Vector | None"     # the innermost event the CPU is handling (its frame outstanding)


@dataclass(frozen=True)
class DebugRegWritten(Event):
    number: int
    old: int
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
class Mispredicted(Event):
    """The conditional branch at ``pc`` ran; the path goes on speculatively at ``target``, its
    other side (a mispredict injection)."""

    target: int


@dataclass(frozen=True)
class Branch(Event):
    """A RET or indirect branch of the entry code that ran before a mitigation its feature set
    says must come first (recorded only then)."""

    kind: str                 # "ret" or "indirect"
    missing: tuple[str, ...]  # IBRS_ENTER, UNTRAIN_RET, CLEAR_BRANCH_HISTORY


@dataclass(frozen=True)
class StubCall(Event):
    name: str
    return_address: int
    rsp: int
    note: str = ""


@dataclass(frozen=True)
class Iret(Event):
    frame: Frame
    to_user: bool
    eret: str = ""            # "ERETU"/"ERETS" under FRED (NMIs unblocked only if its frame says NMI)


@dataclass(frozen=True)
class IretFaulted(Event):
    """An IRET whose frame the CPU refused: ``vector`` is delivered at the IRET instead (NMIs
    were unblocked all the same)."""

    frame: Frame
    vector: Vector
    error_code: int
    reason: str


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
