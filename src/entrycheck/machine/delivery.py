"""Exception and event delivery: through the IDT (IST slots, TSS.sp0, the current stack) or by
FRED (stack levels), NMI blocking and the latch, and TF's single-step traps.  Unicorn never
delivers through an IDT, so the machine does it here, with the model's pure functions."""

from __future__ import annotations

from entrycheck.errors import InternalError
from entrycheck.machine import fred, model, uc as U
from entrycheck.machine.api import MASK64, Op
from entrycheck.machine.context import RunContext
from entrycheck.machine.events import Delivered, FaultKind, Latched
from entrycheck.machine.model import CpuState, Frame, Vector
from entrycheck.machine.state import REG_INDEX, Interrupted, context_of

SYSTEM_CALL_VECTORS = frozenset({Vector.INT80, Vector.SYSCALL, Vector.SYSENTER})
_RSP, _RIP, _RFLAGS = U.UC_REG["rsp"], U.UC_REG["rip"], U.UC_REG["rflags"]


class Delivery:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        spec = ctx.config.spec
        self._tracks = spec is not None and spec.tracks

    def deliver(self, vector: Vector, error_code: int | None = None, *, from_latch: bool = False,
                single_step: bool = False) -> bool:
        """Deliver ``vector`` at the current instruction boundary; an NMI while blocked is latched."""
        ctx = self.ctx
        cpu, run = ctx.cpu, ctx.run
        if vector is Vector.NMI and cpu.nmi_blocked:
            if not cpu.nmi_pending:
                ctx.set_cpu(model.latch_nmi(cpu))
                ctx.emit(Latched, vector=vector)
            return False
        if not model.can_deliver(cpu, vector):
            raise InternalError(f"{vector.label} cannot be delivered now (MCIP set)")
        if self.config.fred is not None:
            return self._deliver_fred(vector, error_code or 0, from_latch, single_step)
        u = ctx.u
        rip, rsp, rflags = u.read(_RIP), u.read(_RSP), u.read(_RFLAGS)
        ist = self.config.ist_slots.get(vector)
        if ist is not None:
            top = ctx.read_u64(ist)
        elif cpu.cpl == 3:
            top = ctx.read_u64(self.config.sp0_slot)
        else:
            if run.flow is not None:
                run.flow.append((Op.USE, REG_INDEX["rsp"]))
            top = rsp
        injection = Interrupted(vector, run.steps, rip, rsp, context_of(u.read_all()), cpu, run.chain)
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
        ctx = self.ctx
        run, u = ctx.run, ctx.u
        if self._tracks:
            new_cpu = model.entered(new_cpu, injection.cpu.cpl == 3, vector in SYSTEM_CALL_VECTORS)
        if self.config.noinstr_c:
            new_cpu = model.recorded(new_cpu, vector, single_step)
        if not ctx.mapped(new_rsp) or not ctx.mapped(new_rsp + 8 * len(words) - 1):
            ctx.fault(FaultKind.UNMAPPED, f"{vector.label} {what} at unmapped stack {new_rsp:#x}", new_rsp)
            return False
        ctx.write_as(new_rsp, b"".join((w & MASK64).to_bytes(8, "little") for w in words), None)
        u.write(_RSP, new_rsp)
        u.write(_RFLAGS, new_flags)
        u.write(_RIP, entry)
        ctx.set_cpu(new_cpu)
        run.outstanding = run.outstanding + (injection,)
        run.chain += 1
        if run.flow is not None:
            run.flow.append((Op.DELIVER, ctx.layout.phys(new_rsp), len(words), len(run.outstanding) - 1))
        ctx.emit(Delivered, pc=injection.rip, vector=vector, frame=frame, stack=new_rsp, from_latch=from_latch,
                 single_step=single_step)
        return True

    def _deliver_fred(self, vector: Vector, error_code: int, from_latch: bool, single_step: bool) -> bool:
        """FRED event delivery (fred.fred_deliver): an 8-word frame on the stack of the new stack
        level, or below the interrupted RSP; RIP at the ring-3 or ring-0 entry point."""
        ctx = self.ctx
        cpu, run, u = ctx.cpu, ctx.run, ctx.u
        rip, rsp, rflags = u.read(_RIP), u.read(_RSP), u.read(_RFLAGS)
        if run.flow is not None and cpu.cpl == 0:
            run.flow.append((Op.USE, REG_INDEX["rsp"]))
        cs = ((model.USER32_CS if cpu.compat else model.USER_CS) if cpu.cpl == 3 else model.KERNEL_CS)
        ss = model.USER_DS if cpu.cpl == 3 else cpu.ss
        injection = Interrupted(vector, run.steps, rip, rsp, context_of(u.read_all()), cpu, run.chain)
        new_cpu, words, new_rsp, entry = fred.fred_deliver(cpu, vector, self.config.fred, rip=rip, rsp=rsp,
                                                            rflags=rflags, cs=cs, ss=ss, error_code=error_code)
        frame = Frame(words[0], words[1], words[2], words[3], words[4], words[5])
        return self._push_frame(vector, injection, new_cpu, frame, words, new_rsp, model.RFLAGS_FIXED, entry,
                                "FRED frame", from_latch, single_step)

    def latched_nmi(self) -> bool:
        """After NMIs were unblocked: a latched NMI arrives at this boundary (True: it did)."""
        ctx = self.ctx
        if ctx.cpu.nmi_pending and not ctx.cpu.nmi_blocked:
            ctx.set_cpu(ctx.cpu.but(nmi_pending=False))
            self.deliver(Vector.NMI, from_latch=True)
            return True
        return False

    def single_step(self) -> None:
        """TF was set when an instruction began: the CPU delivers a #DB trap (DR6.BS) at the next
        boundary.  Only SYSENTER enters the kernel with TF set (user space set it); the code it
        enters single-steps until it clears TF."""
        ctx = self.ctx
        run = ctx.run
        if run.outcome is not None or ctx.cpu.cpl != 0 or Vector.DB not in self.config.idt or run.speculative:
            return
        if self.deliver(Vector.DB, 0, single_step=True) and run.outcome is None:
            run.restart = True
        ctx.u.emu_stop()


__all__ = ["Delivery", "SYSTEM_CALL_VECTORS"]
