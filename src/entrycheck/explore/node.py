"""A recorded run of the exploration tree, and what exploring inside it needs.

Each node is a run recorded at STEPS level: the scenario's own path, or a run injected at a
boundary of its parent.  It keeps, per event, the summary of the path up to it (so that a path
injected at any boundary costs O(1) to put together) and the local violations so far; what it
still reads (``live``) decides convergence and ist-reentered deliveries; ``targets`` says what a
leaf injected into it may rejoin.
"""

from __future__ import annotations

import bisect

from entrycheck.explore.memo import Target
from entrycheck.explore.summary import EMPTY, PathSummary, Summaries
from entrycheck.machine.api import ConvergePoint, JoinedLive, LiveIndex, Record, StepLog
from entrycheck.machine.events import Delivered, Event, Injection
from entrycheck.props.invariants import End, local_violations, verdict
from entrycheck.props.reentry import Reentry


class Node:
    """A recorded run and what exploring inside it and evaluating paths through it need."""

    def __init__(self, summaries: Summaries, world, wbase: int, record: Record, parent: "Node | None",
                 parent_k: int, chain: tuple[Injection, ...], row: int) -> None:
        self.record = record
        self._summaries = summaries
        self._world = world
        self._wbase = wbase
        self.log: StepLog = record.steps
        self.parent, self.parent_k = parent, parent_k
        self.chain = chain
        self.pre: tuple = ()                         # one precondition per link of the chain
        self.latched: Reentry | None = None          # an ist-reentered delivery inside its run
        self.row = row
        self.events = record.events
        self.steps = [e.step for e in self.events]
        # Boundaries a single-step #DB trap was delivered just before (a breakpoint's trap on the
        # same instruction is that same #DB: DR6 reports both).
        self.single_steps = frozenset(e.step for e in self.events if type(e) is Delivered and e.single_step)
        first = self.log.start
        end = record.resumed_step if record.resumed_step is not None else record.final.steps
        self.window = (first, end)
        # Where the run goes on after its exception returned, the rest is its parent's run — unless
        # that return unblocked NMIs the parent had blocked (an IRET inside an NMI handler): then an
        # NMI may arrive at each boundary of the rest, which the parent never let in.  Those
        # boundaries are this run's too, for NMIs alone (``continuation``: the first of them).
        self.continuation: int | None = None
        if parent is not None and record.resumed_step is not None:
            last = first + len(self.log.pcs)
            r = record.resumed_step - first
            if 0 <= r < len(self.log.pcs) and not self.log.cpus[r].nmi_blocked and \
                    parent.log.cpus[parent_k - parent.log.start].nmi_blocked:
                self.window = (first, last)
                self.continuation = record.resumed_step
        if parent is None:
            before, pre_local, self.position = EMPTY, (), 0
        else:
            i = parent.index(parent_k)
            before, pre_local = parent.prefix[i], parent.local_pre[i]
            self.position = parent.position + i
        n = len(self.events)
        self._contributions = tuple(summaries.contributions(self.events))
        self.prefix: list[PathSummary] = summaries.prefixes(len(self.events), before, self._contributions)
        self.local_pre: list[tuple] = [pre_local] * (n + 1)
        own_local = local_violations(world, self.events, self.position)
        li = 0
        for i in range(n):
            start = li
            while li < len(own_local) and own_local[li][2] == self.position + i:
                li += 1
            self.local_pre[i + 1] = self.local_pre[i] + own_local[start:li] if li > start else self.local_pre[i]
        self.own_local = own_local
        self._suffix: list[PathSummary] | None = None
        self._live: LiveIndex | None = None
        self._live_words: frozenset[int] | None = None
        self.points: tuple[ConvergePoint, ...] = ()
        self.point_nodes: tuple[tuple["Node", int], ...] = ()
        self._anc: tuple | None = None
        self.attributed: dict[tuple, tuple] = {}     # (index, memo entry) -> path summary
        self.siblings: dict = {}                     # vector (leaves), ("record", vector) -> Sibling
        # Where this run stopped because it rejoined another recorded run (``join``): that run and
        # its boundary; its rest stands for this run's.
        self.joined: tuple["Node", int] | None = None
        self.ends: Record = record                   # the record of where this run's path ends

    def index(self, k: int) -> int:
        """How many of this run's events happened by boundary k."""
        return bisect.bisect_right(self.steps, k)

    def suffix(self, k: int) -> PathSummary:
        """The summary of this run's events after boundary k (and of the rest it rejoined)."""
        if self._suffix is None:
            suffix = self._summaries.suffixes(len(self.events), self._contributions)
            if self.joined is not None:
                ref, at = self.joined
                tail = ref.suffix(at)
                suffix = [self._summaries.join(s, tail) for s in suffix]
            self._suffix = suffix
        return self._suffix[self.index(k)]

    def join(self, ref: "Node", at: int) -> None:
        """This run stopped where it reached ``ref``'s state at boundary ``at`` (it converged)."""
        self.joined = (ref, at)
        self.ends = ref.ends

    @property
    def live(self) -> LiveIndex:
        if self._live is None:
            space = self.record.final
            live = LiveIndex(self.log.accesses, self._wbase, len(space.memory))
            if self.joined is not None:
                ref, at = self.joined
                live = JoinedLive(live, ref.live, at)
            self._live = live
            self._live_words = frozenset(w for w in live.words())
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
        if not self.points or self.in_rest(k):
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

    def path(self, i: int, own, rec, converged_at) -> tuple:
        """(violations, inherited, summary, the record it ends as) of the path made of this run's
        first i events, a leaf's own run (``own``: explore/unit.py's Own; ``rec``: its record, or
        how a shared run ends) and the rest of the recorded run it rejoined (``converged_at``: a
        (node, boundary) or None).  ``inherited``: every violation happened before the leaf."""
        path = self._summaries.join(self.prefix[i], own.summary)
        if converged_at is not None:
            ref, ref_k = converged_at
            path = self._summaries.join(path, ref.suffix(ref_k))
            ends = ref.ends
        else:
            ends = rec
        final = rec.final if isinstance(rec, Record) else rec
        events = own.events
        local = self.local_pre[i] + own.local if own.local else self.local_pre[i]
        nmi = path.nmi
        if converged_at is not None and not local and nmi.handled <= nmi.delivered and \
                (nmi.tail is None or nmi.tail[0] != "nmi"):
            violations = []            # what verdict() finds for a clean path that rejoined
        else:
            end = End(rec.outcome, rec.reason, final.cpu, converged_at is not None, final.outstanding, events[-1],
                      nmi, lambda: self.path_events(i) + events)
            violations = verdict(self._world, local, end)
        inherited = True
        if violations:
            before = {id(t[3]) for t in self.local_pre[i]}
            inherited = all(id(v) in before for v in violations)
        return violations, inherited, path, ends

    def in_rest(self, k: int) -> bool:
        """Whether boundary k comes after this run's exception returned (``continuation``): a run
        injected there can only rejoin this one."""
        return self.continuation is not None and k >= self.continuation

    def rejoinable(self, k: int) -> tuple[tuple["Node", int], ...]:
        """The recorded runs a run injected at boundary k may return into: this one at k, then
        each outer one at the boundary its exception interrupted (``Request.converge``'s order)."""
        return ((self, k),) if self.in_rest(k) else ((self, k),) + self.point_nodes

    def converge_points(self, k: int, state) -> tuple[ConvergePoint, ...]:
        """The stop rule of a run injected at boundary k from ``state``: rejoin this run at k, or
        any outer run where its exception returns."""
        own = (ConvergePoint(len(state.outstanding), state, self.live, k, 0),)
        if self.in_rest(k):
            return own
        return own + tuple(ConvergePoint(p.index, p.ref, p.live, p.boundary, t + 1) for t, p in enumerate(self.points))


