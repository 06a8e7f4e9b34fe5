"""Exhaustive exception injection over one scenario on one feature set: the scheduler.

For a path, one STEPS run records the state at every instruction boundary (explore/node.py).
Each vector is then delivered at each boundary where hardware could deliver it
(explore/delivery.py): leaves run at Unicorn's speed from that state; with depth left, the
injected run is itself recorded and its handler's boundaries explored in turn (nesting).

A path's verdict and cost are put together from summaries (explore/summary.py): of the path
before the injection (kept per event of each recorded run), of the leaf's own run, and of the
recorded run it rejoined — so a leaf costs the same however long its path is.

Pruning (each step provably reaches only states already explored; ``--no-prune`` runs
everything to its end and must find the same):

* Convergence.  When an injected exception returns to the boundary it interrupted and
  registers, model state and every word the recorded run still reads before writing are
  what that run had there, the rest of the run is the recorded run's (deterministic
  execution from equal inputs): it stops, and the recorded continuation stands for the rest.
  A run whose exception returned but changed what the recorded run reads (a nested NMI asks
  the outer one to repeat) may likewise rejoin an earlier run of the same node and vector
  that did the same (explore/node.py ``Sibling``: a leaf's, recorded for that, or a run
  recorded to inject into, which stops where it rejoins as a leaf does: ``Node.join``).
* Latched NMIs.  An NMI that arrives while NMIs are blocked only sets the latch, which
  nothing reads until the unblocking IRET; every boundary of one blocked stretch therefore
  leads to the same state at that IRET, and only the first is run.
* Shared handler runs (explore/memo.py).  A leaf whose start state agrees with an earlier
  leaf's on everything that leaf's run used, and whose copies of the rest would rejoin the
  recorded run, is that run: it is attributed without running.

Root causes (props/reentry.py) and findings (explore/findings.py) are made from what the
scheduler hands them; every finding carries the preconditions of its path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from entrycheck.explore.delivery import DeliveryPolicy
from entrycheck.explore.findings import Findings, Where
from entrycheck.explore.memo import Memo
from entrycheck.explore.node import Node, Sibling
from entrycheck.explore.paths import PathTable
from entrycheck.explore.preconditions import Precondition, for_effect, for_entry, for_injection, for_user
from entrycheck.explore.scenarios import Scenario, delivery, start_state, stub_options
from entrycheck.explore.summary import PathSummary, Summaries
from entrycheck.explore.unit import (DEFAULT_VECTORS, Budget, Ended, ExploreConfig, Group, Own, Shared,  # noqa: F401
                                     UnitResult)
from entrycheck.kernelabi.linux import ist_index
from entrycheck.kernelabi.stubs import Effect, Stubs
from entrycheck.kernelabi.world import World
from entrycheck.machine.api import ConvergePoint, Level, Record, Request
from entrycheck.machine.events import Event, Fault, FaultKind, Injection, Outcome
from entrycheck.machine.flow import Analyser
from entrycheck.machine.machine import Machine
from entrycheck.machine.model import CpuState, Vector
from entrycheck.machine.state import Snapshot
from entrycheck.props import reentry
from entrycheck.props.invariants import End, Violation, local_violations, verdict
from entrycheck.props.reentry import Reentry, RootCauses

ESPFIX_SWAPGS = (" (the espfix64 exit: its SWAPGS depends on the IRET frame's SS, and neither an LFENCE nor, "
                 "without PTI, a CR3 write comes before its per-cpu load; 18ec54fdd6d1 fenced the entries' SWAPGS)")


class Explorer:
    """What the units of one feature set share: one world, one machine, one memo of handler
    runs, the delivery rules, the summaries' arithmetic and the findings' maker."""

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
        self.layout = self.machine.layout
        self.pristine = self.layout.pristine
        self.wbase = self.layout.writable_base
        self.analyser = Analyser(self.image, self.wbase, self.layout.writable_size)
        self.memo = Memo(self.wbase)
        self.policy = DeliveryPolicy(world, self.layout, config)
        self.summaries = Summaries(self.image)
        self.findings = Findings(self.image, config.trace_window)
        spec = world.config.spec
        self.speculating = spec is not None and spec.swapgs and config.spec_window > 0
        self._ends: dict[tuple, tuple] = {}
        self._links: dict[tuple, Injection] = {}

    def set_refusals(self, names) -> None:
        """The data the kernel refuses hardware breakpoints on (kernel/guards.py), by name."""
        self.policy.set_refusals(names)

    def set_guards(self, guards) -> None:
        """The tree's build-option guarded IRETs (kernel/guards.py)."""
        self.findings.set_guards(guards)

    def link(self, vector: Vector, pc: int, hit: int) -> Injection:
        key = (vector, pc, hit)
        got = self._links.get(key)
        if got is None:
            got = self._links[key] = Injection(vector, self.image.symbolize(pc), hit)
        return got

    def end_state(self, outcome: Outcome, cpu: CpuState) -> tuple:
        key = (outcome.value, cpu)
        got = self._ends.get(key)
        if got is None:
            got = self._ends[key] = (outcome.value, cpu.cr3, cpu.cpl, cpu.gs_base, cpu.kernel_gs_base,
                                     cpu.spec_ctrl, cpu.nmi_blocked, cpu.nmi_pending, tuple(sorted(cpu.stale)))
        return got

    def own(self, events: tuple[Event, ...], position: int) -> Own:
        return Own(events, self.summaries.of(events), local_violations(self.world, events, position))

    def run(self, request: Request) -> Record:
        return self.machine.run(request)

    def explore(self, sc: Scenario, effects: frozenset[Effect] = frozenset(), part: int = 0,
                parts: int = 1, depth: int | None = None) -> UnitResult:
        """Explore ``sc`` to ``depth`` (default: the config's); with ``parts`` > 1 only the
        boundaries of its path whose index is ``part`` modulo ``parts`` (the scenario's own
        path belongs to part 0)."""
        return _Unit(self, sc, effects).explore(part, parts, self.config.depth if depth is None else depth)


