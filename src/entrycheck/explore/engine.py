"""Exhaustive exception injection over one scenario on one feature set.

For a path, one STEPS run records the state at every instruction boundary.  Each
vector is then delivered at each boundary where hardware could deliver it: leaves
run at Unicorn's speed from that state; with depth left, the injected run is itself
recorded and its handler's boundaries explored in turn (nesting).

A path's verdict and cost are put together from summaries: of the path before the
injection (kept per boundary of each recorded run), of the leaf's own run, and of
the recorded run it rejoined — so a leaf costs the same however long its path is.

Pruning (each step provably reaches only states already explored; ``--no-prune``
runs everything to its end and must find the same):

* Convergence.  When an injected exception returns to the boundary it interrupted
  and registers, model state and every word the recorded run still reads before
  writing are what that run had there, the rest of the run is the recorded run's
  (deterministic execution from equal inputs): it stops, and the recorded
  continuation stands for the rest.
* Latched NMIs.  An NMI that arrives while NMIs are blocked only sets the latch,
  which nothing reads until the unblocking IRET; every boundary of one blocked
  stretch therefore leads to the same state at that IRET, and only the first is run.
* Shared handler runs (explore/memo.py).  A leaf whose start state agrees with an
  earlier leaf's on everything that leaf's run used, and whose copies of the rest
  would rejoin the recorded run, is that run: it is attributed without running.

Root causes.  An exception delivered through an IST slot while an earlier delivery's
frame on that stack is still live (the recorded run reads it later) is reported as
``ist-reentered`` at the second delivery; what goes wrong on the path after it (the
symptoms) is folded under that finding instead of reported on its own.  Every finding
carries the preconditions of its path (explore/preconditions.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Callable

from entrycheck.explore.memo import Memo, Target
from entrycheck.explore.paths import (NO_COST, Cost, Finding, PathTable, cr3_entry, event_cost)
from entrycheck.explore.replay import live_ist_frame
from entrycheck.explore.preconditions import (DataNames, Precondition, Reach, for_effect, for_entry, for_user,
                                              for_injection)
from entrycheck.explore.scenarios import Scenario, delivery, start_state, stub_options
from entrycheck.image import layout
from entrycheck.kernel.guards import BUILTIN_REFUSALS
from entrycheck.kernelabi.stubs import Effect, Stubs, c_footprint
from entrycheck.kernelabi.world import World
from entrycheck.machine.events import Delivered, Event, Fault, FaultKind, Injection, Iret, Outcome, Resumed
from entrycheck.machine.flow import Analyser
from entrycheck.machine.api import DEFAULT_BUDGET, ConvergePoint, Level, LiveIndex, Record, Request, StepLog
from entrycheck.machine.machine import Machine
from entrycheck.machine.model import RFLAGS_IF, SPEC_WINDOW, CpuState, Vector, can_deliver
from entrycheck.machine.state import RFLAGS, Snapshot
from entrycheck.props.invariants import (NO_NMI, End, NmiSummary, Violation, ist_reentered_message,
                                         local_violations, nmi_of, verdict)

MOV_SS_DB = Precondition(Reach.UNPRIVILEGED, "db", "a data breakpoint of the user's own on the operand of a "
                         "MOV SS or POP SS right before SYSCALL: the MOV SS shadow holds the #DB until the first "
                         "instruction of the SYSCALL entry (CVE-2018-8897)")
DEFAULT_VECTORS = (Vector.NMI, Vector.MC, Vector.DB, Vector.IRQ)
ESPFIX_SWAPGS = (" (the espfix64 exit: its SWAPGS depends on the IRET frame's SS, and neither an LFENCE nor, "
                 "without PTI, a CR3 write comes before its per-cpu load; 18ec54fdd6d1 fenced the entries' SWAPGS)")


@dataclass(frozen=True)
class ExploreConfig:
    vectors: tuple[Vector, ...] = DEFAULT_VECTORS
    depth: int = 2
    db_anywhere: bool = False
    mc_nesting: bool = False       # also deliver #MC inside an #MC handler after MCIP was cleared
    prune: bool = True
    budget: int = DEFAULT_BUDGET
    trace_window: int = 16
    fold: bool = True              # symptoms after an ist-reentered delivery fold under it
    c_footprints: bool = True      # #DB also inside C functions that read unprotected data on an IST stack
    pt_regs_contract: bool = True  # C functions taking pt_regs check it (off: as engines before it did)
    iret_faults: bool = True       # a refused IRET delivers #GP (off: it ends the run, as engines before did)
    mov_ss_db: bool = True         # a #DB held by a MOV SS shadow arrives at the SYSCALL entry
    spec_window: int = SPEC_WINDOW  # instructions a mispredicted branch runs ahead (0: never follow one)


@dataclass(frozen=True)
class Own:
    """What a path's own run contributes: summarised once per run (or per shared run)."""

    events: tuple[Event, ...]
    cost: Cost
    cr3: tuple
    nmi: NmiSummary
    local: tuple                     # local violations, positions relative to the run's first event


@dataclass
class Group:
    """The paths and findings that injecting at one boundary of the scenario's path produced."""

    order: int                       # index of the boundary in the scenario's path
    rows: tuple[int, int]
    findings: list[Finding] = field(default_factory=list)


@dataclass
class UnitResult:
    table: PathTable
    groups: list[Group] = field(default_factory=list)     # in exploration order
    converged: int = 0
    skipped: int = 0
    executed: int = 0                # runs the machine really made
    shared: int = 0                  # leaves attributed to a shared run
    stopped: str = "done"
    error: str = ""
    speculated: int = 0              # mispredicted branches followed (runs not counted as paths)
    covered: frozenset[int] = frozenset()    # instructions the recorded runs executed

    @property
    def runs(self) -> int:
        return len(self.table)

    @property
    def findings(self) -> list[Finding]:
        return [f for g in self.groups for f in g.findings]


class Budget:
    def __init__(self, max_runs: int | None) -> None:
        self.max_runs = max_runs
        self.used = 0

    def take(self) -> bool:
        if self.max_runs is not None and self.used >= self.max_runs:
            return False
        self.used += 1
        return True


