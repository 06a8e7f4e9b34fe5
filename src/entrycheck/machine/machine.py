"""The machine: the one adapter between the privileged-state model and Unicorn.

The rest of entrycheck talks to it through one call, ``Machine.run(Request) -> Record``
(machine/api.py): a start state, what to deliver, what to record, when to stop, the
handler options in; a frozen record of what happened out.  Registers are named; only
machine/uc.py touches Unicorn.

Unicorn executes the kernel's instructions; the few it cannot do for us (CR3, MSRs,
SWAPGS, RD/WRGSBASE, LSL of the CPU-number segment, IRETQ, SYSRETQ, VERW and fences,
and every call into a C stub) are found by decoding the image once (machine/sites.py)
and hooked at their addresses only; the hook applies the model's pure function and
skips the instruction.  Exceptions are delivered here, through the TSS's IST slots,
because Unicorn never delivers through an IDT.

Levels of recording (``Level``): EVENTS hooks only those sites and runs at Unicorn's
speed; PCS also hooks every instruction; STEPS keeps the state at every instruction
boundary (registers and model state per step; memory as the start state plus a write
log) and every memory access; FLOW adds the log the dataflow analysis reads
(``machine.flow``).  Two Unicorn instances, one per hook set, are made on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from entrycheck.errors import InternalError
from entrycheck.image.image import CODE_SECTIONS, Image
from entrycheck.image.layout import Perm
from entrycheck.machine import model, uc as U
from entrycheck.machine.api import (DEFAULT_BUDGET, FLAG_GROUPS, GROUP_MASKS, MASK64, ConvergePoint, Context,
                                    Level, LiveIndex, MachineConfig, MemoryCursor, Op, Record, Request, StepLog,
                                    StubHandler)
from entrycheck.machine.events import (Cr3Read, Cr3Written, Delivered, Ended, Event, Fault, FaultKind, Fence, GsChange,
                                       Iret, IretFaulted, Latched, MsrRead, MsrWritten, Outcome, Resumed, Sysret)
from entrycheck.machine.memory import AddressSpace, Unmapped, build_address_space, diff_words
from entrycheck.machine.model import CpuState, Frame, Vector
from entrycheck.machine.sites import PARENT, find_sites
from entrycheck.machine.speculation import Speculation
from entrycheck.machine.state import REG_INDEX, Interrupted, Regs, Snapshot, context_of

RFLAGS_ZF = 1 << 6
SYSTEM_CALL_VECTORS = frozenset({Vector.INT80, Vector.SYSCALL, Vector.SYSENTER})
LOOP_WATCH = 32          # IRETs a run makes before it is watched for a repeating state
LOOP_HEAD_VISITS = 8     # visits of one loop head before the run is watched there for a repeating state
_UC_REG = U.UC_REG
_RAX, _RCX, _RDX = _UC_REG["rax"], _UC_REG["rcx"], _UC_REG["rdx"]
_RSP, _RIP, _RFLAGS = _UC_REG["rsp"], _UC_REG["rip"], _UC_REG["rflags"]


class Machine:
    """One image, one world, one stub handler; runs requests."""

    def __init__(self, image: Image, config: MachineConfig, stubs: StubHandler) -> None:
        self.image = image
        self.config = config
        self.stubs = stubs
        self.space: AddressSpace = build_address_space(config.regions)
        self.layout = self.space       # what callers may read of memory: frozen
        self._sites, self._loop_heads = find_sites(image, config)
        self._cores: dict[bool, _Core] = {}

    def pristine_memory(self) -> bytes:
        """The writable span as the world initialised it."""
        return self.layout.pristine

    def run(self, request: Request) -> Record:
        steps = request.level >= Level.PCS
        core = self._cores.get(steps)
        if core is None:
            core = self._cores[steps] = _Core(self, steps)
        return core.run(request)

    def mapped(self, addr: int) -> bool:
        return (addr >> 12) in self.space.pages



# ---- one run's bookkeeping ----------------------------------------------------------------
@dataclass
class _Run:
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
    points: dict[int, ConvergePoint] = field(default_factory=dict)
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
    seen_light: set = field(default_factory=set)
    head_visits: dict = field(default_factory=dict)
    restart: bool = False         # stopped to go on at a new RIP (a single-step #DB was delivered)
    tf_watch: bool = False        # TF may be set in kernel mode (started with it, or an IRET restored it)
    speculative: bool = False     # a mispredicted path (Request.speculate, or a mispredict injection)
    window_from: int = 0          # the step the speculation window counts from
    mispredict: int | None = None  # the conditional branch at this address runs, then its other side


class _Core(Speculation):
    """One Unicorn instance with one hook set (sites only, or every step)."""

    def __init__(self, machine: Machine, steps: bool) -> None:
        self.m = machine
        self.image = machine.image
        self.config = machine.config
        self.space = machine.space
        self.heads = machine._loop_heads
        self.steps_mode = steps
        self.u = U.Unicorn()
        for chunk in self.space.chunks:
            self.u.uc.mem_map(chunk.phys, len(chunk.data), U.PROT_ALL)
            self.u.uc.mem_write(chunk.phys, chunk.data)
        self.wbase, self.wsize = self.space.writable_base, self.space.writable_size
        for addr, spec in machine._sites.items():
            if spec in (("fence", "clac"), ("fence", "stac")):
                # Unicorn's CPU model raises #UD at CLAC/STAC (smap's alternatives) before a code hook
                # can skip them; AC is not modelled, so they run as a NOP of their length (the site
                # still records them).
                self.u.uc.mem_write(self.space.phys(addr), b"\x0f\x1f\x00")
        self.cpu: CpuState | None = None
        self._user_view: bool | None = None
        self._gs: int | None = None
        self.run_: _Run | None = None
        self.options: Hashable = None
        self._spec = self.config.spec
        self._tracks = self._spec is not None and self._spec.tracks
        self._actions = {addr: self._make_action(*spec) for addr, spec in machine._sites.items()}
        self._spec_stops = {addr: stop for addr, spec in machine._sites.items()
                            if (stop := self._speculation_stop(addr, spec)) is not None}
        self._install_hooks()

    # ---- the request --------------------------------------------------------------------
    def run(self, req: Request) -> Record:
        start = req.start
        self.u.write_all(start.regs)
        self.u.mem_write(self.wbase, start.memory)
        self.cpu = None
        self.set_cpu(start.cpu)
        limit = req.budget_from + req.budget
        run = self.run_ = _Run(req, start.steps, start.outstanding, start.chain, start.home, limit)
        self.options = req.options
        run.points = {p.index: p for p in req.converge}
        run.tf_watch = bool(start.regs.rflags & model.RFLAGS_TF) and not req.speculate
        run.speculative = req.speculate
        run.window_from = start.steps
        if req.injections:
            run.inject = [(self.image.parse_location(i.at), i.vector, i.hit) for i in req.injections]
        if req.level >= Level.FLOW:
            run.flow = []
        run.full = req.level >= Level.STEPS
        if req.deliver is not None:
            before = len(run.outstanding)
            if self.deliver(req.deliver, 0) and len(run.outstanding) > before:
                run.delivered = run.outstanding[before]
        self._go()
        return self._finish(start)

    def _finish(self, start: Snapshot) -> Record:
        run = self.run_
        regs = Regs(*self.u.read_all())
        memory = self.u.mem_read(self.wbase, self.wsize) if self.steps_mode else b""
        final = Snapshot(regs, memory, self.cpu, run.steps, run.outstanding, run.chain, run.home)
        steps = None
        if self.steps_mode:
            steps = StepLog(start.steps, tuple(run.pcs), tuple(run.regs), tuple(run.cpus), tuple(run.outs),
                            tuple(run.chains), start.memory, tuple(run.writes), tuple(run.accesses), start.home)
        rec = Record(run.request, tuple(run.events), run.outcome, run.reason, final, run.delivered,
                     run.resumed_step, run.converged, steps, tuple(run.flow) if run.flow is not None else None)
        self.run_ = None
        return rec

    def _go(self) -> None:
        run = self.run_
        u = self.u
        while run.outcome is None:
            pc = u.read(_RIP)
            remaining = run.limit - run.steps
            if remaining <= 0:
                self._out_of_budget()
                break
            status = u.start(pc, 0 if self.steps_mode else remaining)
            if status != U.OK:
                self._unicorn_error(status)
                break
            if run.restart:
                run.restart = False
                continue
            if run.outcome is None:
                if not self.steps_mode:
                    self._out_of_budget()
                elif run.pending_fault is not None or run.steps >= run.limit:
                    if run.steps >= run.limit:
                        self._out_of_budget()

    def _out_of_budget(self) -> None:
        run = self.run_
        if run.speculative:
            self._end(Outcome.STOPPED, f"the speculation window of {run.limit - run.window_from} instructions ends")
        else:
            self._end(Outcome.NO_RETURN, f"no return within {run.request.budget} instructions")

    def _unicorn_error(self, errno: int) -> None:
        pending = self.run_.pending_fault
        pc = self.u.read(_RIP)
        sym = self.image.symbolize(pc)
        if pending is not None:
            kind, message, address = pending
            self.fault(kind, f"{message} at {sym}", address)
        elif errno == U.ERR_INSN_INVALID:
            self.fault(FaultKind.UD, f"invalid opcode at {sym}")
        elif errno in U.ERR_PROT:
            self.fault(FaultKind.GP, f"access violates page permissions at {sym}")
        elif errno in U.ERR_UNMAPPED:
            self.fault(FaultKind.UNMAPPED, f"unmapped access at {sym}")
        else:
            self.fault(FaultKind.GP, f"{U.error_text(errno)} at {sym}")

    # ---- the Context stubs see ----------------------------------------------------------------
    def reg(self, name: str) -> int:
        flow = self.run_.flow
        if flow is not None:
            flow.append((Op.USE, REG_INDEX[name]))
        return self.u.read(_UC_REG[name])

    def set_reg(self, name: str, value: int) -> None:
        flow = self.run_.flow
        if flow is not None:
            flow.append((Op.CONST, REG_INDEX[name]))
        self.u.write(_UC_REG[name], value)

    def symbolize(self, addr: int) -> str:
        return self.image.symbolize(addr)

    def mapped(self, addr: int) -> bool:
        return (addr >> 12) in self.space.pages

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        run = self.run_
        while size > 0:
            chunk = min(size, 0x1000 - (addr & 0xFFF))
            phys = self.space.phys(addr)
            if self.steps_mode:
                run.accesses.append((run.steps, phys, chunk, False, False))
                if run.flow is not None:
                    run.flow.append((Op.MREAD, phys, chunk))
            out += self.u.mem_read(phys, chunk)
            addr += chunk
            size -= chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self._write(addr, data, Op.MWRITE)

    def _write(self, addr: int, data: bytes, how: Op, src: int | None = None) -> None:
        run = self.run_
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
            phys = self.space.phys(addr + pos)
            piece = bytes(data[pos:pos + chunk])
            if self.steps_mode:
                run.accesses.append((run.steps, phys, chunk, True, False))
                if self.wbase <= phys < self.wbase + self.wsize:
                    run.writes.append((run.steps, phys - self.wbase, piece))
                if run.flow is not None:
                    if how is Op.MCOPY and src is not None:
                        run.flow.append((Op.MCOPY, phys, self.space.phys(src + pos), chunk))
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
        run = self.run_
        flow, run.flow = run.flow, None
        try:
            data = self.read(src, size)
        finally:
            run.flow = flow
        self._write(dst, data, Op.MCOPY, src)

    def set_cpu(self, cpu: CpuState) -> None:
        """Install a new model state; keep Unicorn's GSBASE and TLB in step with it."""
        self.cpu = cpu
        if cpu.gs_base != self._gs:
            self._gs = cpu.gs_base
            self.u.write(U.UC_GS_BASE, cpu.gs_base)
        view = bool(cpu.cr3 & model.PTI_USER_PGTABLE)
        if view is not self._user_view:
            # The fill hook answers per view (PTI user or kernel tables) only.
            self._user_view = view
            self.u.flush_tlb()

    def emit(self, event_type, **fields) -> None:
        run = self.run_
        if "pc" not in fields:
            fields["pc"] = self.u.read(_RIP)
        if "cpu" not in fields:
            fields["cpu"] = self.cpu
        run.events.append(event_type(step=run.steps, **fields))

    def fault(self, kind: FaultKind, message: str, address: int | None = None) -> None:
        """End the run with an emulation fault (callable from hooks and stubs).  On a mispredicted
        path a fault is squashed (the path just ends), except the %gs: access with the user
        GSBASE that swapgs-unfenced is about."""
        run = self.run_
        if run.speculative and run.outcome is None:
            if kind is FaultKind.USER_GS:
                self.emit(Fault, kind=FaultKind.SPECULATIVE_USER_GS, message=message, address=address)
                self._end(Outcome.STOPPED, f"speculatively: {message}")
            else:
                self._end(Outcome.STOPPED, f"speculation ends at a fault ({kind.value}: {message})")
            return
        if self.run_.outcome is None:
            self.emit(Fault, kind=kind, message=message, address=address)
            self._end(Outcome.EMULATION_FAULT, f"{kind.value}: {message}")

    def _end(self, outcome: Outcome, reason: str) -> None:
        run = self.run_
        if run.outcome is not None:
            return
        run.outcome = outcome
        run.reason = reason
        self.emit(Ended, outcome=outcome, reason=reason)
        self.u.emu_stop()

    # ---- exceptions -------------------------------------------------------------------
    def deliver(self, vector: Vector, error_code: int | None = None, *, from_latch: bool = False,
                single_step: bool = False) -> bool:
        """Deliver ``vector`` at the current instruction boundary; an NMI while blocked is latched."""
        cpu = self.cpu
        run = self.run_
        flow = run.flow
        if vector is Vector.NMI and cpu.nmi_blocked:
            if not cpu.nmi_pending:
                self.set_cpu(model.latch_nmi(cpu))
                self.emit(Latched, vector=vector)
            return False
        if not model.can_deliver(cpu, vector):
            raise InternalError(f"{vector.label} cannot be delivered now (MCIP set)")
        if self.config.fred is not None:
            return self._deliver_fred(vector, error_code or 0, from_latch, single_step)
        u = self.u
        rip, rsp, rflags = u.read(_RIP), u.read(_RSP), u.read(_RFLAGS)
        ist = self.config.ist_slots.get(vector)
        if ist is not None:
            top = self.read_u64(ist)
        elif cpu.cpl == 3:
            top = self.read_u64(self.config.sp0_slot)
        else:
            if flow is not None:
                flow.append((Op.USE, REG_INDEX["rsp"]))
            top = rsp
        regs = u.read_all()
        injection = Interrupted(vector, run.steps, rip, rsp, context_of(regs), cpu, run.chain)
        new_cpu, frame, new_rsp, new_flags = model.deliver(
            cpu, vector, rip=rip, rsp=rsp, rflags=rflags,
            error_code=error_code if error_code is not None else 0, stack_top=top, ist=ist is not None)
        return self._push_frame(vector, injection, new_cpu, frame, frame.words(), new_rsp, new_flags,
                                self.config.idt[vector], "frame", from_latch, single_step)

    def _push_frame(self, vector: Vector, injection: Interrupted, new_cpu: CpuState, frame: Frame,
                    words: list[int], new_rsp: int, new_flags: int, entry: int, what: str, from_latch: bool,
                    single_step: bool) -> bool:
        """The common end of IDT and FRED delivery: ``words`` pushed at ``new_rsp``, the CPU at
        ``entry`` with ``new_flags`` and ``new_cpu``, the interrupted context outstanding."""
        run, u = self.run_, self.u
        if self._tracks:
            new_cpu = model.entered(new_cpu, injection.cpu.cpl == 3, vector in SYSTEM_CALL_VECTORS)
        if not self.mapped(new_rsp) or not self.mapped(new_rsp + 8 * len(words) - 1):
            self.fault(FaultKind.UNMAPPED, f"{vector.label} {what} at unmapped stack {new_rsp:#x}", new_rsp)
            return False
        self._write(new_rsp, b"".join((w & MASK64).to_bytes(8, "little") for w in words), None)
        u.write(_RSP, new_rsp)
        u.write(_RFLAGS, new_flags)
        u.write(_RIP, entry)
        self.set_cpu(new_cpu)
        run.outstanding = run.outstanding + (injection,)
        run.chain += 1
        if run.flow is not None:
            run.flow.append((Op.DELIVER, self.space.phys(new_rsp), len(words), len(run.outstanding) - 1))
        self.emit(Delivered, pc=injection.rip, vector=vector, frame=frame, stack=new_rsp, from_latch=from_latch,
                  single_step=single_step)
        return True

    def _deliver_fred(self, vector: Vector, error_code: int, from_latch: bool, single_step: bool) -> bool:
        """FRED event delivery (model.fred_deliver): an 8-word frame on the stack of the new stack
        level, or below the interrupted RSP; RIP at the ring-3 or ring-0 entry point."""
        cpu, run, u = self.cpu, self.run_, self.u
        rip, rsp, rflags = u.read(_RIP), u.read(_RSP), u.read(_RFLAGS)
        if run.flow is not None and cpu.cpl == 0:
            run.flow.append((Op.USE, REG_INDEX["rsp"]))
        cs = ((model.USER32_CS if cpu.compat else model.USER_CS) if cpu.cpl == 3 else model.KERNEL_CS)
        ss = model.USER_DS if cpu.cpl == 3 else cpu.ss
        regs = u.read_all()
        injection = Interrupted(vector, run.steps, rip, rsp, context_of(regs), cpu, run.chain)
        new_cpu, words, new_rsp, entry = model.fred_deliver(cpu, vector, self.config.fred, rip=rip, rsp=rsp,
                                                            rflags=rflags, cs=cs, ss=ss, error_code=error_code)
        frame = Frame(words[0], words[1], words[2], words[3], words[4], words[5])
        return self._push_frame(vector, injection, new_cpu, frame, words, new_rsp, model.RFLAGS_FIXED, entry,
                                "FRED frame", from_latch, single_step)

    # ---- hooks --------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        u = self.u
        u.hook(U.HOOK_TLB_FILL, self._tlb_fill, U.TLB_CB)
        u.hook(U.HOOK_INTR, self._intr, U.INTR_CB)
        if self.steps_mode:
            ranges = [(s.address, s.address + s.size - 1) for s in self.image.loaded.sections
                      if s.name in CODE_SECTIONS]
            if self.config.stubs:
                ranges.append((min(self.config.stubs), max(self.config.stubs) + 15))
            for lo, hi in ranges:
                u.hook(U.HOOK_CODE, self._step, U.CODE_CB, lo, hi)
            u.hook(U.HOOK_MEM, self._mem, U.MEM_CB)
        else:
            for addr in sorted(self._actions):
                u.hook(U.HOOK_CODE, self._site, U.CODE_CB, addr, addr)
            for addr in sorted(self.heads):
                u.hook(U.HOOK_CODE, self._head, U.CODE_CB, addr, addr)

    def _tlb_fill(self, vaddr: int, access: int, entry) -> bool:
        page = self.space.pages.get(vaddr >> 12)
        run = self.run_
        if page is None:
            gs = self.cpu.gs_base if self.cpu is not None else None
            if gs in self.config.user_gs_values and 0 <= vaddr - gs < 0x100000:
                run.pending_fault = (FaultKind.USER_GS, f"%gs: access with the user GSBASE ({vaddr:#x})", vaddr)
            else:
                run.pending_fault = (FaultKind.UNMAPPED, f"access to unmapped {vaddr:#x}", vaddr)
            return False
        if self._user_view and not page.user:
            what = "fetch of" if access == U.MEM_FETCH else "access to"
            run.pending_fault = (FaultKind.USER_CR3, f"{what} {page.region} {vaddr:#x} under the user CR3", vaddr)
            return False
        e = entry.contents
        e.paddr = page.phys
        perms = U.PROT_READ
        if Perm.W in page.perm:
            perms |= U.PROT_WRITE
        if Perm.X in page.perm:
            perms |= U.PROT_EXEC
        e.perms = perms
        return True

    def _intr(self, intno: int) -> None:
        if intno == Vector.DB:
            # Only TF raises it here (the model has no hardware breakpoints; the trap after a
            # POPF that cleared TF is raised too, as TF was set when the POPF began).
            self._single_step()
            return
        self.fault(FaultKind.TRAP,
                   f"exception {intno} raised by the code at {self.image.symbolize(self.u.read(_RIP))}")

    def _single_step(self) -> None:
        """TF was set when an instruction began: the CPU delivers a #DB trap (DR6.BS) at the next
        boundary.  Only SYSENTER enters the kernel with TF set (user space set it); the code it
        enters single-steps until it clears TF."""
        run = self.run_
        if run.outcome is not None or self.cpu.cpl != 0 or Vector.DB not in self.config.idt or run.speculative:
            return
        if self.deliver(Vector.DB, 0, single_step=True) and run.outcome is None:
            run.restart = True
        self.u.emu_stop()

    def _mem(self, access: int, addr: int, size: int, value: int) -> None:
        run = self.run_
        if not run.full:
            return
        write = access == U.MEM_WRITE
        run.accesses.append((run.steps, addr, size, write, True))
        if write:
            off = addr - self.wbase
            if 0 <= off < self.wsize:
                run.writes.append((run.steps, off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")))
        if run.flow is not None:
            run.flow.append((Op.WRITE if write else Op.READ, addr, size))

    def _step(self, addr: int, size: int) -> None:
        run = self.run_
        if run.outcome is not None:
            self.u.emu_stop()
            return
        if run.steps >= run.limit:
            self._out_of_budget()
            return
        if addr in self.heads and run.request.cut_loops and self._loops_for_good(addr):
            return
        if run.mispredict is not None and self._mispredicted(addr):
            return
        while run.inject and run.inject[0][0] == addr:
            run.hits += 1
            address, vector, hit = run.inject[0]
            if run.hits != hit:
                break
            run.inject.pop(0)
            run.hits = 0
            if vector is Vector.MISPREDICT:
                run.mispredict = addr      # the branch runs; the next boundary turns to its other side
                break
            if self.deliver(vector, 0) and run.outcome is None:
                self.u.emu_stop()       # restart at the handler (RIP was changed)
                return
            if run.outcome is not None:
                break
            # Latched: this boundary is still the one the next injection counts from (as
            # the explorer counts it), so the next may arrive here too.
        run.pcs.append(addr)
        if run.full:
            run.regs.append(self.u.read_all())
            run.cpus.append(self.cpu)
            run.outs.append(run.outstanding)
            run.chains.append(run.chain)
        if run.flow is not None:
            run.flow.append((Op.INSN, addr))
        run.steps += 1
        action = self._actions.get(addr)
        if action is not None:
            self._act(action, addr, size)

    def _site(self, addr: int, size: int) -> None:
        run = self.run_
        if run.outcome is not None:
            self.u.emu_stop()
            return
        run.steps += 1
        self._act(self._actions[addr], addr, size)

    def _act(self, action, addr: int, size: int) -> None:
        """Run a privileged instruction's action; with TF set, its single-step trap follows (the
        model executed it, so Unicorn cannot raise that trap)."""
        if self.run_.speculative:
            stop = self._spec_stops.get(addr)
            if stop is not None:
                self._speculation_ends(addr, stop)
                return
        if not self.run_.tf_watch:
            action(addr, size)
            return
        tf = self.cpu.cpl == 0 and self.u.read(_RFLAGS) & model.RFLAGS_TF
        action(addr, size)
        if tf and self.run_.outcome is None and self.u.read(_RIP) == addr + size:
            self._single_step()

    def _skip(self, addr: int, size: int) -> None:
        if self.run_.flow is not None:
            self.run_.flow.append((Op.SKIP,))
        self.u.write(_RIP, addr + size)

    # ---- privileged instructions --------------------------------------------------------------
    def _make_action(self, kind: str, *args):
        return getattr(self, "_act_" + kind)(*args)

    def _flow(self, *entry) -> None:
        if self.run_.flow is not None:
            self.run_.flow.append(entry)

    def _act_cr3_read(self, reg: str):
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            self._skip(addr, size)
            self.u.write(uc_reg, self.cpu.cr3)
            self._flow(Op.CONST, loc)
            self.emit(Cr3Read, pc=addr, value=self.cpu.cr3)
        return act

    def _act_cr3_write(self, reg: str):
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            self._skip(addr, size)
            self._flow(Op.USE, loc)
            cpu, write = model.write_cr3(self.cpu, self.u.read(uc_reg))
            self.set_cpu(cpu)
            self.emit(Cr3Written, pc=addr, write=write, user_view=self._user_view)
        return act

    def _act_rdmsr(self):
        def act(addr: int, size: int) -> None:
            self._flow(Op.USE, REG_INDEX["rcx"])
            msr = self.u.read(_RCX) & 0xFFFFFFFF
            try:
                value = model.rdmsr(self.cpu, msr)
            except model.MsrError as exc:
                self.fault(FaultKind.GP, str(exc))
                return
            self._skip(addr, size)
            self.u.write(_RAX, value & 0xFFFFFFFF)
            self.u.write(_RDX, value >> 32)
            self._flow(Op.CONST, REG_INDEX["rax"])
            self._flow(Op.CONST, REG_INDEX["rdx"])
            self.emit(MsrRead, pc=addr, msr=msr, value=value)
        return act

    def _act_wrmsr(self):
        def act(addr: int, size: int) -> None:
            for name in ("rcx", "rax", "rdx"):
                self._flow(Op.USE, REG_INDEX[name])
            u = self.u
            msr = u.read(_RCX) & 0xFFFFFFFF
            value = (u.read(_RAX) & 0xFFFFFFFF) | ((u.read(_RDX) & 0xFFFFFFFF) << 32)
            try:
                cpu, write = model.wrmsr(self.cpu, msr, value)
            except model.MsrError as exc:
                self.fault(FaultKind.GP, str(exc))
                return
            self._skip(addr, size)
            self.set_cpu(cpu)
            self.emit(MsrWritten, pc=addr, write=write)
            if msr in (model.MSR_GS_BASE, model.MSR_KERNEL_GS_BASE):
                self.emit(GsChange, pc=addr, how="wrmsr", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _act_swapgs(self):
        def act(addr: int, size: int) -> None:
            if self.config.fred is not None:
                self.fault(FaultKind.UD, f"SWAPGS at {self.image.symbolize(addr)}: it #UDs with FRED enabled")
                return
            self._skip(addr, size)
            cpu = model.swapgs(self.cpu)
            self.set_cpu(cpu)
            self.emit(GsChange, pc=addr, how="swapgs", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _act_rdgsbase(self, reg: str):
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            if not self.cpu.fsgsbase:
                self.fault(FaultKind.UD, f"RDGSBASE with CR4.FSGSBASE clear at {self.image.symbolize(addr)}")
                return
            self._skip(addr, size)
            self.u.write(uc_reg, self.cpu.gs_base)
            self._flow(Op.CONST, loc)
        return act

    def _act_wrgsbase(self, reg: str):
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            if not self.cpu.fsgsbase:
                self.fault(FaultKind.UD, f"WRGSBASE with CR4.FSGSBASE clear at {self.image.symbolize(addr)}")
                return
            self._skip(addr, size)
            self._flow(Op.USE, loc)
            cpu = model.wrgsbase(self.cpu, self.u.read(uc_reg))
            self.set_cpu(cpu)
            self.emit(GsChange, pc=addr, how="wrgsbase", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _act_lsl(self, dst: str, src: str):
        uc_dst, uc_src = _UC_REG[dst], _UC_REG[PARENT[src]]
        src_loc = REG_INDEX[PARENT[src]]

        def act(addr: int, size: int) -> None:
            selector = self.u.read(uc_src) & 0xFFFF
            if selector != self.config.cpunode_selector:
                self.fault(FaultKind.GP, f"LSL of selector {selector:#x}: only the CPU-number segment is modelled")
                return
            self._skip(addr, size)
            self._flow(Op.USE, src_loc)
            self._flow(Op.USE, FLAG_GROUPS["arith"])
            self.u.write(uc_dst, self.config.cpunode_limit)
            self.u.write(_RFLAGS, self.u.read(_RFLAGS) | RFLAGS_ZF)
            self._flow(Op.CONST, REG_INDEX[dst])
            self._flow(Op.CONST, FLAG_GROUPS["arith"])
        return act

    def _act_fence(self, kind: str):
        verw = kind == "verw" and self._tracks

        def act(addr: int, size: int) -> None:
            self._skip(addr, size)
            if verw:
                self.set_cpu(self.cpu.but(spec=(self.cpu.spec | model.SPEC_VERW) & ~model.SPEC_VERW_UNDONE))
            self.emit(Fence, pc=addr, kind=kind)
        return act

    def _act_unsupported(self, what: str):
        def act(addr: int, size: int) -> None:
            self.fault(FaultKind.UD, f"{what} at {self.image.symbolize(addr)} is not modelled")
        return act

    def _act_iretq(self):
        def act(addr: int, size: int) -> None:
            u = self.u
            rsp = u.read(_RSP)
            if not (self.mapped(rsp) and self.mapped(rsp + 39)):
                self.fault(FaultKind.UNMAPPED, f"IRET frame at unmapped {rsp:#x}", rsp)
                return
            run = self.run_
            flow, run.flow = run.flow, None
            try:
                raw = self.read(rsp, 40)
            finally:
                run.flow = flow
            frame = Frame(None, *(int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(5)))
            try:
                cpu = model.iret(self.cpu, frame)
            except model.IretFault as exc:
                self._iret_faults(addr, rsp, frame, exc)
                return
            if flow is not None:
                flow.append((Op.SKIP,))
                flow.append((Op.IRET, self.space.phys(rsp)))
            to_user = frame.cs & 3 == 3
            self.emit(Iret, pc=addr, cpu=cpu, frame=frame, to_user=to_user)
            u.write(_RIP, frame.rip)
            u.write(_RSP, frame.rsp)
            u.write(_RFLAGS, frame.rflags | model.RFLAGS_FIXED)
            if frame.rflags & model.RFLAGS_TF:
                run.tf_watch = True
            self.set_cpu(cpu)
            self._returned(addr, frame.rip, frame.rsp, to_user, "IRET")
        return act

    def _returned(self, addr: int, rip: int, rsp: int, to_user: bool, how: str) -> None:
        """After an IRET or ERET at ``addr`` landed at (rip, rsp): the exceptions it resumed, the
        no-return watch, a latched NMI it let in, and the end of the path when it is back."""
        run = self.run_
        self._landed(rip, rsp)
        if run.outcome is not None:
            return
        if run.request.cut_loops:
            run.irets += 1
            if run.irets >= LOOP_WATCH and self._repeats():
                self._end(Outcome.NO_RETURN, self._loop_reason(addr))
                return
        if self.cpu.nmi_pending and not self.cpu.nmi_blocked:
            # A latched NMI arrives at the first boundary after the unblocking return (in user
            # mode too: the path then goes on through the NMI-from-user entry).
            self.set_cpu(self.cpu.but(nmi_pending=False))
            self.deliver(Vector.NMI, from_latch=True)
            return
        if to_user:
            self._end(Outcome.RETURNED, f"{how} to user mode")
            return
        if run.home is not None and (rip, rsp) == run.home and not run.outstanding:
            self._end(Outcome.RETURNED, f"{how} to the interrupted kernel context")

    def _iret_faults(self, addr: int, rsp: int, frame: Frame, exc: model.IretFault) -> None:
        """The IRET at ``addr`` faults: NMIs are unblocked, and the fault is delivered at the
        IRET itself, in the mode it ran in (the bad-IRET case of error_entry); a latched NMI
        then arrives before the handler's first instruction."""
        run = self.run_
        if exc.vector not in self.config.idt or not self.config.iret_faults:
            self.fault(FaultKind.GP, f"{exc} at {self.image.symbolize(addr)}")
            return
        if run.flow is not None:
            run.flow.append((Op.READ, rsp, 40))
            run.flow.append((Op.SKIP,))
        self.emit(IretFaulted, pc=addr, frame=frame, vector=exc.vector, error_code=exc.error_code,
                  reason=str(exc))
        self.set_cpu(exc.cpu)
        self.u.write(_RIP, addr)
        if not self.deliver(exc.vector, exc.error_code) or run.outcome is not None:
            return
        if self.cpu.nmi_pending and not self.cpu.nmi_blocked:
            self.set_cpu(self.cpu.but(nmi_pending=False))
            self.deliver(Vector.NMI, from_latch=True)

    def _head(self, addr: int, size: int) -> None:
        run = self.run_
        if run.outcome is not None:
            self.u.emu_stop()
        elif run.request.cut_loops:
            self._loops_for_good(addr)

    def _loops_for_good(self, addr: int) -> bool:
        """At a loop head (``sites.find_sites``): after a few visits in one run, end the run as
        no-return once the whole state there repeats, as at the step budget, only sooner."""
        run = self.run_
        n = run.head_visits.get(addr, 0) + 1
        run.head_visits[addr] = n
        if n > LOOP_HEAD_VISITS and self._repeats():
            self._end(Outcome.NO_RETURN, self._loop_reason(addr))
            self.u.emu_stop()
            return True
        return False

    def _loop_reason(self, addr: int) -> str:
        return f"no return: the whole machine state at {self.image.symbolize(addr)} repeats (a loop that never ends)"

    def _repeats(self) -> bool:
        """Whether the machine is in a state it was in before, for the third time (a
        deterministic machine then loops forever; three times leave two whole periods of
        events for the no-return check to find the loop in).  Bookkeeping that cannot
        change what runs next (step and delivery counts) is left out.  Memory is read only
        once registers and model state have repeated (a loop that counts never pays for it)."""
        run = self.run_
        out = tuple((i.vector, i.rip, i.rsp, i.regs, i.cpu) for i in run.outstanding)
        light = (self.u.read_all(), self.cpu, out)
        if light not in run.seen_light:
            run.seen_light.add(light)
            return False
        key = (light, self.u.mem_read(self.wbase, self.wsize))
        seen = run.seen_states.get(key, 0) + 1
        run.seen_states[key] = seen
        return seen >= 3

    def _landed(self, rip: int, rsp: int) -> None:
        """An IRET landed at (rip, rsp): the exceptions that interrupted exactly there resumed."""
        run = self.run_
        outstanding = run.outstanding
        scanned = []
        for k in range(len(outstanding) - 1, -1, -1):
            inj = outstanding[k]
            scanned.append(k)
            if inj.rip == rip and inj.rsp == rsp:
                run.outstanding = outstanding[:k]
                if run.flow is not None:
                    run.flow.append((Op.LANDED, tuple(scanned), k))
                regs = self.u.read_all()
                run.events.append(Resumed(step=run.steps, pc=rip, cpu=self.cpu, injection=inj,
                                          regs=context_of(regs)))
                if inj is run.delivered and run.resumed_step is None:
                    run.resumed_step = run.steps
                point = run.points.get(k)
                if point is not None and self._same_state(point, regs):
                    run.converged = point.tag
                    if run.flow is not None:
                        run.flow.append((Op.STOP,))
                    self._end(Outcome.STOPPED, "converged")
                return
        if run.flow is not None:
            run.flow.append((Op.LANDED, tuple(scanned), -1))

    def _same_state(self, point: ConvergePoint, regs: tuple[int, ...]) -> bool:
        """Registers, model state and every word the reference run still reads equal to its state."""
        ref = point.ref
        if self.cpu is not ref.cpu and self.cpu != ref.cpu:
            return False
        if self.run_.outstanding != ref.outstanding or regs != ref.regs:
            return False
        cur = self.u.mem_read(self.wbase, self.wsize)
        if cur == ref.memory:
            return True
        live = point.live
        for off in diff_words(cur, ref.memory):
            if live.live(off, point.boundary):
                return False
        return True

    def _act_sysret(self, compat: bool):
        """SYSRETQ (to 64-bit mode: RIP = RCX, which must be canonical) or SYSRETL (to compat mode:
        RIP = ECX); RFLAGS from R11 either way."""
        how = "SYSRETL to compat mode" if compat else "SYSRET to user mode"

        def act(addr: int, size: int) -> None:
            u = self.u
            self._flow(Op.USE, REG_INDEX["rcx"])
            self._flow(Op.USE, REG_INDEX["r11"])
            rip = u.read(_RCX) & (0xFFFFFFFF if compat else MASK64)
            r11 = u.read(_UC_REG["r11"])
            if compat:
                cpu = model.sysretl(self.cpu)
            else:
                try:
                    cpu = model.sysret(self.cpu, rip)
                except model.FrameError as exc:
                    self.fault(FaultKind.GP, f"{exc}: the #GP is delivered on the user's RSP "
                                             f"({u.read(_RSP):#x}) with GSBASE {self.cpu.gs_base:#x}")
                    return
            u.write(_RIP, rip)
            u.write(_RFLAGS, (r11 & 0x3C7FD7) | model.RFLAGS_FIXED)
            self.set_cpu(cpu)
            self.emit(Sysret, pc=addr, rip=rip)
            self._end(Outcome.RETURNED, how)
        return act

    def _act_eret(self, to_user: bool):
        name = "ERETU" if to_user else "ERETS"

        def act(addr: int, size: int) -> None:
            u, run = self.u, self.run_
            if self.config.fred is None:
                self.fault(FaultKind.UD, f"{name} at {self.image.symbolize(addr)} without FRED")
                return
            rsp = u.read(_RSP)
            if not (self.mapped(rsp) and self.mapped(rsp + 47)):
                self.fault(FaultKind.UNMAPPED, f"{name} frame at unmapped {rsp:#x}", rsp)
                return
            flow, run.flow = run.flow, None
            try:
                raw = self.read(rsp, 48)
            finally:
                run.flow = flow
            words = [int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(6)]
            frame = Frame(None, words[1], words[2] & 0xFFFF, words[3], words[4], words[5] & 0xFFFF)
            try:
                cpu = model.eret(self.cpu, words, to_user)
            except model.EretFault as exc:
                if not to_user or not self.config.iret_faults:
                    self.fault(FaultKind.GP, f"{exc} at {self.image.symbolize(addr)}")
                    return
                # A refused ERETU raises #GP(0) in ring 0, at the ERETU (the kernel's extable entry
                # EX_TYPE_ERETU turns it into a #GP of the user mode it was returning to).
                self.emit(IretFaulted, pc=addr, frame=frame, vector=Vector.GP, error_code=0, reason=str(exc))
                self.deliver(Vector.GP, 0)
                return
            if flow is not None:
                flow.append((Op.SKIP,))
                flow.append((Op.IRET, self.space.phys(rsp + 8)))
            self.emit(Iret, pc=addr, cpu=cpu, frame=frame, to_user=to_user, eret=name)
            rip = words[1] & 0xFFFF_FFFF if cpu.compat and to_user else words[1]
            u.write(_RIP, rip)
            u.write(_RSP, words[4])
            u.write(_RFLAGS, words[3] | model.RFLAGS_FIXED)
            self.set_cpu(cpu)
            self._returned(addr, words[1], words[4], to_user, name)
        return act

    def _act_stub(self, name: str):
        stubs = self.m.stubs

        def act(addr: int, size: int) -> None:
            try:
                stubs(self, name)
            except Unmapped as exc:
                self.fault(FaultKind.UNMAPPED, f"{name} was given an address it reads or writes through, "
                                               f"and {exc}", exc.addr)
        return act


__all__ = ["Machine", "MachineConfig", "Request", "Record", "Level", "Op", "ConvergePoint", "LiveIndex", "StepLog",
           "MemoryCursor", "Context", "DEFAULT_BUDGET", "FLAG_GROUPS", "GROUP_MASKS"]