class _Unit:
    """The exploration of one unit: its scenario, effects, path table and findings, and the
    state of the path being explored (its preconditions and root causes)."""

    def __init__(self, ex: Explorer, sc: Scenario, effects: frozenset[Effect]) -> None:
        self.ex, self.sc, self.effects = ex, sc, effects
        self.config = ex.config
        self.policy, self.findings, self.summaries = ex.policy, ex.findings, ex.summaries
        self.options = stub_options(sc, effects, self.config.pt_regs_contract)
        names = tuple(sorted(e.value for e in effects))
        self.where = Where(sc.name, ex.image.features, names)
        self.table = PathTable(sc.name, ex.image.features, names)
        self.result = UnitResult(self.table)
        self.entry_pre = (for_entry(sc.vector, sc.from_user, sc.name),) + for_user(sc.user.items()) + \
            tuple(for_effect(e.value) for e in sorted(effects, key=lambda e: e.value))
        self.pre: tuple[Precondition, ...] = self.entry_pre   # preconditions of the path being evaluated
        self.roots = RootCauses(self.config.fold)
        self.group: Group | None = None
        self.covered: set[int] = set()

    def explore(self, part: int, parts: int, depth: int) -> UnitResult:
        ex = self.ex
        if not ex.budget.take():
            self.result.stopped = "budget"
            return self.result
        start = start_state(ex.world, self.sc, ex.pristine)
        rec = self._run(Request(start, deliver=delivery(ex.world, self.sc), level=Level.STEPS, options=self.options,
                                budget=self.config.budget, cut_loops=self.config.prune))
        base = Node(self.summaries, ex.world, ex.wbase, rec, None, 0, (), -1)
        if part == 0:
            group = Group(-1, (0, 0))
            base.row, _ = self._evaluate_node(base, (), group)
            group.rows = (0, len(self.table))
            self.result.groups.append(group)
        else:
            base.row = -1
        self.covered = set(rec.steps.pcs)
        self._explore_level(base, depth, top=(part, parts))
        self.result.covered = frozenset(self.covered)
        return self.result

    def _run(self, request: Request) -> Record:
        self.result.executed += 1
        return self.ex.run(request)

    def _entry(self, node: Node) -> bool:
        """Whether ``node`` is a system-call scenario's own path (where a MOV SS-held #DB lands)."""
        return node.parent is None and self.sc.vector is None

    # ---- injection points --------------------------------------------------------------
    def _explore_level(self, node: Node, depth_left: int, top: tuple[int, int] | None = None) -> None:
        if depth_left <= 0 and not self.ex.speculating:
            return                   # (at depth 0 a path's mispredicted branches are still its own)
        depth = len(self.roots.stack)
        try:
            self._explore_boundaries(node, depth_left, top)
        finally:
            del self.roots.stack[depth:]

    def _explore_boundaries(self, node: Node, depth_left: int, top: tuple[int, int] | None) -> None:
        ex, policy, roots = self.ex, self.policy, self.roots
        latched = node.latched
        first, last = node.window
        log = node.log
        seen_blocked = False
        hits: dict[int, int] = {}
        cursor = log.cursor()
        vectors = self.config.vectors if depth_left > 0 else ()
        entry = self._entry(node)
        fred = ex.world.config.fred is not None
        rest = node.continuation if node.continuation is not None else last
        for k in range(first, last):
            i = k - log.start
            if k == rest:
                # the rest of the parent's run, with NMIs unblocked: only an NMI is new there
                vectors = tuple(v for v in vectors if v is Vector.NMI)
            pc = log.pcs[i]
            hits[pc] = hits.get(pc, 0) + 1
            if latched is not None and k >= latched.step:
                # Paths injected from here on have the run's ist-reentered delivery before them.
                roots.stack.append(latched)
                latched = None
            if ex.progress:
                ex.progress(1)
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
                if not policy.allowed(vector, log, k, node.single_steps, entry):
                    continue
                if vector is Vector.NMI and cpu.nmi_blocked and self.config.prune and not blocked_start:
                    self.result.skipped += 1
                    continue
                link = ex.link(vector, pc, hits[pc])
                if not ex.budget.take():
                    self.result.stopped = "budget"
                    self._close(group)
                    return
                if memory is None:
                    memory = cursor.advance(k)
                pre = policy.precondition(log, k, vector, entry)
                self.pre = self.entry_pre + node.pre + (pre,)
                r = self._injected_reentry(node, k, vector, memory, link) if ist_index(vector) and not fred else None
                if r is not None:
                    if roots.new_root(r):
                        roots.stack.append(r)
                    else:
                        r = None
                if depth_left > 1:
                    state = log.state(k, cursor.frozen())
                    child = self._record(node, k, state, vector, link, pre)
                    self._explore_level(child, depth_left - 1)
                    if child.latched is not None:
                        self.pre = self.entry_pre + child.pre
                        self._report_reentry(child.latched)
                else:
                    self._leaf(node, k, i, memory, cursor, vector, link)
                if r is not None:
                    roots.stack.pop()
                    self.pre = self.entry_pre + node.pre + (pre,)
                    self._report_reentry(r)
            if ex.speculating and k < rest and cpu.cpl == 0 and i + 1 < len(log.pcs) and \
                    pc not in ex.world.config.stubs:
                jcc = ex.image.instructions.conditional(pc)
                if jcc is not None and log.pcs[i + 1] in jcc:
                    wrong = jcc[1] if log.pcs[i + 1] == jcc[0] else jcc[0]
                    if memory is None:
                        memory = cursor.advance(k)
                    self._speculate(node, k, cursor, wrong, ex.link(Vector.MISPREDICT, pc, hits[pc]))
            self._close(group)
            if self.result.stopped == "budget":
                return

    def _close(self, group: Group | None) -> None:
        if group is not None and group.rows[1] == 0:
            group.rows = (group.rows[0], len(self.table))
            self.result.groups.append(group)

    # ---- mispredicted branches ---------------------------------------------------------------
    def _speculate(self, node: Node, k: int, cursor, wrong: int, link: Injection) -> None:
        """Run the side of the conditional branch at boundary k that the path did not take, as the
        CPU would when it mispredicts it: up to ``spec_window`` instructions, ending at an LFENCE,
        a serialising instruction or a C function, nothing of it committed (a run of its own from
        the boundary's state).  A %gs: access (or a C function's) with the user GSBASE on it is
        swapgs-unfenced."""
        image = self.ex.image
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
                      f"the {image.instruction_text(pc).split()[0]} at {image.symbolize(pc)} mispredicted, "
                      "its other side reaches a %gs: access with "
                      f"the user GSBASE before any LFENCE or serialising instruction: {fault.message}"
                      + (ESPFIX_SWAPGS if image.symbolize(fault.pc).startswith("native_irq_return_ldt") else ""))
        self.pre = self.entry_pre + node.pre + (for_injection(Vector.MISPREDICT),)
        self._findings([v], node.chain + (link,), traced.steps.pcs, k, {id(v): fault.step}, ())

    # ---- recorded runs ----------------------------------------------------------------------
    def _record(self, node: Node, k: int, state: Snapshot, vector: Vector, link: Injection,
                pre: Precondition) -> Node:
        ex = self.ex
        # Where NMIs are not blocked, the run stops where its exception returns into this run at k,
        # or into a sibling's run at k (as a leaf does): its rest is theirs.  (Where they are, its
        # return may unblock them, and the rest is explored as its continuation.)
        sibling = beside = None
        joinable = self.config.prune and not node.log.cpus[k - node.log.start].nmi_blocked and not node.in_rest(k)
        rejoin = node.converge_points(k, state)
        points: tuple[ConvergePoint, ...] = ()
        if joinable:
            points = rejoin[:1]                    # this run at k
            sibling = node.siblings.get(("record", vector))
            beside = sibling.point(node, k, len(state.outstanding), 1) if sibling is not None else None
            if beside is not None:
                points += (beside,)
        rec = self._run(Request(state, deliver=vector, level=Level.STEPS, converge=points, options=self.options,
                                budget=self.config.budget, cut_loops=self.config.prune))
        child = Node(self.summaries, ex.world, ex.wbase, rec, node, k, node.chain + (link,), -1)
        if rec.converged == 0:
            child.join(node, k)
        elif rec.converged == 1:
            child.join(sibling.run, beside.boundary)
            sibling.served += 1
            self.result.beside += 1
        self.covered.update(rec.steps.pcs)
        child.pre = node.pre + (pre,)
        r = self._latched_reentry(node, k, rec.events, child.position, child.chain)
        if r is not None and self.roots.new_root(r):
            child.latched = r
            self.roots.stack.append(r)
            try:
                child.row, broke = self._evaluate_node(child, child.chain, self.group)
            finally:
                self.roots.stack.pop()
        else:
            child.row, broke = self._evaluate_node(child, child.chain, self.group)
        if rec.delivered is not None:
            child.points = rejoin
            child.point_nodes = node.rejoinable(k)
            if rec.converged == 1:
                # What rejoins this run where its exception returned rejoins the sibling there
                # (``converge_points`` numbers the points again).
                child.points += (beside,)
                child.point_nodes += (child.joined,)
        else:
            child.points, child.point_nodes = node.points, node.point_nodes
        if joinable and rec.converged is None and rec.resumed_step is not None and \
                rec.outcome is Outcome.RETURNED and not broke and r is None:
            node.siblings[("record", vector)] = Sibling(child, k)
        return child

    def _evaluate_node(self, node: Node, chain: tuple[Injection, ...], group: Group) -> tuple[int, bool]:
        """The row of a recorded run's path, and whether that path broke an invariant."""
        if node.joined is not None:
            return self._evaluate_joined(node, chain, group)
        rec = node.record
        n = len(node.events)
        upto = node.prefix[n]
        end = End(rec.outcome, rec.reason, rec.final.cpu, False, rec.final.outstanding, node.events[-1],
                  upto.nmi, lambda: node.path_events(n))
        violations = verdict(self.ex.world, node.local_pre[n], end)
        row = self.table.add(node.parent.row if node.parent is not None else -1, chain[-1] if chain else None,
                             rec.outcome.value, upto.cost, self.ex.end_state(rec.outcome, rec.final.cpu), upto.cr3,
                             False)
        if violations:
            steps = {id(v): v.step for v in violations}
            self._findings(violations, chain, node.log.pcs, node.log.start, steps, node.local_pre[n],
                           self.findings.relied_on(node.path_events(n)), group)
        return row, bool(violations)

    def _evaluate_joined(self, node: Node, chain: tuple[Injection, ...], group: Group) -> tuple[int, bool]:
        """A recorded run that rejoined another: its path is its parent's up to the injection, its
        own run, and the rest of the run it rejoined (as a converged leaf's)."""
        parent, k = node.parent, node.parent_k
        i = parent.index(k)
        own = self.ex.own(node.events, node.position)
        violations, _, path, ends = parent.path(i, own, node.record, node.joined)
        row = self.table.add(parent.row, chain[-1], ends.outcome.value, path.cost,
                             self.ex.end_state(ends.outcome, ends.final.cpu), path.cr3, True)
        self.result.converged += 1
        if violations:
            n = len(node.events)
            steps = {id(v): v.step for v in violations}
            self._findings(violations, chain, node.log.pcs, node.log.start, steps, node.local_pre[n],
                           self.findings.relied_on(node.path_events(n)), group)
        return row, bool(violations)

    # ---- leaves --------------------------------------------------------------------------
    def _leaf(self, node: Node, k: int, i: int, memory, cursor, vector: Vector, link: Injection) -> None:
        ex = self.ex
        log = node.log
        chain = node.chain + (link,)
        prune = self.config.prune
        key = None
        if prune and self.config.share:
            key = Memo.key(vector, log.cpus[i], log.outstanding[i], log.home, self.options)
            entry = ex.memo.lookup(key, log.regs[i], memory, log.outstanding[i], node.targets(k, memory))
            if entry is not None and self._attribute(node, k, entry, link):
                self.result.shared += 1
                return
        state = log.state(k, cursor.frozen())
        points = node.converge_points(k, state) if prune else ()
        sibling = node.siblings.get(vector) if prune else None
        beside = sibling.point(node, k, len(state.outstanding), len(points)) if sibling is not None else None
        rec = self._run(Request(state, deliver=vector, level=Level.EVENTS,
                                converge=points + (beside,) if beside is not None else points, options=self.options,
                                budget=self.config.budget, budget_from=k, cut_loops=prune))
        position = node.position + node.index(k)
        own = ex.own(rec.events, position)
        by_sibling = beside is not None and rec.converged == beside.tag
        if rec.converged is None:
            converged_at = None
        elif by_sibling:
            converged_at = (sibling.run, beside.boundary)
            sibling.served += 1
            sibling.missed = 0
            self.result.beside += 1
        else:
            converged_at = node.rejoinable(k)[rec.converged]
        violations, inherited, local = self._leaf_path(node, k, own, rec, converged_at, link)
        r = self._latched_reentry(node, k, rec.events, position, chain)
        if r is not None and self.roots.new_root(r):
            self.roots.stack.append(r)
            try:
                self._leaf_verdict(node, k, state, vector, violations, inherited, chain, position, local, rec.events)
            finally:
                self.roots.stack.pop()
            self._report_reentry(r)
            return
        if self._leaf_verdict(node, k, state, vector, violations, inherited, chain, position, local, rec.events):
            return
        if prune and converged_at is None:
            self._beside(node, k, state, vector, link, rec, violations or own.local or r is not None)
            return
        if key is not None and rec.converged in (0, 1) and not by_sibling and not own.local:
            # A clean run that rejoined: run it again with the dataflow log, to share it.
            flowed = self._run(Request(state, deliver=vector, level=Level.FLOW, converge=points,
                                       options=self.options, budget=self.config.budget, budget_from=k))
            flow = ex.analyser.analyse(flowed)
            if flow is not None and flowed.converged == rec.converged:
                ex.memo.add(key, flow, flowed.converged, state.regs, state.memory, flowed.final.regs,
                            flowed.final.memory, flowed.final.cpu, Shared(own, flowed.final.cpu))

    def _beside(self, node: Node, k: int, state: Snapshot, vector: Vector, link: Injection, rec: Record,
                broke) -> None:
        """A leaf whose exception returned to its boundary but rejoined no run: record it for later
        leaves of the node to rejoin (``Sibling``), when it ended as a path does and broke nothing.
        A sibling that has served a leaf is replaced at once; one that has not, only at the 1st,
        2nd, 4th ... leaf it missed since (so a node where none rejoin records a few)."""
        if rec.resumed_step is None or rec.outcome is not Outcome.RETURNED or broke:
            return
        sibling = node.siblings.get(vector)
        if sibling is not None and not sibling.served:
            sibling.missed += 1
            if sibling.missed & (sibling.missed - 1):
                return
        ex = self.ex
        again = self._run(Request(state, deliver=vector, level=Level.STEPS, options=self.options,
                                  budget=self.config.budget, budget_from=k, cut_loops=True))
        if again.resumed_step is None or again.outcome is not rec.outcome:
            return
        run = Node(self.summaries, ex.world, ex.wbase, again, node, k, node.chain + (link,), -1)
        fresh = Sibling(run, k)
        if sibling is not None and not sibling.served:
            fresh.missed = sibling.missed
        node.siblings[vector] = fresh

    def _leaf_verdict(self, node: Node, k: int, state: Snapshot, vector: Vector, violations, inherited: bool,
                      chain, position: int, local: tuple, events: tuple[Event, ...]) -> bool:
        """Report a leaf's violations (``events``: its own run's); True when it broke an invariant itself."""
        if violations and not inherited:
            self._leaf_findings(node, k, state, vector, violations, chain, position, local, events)
            return True
        if violations:
            self._findings(violations, chain, (), k, {id(v): k for v in violations}, local,
                           self.findings.relied_on(node.path_events(node.index(k))))
        return False

    def _attribute(self, node: Node, k: int, entry, link: Injection) -> bool:
        """A leaf the memo stands for: its path, if that path breaks no invariant (else it runs).
        The path's summary depends only on how many of the node's events precede k and on the
        entry, so it is worked out once per (index, entry) of a node."""
        i = node.index(k)
        key = (i, id(entry))
        got = node.attributed.get(key)
        if got is None:
            shared = entry.result
            at = node.rejoinable(k)[entry.rejoined]
            outstanding = node.log.outstanding[k - node.log.start]
            if entry.rejoined:
                outstanding = outstanding[:node.points[0].index]
            ended = Ended(Outcome.STOPPED, "converged", shared.cpu, outstanding)
            got = node.attributed[key] = node.path(i, shared.own, ended, at)
        violations, inherited, path, ends = got
        if violations and not inherited:
            return False
        self._add_path(node, link, ends, path, True)
        if violations:
            # Only what the path broke before the injection: the same for every leaf here.
            self._findings(violations, node.chain + (link,), (), k, {id(v): k for v in violations},
                           node.local_pre[i], self.findings.relied_on(node.path_events(i)))
        return True

    def _leaf_path(self, node: Node, k: int, own: Own, rec, converged_at, link: Injection | None,
                   dry: bool = False) -> tuple[list[Violation], bool, tuple]:
        """The verdict of a leaf's path (prefix + own run + the rest it rejoined), whether
        every violation in it happened before the injection (``inherited``) and its local
        violations; adds the path's row unless ``dry``."""
        i = node.index(k)
        violations, inherited, path, ends = node.path(i, own, rec, converged_at)
        if not dry:
            self._add_path(node, link, ends, path, converged_at is not None)
        return violations, inherited, node.local_pre[i] + own.local if own.local else node.local_pre[i]

    def _add_path(self, node: Node, link: Injection, ends, path: PathSummary, converged: bool) -> None:
        """The row of a leaf's path under ``node``."""
        self.table.add(node.row, link, ends.outcome.value, path.cost, self.ex.end_state(ends.outcome, ends.final.cpu),
                       path.cr3, converged)
        if converged:
            self.result.converged += 1

    def _leaf_findings(self, node: Node, k: int, state: Snapshot, vector: Vector, violations: list[Violation],
                       chain, position: int, local: tuple, events: tuple[Event, ...]) -> None:
        if self.findings.shown_before(self.group.findings, self.where, self.roots, violations, chain, local):
            # No trace of these would be shown: the leaf's own run says the rest.
            self._findings(violations, chain, (), k, {id(v): k for v in violations}, local,
                           self.findings.relied_on(node.path_events(node.index(k)) + events))
            return
        # Leaves keep no instruction trace: replay the same run recorded.
        rec = self._run(Request(state, deliver=vector, level=Level.PCS, options=self.options,
                                budget=self.config.budget, budget_from=k, cut_loops=self.config.prune))
        own = self.ex.own(rec.events, position)
        replayed, _, _ = self._leaf_path(node, k, own, rec, None, None, dry=True)
        found = {(v.invariant, v.pc, v.message): v.step for v in replayed}
        pcs = rec.steps.pcs
        steps = {id(v): found.get((v.invariant, v.pc, v.message), k + len(pcs)) for v in violations}
        self._findings(violations, chain, pcs, k, steps, local,
                       self.findings.relied_on(node.path_events(node.index(k)) + rec.events))

    def _findings(self, violations: list[Violation], chain, pcs, pcs_start: int, steps: dict, local: tuple,
                  options: tuple = (), group: Group | None = None) -> None:
        self.findings.add((group or self.group).findings, self.where, self.roots, violations, chain, pcs, pcs_start,
                          steps, local, self.pre, options)

    # ---- root causes -----------------------------------------------------------------------
    def _injected_reentry(self, node: Node, k: int, vector: Vector, memory, link: Injection) -> Reentry | None:
        """An ist-reentered delivery injected at boundary k of ``node``."""
        log = node.log
        i = k - log.start
        if vector is Vector.NMI and log.cpus[i].nmi_blocked:
            return None              # latched, not delivered
        if not any(ist_index(o.vector) == ist_index(vector) for o in log.outstanding[i]):
            return None
        ex = self.ex
        top = reentry.stack_top(ex.layout, ex.world.config.ist_slots[vector], memory)
        found = reentry.live_frame(ex.layout, node.live, log.outstanding[i], vector, top, k)
        if found is None:
            return None
        outer, words, in_frame = found
        msg = reentry.message(vector, outer, len(words), "", ex.image.symbolize, in_frame)
        if vector is Vector.DB:
            msg += self.policy.db_cause(log, k)
        return Reentry(node.position + node.index(k), node.chain + (link,), log.pcs[i], msg,
                       self.findings.trace_window(log.pcs, i), set())

    def _latched_reentry(self, node: Node, k: int, events, position: int,
                         chain: tuple[Injection, ...]) -> Reentry | None:
        """An ist-reentered delivery inside a run injected at boundary k of ``node``: an NMI
        latched while blocked and delivered when an IRET that resumed a recorded run unblocked
        NMIs.  (A run the memo stands for rejoined its recorded run with every live word
        equal, so it overwrote no live frame: only runs made are looked at.)"""
        ex = self.ex
        if ex.world.config.fred is not None:
            return None
        got = reentry.latched_delivery(ex.layout, events, node.rejoinable(k))
        if got is None:
            return None
        j, e, ref, ref_k, (outer, words, in_frame), resumed = got
        how = reentry.latched(resumed.injection, resumed.pc, ex.image.symbolize)
        return Reentry(position + j, chain, e.pc, reentry.message(e.vector, outer, len(words), how, ex.image.symbolize,
                                                                  in_frame),
                       self.findings.trace_window(ref.log.pcs, ref_k - ref.log.start), set(), e.step)

    def _report_reentry(self, r: Reentry) -> None:
        self.group.findings.append(self.findings.reentry(self.where, r, self.pre))


__all__ = ["ExploreConfig", "Explorer", "UnitResult", "Budget", "DEFAULT_VECTORS", "Group"]
