"""When a run ends: back where it started (an IRET or ERET that lands on the context an
exception interrupted, or in user mode), converged (``Request.converge``: the state where the
recorded run continues identically), out of budget, or in a loop that never ends (the whole
machine state repeats at a loop head or an IRET)."""

from __future__ import annotations

from entrycheck.machine.api import ConvergePoint, Op
from entrycheck.machine.context import RunContext
from entrycheck.machine.delivery import Delivery
from entrycheck.machine.events import Outcome, Resumed
from entrycheck.machine.memory import diff_words
from entrycheck.machine.state import context_of

LOOP_WATCH = 32          # IRETs a run makes before it is watched for a repeating state
LOOP_HEAD_VISITS = 8     # visits of one loop head before the run is watched there for a repeating state


class Stops:
    def __init__(self, ctx: RunContext, delivery: Delivery) -> None:
        self.ctx = ctx
        self.delivery = delivery

    def out_of_budget(self) -> None:
        ctx = self.ctx
        run = ctx.run
        if run.speculative:
            ctx.end(Outcome.STOPPED, f"the speculation window of {run.limit - run.window_from} instructions ends")
        else:
            ctx.end(Outcome.NO_RETURN, f"no return within {run.request.budget} instructions")

    def returned(self, addr: int, rip: int, rsp: int, to_user: bool, how: str) -> None:
        """After an IRET or ERET at ``addr`` landed at (rip, rsp): the exceptions it resumed, the
        no-return watch, a latched NMI it let in, and the end of the path when it is back."""
        ctx = self.ctx
        run = ctx.run
        self.landed(rip, rsp)
        if run.outcome is not None:
            return
        if run.request.cut_loops:
            run.irets += 1
            if run.irets >= LOOP_WATCH and self._repeats():
                ctx.end(Outcome.NO_RETURN, self._loop_reason(addr))
                return
        # A latched NMI arrives at the first boundary after the unblocking return (in user mode
        # too: the path then goes on through the NMI-from-user entry).
        if self.delivery.latched_nmi():
            return
        if to_user:
            ctx.end(Outcome.RETURNED, f"{how} to user mode")
            return
        if run.home is not None and (rip, rsp) == run.home and not run.outstanding:
            ctx.end(Outcome.RETURNED, f"{how} to the interrupted kernel context")

    def landed(self, rip: int, rsp: int) -> None:
        """An IRET landed at (rip, rsp): the exceptions that interrupted exactly there resumed."""
        ctx = self.ctx
        run = ctx.run
        outstanding = run.outstanding
        scanned = []
        for k in range(len(outstanding) - 1, -1, -1):
            inj = outstanding[k]
            scanned.append(k)
            if inj.rip == rip and inj.rsp == rsp:
                run.outstanding = outstanding[:k]
                if run.flow is not None:
                    run.flow.append((Op.LANDED, tuple(scanned), k))
                regs = ctx.u.read_all()
                run.events.append(Resumed(step=run.steps, pc=rip, cpu=ctx.cpu, injection=inj, regs=context_of(regs)))
                if inj is run.delivered and run.resumed_step is None:
                    run.resumed_step = run.steps
                memory: list = []
                for point in run.points.get(k, ()):
                    if self._same_state(point, regs, memory):
                        run.converged = point.tag
                        if run.flow is not None:
                            run.flow.append((Op.STOP,))
                        ctx.end(Outcome.STOPPED, "converged")
                        break
                return
        if run.flow is not None:
            run.flow.append((Op.LANDED, tuple(scanned), -1))

    def _same_state(self, point: ConvergePoint, regs: tuple[int, ...], memory: list) -> bool:
        """Registers, model state and every word the reference run still reads equal to its state
        (``memory``: the writable memory once read, for the next point of the same return)."""
        ctx = self.ctx
        ref = point.ref
        if ctx.cpu is not ref.cpu and ctx.cpu != ref.cpu:
            return False
        if ctx.run.outstanding != ref.outstanding or regs != ref.regs:
            return False
        if not memory:
            memory.append(ctx.u.mem_read(ctx.wbase, ctx.wsize))
        cur = memory[0]
        if cur == ref.memory:
            return True
        live = point.live
        for off in diff_words(cur, ref.memory):
            if live.live(off, point.boundary):
                return False
        return True

    def loops_for_good(self, addr: int) -> bool:
        """At a loop head (``Instructions.loop_heads``): after a few visits in one run, end the run as
        no-return once the whole state there repeats, as at the step budget, only sooner."""
        ctx = self.ctx
        run = ctx.run
        n = run.head_visits.get(addr, 0) + 1
        run.head_visits[addr] = n
        if n > LOOP_HEAD_VISITS and self._repeats():
            ctx.end(Outcome.NO_RETURN, self._loop_reason(addr))
            ctx.u.emu_stop()
            return True
        return False

    def _loop_reason(self, addr: int) -> str:
        return f"no return: the whole machine state at {self.ctx.symbolize(addr)} repeats (a loop that never ends)"

    def _repeats(self) -> bool:
        """Whether the machine is in a state it was in before, for the third time (a
        deterministic machine then loops forever; three times leave two whole periods of
        events for the no-return check to find the loop in).  Bookkeeping that cannot
        change what runs next (step and delivery counts) is left out.  Memory is read only
        once registers and model state have repeated (a loop that counts in a register never
        pays for it), and then at their 2nd, 4th, 8th ... repeat only: a loop that counts in
        memory (context tracking's nesting counter in an NMI storm) would read the whole
        writable memory at every turn; a loop that never ends is still found, a few turns later."""
        ctx = self.ctx
        run = ctx.run
        out = tuple((i.vector, i.rip, i.rsp, i.regs, i.cpu) for i in run.outstanding)
        light = (ctx.u.read_all(), ctx.cpu, out)
        n = run.seen_light.get(light, 0) + 1
        run.seen_light[light] = n
        if n < 2 or n & (n - 1):        # the first sighting, or not a power of two
            return False
        key = (light, ctx.u.mem_read(ctx.wbase, ctx.wsize))
        seen = run.seen_states.get(key, 0) + 1
        run.seen_states[key] = seen
        return seen >= 3


__all__ = ["Stops", "LOOP_WATCH", "LOOP_HEAD_VISITS"]