class Sibling:
    """A recorded run injected at boundary k of a node (a leaf's, recorded for this, or one
    recorded for deeper injection) that later runs of the same node and vector may rejoin.

    Its exception returned to the boundary it interrupted but changed a word the node's run
    still reads (a nested NMI tells the NMI it interrupted to repeat itself), so it did not
    rejoin the node; it ran on through the node's code from there.  A run injected at a later
    boundary j whose exception returns in the state this run had when it reached j (the same
    change made, nothing else the rest reads different) is this run from there on: its rest
    stands for that run's (``Request.converge``, checked by the machine as any convergence)."""

    def __init__(self, run: Node, k: int) -> None:
        self.run, self.k = run, k                    # its recorded run, the boundary it was injected at
        self.resumed = run.record.resumed_step       # where its exception returned
        self._cursor = run.log.cursor()
        self._at = run.log.start
        self.served = 0                              # runs that rejoined it
        self.missed = 0                              # leaves since that did not (leaves' siblings)

    def point(self, node: Node, j: int, index: int, tag: int) -> ConvergePoint | None:
        """The stop rule for a run injected at boundary j of ``node`` whose exception's return
        takes outstanding to ``index``: this run's state where it reached j (as many steps after
        its own return as j is after k, at the same instruction), or None."""
        log = self.run.log
        s = self.resumed + (j - self.k)
        i = s - log.start
        if j <= self.k or i >= len(log.pcs) or log.pcs[i] != node.log.pcs[j - node.log.start]:
            return None
        if s < self._at:
            self._cursor = log.cursor()
        self._at = s
        self._cursor.advance(s)
        return ConvergePoint(index, log.state(s, self._cursor.frozen()), self.run.live, s, tag)


__all__ = ["Node", "Sibling"]
