"""One run as the machine's parts see it: its bookkeeping (``RunState``) and the context they all
act through (``RunContext``: registers by name, memory by virtual address with the access and
dataflow logs, the model state, events, faults and the end of the run).

``RunContext`` is also what a stub (a C function's model) is handed: the ``Context`` protocol of
machine/api.py.  Delivery, the stop rules, the privileged instructions' actions and speculation
(delivery.py, stops.py, actions.py, speculation.py) each hold the one context of their core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from entrycheck.machine import model, uc as U
from entrycheck.machine.api import FLAG_LOCS, GROUP_MASKS, MASK64, ConvergePoint, Op, Request
from entrycheck.machine.events import Ended, Event, Fault, FaultKind, Outcome
from entrycheck.machine.memory import AddressSpace
from entrycheck.machine.model import CpuState, Vector
from entrycheck.machine.state import REG_INDEX, Interrupted

_UC_REG = U.UC_REG
_RIP = _UC_REG["rip"]


@dataclass
class RunState:
    """One run's bookkeeping."""

    request: Request
    steps: int
    outstanding: tuple[Interrupted, ...]
    chain: int
    home: tuple[int, int] | None
    limit: int
    events: list[Event] = field(default_factory=list)
    outcome: Outcome | None = None
    reason: str = ""
    pending_fault: tuple[FaultKind, str, int | None] | None = None
    delivered: Interrupted | None = None
    resumed_step: int | None = None
    converged: int | None = None
    points: dict[int, tuple[ConvergePoint, ...]] = field(default_factory=dict)   # by index, in order
    inject: list[tuple[int, Vector, int]] = field(default_factory=list)
    hits: int = 0
    # STEPS
    pcs: list[int] = field(default_factory=list)
    regs: list[tuple[int, ...]] = field(default_factory=list)
    cpus: list[CpuState] = field(default_factory=list)
    outs: list[tuple[Interrupted, ...]] = field(default_factory=list)
    chains: list[int] = field(default_factory=list)
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)
    accesses: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)
    flow: list[tuple] | None = None
    full: bool = False
    irets: int = 0
    seen_states: dict = field(default_factory=dict)
    seen_light: dict = field(default_factory=dict)   # light state -> times seen
    head_visits: dict = field(default_factory=dict)
    restart: bool = False         # stopped to go on at a new RIP (a single-step #DB was delivered)
    tf_watch: bool = False        # TF may be set in kernel mode (started with it, or an IRET restored it)
    speculative: bool = False     # a mispredicted path (Request.speculate, or a mispredict injection)
    window_from: int = 0          # the step the speculation window counts from
    mispredict: int | None = None  # the conditional branch at this address runs, then its other side


