"""Where hardware could deliver each vector on a recorded run, and what that delivery needs.

One policy per explorer (image, world, configuration) answers for every boundary of every
recorded run (a ``StepLog``), and the explorer and the user-value search ask it alike:

* NMI: anywhere, unless one is already latched (a blocked NMI is latched, not delivered).
* #MC: not while MCG_STATUS.MCIP is set, nor (unless asked) inside an #MC handler after it
  cleared MCIP: Linux supports no nested #MC.
* #DB: as a trap after a data access a hardware breakpoint may watch (the tree's
  hw_breakpoint.c refuses some data) — with the kernel's C in the image, only while DR7 arms
  a breakpoint; with stubs, also at a C function's stub that reads such data on an IST stack —
  or held by a MOV SS shadow until the first instruction of the SYSCALL entry.
* #VC: before an instruction an SEV-ES hypervisor intercepts.
* a maskable interrupt: where IF=1, outside an STI shadow.
"""

from __future__ import annotations

import bisect

from entrycheck.explore.preconditions import DataNames, Precondition, Reach, for_injection
from entrycheck.image import layout
from entrycheck.kernel.guards import BUILTIN_REFUSALS
from entrycheck.kernelabi.linux import IBPB_HELPERS
from entrycheck.kernelabi.stubs import c_footprint
from entrycheck.machine.api import StepLog
from entrycheck.machine.model import RFLAGS_IF, CpuState, Vector, armed, can_deliver
from entrycheck.machine.state import RFLAGS

MOV_SS_DB = Precondition(Reach.UNPRIVILEGED, "db", "a data breakpoint of the user's own on the operand of a "
                         "MOV SS or POP SS right before SYSCALL: the MOV SS shadow holds the #DB until the first "
                         "instruction of the SYSCALL entry (CVE-2018-8897)")


