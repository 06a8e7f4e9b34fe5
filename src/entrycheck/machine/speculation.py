"""The machine's speculation hygiene: RETs and indirect branches that come before the mitigation a
feature set orders before them, clear_bhb_loop's start, and mispredicted paths (where one ends, a
mispredict injection turning a run to the other side of a conditional branch).

One part of the machine's Unicorn core (machine.py), acting through its run context: the actions
of the sites ``sites.find_sites`` adds for these checks, and the rules of a mispredicted path.
"""

from __future__ import annotations

from entrycheck.machine import model, uc as U
from entrycheck.machine.context import RunContext
from entrycheck.machine.events import Branch, FaultKind, Mispredicted, Outcome

_RIP = U.UC_REG["rip"]


class Speculation:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self._spec = ctx.config.spec
        self._tracks = self._spec is not None and self._spec.tracks

    def act_branch(self, kind: str):
        """A RET or indirect branch (watched only when a feature set orders mitigations before
        them): recorded when one is still missing; the instruction itself runs in Unicorn."""
        ctx, spec = self.ctx, self._spec

        def act(addr: int, size: int) -> None:
            cpu = ctx.cpu
            missing = model.unmitigated(cpu, spec, kind, bool(cpu.spec_ctrl & model.SPEC_CTRL_IBRS))
            if missing:
                ctx.emit(Branch, pc=addr, kind=kind, missing=missing)
        return act

    def act_bhb(self):
        """The first instruction of clear_bhb_loop: the branch history is being overwritten."""
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            if self._tracks:
                ctx.set_cpu(ctx.cpu.but(spec=ctx.cpu.spec | model.SPEC_BHB))
        return act

    # ---- mispredicted paths -------------------------------------------------------------------
    def stop(self, addr: int, site: tuple) -> str | None:
        """What ends a mispredicted path at this site: a serialising instruction, an LFENCE, a
        C function (modelled as a stub, so not followed), or a SWAPGS the CPU does not speculate."""
        kind = site[0]
        if kind in ("cr3_write", "wrmsr", "iretq", "sysret", "eret"):
            return {"cr3_write": "MOV to CR3", "wrmsr": "WRMSR", "iretq": "IRET", "sysret": "SYSRET",
                    "eret": "ERET"}[kind] + " (serialising)"
        if kind == "unsupported":
            return f"{site[1]} (not followed)"
        if kind == "fence" and site[1] == "lfence":
            return "LFENCE"
        if kind == "swapgs" and not (self._spec is not None and self._spec.swapgs_speculates):
            return "SWAPGS (this CPU does not execute it speculatively)"
        if (kind == "stub" and addr not in self.config.asm_stubs) or kind == "c_entry":
            return "C:" + site[1]
        return None

    def mispredicted(self, addr: int) -> bool:
        """The conditional branch at ``run.mispredict`` went to ``addr``: go on, speculatively, at
        its other side (a mispredict injection: ``trace`` replays what the explorer followed)."""
        ctx = self.ctx
        run = ctx.run
        jcc, run.mispredict = run.mispredict, None
        sides = ctx.image.instructions.conditional(jcc)
        if sides is None or addr not in sides:
            ctx.fault(FaultKind.UD, f"mispredict@{ctx.symbolize(jcc)}: not a conditional branch")
            return True
        wrong = sides[1] if addr == sides[0] else sides[0]
        run.speculative, run.tf_watch = True, False
        run.window_from, run.limit = run.steps, run.steps + run.request.window
        ctx.emit(Mispredicted, pc=jcc, target=wrong)
        ctx.u.write(_RIP, wrong)
        run.restart = True
        ctx.u.emu_stop()
        return True

    def ends(self, addr: int, stop: str) -> None:
        ctx = self.ctx
        if stop.startswith("C:"):
            name = stop[2:]
            if ctx.cpu.cpl == 0 and ctx.cpu.gs_base in self.config.user_gs_values:
                # Its first per-cpu access (current, the preempt count) uses the user's GSBASE.
                ctx.fault(FaultKind.USER_GS, f"C function {name} entered with the user GSBASE "
                                             f"({ctx.cpu.gs_base:#x})", ctx.cpu.gs_base)
            else:
                ctx.end(Outcome.STOPPED, f"speculation ends at C function {name}")
            return
        ctx.end(Outcome.STOPPED, f"speculation ends at {ctx.symbolize(addr)}: {stop}")


__all__ = ["Speculation"]
