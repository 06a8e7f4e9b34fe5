"""The machine's speculation hygiene: RETs and indirect branches that come before the mitigation a
feature set orders before them, clear_bhb_loop's start, and mispredicted paths (where one ends, a
mispredict injection turning a run to the other side of a conditional branch).

A mixin of the machine's Unicorn core (machine.py): it uses the core's run, model state and
emitters, and adds the actions of the sites ``sites.find_sites`` adds for these checks.
"""

from __future__ import annotations

from entrycheck.machine import model, uc as U
from entrycheck.machine.events import Branch, FaultKind, Mispredicted, Outcome

_RIP = U.UC_REG["rip"]


class Speculation:
    def _act_branch(self, kind: str):
        """A RET or indirect branch (watched only when a feature set orders mitigations before
        them): recorded when one is still missing; the instruction itself runs in Unicorn."""
        spec = self._spec

        def act(addr: int, size: int) -> None:
            cpu = self.cpu
            missing = model.unmitigated(cpu, spec, kind, bool(cpu.spec_ctrl & model.SPEC_CTRL_IBRS))
            if missing:
                self.emit(Branch, pc=addr, kind=kind, missing=missing)
        return act

    def _act_bhb(self):
        """The first instruction of clear_bhb_loop: the branch history is being overwritten."""
        def act(addr: int, size: int) -> None:
            if self._tracks:
                self.set_cpu(self.cpu.but(spec=self.cpu.spec | model.SPEC_BHB))
        return act

    # ---- mispredicted paths -------------------------------------------------------------------
    def _speculation_stop(self, addr: int, spec: tuple) -> str | None:
        """What ends a mispredicted path at this site: a serialising instruction, an LFENCE, a
        C function (modelled as a stub, so not followed), or a SWAPGS the CPU does not speculate."""
        kind = spec[0]
        if kind in ("cr3_write", "wrmsr", "iretq", "sysret", "eret"):
            return {"cr3_write": "MOV to CR3", "wrmsr": "WRMSR", "iretq": "IRET", "sysret": "SYSRET",
                    "eret": "ERET"}[kind] + " (serialising)"
        if kind == "unsupported":
            return f"{spec[1]} (not followed)"
        if kind == "fence" and spec[1] == "lfence":
            return "LFENCE"
        if kind == "swapgs" and not (self._spec is not None and self._spec.swapgs_speculates):
            return "SWAPGS (this CPU does not execute it speculatively)"
        if kind == "stub" and addr not in self.config.asm_stubs:
            return "C:" + spec[1]
        return None

    def _mispredicted(self, addr: int) -> bool:
        """The conditional branch at ``run.mispredict`` went to ``addr``: go on, speculatively, at
        its other side (a mispredict injection: ``trace`` replays what the explorer followed)."""
        run = self.run_
        jcc, run.mispredict = run.mispredict, None
        sides = self.image.instructions.conditional(jcc)
        if sides is None or addr not in sides:
            self.fault(FaultKind.UD, f"mispredict@{self.image.symbolize(jcc)}: not a conditional branch")
            return True
        wrong = sides[1] if addr == sides[0] else sides[0]
        run.speculative, run.tf_watch = True, False
        run.window_from, run.limit = run.steps, run.steps + run.request.window
        self.emit(Mispredicted, pc=jcc, target=wrong)
        self.u.write(_RIP, wrong)
        run.restart = True
        self.u.emu_stop()
        return True

    def _speculation_ends(self, addr: int, stop: str) -> None:
        if stop.startswith("C:"):
            name = stop[2:]
            if self.cpu.cpl == 0 and self.cpu.gs_base in self.config.user_gs_values:
                # Its first per-cpu access (current, the preempt count) uses the user's GSBASE.
                self.fault(FaultKind.USER_GS, f"C function {name} entered with the user GSBASE "
                                              f"({self.cpu.gs_base:#x})", self.cpu.gs_base)
            else:
                self._end(Outcome.STOPPED, f"speculation ends at C function {name}")
            return
        self._end(Outcome.STOPPED, f"speculation ends at {self.image.symbolize(addr)}: {stop}")


__all__ = ["Speculation"]