class DeliveryPolicy:
    """The delivery rules of one explorer (see the module's docstring)."""

    def __init__(self, world, layout_, config) -> None:
        self.world = world
        self.image = world.image
        self.config = config
        self.layout = layout_
        self.names = DataNames(world, layout_)
        self._vc_sites: dict[int, bool] = {}
        self._c = world.config.noinstr_c
        self._link_pres: dict[tuple, Precondition] = {}
        self.set_refusals(BUILTIN_REFUSALS)

    def set_refusals(self, names) -> None:
        """The data the kernel refuses hardware breakpoints on (kernel/guards.py), by name."""
        self._watch_excluded = self._db_excluded_ranges(names)
        self._footprints = self._c_footprints(names)

    # ---- may it arrive here? ------------------------------------------------------------------
    def allowed(self, vector: Vector, log: StepLog, k: int, single_steps: frozenset[int], entry: bool) -> bool:
        """Whether ``vector`` may be delivered at boundary k of ``log``.  ``single_steps``: the
        boundaries a single-step #DB trap was delivered just before; ``entry``: the log is a
        system-call scenario's own path (its first boundary is where a MOV SS-held #DB lands)."""
        i = k - log.start
        cpu = log.cpus[i]
        if vector is Vector.IRQ and not self.irq_window(log, i):
            return False
        if vector is Vector.NMI:
            return not cpu.nmi_pending
        return self._allowed(vector, cpu, log, k, i, single_steps, entry)

    def _allowed(self, vector: Vector, cpu: CpuState, log: StepLog, k: int, i: int, single_steps, entry) -> bool:
        if not can_deliver(cpu, vector):
            return False
        if vector is Vector.MC and not self.config.mc_nesting and \
                any(o.vector is Vector.MC for o in log.outstanding[i]):
            # Linux supports no nested #MC: once do_machine_check() cleared MCIP, another #MC
            # before the IRET reuses the #MC IST stack in any kernel.  Assumed not to happen.
            return False
        if vector is Vector.DB and not self.config.db_anywhere:
            if k in single_steps:
                return False
            if self.mov_ss(log, k, entry):
                return True
            # With the kernel's C running, a breakpoint fires only while DR7 arms it: the handlers'
            # local_db_save() clears it (the user's own breakpoints cannot watch kernel data).
            return (not self._c or armed(cpu)) and self.watchable_access(log, k) is not None
        if vector is Vector.VC:
            return vector in self.world.config.idt and self.raises_vc(log.pcs[i])
        return vector in self.world.config.idt

    def irq_window(self, log: StepLog, i: int) -> bool:
        """A maskable interrupt arrives at a boundary where IF=1, unless the instruction before
        was an STI that set IF (its one-instruction shadow; MOV SS/POP SS never run here: the
        machine refuses segment loads)."""
        if not log.regs[i][RFLAGS] & RFLAGS_IF:
            return False
        if i == 0:
            return True
        prev = log.pcs[i - 1]
        if self.image.code_section(prev) is None:
            return True                     # a stub's RET, never an STI
        return not (self.image.read(prev, 1) == b"\xfb" and not log.regs[i - 1][RFLAGS] & RFLAGS_IF)

    def raises_vc(self, pc: int) -> bool:
        """#VC is a fault of the instruction at ``pc`` (image/insns.py says which an SEV-ES
        hypervisor intercepts); a C function's stub raises none: its #VCs are its own.  The
        stub of an IBPB helper (entry_ibpb) does: its WRMSR of PRED_CMD, an MSR the VMSA does
        not hold, faults where the hypervisor intercepts it.  It is delivered at the stub's
        first instruction: what entry_ibpb runs before its WRMSR only loads the WRMSR's
        operands, which the #VC handler saves and restores."""
        got = self._vc_sites.get(pc)
        if got is None:
            stub = self.world.config.stubs.get(pc)
            got = self._vc_sites[pc] = stub in IBPB_HELPERS if stub is not None else \
                self.image.code_section(pc) is not None and self.image.instructions.raises_vc(pc)
        return got

    def mov_ss(self, log: StepLog, k: int, entry: bool) -> bool:
        """The first boundary of the SYSCALL entry: a #DB that a user's own data breakpoint on the
        operand of a MOV SS/POP SS raised just before SYSCALL is held by the MOV SS shadow and
        delivered here, in kernel mode with the user's GSBASE and RSP (CVE-2018-8897)."""
        return self.config.mov_ss_db and entry and k == log.start

    # ---- what a breakpoint may watch -------------------------------------------------------------
    def _c_footprints(self, refused) -> dict[str, str]:
        """C function -> the first per-cpu variable it reads on an IST stack that no refusal
        covers (kernelabi/stubs.py); empty unless the configuration asks for it."""
        if not self.config.c_footprints or self._c:
            return {}          # with the kernel's C in the image, its own accesses are watched
        out = {}
        for name in set(self.world.config.stubs.values()):
            free = [v for v in c_footprint(self.world, name) if v not in refused]
            if free:
                out[name] = free[0]
        return out

    def _db_excluded_ranges(self, names) -> list[tuple[int, int]]:
        """Data the kernel refuses hardware breakpoints on (hw_breakpoint.c within_cpu_entry()),
        as physical ranges (memory hooks report physical addresses): the cpu_entry_area, data
        symbols, and whole per-cpu variables (up to the next one in the per-cpu area)."""
        w = self.world
        out = []
        res = self.image.loaded.resolution
        offsets = sorted(set(w.percpu.values()))
        for name in names:
            if name == "cpu_entry_area":
                out.append((layout.CEA_BASE - layout.PAGE, layout.CEA_BASE + 0x100000))
            elif name in w.percpu:
                start = w.percpu[name]
                k = bisect.bisect_right(offsets, start)
                end = offsets[k] if k < len(offsets) else start + layout.PAGE
                out.append((w.percpu_addr(name), w.percpu_base + end))
            elif name in res.data:
                out.append((res.data[name], res.data[name] + max(8, res.data_sizes.get(name, 8))))
        space = self.layout
        phys = []
        for start, end in out:
            addr = start
            while addr < end:
                chunk = min(end, (addr | 0xFFF) + 1) - addr
                if space.pages.get(addr >> 12) is not None:
                    p = space.phys(addr)
                    phys.append((p, p + chunk))
                addr += chunk
        return phys

    def watchable_access(self, log: StepLog, k: int) -> int | str | None:
        """The (physical) address of the first access of the instruction before boundary k that
        a breakpoint may watch; at a C function's boundary, the per-cpu variable it reads that
        a breakpoint may watch (its name)."""
        if self._footprints:
            name = self.world.config.stubs.get(log.pcs[k - log.start])
            if name in self._footprints:
                return self._footprints[name]
        if k == log.start:
            return None
        accesses = log.accesses
        lo = bisect.bisect_left(accesses, (k, -1, -1, False, False))
        for s, addr, size, _, by_insn in accesses[lo:]:
            if s != k:
                break
            if by_insn and not any(a < addr + size and addr < b for a, b in self._watch_excluded):
                return addr
        return None

    def watched(self, log: StepLog, k: int) -> str | None:
        """The data a breakpoint would watch to raise a #DB trap at boundary k."""
        got = self.watchable_access(log, k)
        if isinstance(got, str):
            return f"{got} (per-cpu, read by {self.world.config.stubs[log.pcs[k - log.start]]})"
        return self.names.name(got) if got is not None else None

    def db_cause(self, log: StepLog, k: int) -> str:
        """How a #DB delivered at boundary k comes about, for an ist-reentered finding's message."""
        got = self.watchable_access(log, k)
        i = k - log.start
        if isinstance(got, str):
            return f"; the #DB traps in {self.world.config.stubs[log.pcs[i]]}, which reads {got} (per-cpu) on that stack"
        if got is not None:
            prev = log.pcs[i - 1] if i > 0 else log.pcs[i]
            return f"; the #DB traps on the access to {self.names.name(got)} by {self.image.symbolize(prev)}"
        return ""

    # ---- what it needs --------------------------------------------------------------------------
    def precondition(self, log: StepLog, k: int, vector: Vector, entry: bool) -> Precondition:
        """The precondition of injecting ``vector`` at boundary k (one object per distinct one)."""
        got = self.watchable_access(log, k) if vector is Vector.DB else None
        if vector is Vector.DB and got is None and self.mov_ss(log, k, entry):
            return MOV_SS_DB
        key = (vector, got, log.pcs[k - log.start] if isinstance(got, str) else None)
        pre = self._link_pres.get(key)
        if pre is None:
            pre = self._link_pres[key] = for_injection(vector, self.watched(log, k) if got is not None else None)
        return pre


__all__ = ["DeliveryPolicy", "MOV_SS_DB"]
