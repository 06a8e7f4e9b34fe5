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

Each core is made of parts that act through one run context (machine/context.py, also what
stubs see): delivery (delivery.py), the stop rules (stops.py), the privileged instructions'
actions (actions.py) and speculation (speculation.py).
"""

from __future__ import annotations

from entrycheck.image.image import Image
from entrycheck.image.layout import Perm
from entrycheck.machine import model, uc as U
from entrycheck.machine.actions import Actions
from entrycheck.machine.api import (DEFAULT_BUDGET, FLAG_GROUPS, GROUP_MASKS, ConvergePoint, Context, Level,
                                    LiveIndex, MachineConfig, MemoryCursor, Op, Record, Request, StepLog,
                                    StubHandler)
from entrycheck.machine.context import RunContext, RunState
from entrycheck.machine.delivery import Delivery
from entrycheck.machine.events import FaultKind
from entrycheck.machine.memory import AddressSpace, build_address_space
from entrycheck.machine.model import Vector
from entrycheck.machine.sites import find_sites
from entrycheck.machine.speculation import Speculation
from entrycheck.machine.state import Regs, Snapshot
from entrycheck.machine.stops import LOOP_HEAD_VISITS, LOOP_WATCH, Stops

_RIP, _RFLAGS = U.UC_REG["rip"], U.UC_REG["rflags"]


class Machine:
    """One image, one world, one stub handler; runs requests."""

    def __init__(self, image: Image, config: MachineConfig, stubs: StubHandler) -> None:
        self.image = image
        self.config = config
        self.stubs = stubs
        self.layout: AddressSpace = build_address_space(config.regions)   # frozen: what callers may read
        self._sites, self._loop_heads = find_sites(image, config)
        self._cores: dict[bool, _Core] = {}

    def run(self, request: Request) -> Record:
        steps = request.level >= Level.PCS
        core = self._cores.get(steps)
        if core is None:
            core = self._cores[steps] = _Core(self, steps)
        return core.run(request)


class _Core:
    """One Unicorn instance with one hook set (sites only, or every step), and the parts that act
    through its run context: delivery, the stop rules, the sites' actions, speculation."""

    def __init__(self, machine: Machine, steps: bool) -> None:
        self.image = machine.image
        self.config = machine.config
        layout = machine.layout
        self.layout = layout
        self.heads = machine._loop_heads
        self.steps_mode = steps
        self.u = U.Unicorn()
        for chunk in layout.chunks:
            self.u.uc.mem_map(chunk.phys, len(chunk.data), U.PROT_ALL)
            self.u.uc.mem_write(chunk.phys, chunk.data)
        self.wbase, self.wsize = layout.writable_base, layout.writable_size
        for addr, site in machine._sites.items():
            if site in (("fence", "clac"), ("fence", "stac")):
                # Unicorn's CPU model raises #UD at CLAC/STAC (smap's alternatives) before a code hook
                # can skip them: they become a NOP of their length, and the site's action sets AC.
                self.u.uc.mem_write(layout.phys(addr), b"\x0f\x1f\x00")
        self.ctx = RunContext(self.u, layout, self.image, self.config, steps)
        self.delivery = Delivery(self.ctx)
        self.stops = Stops(self.ctx, self.delivery)
        self.speculation = Speculation(self.ctx)
        actions = Actions(self.ctx, self.delivery, self.stops, machine.stubs, self.speculation)
        self._actions = {addr: actions.make(*site) for addr, site in machine._sites.items()}
        self._spec_stops = {addr: stop for addr, site in machine._sites.items()
                            if (stop := self.speculation.stop(addr, site)) is not None}
        self._install_hooks()

    # ---- the request --------------------------------------------------------------------
    def run(self, req: Request) -> Record:
        ctx = self.ctx
        start = req.start
        self.u.write_all(start.regs)
        self.u.mem_write(self.wbase, start.memory)
        ctx.cpu = None
        ctx.set_cpu(start.cpu)
        limit = req.budget_from + req.budget
        run = ctx.run = RunState(req, start.steps, start.outstanding, start.chain, start.home, limit)
        ctx.options = req.options
        points: dict[int, tuple] = {}
        for p in req.converge:
            points[p.index] = points.get(p.index, ()) + (p,)
        run.points = points
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
            if self.delivery.deliver(req.deliver, 0) and len(run.outstanding) > before:
                run.delivered = run.outstanding[before]
        self._go()
        return self._finish(start)

    def _finish(self, start: Snapshot) -> Record:
        ctx = self.ctx
        run = ctx.run
        regs = Regs(*self.u.read_all())
        memory = self.u.mem_read(self.wbase, self.wsize) if self.steps_mode else b""
        final = Snapshot(regs, memory, ctx.cpu, run.steps, run.outstanding, run.chain, run.home)
        steps = None
        if self.steps_mode:
            steps = StepLog(start.steps, tuple(run.pcs), tuple(run.regs), tuple(run.cpus), tuple(run.outs),
                            tuple(run.chains), start.memory, tuple(run.writes), tuple(run.accesses), start.home)
        rec = Record(run.request, tuple(run.events), run.outcome, run.reason, final, run.delivered,
                     run.resumed_step, run.converged, steps, tuple(run.flow) if run.flow is not None else None)
        ctx.run = None
        return rec

    def _go(self) -> None:
        run = self.ctx.run
        u = self.u
        while run.outcome is None:
            pc = u.read(_RIP)
            remaining = run.limit - run.steps
            if remaining <= 0:
                self.stops.out_of_budget()
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
                    self.stops.out_of_budget()
                elif run.pending_fault is not None or run.steps >= run.limit:
                    if run.steps >= run.limit:
                        self.stops.out_of_budget()

    def _unicorn_error(self, errno: int) -> None:
        ctx = self.ctx
        pending = ctx.run.pending_fault
        sym = self.image.symbolize(self.u.read(_RIP))
        if pending is not None:
            kind, message, address = pending
            ctx.fault(kind, f"{message} at {sym}", address)
        elif errno == U.ERR_INSN_INVALID:
            bug = self.image.bug_at(self.u.read(_RIP))
            ctx.fault(FaultKind.UD, f"{bug} ({sym})" if bug else f"invalid opcode at {sym}")
        elif errno in U.ERR_PROT:
            ctx.fault(FaultKind.GP, f"access violates page permissions at {sym}")
        elif errno in U.ERR_UNMAPPED:
            ctx.fault(FaultKind.UNMAPPED, f"unmapped access at {sym}")
        else:
            ctx.fault(FaultKind.GP, f"{U.error_text(errno)} at {sym}")

    # ---- hooks --------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        u = self.u
        u.hook(U.HOOK_TLB_FILL, self._tlb_fill, U.TLB_CB)
        u.hook(U.HOOK_INTR, self._intr, U.INTR_CB)
        if self.steps_mode:
            ranges = [(s.address, s.address + s.size - 1) for s in self.image.loaded.sections
                      if s.name in self.image.loaded.code_sections]
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
        ctx = self.ctx
        page = self.layout.pages.get(vaddr >> 12)
        run = ctx.run
        if page is None:
            gs = ctx.cpu.gs_base if ctx.cpu is not None else None
            if gs in self.config.user_gs_values and 0 <= vaddr - gs < 0x100000:
                run.pending_fault = (FaultKind.USER_GS, f"%gs: access with the user GSBASE ({vaddr:#x})", vaddr)
            elif (name := self._unbacked(vaddr)) is not None:
                run.pending_fault = (FaultKind.UNDEFINED_DATA, f"access to {name}, which the image does not define "
                                     "and no booted value gives", vaddr)
            else:
                run.pending_fault = (FaultKind.UNMAPPED, f"access to unmapped {vaddr:#x}", vaddr)
            return False
        if ctx.user_view and not page.user:
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

    def _unbacked(self, vaddr: int) -> str | None:
        # The fill is for the page: each unbacked symbol starts a page of its own (image/symbols.py).
        for start, end, name in self.config.unbacked:
            if start <= vaddr < end:
                return name if vaddr & ~0xFFF == start else f"{name}+{(vaddr & ~0xFFF) - start:#x}"
        return None

    def _intr(self, intno: int) -> None:
        if intno == Vector.DB:
            # Only TF raises it here (the model has no hardware breakpoints; the trap after a
            # POPF that cleared TF is raised too, as TF was set when the POPF began).
            self.delivery.single_step()
            return
        self.ctx.fault(FaultKind.TRAP,
                       f"exception {intno} raised by the code at {self.image.symbolize(self.u.read(_RIP))}")

    def _mem(self, access: int, addr: int, size: int, value: int) -> None:
        run = self.ctx.run
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
        ctx = self.ctx
        run = ctx.run
        if run.outcome is not None:
            self.u.emu_stop()
            return
        if run.steps >= run.limit:
            self.stops.out_of_budget()
            return
        if addr in self.heads and run.request.cut_loops and self.stops.loops_for_good(addr):
            return
        if run.mispredict is not None and self.speculation.mispredicted(addr):
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
            if self.delivery.deliver(vector, 0) and run.outcome is None:
                self.u.emu_stop()       # restart at the handler (RIP was changed)
                return
            if run.outcome is not None:
                break
            # Latched: this boundary is still the one the next injection counts from (as
            # the explorer counts it), so the next may arrive here too.
        run.pcs.append(addr)
        if run.full:
            run.regs.append(self.u.read_all())
            run.cpus.append(ctx.cpu)
            run.outs.append(run.outstanding)
            run.chains.append(run.chain)
        if run.flow is not None:
            run.flow.append((Op.INSN, addr))
        run.steps += 1
        action = self._actions.get(addr)
        if action is not None:
            self._act(action, addr, size)

    def _site(self, addr: int, size: int) -> None:
        run = self.ctx.run
        if run.outcome is not None:
            self.u.emu_stop()
            return
        run.steps += 1
        self._act(self._actions[addr], addr, size)

    def _act(self, action, addr: int, size: int) -> None:
        """Run a privileged instruction's action; with TF set, its single-step trap follows (the
        model executed it, so Unicorn cannot raise that trap)."""
        ctx = self.ctx
        run = ctx.run
        if run.speculative:
            stop = self._spec_stops.get(addr)
            if stop is not None:
                self.speculation.ends(addr, stop)
                return
        if not run.tf_watch:
            action(addr, size)
            return
        tf = ctx.cpu.cpl == 0 and self.u.read(_RFLAGS) & model.RFLAGS_TF
        action(addr, size)
        if tf and run.outcome is None and self.u.read(_RIP) == addr + size:
            self.delivery.single_step()

    def _head(self, addr: int, size: int) -> None:
        run = self.ctx.run
        if run.outcome is not None:
            self.u.emu_stop()
        elif run.request.cut_loops:
            self.stops.loops_for_good(addr)


__all__ = ["Machine", "MachineConfig", "Request", "Record", "Level", "Op", "ConvergePoint", "LiveIndex", "StepLog",
           "MemoryCursor", "Context", "DEFAULT_BUDGET", "FLAG_GROUPS", "GROUP_MASKS", "LOOP_WATCH",
           "LOOP_HEAD_VISITS", "RunState"]
