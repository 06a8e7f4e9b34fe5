"""Exhaustive exception injection over one scenario on one feature set.

For a path, a RECORD run keeps a snapshot at every instruction boundary.  Each
vector is then delivered at each boundary where hardware could deliver it: the
leaves run FAST from the snapshot; when depth remains, the injected run is itself
recorded and its handler's boundaries explored in turn (nesting).

Pruning (each step provably reaches only states already explored):

* Convergence.  When an injected exception returns to the boundary it
  interrupted and registers, model state and the memory the rest of the path
  reads before writing are all what the recorded run had there, the rest of the
  run is the recorded run's — deterministic execution from equal inputs — so it
  stops ("converged") and the recorded continuation stands for it.
* Latched NMIs.  An NMI that arrives while NMIs are blocked only sets the latch,
  which nothing reads until the unblocking IRET; every boundary of one blocked
  stretch therefore leads to the same state at that IRET, and only the first is run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

from entrycheck.explore.paths import Cost, Finding, Injected, PathResult, cost_of, cr3_trace_of
from entrycheck.explore.scenarios import Scenario, prepare
from entrycheck.kernelabi.stubs import Effect, StubOptions, Stubs
from entrycheck.kernelabi.world import World
from entrycheck.image import layout
from entrycheck.machine.emulator import DEFAULT_BUDGET, Emulator, Mode, Snapshot
from entrycheck.machine.events import Event, Injection, Outcome, Resumed
from entrycheck.machine.model import Vector, can_deliver
from entrycheck.props.invariants import Run, check_run

DEFAULT_VECTORS = (Vector.NMI, Vector.MC, Vector.DB)


@dataclass(frozen=True)
class ExploreConfig:
    vectors: tuple[Vector, ...] = DEFAULT_VECTORS
    depth: int = 2
    db_anywhere: bool = False
    mc_nesting: bool = False       # also deliver #MC inside an #MC handler after MCIP was cleared
    prune: bool = True
    budget: int = DEFAULT_BUDGET
    trace_window: int = 16


@dataclass
class Recorded:
    """A recorded run and what exploring inside it needs."""

    start: int                          # step the run started at
    prefix: tuple[Event, ...]           # the path's events before this run
    chain: tuple[Injected, ...]
    events: list[Event]
    pcs: list[int]
    snapshots: dict[int, Snapshot]
    accesses: list[tuple[int, int, int, bool, bool]]
    window: tuple[int, int]             # [first, last) steps where injection happens
    run: Run
    target: Injection | None = None     # the exception delivered at the start of this run
    parent: "Recorded | None" = None    # the run it was injected into, at boundary parent_k
    parent_k: int = 0
    _live: dict | None = None
    _event_steps: list[int] = field(default_factory=list)

    def events_upto(self, step: int) -> tuple[Event, ...]:
        if not self._event_steps:
            self._event_steps = [e.step for e in self.events]
        return self.prefix + tuple(self.events[:bisect.bisect_right(self._event_steps, step)])

    def pc_at(self, step: int) -> int:
        return self.pcs[step - self.start]


@dataclass
class UnitResult:
    paths: list[PathResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0
    converged: int = 0
    skipped: int = 0
    stopped: str = "done"
    error: str = ""


class Budget:
    def __init__(self, max_runs: int | None) -> None:
        self.max_runs = max_runs
        self.used = 0

    def take(self) -> bool:
        if self.max_runs is not None and self.used >= self.max_runs:
            return False
        self.used += 1
        return True


class Explorer:
    """Explores the scenarios of one feature set (one world, two emulators)."""

    def __init__(self, world: World, config: ExploreConfig, budget: Budget | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.world = world
        self.image = world.image
        self.config = config
        self.budget = budget or Budget(None)
        self.progress = progress
        self.rec = Emulator(self.image, world.config, Stubs(world), mode=Mode.RECORD, budget=config.budget)
        self.fast = Emulator(self.image, world.config, Stubs(world), mode=Mode.FAST, budget=config.budget)
        self._pristine = self._pristine_snapshot()
        self._watch_excluded = self._db_excluded_ranges()
        self._disasm: dict[int, str] = {}

    def _pristine_snapshot(self) -> Snapshot:
        self.rec.set_cpu(self.world.kernel_cpu())
        return self.rec.snapshot()

    # ---- the unit of work ------------------------------------------------------------
    def explore(self, sc: Scenario, effects: frozenset[Effect] = frozenset()) -> UnitResult:
        self.sc, self.effects = sc, effects
        options = StubOptions(effects=effects, sysret=sc.sysret)
        self.rec.stub_handler.options = options
        self.fast.stub_handler.options = options
        self.result = UnitResult()
        if not self.budget.take():
            self.result.stopped = "budget"
            return self.result
        self.rec.restore(self._pristine)
        prepare(self.rec, self.world, sc)
        base = self._record(start=None, prefix=(), chain=())
        self._evaluate(base.run, (), base.events, self.rec, None)
        self._explore_level(base, self.config.depth)
        return self.result

    def _record(self, start: Snapshot | None, prefix: tuple[Event, ...], chain: tuple[Injected, ...],
                vector: Vector | None = None, parent: Recorded | None = None, parent_k: int = 0) -> Recorded:
        emu = self.rec
        self.result.runs += 1
        if start is not None:
            emu.restore(start)
        emu.snapshot_steps = True
        emu.on_resume = None
        target = None
        if vector is not None:
            before = len(emu.run.outstanding)
            delivered = emu.deliver(vector, 0)
            target = emu.run.outstanding[before] if delivered else None

            def on_resume(e: Emulator, ev: Resumed) -> bool:
                if ev.injection is target:
                    e.snapshot_steps = False
                return False
            emu.on_resume = on_resume
        first = emu.run.steps
        emu.go()
        emu.snapshot_steps = False
        end = emu.run.steps
        if target is not None:
            resumed = next((ev.step for ev in emu.run.events if isinstance(ev, Resumed) and ev.injection is target),
                           None)
            end = resumed if resumed is not None else end
        run = Run(prefix + tuple(emu.run.events), emu.run.outcome, emu.run.reason, emu.cpu, False,
                  tuple(emu.run.outstanding), len(prefix))
        return Recorded(first, prefix, chain, list(emu.run.events), list(emu.run.pcs), emu.snapshots,
                        list(emu.run.accesses), (first, end), run, target, parent, parent_k)

    # ---- injection points --------------------------------------------------------------
    def _explore_level(self, rec: Recorded, depth_left: int) -> None:
        if depth_left <= 0:
            return
        first, last = rec.window
        seen_blocked = False
        hits: dict[int, int] = {}
        for k in range(first, last):
            snap = rec.snapshots.get(k)
            if snap is None:
                continue
            pc = rec.pc_at(k)
            hits[pc] = hits.get(pc, 0) + 1
            if self.progress:
                self.progress(1)
            blocked_start = snap.cpu.nmi_blocked and not snap.cpu.nmi_pending and not seen_blocked
            seen_blocked = snap.cpu.nmi_blocked
            for vector in self.config.vectors:
                if not self._allowed(vector, snap, rec, k):
                    continue
                if vector is Vector.NMI and snap.cpu.nmi_blocked and self.config.prune and not blocked_start:
                    self.result.skipped += 1
                    continue
                link = Injected(vector.label, self.image.symbolize(pc), hits[pc])
                chain = rec.chain + (link,)
                if not self.budget.take():
                    self.result.stopped = "budget"
                    return
                if depth_left > 1:
                    sub = self._record(snap, rec.events_upto(k), chain, vector, rec, k)
                    self._evaluate(sub.run, chain, sub.events, self.rec, None, pcs_start=sub.start)
                    self._explore_level(sub, depth_left - 1)
                else:
                    self._leaf(rec, k, snap, vector, chain)

    def _allowed(self, vector: Vector, snap: Snapshot, rec: Recorded, k: int) -> bool:
        cpu = snap.cpu
        if vector is Vector.NMI:
            return not cpu.nmi_pending
        if not can_deliver(cpu, vector):
            return False
        if vector is Vector.MC and not self.config.mc_nesting and any(i.vector is Vector.MC for i in snap.outstanding):
            # Linux supports no nested #MC: once do_machine_check() cleared MCIP, another #MC
            # before the IRET reuses the #MC IST stack in any kernel.  Assumed not to happen.
            return False
        if vector is Vector.DB and not self.config.db_anywhere:
            return self._watchable_before(rec, k)
        return vector in self.world.config.idt

    def _db_excluded_ranges(self) -> list[tuple[int, int]]:
        """Data the kernel refuses hardware breakpoints on (hw_breakpoint.c within_cpu_entry()),
        as physical ranges (memory hooks report physical addresses)."""
        w = self.world
        out = [(layout.CEA_BASE - layout.PAGE, layout.CEA_BASE + 0x100000)]
        res = self.image.loaded.resolution
        if "__per_cpu_offset" in res.data:
            out.append((res.data["__per_cpu_offset"], res.data["__per_cpu_offset"] + res.data_sizes["__per_cpu_offset"]))
        if "cpu_tss_rw" in w.percpu:
            out.append((w.percpu_addr("cpu_tss_rw"), w.percpu_addr("cpu_tss_rw") + 0x1000))
        mask = w.tlbstate_flush_mask()
        if mask is not None:
            out.append((mask, mask + 2))
        if "cpu_dr7" in w.percpu:
            out.append((w.percpu_addr("cpu_dr7"), w.percpu_addr("cpu_dr7") + 8))
        space = self.rec.space
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

    def _watchable_before(self, rec: Recorded, k: int) -> bool:
        """#DB as a trap: the instruction before boundary k touched data a breakpoint may watch."""
        if k == rec.start:
            return False
        step = k            # accesses of instruction k-1 carry step == k (counted before it ran)
        lo = bisect.bisect_left(rec.accesses, (step, -1, -1, False, False))
        for s, addr, size, _, by_insn in rec.accesses[lo:]:
            if s != step:
                break
            if by_insn and not any(a < addr + size and addr < b for a, b in self._watch_excluded):
                return True
        return False

    # ---- leaves --------------------------------------------------------------------------
    def _leaf(self, rec: Recorded, k: int, snap: Snapshot, vector: Vector, chain: tuple[Injected, ...]) -> None:
        emu = self.fast
        self.result.runs += 1
        emu.restore(snap)
        before = len(emu.run.outstanding)
        delivered = emu.deliver(vector, 0)
        target = emu.run.outstanding[before] if delivered else None
        emu.on_resume = None
        converged_at: list[tuple[Recorded, int]] = []
        if self.config.prune:
            # Where each exception of the chain returns, the run it interrupted is known.
            points: dict[int, tuple[Recorded, int, Snapshot]] = {}
            if target is not None:
                points[id(target)] = (rec, k, snap)
            r = rec
            while r.target is not None and r.parent is not None:
                points[id(r.target)] = (r.parent, r.parent_k, r.parent.snapshots[r.parent_k])
                r = r.parent

            def on_resume(e: Emulator, ev: Resumed) -> bool:
                point = points.get(id(ev.injection))
                if point is None:
                    return False
                ref_rec, ref_k, ref_snap = point
                if _same_state(e, ref_snap, self._live_index(ref_rec), ref_k):
                    converged_at.append((ref_rec, ref_k))
                    return True
                return False
            emu.on_resume = on_resume
        emu.go()
        converged = bool(converged_at) and emu.run.outcome is Outcome.STOPPED
        if converged:
            self.result.converged += 1
        prefix = rec.events_upto(k)
        suffix: tuple[Event, ...] = ()
        if converged:
            ref_rec, ref_k = converged_at[-1]
            suffix = tuple(e for e in ref_rec.events if e.step > ref_k)
        run = Run(prefix + tuple(emu.run.events), emu.run.outcome, emu.run.reason, emu.cpu, converged,
                  tuple(emu.run.outstanding), len(prefix), suffix)
        # A converged run ends as the run it rejoined ends.
        ends_as = converged_at[-1][0].run if converged else run
        self._evaluate(run, chain, emu.run.events, emu, (rec, k, snap, vector), cost_of(suffix, self.image),
                       ends_as=ends_as)

    def _live_index(self, rec: Recorded) -> dict[int, tuple[list[int], list[bool]]]:
        """Per writable byte (offset into the span): the steps that access it, and whether
        that step reads it (a read and a write in one step count as a read)."""
        if rec._live is None:
            base, size = self.rec.space.writable_base, self.rec.space.writable_size
            per: dict[int, dict[int, bool]] = {}
            for s, addr, n, write, _ in rec.accesses:
                for b in range(max(addr, base), min(addr + n, base + size)):
                    d = per.setdefault(b - base, {})
                    d[s] = d.get(s, False) or not write
            rec._live = {b: (sorted(d), [d[k] for k in sorted(d)]) for b, d in per.items()}
        return rec._live

    # ---- evaluation -----------------------------------------------------------------------
    def _evaluate(self, run: Run, chain: tuple[Injected, ...], own_events: list[Event], emu: Emulator,
                  leaf: tuple | None, suffix_cost: Cost = Cost(), pcs_start: int = 0,
                  ends_as: Run | None = None) -> None:
        violations = check_run(self.world, run)
        end = ends_as or run
        self.result.paths.append(PathResult(self.sc.name, str(self.image.features), _names(self.effects), chain,
                                            end.outcome.value, cost_of(run.events, self.image) + suffix_cost,
                                            _end_state(end), cr3_trace_of(run.events + run.suffix, self.image),
                                            run.converged))
        if not violations:
            return
        if emu.mode is Mode.RECORD:
            pcs, steps = emu.run.pcs, {id(v): v.step for v in violations}
        else:
            # FAST runs keep no instruction trace: replay the same run recorded.
            pcs, replayed = self._replay(*leaf)
            pcs_start = leaf[1]
            found = {(v.invariant, v.pc, v.message): v.step for v in replayed}
            steps = {id(v): found.get((v.invariant, v.pc, v.message), pcs_start + len(pcs)) for v in violations}
        for v in violations:
            trace = self._trace_window(pcs, steps[id(v)] - pcs_start)
            self.result.findings.append(Finding(v.invariant, self.sc.name, str(self.image.features),
                                                _names(self.effects), chain, self.image.symbolize(v.pc),
                                                v.message, trace))

    def _replay(self, rec: Recorded, k: int, snap: Snapshot, vector: Vector) -> tuple[list[int], list]:
        emu = self.rec
        emu.restore(snap)
        emu.snapshot_steps = False
        emu.on_resume = None
        emu.deliver(vector, 0)
        emu.go()
        prefix = rec.events_upto(k)
        run = Run(prefix + tuple(emu.run.events), emu.run.outcome, emu.run.reason, emu.cpu, False,
                  tuple(emu.run.outstanding), len(prefix))
        return list(emu.run.pcs), check_run(self.world, run)

    def _trace_window(self, pcs: list[int], upto: int) -> tuple[str, ...]:
        n = self.config.trace_window
        upto = max(0, min(len(pcs), upto))
        window = pcs[max(0, upto - n):upto]
        return tuple(self._line(a) for a in window)

    def _line(self, addr: int) -> str:
        got = self._disasm.get(addr)
        if got is None:
            got = self._disasm[addr] = f"{self.image.symbolize(addr)}: {self.image.instruction_text(addr)}"
        return got