# Instructions an SEV-ES guest takes a #VC on (when the hypervisor intercepts them; assumed).
VC_MNEMONICS = frozenset({"cpuid", "rdtsc", "rdtscp", "rdpmc", "wbinvd", "vmmcall", "monitor", "mwait", "monitorx",
                          "mwaitx", "in", "inb", "inw", "inl", "insb", "insw", "insl", "out", "outb", "outw", "outl",
                          "outsb", "outsw", "outsl"})
# MSRs an SEV-ES guest accesses without a #VC: the VMSA holds them (swapped on VMRUN).
VMSA_MSRS = frozenset({0xC0000100, 0xC0000101, 0xC0000102})


class Node:
    """A recorded run and what exploring inside it and evaluating paths through it need."""

    def __init__(self, ex: "Explorer", record: Record, parent: "Node | None", parent_k: int,
                 chain: tuple[Injection, ...], row: int) -> None:
        self.record = record
        self._wbase = ex.wbase
        self.log: StepLog = record.steps
        self.parent, self.parent_k = parent, parent_k
        self.chain = chain
        self.pre: tuple[Precondition, ...] = ()      # one per link of the chain
        self.latched: _Reentry | None = None         # an ist-reentered delivery inside its run
        self.row = row
        self.events = record.events
        self.steps = [e.step for e in self.events]
        # Boundaries a single-step #DB trap was delivered just before (a breakpoint's trap on the
        # same instruction is that same #DB: DR6 reports both).
        self.single_steps = frozenset(e.step for e in self.events if type(e) is Delivered and e.single_step)
        first = self.log.start
        end = record.resumed_step if record.resumed_step is not None else record.final.steps
        self.window = (first, end)
        if parent is None:
            pre_cost, pre_cr3, pre_nmi, pre_local, self.position = NO_COST, (), NO_NMI, (), 0
        else:
            i = parent.index(parent_k)
            pre_cost, pre_cr3, pre_nmi, pre_local = parent.cost_pre[i], parent.cr3_pre[i], parent.nmi_pre[i], \
                parent.local_pre[i]
            self.position = parent.position + i
        n = len(self.events)
        self.cost_pre: list[Cost] = [pre_cost] * (n + 1)
        self.cr3_pre: list[tuple] = [pre_cr3] * (n + 1)
        self.nmi_pre: list[NmiSummary] = [pre_nmi] * (n + 1)
        self.local_pre: list[tuple] = [pre_local] * (n + 1)
        own_local = local_violations(ex.world, self.events, self.position)
        li = 0
        for i, e in enumerate(self.events):
            c = event_cost(e, ex.image)
            self.cost_pre[i + 1] = ex.add_cost(self.cost_pre[i], c) if c is not None else self.cost_pre[i]
            t = cr3_entry(e, ex.image)
            self.cr3_pre[i + 1] = ex.concat(self.cr3_pre[i], (t,)) if t is not None else self.cr3_pre[i]
            s = nmi_of(e)
            self.nmi_pre[i + 1] = self.nmi_pre[i] + s if s is not NO_NMI else self.nmi_pre[i]
            start = li
            while li < len(own_local) and own_local[li][2] == self.position + i:
                li += 1
            self.local_pre[i + 1] = self.local_pre[i] + own_local[start:li] if li > start else self.local_pre[i]
        self.own_local = own_local
        self._suffix: dict[int, tuple[Cost, tuple, NmiSummary]] = {}
        self._live: LiveIndex | None = None
        self._live_words: frozenset[int] | None = None
        self.points: tuple[ConvergePoint, ...] = ()
        self.point_nodes: tuple[tuple["Node", int], ...] = ()
        self._anc: tuple | None = None
        self.attributed: dict[tuple, tuple] = {}     # (index, memo entry) -> path summary

    def index(self, k: int) -> int:
        """How many of this run's events happened by boundary k."""
        return bisect.bisect_right(self.steps, k)

    def suffix(self, k: int, ex: "Explorer") -> tuple[Cost, tuple, NmiSummary]:
        """Cost, CR3 trace and NMI summary of this run's events after boundary k."""
        i = self.index(k)
        got = self._suffix.get(i)
        if got is None:
            cost, cr3, nmi = NO_COST, (), NO_NMI
            for e in self.events[i:]:
                c = event_cost(e, ex.image)
                if c is not None:
                    cost = ex.add_cost(cost, c)
                t = cr3_entry(e, ex.image)
                if t is not None:
                    cr3 = ex.concat(cr3, (t,))
                s = nmi_of(e)
                if s is not NO_NMI:
                    nmi = nmi + s
            got = self._suffix[i] = (cost, cr3, nmi)
        return got

    @property
    def live(self) -> LiveIndex:
        if self._live is None:
            space = self.record.final
            self._live = LiveIndex(self.log.accesses, self._wbase, len(space.memory))
            self._live_words = frozenset(w for w in self._live.words())
        return self._live

    @property
    def live_words(self) -> frozenset[int]:
        self.live
        return self._live_words

    def targets(self, k: int, memory) -> tuple[Target, Target | None]:
        """What a leaf at boundary k may rejoin: this run there, or (through the outer
        exception's return) the run this one was injected into."""
        i = k - self.log.start
        log = self.log
        own = Target(len(log.outstanding[i]), log.regs[i], memory, log.cpus[i], log.outstanding[i], self.live,
                     self.live_words, k)
        if not self.points:
            return own, None
        p = self.points[0]
        if self._anc is None:
            node = self.point_nodes[0][0]
            self._anc = (p.ref.regs, p.ref.memory, p.ref.cpu, p.ref.outstanding, p.live, node.live_words,
                         p.boundary)
            self._dirty_pos, self._dirty = 0, {}
        writes = log.writes
        n = self._dirty_pos
        live_words = self._anc[5]
        while n < len(writes) and writes[n][0] <= k:
            _, off, data = writes[n]
            for w in range(off & ~7, off + len(data), 8):
                if w in live_words:
                    self._dirty[w] = None
            n += 1
        self._dirty_pos = n
        regs, mem, cpu, out, live, words, boundary = self._anc
        return own, Target(p.index, regs, mem, cpu, out, live, words, boundary, tuple(self._dirty))

    def path_events(self, i: int) -> tuple[Event, ...]:
        before = self.parent.path_events(self.parent.index(self.parent_k)) if self.parent else ()
        return before + self.events[:i]


