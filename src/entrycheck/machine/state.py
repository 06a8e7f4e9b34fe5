"""The machine's state as plain data: registers by name, snapshots, and what an exception interrupted.

Nothing here knows about Unicorn.  A ``Snapshot`` can be taken in one process and
restored in another; two snapshots are equal when the machines they describe are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from entrycheck.machine.model import CpuState, Vector

REG_NAMES: tuple[str, ...] = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                              "r13", "r14", "r15", "rsp", "rip", "rflags")
GPR_NAMES: tuple[str, ...] = REG_NAMES[:15]
REG_INDEX = {name: k for k, name in enumerate(REG_NAMES)}
RSP, RIP, RFLAGS = REG_INDEX["rsp"], REG_INDEX["rip"], REG_INDEX["rflags"]
CONTEXT_LABELS: tuple[str, ...] = GPR_NAMES + ("rflags",)
"""What an exception must give back besides RIP and RSP (which its frame carries)."""


def context_of(regs: tuple[int, ...]) -> tuple[int, ...]:
    """The general registers and RFLAGS of registers in REG_NAMES order (CONTEXT_LABELS order)."""
    return regs[:RSP] + (regs[RFLAGS],)


class Regs(NamedTuple):
    """The registers a snapshot carries, in REG_NAMES order."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rsp: int
    rip: int
    rflags: int

    def context(self) -> tuple[int, ...]:
        """The general registers and RFLAGS (CONTEXT_LABELS order)."""
        return context_of(self)

    def with_(self, **values: int) -> "Regs":
        return self._replace(**values)


def regs(**values: int) -> Regs:
    """Registers with the given values, zero elsewhere."""
    return Regs(*(values.get(name, 0) for name in REG_NAMES))


@dataclass(frozen=True)
class Interrupted:
    """An exception delivered and not yet resumed: what it interrupted."""

    vector: Vector
    step: int
    rip: int
    rsp: int
    regs: tuple[int, ...]      # CONTEXT_LABELS at delivery
    cpu: CpuState
    chain_index: int           # how many exceptions were delivered on the path before it


@dataclass(frozen=True)
class Snapshot:
    """Everything a run starts from: registers, writable memory, model state, bookkeeping."""

    regs: Regs
    memory: bytes                       # the writable physical span
    cpu: CpuState
    steps: int                          # instructions executed on the path so far
    outstanding: tuple[Interrupted, ...] = ()
    chain: int = 0                      # exceptions delivered on the path so far
    home: tuple[int, int] | None = None  # (rip, rsp) of the scenario's interrupted kernel context


__all__ = ["REG_NAMES", "GPR_NAMES", "REG_INDEX", "CONTEXT_LABELS", "Regs", "regs", "Interrupted", "Snapshot",
           "RSP", "RIP", "RFLAGS"]