def _names(effects: frozenset[Effect]) -> tuple[str, ...]:
    return tuple(sorted(e.value for e in effects))


def _end_state(run: Run) -> tuple:
    cpu = run.final_cpu
    return (run.outcome.value, cpu.cr3, cpu.cpl, cpu.gs_base, cpu.kernel_gs_base, cpu.spec_ctrl, cpu.nmi_blocked,
            cpu.nmi_pending, tuple(sorted(cpu.stale)))


def _same_state(emu: Emulator, ref: Snapshot, index: dict, k: int) -> bool:
    """Registers, model state and every byte the recorded run still reads equal to ``ref``.

    A byte that differs only matters if the recorded run's next access to it, from
    boundary k on (instruction k's accesses carry step k+1), is a read.
    """
    from entrycheck.machine.emulator import CONTEXT_REGS

    if emu.cpu != ref.cpu or tuple(emu.run.outstanding) != ref.outstanding:
        return False
    if emu.regs.read_all(CONTEXT_REGS) != ref.regs:
        return False
    cur, mem = emu.writable_memory(), ref.memory
    if cur == mem:
        return True
    block = 256
    for off in range(0, len(mem), block):
        if cur[off:off + block] == mem[off:off + block]:
            continue
        for b in range(off, min(off + block, len(mem))):
            if cur[b] == mem[b]:
                continue
            got = index.get(b)
            if got is None:
                continue                      # never accessed again
            steps, reads = got
            j = bisect.bisect_left(steps, k + 1)
            if j < len(steps) and reads[j]:
                return False
    return True


__all__ = ["ExploreConfig", "Explorer", "UnitResult", "Budget", "DEFAULT_VECTORS"]