class Explorer:
    """Explores the scenarios of one feature set (one world, one machine, one memo)."""

    def __init__(self, world: World, config: ExploreConfig, budget: Budget | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.world = world
        self.image = world.image
        self.config = config
        self.budget = budget or Budget(None)
        self.progress = progress
        self.stubs = Stubs(world)
        machine_config = world.config if config.iret_faults else replace(world.config, iret_faults=False)
        self.machine = Machine(self.image, machine_config, self.stubs)
        self.pristine = self.machine.pristine_memory()
        self.wbase = self.machine.space.writable_base
        self.analyser = Analyser(self.image, self.wbase, self.machine.space.writable_size)
        self.memo = Memo(self.wbase)
        self.memo_enabled = config.prune
        self._watch_excluded = self._db_excluded_ranges()
        self._footprints = self._c_footprints()
        self._vc_sites: dict[int, bool] = {}
        spec = world.config.spec
        self._speculating = spec is not None and spec.swapgs and config.spec_window > 0
        self.names = DataNames(world, self.machine.space)
        self._reentries: list[_Reentry] = []     # the ist-reentered deliveries on the current path
        self._pre: tuple[Precondition, ...] = ()  # preconditions of the path being evaluated
        self.guards: dict[str, str] = {}          # label -> the CONFIG_ option its iretq needs
        self._guarded: dict[int, Precondition] = {}   # instructions only a build option compiles in
        self._early: dict[int, Precondition | None] = {}
        self._link_pres: dict[tuple, Precondition] = {}
        self._disasm: dict[int, str] = {}
        self._costs: dict[tuple[int, int], Cost] = {}
        self._cost_intern: dict[Cost, Cost] = {NO_COST: NO_COST}
        self._concats: dict[tuple[int, int], tuple] = {}
        self._tuple_intern: dict[tuple, tuple] = {(): ()}
        self._ends: dict[tuple, tuple] = {}
        self._links: dict[tuple, Injection] = {}

    # ---- interned arithmetic on summaries ------------------------------------------------
    def _link(self, vector: Vector, pc: int, hit: int) -> Injection:
        key = (vector, pc, hit)
        got = self._links.get(key)
        if got is None:
            got = self._links[key] = Injection(vector, self.image.symbolize(pc), hit)
        return got

    def add_cost(self, a: Cost, b: Cost) -> Cost:
        """a + b, both interned (sums are cached by the identity of interned costs)."""
        if b is NO_COST:
            return a
        intern = self._cost_intern
        a, b = intern.setdefault(a, a), intern.setdefault(b, b)
        if a is NO_COST:
            return b
        key = (id(a), id(b))
        got = self._costs.get(key)
        if got is None:
            c = a + b
            got = self._costs[key] = intern.setdefault(c, c)
        return got

    def _intern_cost(self, c: Cost) -> Cost:
        return self._cost_intern.setdefault(c, c)

    def concat(self, a: tuple, b: tuple) -> tuple:
        """a + b for CR3 traces, interned likewise."""
        intern = self._tuple_intern
        if not b:
            return intern.setdefault(a, a)
        a, b = intern.setdefault(a, a), intern.setdefault(b, b)
        if not a:
            return b
        key = (id(a), id(b))
        got = self._concats.get(key)
        if got is None:
            c = a + b
            got = self._concats[key] = intern.setdefault(c, c)
        return got

    def own_summary(self, events: tuple[Event, ...], position: int) -> Own:
        cost, cr3, nmi = NO_COST, (), NO_NMI
        for e in events:
            c = event_cost(e, self.image)
            if c is not None:
                cost = cost + c
            t = cr3_entry(e, self.image)
            if t is not None:
                cr3 = cr3 + (t,)
            s = nmi_of(e)
            if s is not NO_NMI:
                nmi = nmi + s
        return Own(events, self._intern_cost(cost), self._tuple_intern.setdefault(cr3, cr3), nmi,
                   local_violations(self.world, events, position))

    # ---- the unit of work ---------------------------------------------------------------
    def explore(self, sc: Scenario, effects: frozenset[Effect] = frozenset(), part: int = 0,
                parts: int = 1, depth: int | None = None) -> UnitResult:
        """Explore ``sc`` to ``depth`` (default: the config's); with ``parts`` > 1 only the
        boundaries of its path whose index is ``part`` modulo ``parts`` (the scenario's own
        path belongs to part 0)."""
        self.sc, self.effects = sc, effects
        self.options = stub_options(sc, effects, self.config.pt_regs_contract)
        self.table = PathTable(sc.name, self.image.features, _names(effects))
        self.result = UnitResult(self.table)
        self.entry_pre = (for_entry(sc.vector, sc.from_user, sc.name),) + for_user(sc.user.items()) + \
            tuple(for_effect(e.value) for e in sorted(effects, key=lambda e: e.value))
        self._pre = self.entry_pre
        self._reentries = []
        if not self.budget.take():
            self.result.stopped = "budget"
            return self.result
        start = start_state(self.world, sc, self.pristine)
        rec = self._run(Request(start, deliver=delivery(self.world, sc), level=Level.STEPS, options=self.options,
                                budget=self.config.budget, cut_loops=self.config.prune))
        base = Node(self, rec, None, 0, (), -1)
        if part == 0:
            group = Group(-1, (0, 0))
            base.row = self._evaluate_node(base, (), group)
            group.rows = (0, len(self.table))
            self.result.groups.append(group)
        else:
            base.row = -1
        self._covered: set[int] = set(rec.steps.pcs)
        self._explore_level(base, self.config.depth if depth is None else depth, top=(part, parts))
        self.result.covered = frozenset(self._covered)
        return self.result

    def _run(self, request: Request) -> Record:
        self.result.executed += 1
        return self.machine.run(request)

    # ---- injection points --------------------------------------------------------------
    def _explore_level(self, node: Node, depth_left: int, top: tuple[int, int] | None = None) -> None:
        if depth_left <= 0:
            return
        depth = len(self._reentries)
        try:
            self._explore_boundaries(node, depth_left, top)
        finally:
            del self._reentries[depth:]

    def _explore_boundaries(self, node: Node, depth_left: int, top: tuple[int, int] | None) -> None:
        latched = node.latched
        first, last = node.window
        log = node.log
        seen_blocked = False
        hits: dict[int, int] = {}
        cursor = log.cursor()
        vectors = self.config.vectors
        for k in range(first, last):
            i = k - log.start
            pc = log.pcs[i]
            hits[pc] = hits.get(pc, 0) + 1
            if latched is not None and k >= latched.step:
                # Paths injected from here on have the run's ist-reentered delivery before them.
                self._reentries.append(latched)
                latched = None
            if self.progress:
                self.progress(1)
            cpu = log.cpus[i]
            blocked_start = cpu.nmi_blocked and not cpu.nmi_pending and not seen_blocked
            seen_blocked = cpu.nmi_blocked
            group = None
            if top is not None:
                if (k - first) % top[1] != top[0]:
                    continue
                group = Group(k - first, (len(self.table), 0))
                self.group = group
            memory = None
            for vector in vectors:
                if vector is Vector.IRQ and not self._irq_window(log, i):
                    continue
                if not self._allowed(vector, cpu, log.outstanding[i], node, k):
                    continue
                if vector is Vector.NMI and cpu.nmi_blocked and self.config.prune and not blocked_start:
                    self.result.skipped += 1
                    continue
                link = self._link(vector, pc, hits[pc])
                if not self.budget.take():
                    self.result.stopped = "budget"
                    self._close(group)
                    return
                if memory is None:
                    memory = cursor.advance(k)
                pre = self._link_pre(node, k, vector)
                self._pre = self.entry_pre + node.pre + (pre,)
                reentry = (self._ist_reentry(node, k, i, vector, memory, link)
                           if vector.ist and self.world.config.fred is None else None)
                if reentry is not None:
                    if self._new_root(reentry):
                        self._reentries.append(reentry)
                    else:
                        reentry = None
                if depth_left > 1:
                    state = log.state(k, cursor.frozen())
                    child = self._record(node, k, state, vector, link, pre)
                    self._explore_level(child, depth_left - 1)
                    if child.latched is not None:
                        self._pre = self.entry_pre + child.pre
                        self._report_reentry(child.latched)
                else:
                    self._leaf(node, k, i, memory, cursor, vector, link)
                if reentry is not None:
                    self._reentries.pop()
                    self._pre = self.entry_pre + node.pre + (pre,)
                    self._report_reentry(reentry)
            if self._speculating and cpu.cpl == 0 and i + 1 < len(log.pcs) and pc not in self.world.config.stubs:
                jcc = self.machine.conditional(pc)
                if jcc is not None and log.pcs[i + 1] in jcc:
                    wrong = jcc[1] if log.pcs[i + 1] == jcc[0] else jcc[0]
                    if memory is None:
                        memory = cursor.advance(k)
                    self._speculate(node, k, cursor, wrong, self._link(Vector.MISPREDICT, pc, hits[pc]))
            self._close(group)
            if self.result.stopped == "budget":
                return

    # ---- mispredicted branches ---------------------------------------------------------------
    def _speculate(self, node: Node, k: int, cursor, wrong: int, link: Injection) -> None:
        """Run the side of the conditional branch at boundary k that the path did not take, as the
        CPU would when it mispredicts it: up to ``spec_window`` instructions, ending at an LFENCE,
        a serialising instruction or a C function, nothing of it committed (a run of its own from
        the boundary's state).  A %gs: access (or a C function's) with the user GSBASE on it is
        swapgs-unfenced."""
        state = node.log.state(k, cursor.frozen())
        state = replace(state, regs=state.regs.with_(rip=wrong))
        request = Request(state, level=Level.EVENTS, options=self.options, budget=self.config.spec_window,
                          budget_from=k, speculate=True)
        rec = self._run(request)
        self.result.speculated += 1
        fault = next((e for e in rec.events if type(e) is Fault and e.kind is FaultKind.SPECULATIVE_USER_GS), None)
        if fault is None:
            return
        traced = self._run(replace(request, level=Level.PCS))
        fault = next((e for e in traced.events if type(e) is Fault and e.kind is FaultKind.SPECULATIVE_USER_GS), fault)
        pc = node.log.pcs[k - node.log.start]
        v = Violation("swapgs-unfenced", fault.pc, fault.step,
                      f"the {self.image.instruction_text(pc).split()[0]} at {self.image.symbolize(pc)} mispredicted, "
                      "its other side reaches a %gs: access with "
                      f"the user GSBASE before any LFENCE or serialising instruction: {fault.message}"
                      + (ESPFIX_SWAPGS if self.image.symbolize(fault.pc).startswith("native_irq_return_ldt") else ""))
        self._pre = self.entry_pre + node.pre + (for_injection(Vector.MISPREDICT),)
        self._findings([v], node.chain + (link,), traced.steps.pcs, k, {id(v): fault.step}, self.group, ())

    def _close(self, group: Group | None) -> None:
        if group is not None and group.rows[1] == 0:
            group.rows = (group.rows[0], len(self.table))
            self.result.groups.append(group)

    def _allowed(self, vector: Vector, cpu: CpuState, outstanding, node: Node, k: int) -> bool:
        if vector is Vector.NMI:
            return not cpu.nmi_pending
        if not can_deliver(cpu, vector):
            return False
        if vector is Vector.MC and not self.config.mc_nesting and any(i.vector is Vector.MC for i in outstanding):
            # Linux supports no nested #MC: once do_machine_check() cleared MCIP, another #MC
            # before the IRET reuses the #MC IST stack in any kernel.  Assumed not to happen.
            return False
        if vector is Vector.DB and not self.config.db_anywhere:
            return self._watchable_before(node, k)
        if vector is Vector.VC:
            return vector in self.world.config.idt and self._raises_vc(node.log.pcs[k - node.log.start])
        return vector in self.world.config.idt

    def _raises_vc(self, pc: int) -> bool:
        """#VC is a fault of the instruction at ``pc``: one an SEV-ES hypervisor can intercept (CPUID,
        RDTSC(P), RDPMC, I/O, MOV DR7, WBINVD, VMMCALL, MONITOR/MWAIT, and RDMSR/WRMSR of MSRs the
        VMSA does not hold: all but FS/GS/KERNEL_GS_BASE).  MMIO is not in the entry code."""
        got = self._vc_sites.get(pc)
        if got is None and (pc in self.world.config.stubs or self.image.code_section(pc) is None):
            got = self._vc_sites[pc] = False         # a C function's stub: its #VCs are its own
        if got is None:
            from entrycheck.image.decode import decode_one

            ins = decode_one(self.image.read(pc, 16), pc)
            m = ins.mnemonic if ins else ""
            got = m in VC_MNEMONICS
            if not got and ins is not None and m == "mov" and "dr7" in ins.op_str:
                got = True
            if not got and m in ("rdmsr", "wrmsr"):
                got = self._msr_at(pc) not in VMSA_MSRS
            self._vc_sites[pc] = got
        return got

    def _msr_at(self, pc: int) -> int | None:
        """The MSR an RDMSR/WRMSR at ``pc`` accesses, from the MOV to ECX just before it (None: unknown)."""
        from entrycheck.image.decode import sweep

        start, _ = self.image.symbol_range(self.image.symbolize(pc).split("+")[0])
        last = None
        for ins in sweep(self.image.read(start, pc - start), start):
            if ins.mnemonic.startswith("mov") and ins.op_str.endswith(("%ecx", "%rcx")) and ins.op_str.startswith("$"):
                last = int(ins.op_str.split(",")[0][1:], 0)
        return last

    def _irq_window(self, log: StepLog, i: int) -> bool:
        """A maskable interrupt arrives at a boundary where IF=1, unless the instruction before
        was an STI that set IF (its one-instruction shadow; MOV SS/POP SS never run here: the
        machine refuses segment loads)."""
        if not log.regs[i][RFLAGS] & RFLAGS_IF:
            return False
        if i == 0:
            return True
        prev = log.pcs[i - 1]
        return not (self.image.read(prev, 1) == b"\xfb" and not log.regs[i - 1][RFLAGS] & RFLAGS_IF)

    def set_refusals(self, names) -> None:
        """The data the kernel refuses hardware breakpoints on (kernel/guards.py), by name."""
        self._watch_excluded = self._db_excluded_ranges(names)
        self._footprints = self._c_footprints(names)

    def _c_footprints(self, refused=BUILTIN_REFUSALS) -> dict[str, str]:
        """C function -> the first per-cpu variable it reads on an IST stack that no refusal
        covers (kernelabi/stubs.py); empty unless the configuration asks for it."""
        if not self.config.c_footprints:
            return {}
        out = {}
        for name in set(self.world.config.stubs.values()):
            free = [v for v in c_footprint(self.world, name) if v not in refused]
            if free:
                out[name] = free[0]
        return out

    def _db_excluded_ranges(self, names=BUILTIN_REFUSALS) -> list[tuple[int, int]]:
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
        space = self.machine.space
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

    def _watchable_before(self, node: Node, k: int) -> bool:
        """#DB as a trap: the instruction before boundary k touched data a breakpoint may watch
        (unless TF raised a #DB there already: one #DB reports both)."""
        if k in node.single_steps:
            return False
        return self._watchable_access(node, k) is not None or self._mov_ss(node, k)

    def _mov_ss(self, node: Node, k: int) -> bool:
        """The first boundary of the SYSCALL entry: a #DB that a user's own data breakpoint on the
        operand of a MOV SS/POP SS raised just before SYSCALL is held by the MOV SS shadow and
        delivered here, in kernel mode with the user's GSBASE and RSP (CVE-2018-8897)."""
        return self.config.mov_ss_db and node.parent is None and k == node.log.start and self.sc.vector is None

    def _watchable_access(self, node: Node, k: int) -> int | str | None:
        """The (physical) address of the first access of the instruction before boundary k that
        a breakpoint may watch; at a C function's boundary, the per-cpu variable it reads that
        a breakpoint may watch (its name)."""
        if self._footprints:
            name = self.world.config.stubs.get(node.log.pcs[k - node.log.start])
            if name in self._footprints:
                return self._footprints[name]
        if k == node.log.start:
            return None
        accesses = node.log.accesses
        lo = bisect.bisect_left(accesses, (k, -1, -1, False, False))
        for s, addr, size, _, by_insn in accesses[lo:]:
            if s != k:
                break
            if by_insn and not any(a < addr + size and addr < b for a, b in self._watch_excluded):
                return addr
        return None

    # ---- recorded runs ----------------------------------------------------------------------
    def _record(self, node: Node, k: int, state: Snapshot, vector: Vector, link: Injection,
                pre: Precondition) -> Node:
        rec = self._run(Request(state, deliver=vector, level=Level.STEPS, options=self.options,
                                budget=self.config.budget, cut_loops=self.config.prune))
        child = Node(self, rec, node, k, node.chain + (link,), -1)
        self._covered.update(rec.steps.pcs)
        child.pre = node.pre + (pre,)
        r = self._latched_reentry(node, k, rec.events, child.position, child.chain)
        if r is not None and self._new_root(r):
            child.latched = r
            self._reentries.append(r)
            try:
                child.row = self._evaluate_node(child, child.chain, self.group)
            finally:
                self._reentries.pop()
        else:
            child.row = self._evaluate_node(child, child.chain, self.group)
        if rec.delivered is not None:
            point = ConvergePoint(len(state.outstanding), state, node.live, k, 0)
            child.points = (point,) + tuple(ConvergePoint(p.index, p.ref, p.live, p.boundary, t + 1)
                                            for t, p in enumerate(node.points))
            child.point_nodes = ((node, k),) + node.point_nodes
        else:
            child.points, child.point_nodes = node.points, node.point_nodes
        return child

    def _evaluate_node(self, node: Node, chain: tuple[Injection, ...], group: Group) -> int:
        rec = node.record
        n = len(node.events)
        end = End(rec.outcome, rec.reason, rec.final.cpu, False, rec.final.outstanding, node.events[-1],
                  node.nmi_pre[n], lambda: node.path_events(n))
        violations = verdict(self.world, node.local_pre[n], end)
        row = self.table.add(node.parent.row if node.parent is not None else -1, chain[-1] if chain else None,
                             rec.outcome.value, node.cost_pre[n], self._end_state(rec), node.cr3_pre[n], False)
        if violations:
            steps = {id(v): v.step for v in violations}
            self._findings(violations, chain, node.log.pcs, node.log.start, steps, group, node.local_pre[n],
                           self._relied_on(node.path_events(n)))
        return row

    def _end_state(self, rec: Record) -> tuple:
        cpu = rec.final.cpu
        key = (rec.outcome.value, cpu)
        got = self._ends.get(key)
        if got is None:
            got = self._ends[key] = (rec.outcome.value, cpu.cr3, cpu.cpl, cpu.gs_base, cpu.kernel_gs_base,
                                     cpu.spec_ctrl, cpu.nmi_blocked, cpu.nmi_pending, tuple(sorted(cpu.stale)))
        return got

    # ---- leaves --------------------------------------------------------------------------
    def _leaf(self, node: Node, k: int, i: int, memory, cursor, vector: Vector, link: Injection) -> None:
        log = node.log
        chain = node.chain + (link,)
        prune = self.config.prune
        key = None
        if self.memo_enabled:
            key = Memo.key(vector, log.cpus[i], log.outstanding[i], log.home, self.options)
            entry = self.memo.lookup(key, log.regs[i], memory, log.outstanding[i], node.targets(k, memory))
            if entry is not None and self._attribute(node, k, entry, link):
                self.result.shared += 1
                return
        state = log.state(k, cursor.frozen())
        points: tuple[ConvergePoint, ...] = ()
        if prune:
            points = (ConvergePoint(len(state.outstanding), state, node.live, k, 0),) + \
                tuple(ConvergePoint(p.index, p.ref, p.live, p.boundary, t + 1) for t, p in enumerate(node.points))
        rec = self._run(Request(state, deliver=vector, level=Level.EVENTS, converge=points, options=self.options,
                                budget=self.config.budget, budget_from=k, cut_loops=prune))
        position = node.position + node.index(k)
        own = self.own_summary(rec.events, position)
        converged_at = None
        if rec.converged is not None:
            converged_at = (((node, k),) + node.point_nodes)[rec.converged]
        violations, inherited, local = self._leaf_path(node, k, own, rec, converged_at, link)
        r = self._latched_reentry(node, k, rec.events, position, chain)
        if r is not None and self._new_root(r):
            self._reentries.append(r)
            try:
                self._leaf_verdict(node, k, state, vector, violations, inherited, chain, position, local)
            finally:
                self._reentries.pop()
            self._report_reentry(r)
            return
        if self._leaf_verdict(node, k, state, vector, violations, inherited, chain, position, local):
            return
        if key is not None and rec.converged in (0, 1) and not own.local:
            # A clean run that rejoined: run it again with the dataflow log, to share it.
            flowed = self._run(Request(state, deliver=vector, level=Level.FLOW, converge=points,
                                       options=self.options, budget=self.config.budget, budget_from=k))
            flow = self.analyser.analyse(flowed)
            if flow is not None and flowed.converged == rec.converged:
                self.memo.add(key, flow, flowed.converged, state.regs, state.memory, flowed.final.regs,
                              flowed.final.memory, flowed.final.cpu, _Shared(own, flowed.final.cpu))

    def _leaf_verdict(self, node: Node, k: int, state: Snapshot, vector: Vector, violations, inherited: bool,
                      chain, position: int, local: tuple) -> bool:
        """Report a leaf's violations; True when it broke an invariant itself."""
        if violations and not inherited:
            self._leaf_findings(node, k, state, vector, violations, chain, position, local)
            return True
        if violations:
            self._findings(violations, chain, (), k, {id(v): k for v in violations}, self.group, local,
                           self._relied_on(node.path_events(node.index(k))))
        return False

    def _new_root(self, r: "_Reentry") -> bool:
        """Whether an ist-reentered delivery is a root cause of its own: not when an earlier
        one on the path already is (then it is one of that one's symptoms)."""
        if self._reentries and self.config.fold:
            self._reentries[0].folded.add("ist-reentered")
            return False
        return True

    def _attribute(self, node: Node, k: int, entry, link: Injection) -> bool:
        """A leaf the memo stands for: its path, if that path breaks no invariant (else it runs).
        The path's summary depends only on how many of the node's events precede k and on the
        entry, so it is worked out once per (index, entry) of a node."""
        i = node.index(k)
        key = (i, id(entry))
        got = node.attributed.get(key)
        if got is None:
            shared = entry.result
            at = (((node, k),) + node.point_nodes)[entry.rejoined]
            outstanding = node.log.outstanding[k - node.log.start]
            if entry.rejoined:
                outstanding = outstanding[:node.points[0].index]
            ended = _Ended(Outcome.STOPPED, "converged", shared.cpu, outstanding)
            got = node.attributed[key] = self._path(node, i, shared.own, ended, at)
        violations, inherited, cost, cr3, ends = got
        if violations and not inherited:
            return False
        self._add_path(node, link, ends, cost, cr3, True)
        if violations:
            # Only what the path broke before the injection: the same for every leaf here.
            self._findings(violations, node.chain + (link,), (), k, {id(v): k for v in violations}, self.group,
                           node.local_pre[i], self._relied_on(node.path_events(i)))
        return True

    def _leaf_path(self, node: Node, k: int, own: Own, rec, converged_at, link: Injection | None,
                   dry: bool = False) -> tuple[list[Violation], bool, tuple]:
        """The verdict of a leaf's path (prefix + own run + the rest it rejoined), whether
        every violation in it happened before the injection (``inherited``) and its local
        violations; adds the path's row unless ``dry``."""
        i = node.index(k)
        violations, inherited, cost, cr3, ends = self._path(node, i, own, rec, converged_at)
        if not dry:
            self._add_path(node, link, ends, cost, cr3, converged_at is not None)
        return violations, inherited, node.local_pre[i] + own.local if own.local else node.local_pre[i]

    def _add_path(self, node: Node, link: Injection, ends, cost: Cost, cr3: tuple, converged: bool) -> None:
        """The row of a leaf's path under ``node``."""
        self.table.add(node.row, link, ends.outcome.value, cost, self._end_state(ends), cr3, converged)
        if converged:
            self.result.converged += 1

    def _path(self, node: Node, i: int, own: Own, rec, converged_at) -> tuple:
        """(violations, inherited, cost, CR3 trace, the record it ends as) of the path made of
        the node's first i events, the own run, and the rest of the run it rejoined."""
        cost = self.add_cost(node.cost_pre[i], own.cost)
        cr3 = self.concat(node.cr3_pre[i], own.cr3)
        nmi = node.nmi_pre[i] + own.nmi
        if converged_at is not None:
            ref, ref_k = converged_at
            s_cost, s_cr3, s_nmi = ref.suffix(ref_k, self)
            cost = self.add_cost(cost, s_cost)
            cr3 = self.concat(cr3, s_cr3)
            nmi = nmi + s_nmi
            ends = ref.record
        else:
            ends = rec
        final = rec.final if isinstance(rec, Record) else rec
        events = own.events
        local = node.local_pre[i] + own.local if own.local else node.local_pre[i]
        if converged_at is not None and not local and nmi.handled <= nmi.delivered and \
                (nmi.tail is None or nmi.tail[0] != "nmi"):
            violations = []            # what verdict() finds for a clean path that rejoined
        else:
            end = End(rec.outcome, rec.reason, final.cpu, converged_at is not None, final.outstanding, events[-1],
                      nmi, lambda: node.path_events(i) + events)
            violations = verdict(self.world, local, end)
        inherited = True
        if violations:
            before = {id(t[3]) for t in node.local_pre[i]}
            inherited = all(id(v) in before for v in violations)
        return violations, inherited, cost, cr3, ends

    def _leaf_findings(self, node: Node, k: int, state: Snapshot, vector: Vector, violations: list[Violation],
                       chain, position: int, local: tuple) -> None:
        # Leaves keep no instruction trace: replay the same run recorded.
        rec = self._run(Request(state, deliver=vector, level=Level.PCS, options=self.options,
                                budget=self.config.budget, budget_from=k, cut_loops=self.config.prune))
        own = self.own_summary(rec.events, position)
        replayed, _, _ = self._leaf_path(node, k, own, rec, None, None, dry=True)
        found = {(v.invariant, v.pc, v.message): v.step for v in replayed}
        pcs = rec.steps.pcs
        steps = {id(v): found.get((v.invariant, v.pc, v.message), k + len(pcs)) for v in violations}
        self._findings(violations, chain, pcs, k, steps, self.group, local,
                       self._relied_on(node.path_events(node.index(k)) + rec.events))

    def _relied_on(self, events) -> tuple[Precondition, ...]:
        """Build options a path relies on: an NMI delivered while NMIs are unmasked only
        because of an IRET to itself that the option compiles in."""
        out: list[Precondition] = []
        early = None
        for e in events:
            t = type(e)
            if t is Iret:
                early = self.early_iret(e)
            elif t is Delivered and e.vector is Vector.NMI and early is not None and early not in out:
                out.append(early)
        return tuple(out)

    def set_guards(self, guards) -> None:
        """The tree's build-option guarded IRETs (kernel/guards.py): (label, CONFIG_X, n
        instructions of the block before the iretq)."""
        from entrycheck.image.decode import sweep

        self.guards = {label: option for label, option, _ in guards}
        self._early.clear()
        self._guarded = {}
        for label, option, n in guards:
            if label not in self.image.loaded.symbols:
                continue
            start, end = self.image.symbol_range(label)
            insns = list(sweep(self.image.read(start, end - start), start))
            at = next((k for k, ins in enumerate(insns) if ins.mnemonic in ("iretq", "iret")), None)
            if at is None:
                continue
            site = self.image.symbolize(insns[at].address)
            pre = Precondition(Reach.BUILD, "config", f"a kernel built with {option}=y (the code at "
                               f"{self.image.symbolize(insns[max(0, at - max(n, 0))].address)}..{site} that "
                               "unmasks NMIs early exists only then)")
            for ins in insns[max(0, at - max(n, 0)):at + 1]:
                self._guarded[ins.address] = pre

    def _guarded_links(self, chain) -> tuple[Precondition, ...]:
        if not self._guarded:
            return ()
        out = []
        for link in chain:
            try:
                p = self._guarded.get(self.image.parse_location(link.at))
            except Exception:  # noqa: BLE001 - a site outside the image is not guarded code
                p = None
            if p is not None and p not in out:
                out.append(p)
        return tuple(out)

    def early_iret(self, e: Iret) -> Precondition | None:
        """An IRET to the next instruction (it only unmasks NMIs): the build option that
        compiled it in, from the tree's source when at hand."""
        if not 0 < e.frame.rip - e.pc <= 2:
            return None
        got = self._early.get(e.pc, False)
        if got is False:
            site = self.image.symbolize(e.pc)
            option = self.guards.get(site.partition("+")[0])
            if option:
                got = Precondition(Reach.BUILD, "config", f"a kernel built with {option}=y (its IRET to itself at "
                                   f"{site} unmasks NMIs early, and an NMI arrives then)")
            else:
                got = Precondition(Reach.UNPRIVILEGED, "early-iret", f"the IRET to itself at {site}, which "
                                   "unmasks NMIs early (built in by an option? the source was not at hand)")
            self._early[e.pc] = got
        return got

    def _findings(self, violations: list[Violation], chain, pcs, pcs_start: int, steps: dict, group: Group,
                  local: tuple, options: tuple = ()) -> None:
        """Findings of a path's violations; with an ist-reentered delivery on the path, those
        from that delivery on are its symptoms and fold under it."""
        guarded = self._guarded_links(chain)
        if guarded:
            options = options + tuple(p for p in guarded if p not in options)
        cut = self._reentries[0].position if self._reentries and self.config.fold else None
        if cut is not None:
            at = {id(t[3]): t[2] for t in local}
        for v in violations:
            if cut is not None and at.get(id(v), cut) >= cut:
                self._reentries[0].folded.add(v.invariant)
                continue
            trace = self._trace_window(pcs, steps[id(v)] - pcs_start)
            group.findings.append(Finding(v.invariant, self.sc.name, self.image.features, _names(self.effects),
                                          chain, self.image.symbolize(v.pc), v.message, trace,
                                          self._pre + options))

    # ---- root causes -----------------------------------------------------------------------
    def _link_pre(self, node: Node, k: int, vector: Vector) -> Precondition:
        """The precondition of injecting ``vector`` at boundary k (one object per distinct one)."""
        got = self._watchable_access(node, k) if vector is Vector.DB else None
        if vector is Vector.DB and got is None and self._mov_ss(node, k):
            return MOV_SS_DB
        key = (vector, got, node.log.pcs[k - node.log.start] if isinstance(got, str) else None)
        pre = self._link_pres.get(key)
        if pre is None:
            pre = self._link_pres[key] = for_injection(vector, self._watched(node, k) if got is not None else None)
        return pre

    def _watched(self, node: Node, k: int) -> str | None:
        """The data a breakpoint would watch to raise a #DB trap at boundary k."""
        got = self._watchable_access(node, k)
        if isinstance(got, str):
            return f"{got} (per-cpu, read by {self.world.config.stubs[node.log.pcs[k - node.log.start]]})"
        return self.names.name(got) if got is not None else None

    def _ist_reentry(self, node: Node, k: int, i: int, vector: Vector, memory, link: Injection) -> "_Reentry | None":
        """An ist-reentered delivery injected at boundary k of ``node``."""
        if vector is Vector.NMI and node.log.cpus[i].nmi_blocked:
            return None              # latched, not delivered
        if not any(o.vector.ist == vector.ist for o in node.log.outstanding[i]):
            return None
        space = self.machine.space
        slot = space.phys(self.world.config.ist_slots[vector]) - self.wbase
        top = int.from_bytes(memory[slot:slot + 8], "little")
        found = self._live_frame(node, k, vector, top)
        if found is None:
            return None
        outer, words = found
        msg = self._reentry_message(vector, outer, words, "")
        if vector is Vector.DB:
            got = self._watchable_access(node, k)
            if isinstance(got, str):
                func = self.world.config.stubs[node.log.pcs[i]]
                msg += f"; the #DB traps in {func}, which reads {got} (per-cpu) on that stack"
            elif got is not None:
                msg += (f"; the #DB traps on the access to {self.names.name(got)} by "
                        f"{self.image.symbolize(self._prev_pc(node, k))}")
        return _Reentry(node.position + node.index(k), node.chain + (link,), node.log.pcs[i], msg,
                        self._trace_window(node.log.pcs, i), set())

    def _live_frame(self, node: Node, k: int, vector: Vector, top: int):
        """live_ist_frame at boundary k of ``node``'s recorded run."""
        return live_ist_frame(self.machine.space, node.live, node.log.outstanding[k - node.log.start], vector,
                              top, k)

    def _latched_reentry(self, node: Node, k: int, events, position: int,
                         chain: tuple[Injection, ...]) -> "_Reentry | None":
        """An ist-reentered delivery inside a run injected at boundary k of ``node``: an NMI
        latched while blocked and delivered when an IRET that resumed a recorded run unblocked
        NMIs.  (A run the memo stands for rejoined its recorded run with every live word
        equal, so it overwrote no live frame: only runs made are looked at.)"""
        prev = None
        for j, e in enumerate(events):
            if (type(e) is Delivered and e.from_latch and e.vector.ist and type(prev) is Resumed
                    and self.world.config.fred is None):
                resumed = prev.injection
                for ref, ref_k in ((node, k),) + node.point_nodes:
                    # The recorded run it resumed: where that exception was delivered.
                    if resumed.step == ref_k and resumed.chain_index == ref.log.chains[ref_k - ref.log.start]:
                        found = self._live_frame(ref, ref_k, e.vector, e.stack + e.vector.frame_bytes)
                        if found is not None:
                            outer, words = found
                            how = (f" (latched, and delivered when the {prev.injection.vector.label} handler's "
                                   f"IRET to {self.image.symbolize(prev.pc)} unblocked NMIs)")
                            i = ref_k - ref.log.start
                            return _Reentry(position + j, chain, e.pc,
                                            self._reentry_message(e.vector, outer, words, how),
                                            self._trace_window(ref.log.pcs, i), set(), e.step)
                        break
            prev = e
        return None

    def _reentry_message(self, vector: Vector, outer, words, how: str) -> str:
        return ist_reentered_message(vector, outer, len(words), how, self.image.symbolize)

    def _report_reentry(self, r: "_Reentry") -> None:
        self.group.findings.append(Finding("ist-reentered", self.sc.name, self.image.features, _names(self.effects),
                                           r.chain, self.image.symbolize(r.pc), r.message, r.trace,
                                           self._pre + self._guarded_links(r.chain), tuple(sorted(r.folded))))

    def _prev_pc(self, node: Node, k: int) -> int:
        i = k - node.log.start
        return node.log.pcs[i - 1] if i > 0 else node.log.pcs[i]

    def _trace_window(self, pcs, upto: int) -> tuple[str, ...]:
        n = self.config.trace_window
        upto = max(0, min(len(pcs), upto))
        return tuple(self._line(a) for a in pcs[max(0, upto - n):upto])

    def _line(self, addr: int) -> str:
        got = self._disasm.get(addr)
        if got is None:
            got = self._disasm[addr] = f"{self.image.symbolize(addr)}: {self.image.instruction_text(addr)}"
        return got


@dataclass
class _Reentry:
    """An ist-reentered delivery on the path being explored."""

    position: int                    # path index of its Delivered event
    chain: tuple[Injection, ...]     # the path up to it
    pc: int                          # the instruction it interrupted
    message: str
    trace: tuple[str, ...]
    folded: set[str]                 # invariants of its symptoms
    step: int = -1                   # inside a run: the boundary it was delivered at


@dataclass(frozen=True)
class _Shared:
    """What the memo keeps of a shared run."""

    own: Own
    cpu: CpuState


@dataclass(frozen=True)
class _Ended:
    """How a shared run ends: where it started, converged."""

    outcome: Outcome
    reason: str
    cpu: CpuState
    outstanding: tuple


def _names(effects: frozenset[Effect]) -> tuple[str, ...]:
    return tuple(sorted(e.value for e in effects))


__all__ = ["ExploreConfig", "Explorer", "UnitResult", "Budget", "DEFAULT_VECTORS", "Group"]