class RunContext:
    """The state of one Unicorn core's current run, and every way its parts change it."""

    def __init__(self, u: U.Unicorn, layout: AddressSpace, image, config, steps_mode: bool) -> None:
        self.u = u
        self.layout = layout
        self.image = image
        self.config = config
        self.steps_mode = steps_mode
        self.wbase, self.wsize = layout.writable_base, layout.writable_size
        self.cpu: CpuState | None = None
        self.user_view: bool | None = None
        self._gs: int | None = None
        self.run: RunState | None = None
        self.options: Hashable = None

    # ---- registers -----------------------------------------------------------------------
    def reg(self, name: str) -> int:
        flow = self.run.flow
        if flow is not None:
            flow.append((Op.USE, REG_INDEX[name]))
        return self.u.read(_UC_REG[name])

    def flags(self, mask: int) -> int:
        """RFLAGS & ``mask``: a use of the flag groups those bits belong to (FLOW), not of all."""
        flow = self.run.flow
        if flow is not None:
            for loc in FLAG_LOCS:
                if GROUP_MASKS[loc] & mask:
                    flow.append((Op.USE, loc))
        return self.u.read(_UC_REG["rflags"]) & mask

    def set_reg(self, name: str, value: int) -> None:
        flow = self.run.flow
        if flow is not None:
            flow.append((Op.CONST, REG_INDEX[name]))
        self.u.write(_UC_REG[name], value)

    @property
    def handling(self) -> tuple:
        """The vectors whose frames are outstanding (delivered, not yet returned from), innermost last."""
        return tuple(o.vector for o in self.run.outstanding)

    def symbolize(self, addr: int) -> str:
        return self.image.symbolize(addr)

    # ---- memory ----------------------------------------------------------------------------
    def mapped(self, addr: int) -> bool:
        return (addr >> 12) in self.layout.pages

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        run = self.run
        while size > 0:
            chunk = min(size, 0x1000 - (addr & 0xFFF))
            phys = self.layout.phys(addr)
            if self.steps_mode:
                run.accesses.append((run.steps, phys, chunk, False, False))
                if run.flow is not None:
                    run.flow.append((Op.MREAD, phys, chunk))
            out += self.u.mem_read(phys, chunk)
            addr += chunk
            size -= chunk
        return bytes(out)

    def read_quietly(self, addr: int, size: int) -> bytes:
        """A read the dataflow log does not see (the CPU reading a frame it then acts on)."""
        run = self.run
        flow, run.flow = run.flow, None
        try:
            return self.read(addr, size)
        finally:
            run.flow = flow

    def write(self, addr: int, data: bytes) -> None:
        self.write_as(addr, data, Op.MWRITE)

    def write_as(self, addr: int, data: bytes, how: Op | None, src: int | None = None) -> None:
        """Write guest memory, logged for the dataflow as ``how`` (None: not at all; MCOPY from ``src``)."""
        run = self.run
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
            phys = self.layout.phys(addr + pos)
            piece = bytes(data[pos:pos + chunk])
            if self.steps_mode:
                run.accesses.append((run.steps, phys, chunk, True, False))
                if self.wbase <= phys < self.wbase + self.wsize:
                    run.writes.append((run.steps, phys - self.wbase, piece))
                if run.flow is not None:
                    if how is Op.MCOPY and src is not None:
                        run.flow.append((Op.MCOPY, phys, self.layout.phys(src + pos), chunk))
                    elif how is not None:
                        run.flow.append((how, phys, chunk))
            self.u.mem_write(phys, piece)
            pos += chunk

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, (value & MASK64).to_bytes(8, "little"))

    def copy(self, dst: int, src: int, size: int) -> None:
        """Copy guest memory (a C function moving pt_regs); the FLOW log sees a copy, not a use."""
        self.write_as(dst, self.read_quietly(src, size), Op.MCOPY, src)

    # ---- model state, events, the end of the run --------------------------------------------
    def set_cpu(self, cpu: CpuState) -> None:
        """Install a new model state; keep Unicorn's GSBASE and TLB in step with it."""
        self.cpu = cpu
        if cpu.gs_base != self._gs:
            self._gs = cpu.gs_base
            self.u.write(U.UC_GS_BASE, cpu.gs_base)
        view = bool(cpu.cr3 & model.PTI_USER_PGTABLE)
        if view is not self.user_view:
            # The fill hook answers per view (PTI user or kernel tables) only.
            self.user_view = view
            self.u.flush_tlb()

    def flow(self, *entry) -> None:
        """An entry of the FLOW log (when the run keeps one)."""
        if self.run.flow is not None:
            self.run.flow.append(entry)

    def skip(self, addr: int, size: int) -> None:
        """The instruction at ``addr`` was carried out here: go on after it."""
        if self.run.flow is not None:
            self.run.flow.append((Op.SKIP,))
        self.u.write(_RIP, addr + size)

    def emit(self, event_type, **fields) -> None:
        run = self.run
        if "pc" not in fields:
            fields["pc"] = self.u.read(_RIP)
        if "cpu" not in fields:
            fields["cpu"] = self.cpu
        run.events.append(event_type(step=run.steps, **fields))

    def fault(self, kind: FaultKind, message: str, address: int | None = None) -> None:
        """End the run with an emulation fault (callable from hooks and stubs).  On a mispredicted
        path a fault is squashed (the path just ends), except the %gs: access with the user
        GSBASE that swapgs-unfenced is about."""
        run = self.run
        if run.speculative and run.outcome is None:
            if kind is FaultKind.USER_GS:
                self.emit(Fault, kind=FaultKind.SPECULATIVE_USER_GS, message=message, address=address)
                self.end(Outcome.STOPPED, f"speculatively: {message}")
            else:
                self.end(Outcome.STOPPED, f"speculation ends at a fault ({kind.value}: {message})")
            return
        if run.outcome is None:
            self.emit(Fault, kind=kind, message=message, address=address)
            self.end(Outcome.EMULATION_FAULT, f"{kind.value}: {message}")

    def end(self, outcome: Outcome, reason: str) -> None:
        run = self.run
        if run.outcome is not None:
            return
        run.outcome = outcome
        run.reason = reason
        self.emit(Ended, outcome=outcome, reason=reason)
        self.u.emu_stop()


__all__ = ["RunState", "RunContext"]
