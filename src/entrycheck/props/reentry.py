"""The root cause ``ist-reentered``: an exception delivered through an IST slot while an earlier
delivery's frame on that stack is still live (the run reads it later).

The explorer judges an injected delivery at its boundary, and an NMI that was latched and let
in by another handler's IRET against the recorded run that IRET resumed; ``trace`` records the
path without the exception once more and asks the same question.  Both use ``live_frame`` and
word their findings with ``message``.  What goes wrong on a path after such a delivery is one of
its symptoms: ``RootCauses`` keeps the deliveries of the path being explored, the first of which
the symptoms fold under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from entrycheck.kernelabi.linux import ist_index
from entrycheck.kernelabi.stubs import PTREGS_SIZE
from entrycheck.machine.api import LiveIndex, StepLog
from entrycheck.machine.events import Delivered, Event, Injection, Resumed
from entrycheck.machine.model import Vector
from entrycheck.machine.state import Interrupted


# What an IDT entry writes below the hardware frame before its handler can move off the IST
# stack: the rest of pt_regs (orig_ax and the general registers) and the return address of
# the call into paranoid_entry/error_entry (idtentry_mce_db, idtentry_vc, idtentry_df; not
# asm_exc_nmi, whose nested-NMI test comes first).
ENTRY_PUSHES = PTREGS_SIZE + 8


def live_frame(layout, live: LiveIndex, outstanding: Sequence[Interrupted], vector: Vector, top: int,
               boundary: int) -> tuple[Interrupted, tuple[int, ...], bool] | None:
    """(the outstanding exception, the words, whether they are its frame's) when a ``vector``
    frame written below ``top`` at ``boundary`` goes onto the IST stack of an exception still
    outstanding there and covers words the recorded run (``live``) reads later: the earlier
    handler has not moved off the stack or copied its frame (an ist-reentered delivery).  When
    the frame covers none, the words the new entry's pushes below it cover (the earlier
    handler still runs on that stack: its saved registers, its return addresses); else None."""
    slot = ist_index(vector)
    outer = next((o for o in outstanding if ist_index(o.vector) == slot), None)
    if outer is None:
        return None
    wbase = layout.writable_base

    def read_later(lo: int, hi: int) -> tuple[int, ...]:
        return tuple(a for a in range(lo, hi, 8)
                     if layout.pages.get(a >> 12) is not None and live.live(layout.phys(a) - wbase, boundary))
    size = vector.frame_bytes
    words = read_later(top - size, top)
    if words:
        return outer, words, True
    if vector is Vector.NMI:
        return None      # the NMI entry tells a nested NMI apart before it pushes anything more
    words = read_later(top - ENTRY_PUSHES, top - size)
    return (outer, words, False) if words else None


def message(vector: Vector, outer: Interrupted, words: int, how: str, symbolize: Callable[[int], str],
            in_frame: bool = True) -> str:
    """What an ist-reentered finding says."""
    where = f"user mode ({outer.rip:#x})" if outer.cpu.cpl == 3 else symbolize(outer.rip)
    if in_frame:
        return (f"{vector.label} delivered through IST {ist_index(vector)}{how} while the frame of the "
                f"{outer.vector.label} that interrupted {where} is still live on that stack (the handler reads it "
                f"later; the new frame overwrites {words} of its words)")
    return (f"{vector.label} delivered through IST {ist_index(vector)}{how} while the handler of the "
            f"{outer.vector.label} that interrupted {where} still runs on that stack (the registers the new "
            f"entry saves overwrite {words} words it reads later)")


def latched(resumed: Interrupted, iret_pc: int, symbolize: Callable[[int], str]) -> str:
    """How a latched NMI came in: the IRET that resumed ``resumed`` unblocked NMIs."""
    return (f" (latched, and delivered when the {resumed.vector.label} handler's IRET to "
            f"{symbolize(iret_pc)} unblocked NMIs)")


def stack_top(layout, ist_slot: int, memory) -> int:
    """The IST stack top a delivery through the TSS slot at ``ist_slot`` uses, read from a
    snapshot of writable memory."""
    slot = layout.phys(ist_slot) - layout.writable_base
    return int.from_bytes(memory[slot:slot + 8], "little")


class Recorded(Protocol):
    """A recorded run the explorer keeps: its step log and what it still reads."""

    log: StepLog

    @property
    def live(self) -> LiveIndex: ...


def latched_delivery(layout, events: Sequence[Event], resumed_runs: Sequence[tuple[Recorded, int]]):
    """The first NMI in ``events`` that was latched, let in by an IRET that resumed one of
    ``resumed_runs`` (a recorded run and the boundary its exception was delivered at), and
    delivered while that run's frame on the NMI stack is live: (its index in ``events``, the
    event, the resumed run and boundary, what ``live_frame`` found, the IRET's Resumed event),
    or None."""
    prev = None
    for j, e in enumerate(events):
        if type(e) is Delivered and e.from_latch and ist_index(e.vector) and type(prev) is Resumed:
            resumed = prev.injection
            for ref, ref_k in resumed_runs:
                # The recorded run it resumed: where that exception was delivered.
                if resumed.step == ref_k and resumed.chain_index == ref.log.chains[ref_k - ref.log.start]:
                    found = live_frame(layout, ref.live, ref.log.outstanding[ref_k - ref.log.start], e.vector,
                                       e.stack + e.vector.frame_bytes, ref_k)
                    if found is not None:
                        return j, e, ref, ref_k, found, prev
                    break
        prev = e
    return None


@dataclass
class Reentry:
    """An ist-reentered delivery on the path being explored."""

    position: int                    # path index of its Delivered event
    chain: tuple[Injection, ...]     # the path up to it
    pc: int                          # the instruction it interrupted
    message: str
    trace: tuple[str, ...]
    folded: set[str]                 # invariants of its symptoms
    step: int = -1                   # inside a run: the boundary it was delivered at


class RootCauses:
    """The ist-reentered deliveries on the path being explored (outermost first).  With
    ``fold``, only the first is a root cause: a later one, and every violation from the
    first's position on, is one of its symptoms."""

    def __init__(self, fold: bool) -> None:
        self.fold = fold
        self.stack: list[Reentry] = []

    def new_root(self, r: Reentry) -> bool:
        """Whether ``r`` is a root cause of its own (then the caller pushes it)."""
        if self.stack and self.fold:
            self.stack[0].folded.add("ist-reentered")
            return False
        return True

    def cut(self) -> int | None:
        """The path position from which violations fold (None: none fold)."""
        return self.stack[0].position if self.stack and self.fold else None

    def folds(self, invariant: str) -> None:
        self.stack[0].folded.add(invariant)


__all__ = ["live_frame", "message", "latched", "stack_top", "latched_delivery", "Reentry", "RootCauses"]
