"""What a run contributes to the paths through it: its cost, its CR3 writes, its NMI accounting.

One loop over a run's events (``Summaries.contributions``) serves every summary the explorer
keeps: the whole run's (a leaf's own run), the prefix at each of its events (a recorded run,
so that a path injected at any boundary costs O(1)), and the rest after a boundary (the part
of a recorded run a converged leaf rejoins).  Sums and concatenations are interned per
explorer: paths share them, and the path tables key them by identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from entrycheck.explore.paths import NO_COST, Cost, cr3_entry, event_cost
from entrycheck.image.image import Image
from entrycheck.machine.events import Event
from entrycheck.props.invariants import NO_NMI, NmiSummary, nmi_of


@dataclass(frozen=True)
class PathSummary:
    """A stretch of a path: the privileged operations it cost, its CR3 writes (site, value,
    NOFLUSH) in order, and its NMI accounting (what the end checks need)."""

    cost: Cost = NO_COST
    cr3: tuple = ()
    nmi: NmiSummary = NO_NMI


EMPTY = PathSummary()


class _Interned:
    """Sums of values that are interned: equal values are one object, and a sum is cached by the
    identity of its two terms (paths share their sums; the path tables key them by identity)."""

    def __init__(self, zero) -> None:
        self.zero = zero
        self._values: dict = {zero: zero}
        self._sums: dict[tuple[int, int], object] = {}

    def intern(self, value):
        return self._values.setdefault(value, value)

    def add(self, a, b):
        values = self._values
        a = values.setdefault(a, a)
        if b is self.zero or not b:
            return a
        b = values.setdefault(b, b)
        if a is self.zero:
            return b
        key = (id(a), id(b))
        got = self._sums.get(key)
        if got is None:
            c = a + b
            got = self._sums[key] = values.setdefault(c, c)
        return got


class Summaries:
    """The summaries of one image's runs, with interned arithmetic."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self._costs = _Interned(NO_COST)
        self._traces = _Interned(())

    # ---- interned arithmetic ----------------------------------------------------------------
    def add_cost(self, a: Cost, b: Cost) -> Cost:
        """a + b, interned (see ``_Interned``)."""
        return self._costs.add(a, b)

    def concat(self, a: tuple, b: tuple) -> tuple:
        """a + b for CR3 traces, interned likewise."""
        return self._traces.add(a, b)

    def join(self, a: PathSummary, b: PathSummary) -> PathSummary:
        """The summary of a stretch followed by another."""
        if b is EMPTY:
            return a
        return PathSummary(self.add_cost(a.cost, b.cost), self.concat(a.cr3, b.cr3), a.nmi + b.nmi)

    # ---- the one loop over a run's events ----------------------------------------------------
    def contributions(self, events: Sequence[Event], start: int = 0) -> Iterator[tuple[int, Cost | None,
                                                                                       tuple | None, NmiSummary]]:
        """(index, cost, CR3 entry, NMI summary) of each event from ``start`` that adds to a summary."""
        image = self.image
        for i in range(start, len(events)):
            e = events[i]
            c, t, s = event_cost(e, image), cr3_entry(e, image), nmi_of(e)
            if c is not None or t is not None or s is not NO_NMI:
                yield i, c, t, s

    def of(self, events: Sequence[Event], start: int = 0) -> PathSummary:
        """The summary of ``events[start:]``."""
        cost, cr3, nmi = NO_COST, (), NO_NMI
        for _, c, t, s in self.contributions(events, start):
            if c is not None:
                cost = self.add_cost(cost, c)
            if t is not None:
                cr3 = self.concat(cr3, (t,))
            if s is not NO_NMI:
                nmi = nmi + s
        return PathSummary(self._costs.intern(cost), self._traces.intern(cr3), nmi)

    def prefixes(self, n: int, before: PathSummary, contributions: Sequence[tuple]) -> list[PathSummary]:
        """The summary of the path up to each event of a run of ``n`` events whose
        ``contributions`` are given: element i covers ``before`` and the first i events (element 0
        is ``before``; unchanged stretches share one object)."""
        out = [before] * (n + 1)
        cur = before
        last = 0
        for i, c, t, s in contributions:
            for j in range(last + 1, i + 1):
                out[j] = cur
            cur = PathSummary(self.add_cost(cur.cost, c) if c is not None else cur.cost,
                              self.concat(cur.cr3, (t,)) if t is not None else cur.cr3,
                              cur.nmi + s if s is not NO_NMI else cur.nmi)
            last = i + 1
            out[last] = cur
        for j in range(last + 1, len(out)):
            out[j] = cur
        return out

    def suffixes(self, n: int, contributions: Sequence[tuple]) -> list[PathSummary]:
        """The summary of a run's events from each index on, for a run of ``n`` events whose
        ``contributions`` are given: element i is ``of(events, i)`` (element n is empty), in one
        pass from the end (each summary is its event's contribution followed by the next one)."""
        out: list[PathSummary] = [EMPTY] * (n + 1)
        cur = EMPTY
        nxt = n
        for i, c, t, s in reversed(contributions):
            for j in range(i + 1, nxt):
                out[j] = cur
            cur = PathSummary(self.add_cost(c, cur.cost) if c is not None else cur.cost,
                              self.concat((t,), cur.cr3) if t is not None else cur.cr3,
                              s + cur.nmi if s is not NO_NMI else cur.nmi)
            out[i] = cur
            nxt = i
        for j in range(nxt):
            out[j] = cur
        return out


__all__ = ["PathSummary", "Summaries", "EMPTY"]
