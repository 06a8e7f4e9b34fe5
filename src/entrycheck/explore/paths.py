"""Results of exploration as data: costs, findings, and the paths explored.

A check explores millions of paths, so they are kept in ``PathTable``s: one row per
path (its parent path, the injection that extends the parent's chain, and indices
into tables of the costs, CR3 traces and end states the paths share).  ``PathResult``
objects are made on demand when a row is read.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from entrycheck.explore.preconditions import Reach, reach_of
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import Image
from entrycheck.machine.events import Cr3Written, Delivered, Event, GsChange, Injection, MsrWritten

Sites = tuple[tuple[str, int], ...]
_COUNTS = ("cr3_writes", "cr3_flushing", "cr3_noflush", "cr3_redundant", "msr_writes", "msr_redundant", "swapgs",
           "exceptions")


@dataclass(frozen=True, eq=True)
class Cost:
    """What a path costs in privileged operations."""

    cr3_writes: int = 0
    cr3_flushing: int = 0
    cr3_noflush: int = 0
    cr3_redundant: int = 0
    msr_writes: int = 0
    msr_redundant: int = 0
    swapgs: int = 0
    exceptions: int = 0
    cr3_sites: Sites = ()               # (site, writes) sorted
    redundant_sites: Sites = ()         # (site, redundant CR3 and MSR writes) sorted

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f) for f in _COUNTS) + (self.cr3_sites, self.redundant_sites))
            object.__setattr__(self, "_hash", h)
        return h

    def __add__(self, other: "Cost") -> "Cost":
        if not other:
            return self
        if not self:
            return other
        return Cost(*(getattr(self, f) + getattr(other, f) for f in _COUNTS),
                    cr3_sites=_merge(self.cr3_sites, other.cr3_sites, 1),
                    redundant_sites=_merge(self.redundant_sites, other.redundant_sites, 1))

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f) - getattr(other, f) for f in _COUNTS),
                    cr3_sites=_merge(self.cr3_sites, other.cr3_sites, -1),
                    redundant_sites=_merge(self.redundant_sites, other.redundant_sites, -1))

    def times(self, n: int) -> "Cost":
        """The cost of ``n`` such paths."""
        if n == 1:
            return self
        return Cost(*(getattr(self, f) * n for f in _COUNTS),
                    cr3_sites=tuple((k, v * n) for k, v in self.cr3_sites),
                    redundant_sites=tuple((k, v * n) for k, v in self.redundant_sites))

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in _COUNTS) or bool(self.cr3_sites or self.redundant_sites)

    def counts(self) -> tuple[int, ...]:
        """The counts (what ``to_json`` shows), without the sites."""
        return tuple(getattr(self, f) for f in _COUNTS)

    def cr3_json(self) -> dict:
        return {"writes": self.cr3_writes, "flushing_writes": self.cr3_flushing,
                "noflush_writes": self.cr3_noflush, "redundant_writes": self.cr3_redundant}

    def to_json(self) -> dict:
        return {"cr3": self.cr3_json(), "msr_writes": self.msr_writes,
                "redundant_msr_writes": self.msr_redundant, "swapgs": self.swapgs, "exceptions": self.exceptions}


NO_COST = Cost()


def sum_costs(weighted) -> Cost:
    """The sum of ``n`` times each cost over (cost, n) pairs, added up field by field once
    (not one Cost per addition: a check sums hundreds of thousands)."""
    counts = [0] * len(_COUNTS)
    cr3_sites: Counter = Counter()
    redundant_sites: Counter = Counter()
    for cost, n in weighted:
        if not cost:
            continue
        for k, f in enumerate(_COUNTS):
            counts[k] += getattr(cost, f) * n
        for site, v in cost.cr3_sites:
            cr3_sites[site] += v * n
        for site, v in cost.redundant_sites:
            redundant_sites[site] += v * n
    return Cost(*counts, cr3_sites=tuple(sorted((k, v) for k, v in cr3_sites.items() if v)),
                redundant_sites=tuple(sorted((k, v) for k, v in redundant_sites.items() if v)))


def _merge(a: Sites, b: Sites, sign: int) -> Sites:
    if not b:
        return a
    c = Counter(dict(a))
    for k, v in b:
        c[k] += sign * v
    return tuple(sorted((k, v) for k, v in c.items() if v))


def event_cost(e: Event, image: Image) -> Cost | None:
    """What one event adds to a path's cost (None: nothing)."""
    if isinstance(e, Cr3Written):
        site = image.symbolize(e.pc)
        red = e.write.redundant
        return Cost(1, 0 if e.write.noflush else 1, 1 if e.write.noflush else 0, 1 if red else 0,
                    cr3_sites=((site, 1),), redundant_sites=((site, 1),) if red else ())
    if isinstance(e, MsrWritten):
        red = e.write.redundant
        return Cost(msr_writes=1, msr_redundant=1 if red else 0,
                    redundant_sites=((image.symbolize(e.pc), 1),) if red else ())
    if isinstance(e, GsChange) and e.how == "swapgs":
        return Cost(swapgs=1)
    if isinstance(e, Delivered):
        return Cost(exceptions=1)
    return None


def cr3_entry(e: Event, image: Image) -> tuple[str, int, bool] | None:
    if isinstance(e, Cr3Written):
        return (image.symbolize(e.pc), e.write.written, e.write.noflush)
    return None


def cr3_trace_of(events, image: Image) -> tuple[tuple[str, int, bool], ...]:
    return tuple(t for t in (cr3_entry(e, image) for e in events) if t is not None)


def finding_key(invariant: str, scenario: str, site: str, injections: tuple[Injection, ...]) -> tuple:
    """``Finding.key`` of a finding that would be made of these."""
    from entrycheck.explore.scenarios import SCENARIOS

    sc = SCENARIOS.get(scenario)
    entry = sc.vector.label if sc and sc.vector else "syscall"
    return (invariant, site, (entry,) + tuple(i.vector.label for i in injections))


@dataclass(frozen=True)
class Finding:
    invariant: str
    scenario: str
    features: FeatureSet
    effects: tuple[str, ...]
    injections: tuple[Injection, ...]
    site: str                 # where the violation showed
    message: str
    trace: tuple[str, ...] = field(default=(), compare=False)   # instructions before the violation
    preconditions: tuple = field(default=(), compare=False)     # Precondition per link of the path
    folded: tuple[str, ...] = field(default=(), compare=False)  # symptom invariants folded under it
    paths: int = field(default=1, compare=False)                # the explored paths that showed it (its key)

    @property
    def reach(self) -> Reach:
        return reach_of(self.preconditions)

    def key(self) -> tuple:
        """Deduplication key: (invariant, site, vector chain), the chain starting with the
        scenario's own entry (syscall, or the exception it starts with)."""
        return finding_key(self.invariant, self.scenario, self.site, self.injections)

    def to_json(self) -> dict:
        return {"invariant": self.invariant, "scenario": self.scenario, "features": str(self.features),
                "effects": list(self.effects), "injections": [i.to_json() for i in self.injections],
                "site": self.site, "message": self.message, "reach": self.reach.label,
                "preconditions": [p.to_json() for p in self.preconditions],
                **({"folded": list(self.folded)} if self.folded else {}), "paths": self.paths,
                "trace": list(self.trace)}


@dataclass(frozen=True)
class PathResult:
    """One explored path: a scenario with an injection chain, on one feature set."""

    scenario: str
    features: FeatureSet
    effects: tuple[str, ...]
    injections: tuple[Injection, ...]
    outcome: str
    cost: Cost
    end_state: tuple            # comparable summary of where the path ended
    cr3_trace: tuple[tuple[str, int, bool], ...]   # (site, value written, NOFLUSH)
    converged: bool = False


class PathTable:
    """The paths of one unit of work, one row each (see the module's docstring)."""

    def __init__(self, scenario: str, features: FeatureSet, effects: tuple[str, ...]) -> None:
        self.scenario, self.features, self.effects = scenario, features, effects
        self.parent = array("i")        # row of the path this one extends (-1: the scenario's own path)
        self.link = array("i")          # index into links (-1: no injection)
        self.outcome = array("b")
        self.cost = array("i")
        self.end = array("i")
        self.cr3 = array("i")
        self.converged = array("b")
        self.links: list[Injection] = []
        self.outcomes: list[str] = []
        self.costs: list[Cost] = []
        self.ends: list[tuple] = []
        self.cr3s: list[tuple] = []
        self._ids: dict = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ids"] = None
        return state

    def _id(self, table: list, kind: int, value) -> int:
        # Values come interned from the explorer: their identity is the key (the table keeps
        # them alive); equal values made apart only cost an extra entry.
        key = (kind, id(value))
        got = self._ids.get(key)
        if got is None:
            got = self._ids[key] = len(table)
            table.append(value)
        return got

    def add(self, parent: int, link: Injection | None, outcome: str, cost: Cost, end: tuple, cr3: tuple,
            converged: bool) -> int:
        self.parent.append(parent)
        self.link.append(-1 if link is None else self._id(self.links, 0, link))
        self.outcome.append(self._id(self.outcomes, 1, outcome))
        self.cost.append(self._id(self.costs, 2, cost))
        self.end.append(self._id(self.ends, 3, end))
        self.cr3.append(self._id(self.cr3s, 4, cr3))
        self.converged.append(1 if converged else 0)
        return len(self.parent) - 1

    def __len__(self) -> int:
        return len(self.parent)

    def chain(self, row: int) -> tuple[Injection, ...]:
        out = []
        while row >= 0 and self.link[row] >= 0:
            out.append(self.links[self.link[row]])
            row = self.parent[row]
        return tuple(reversed(out))

    def row(self, row: int) -> PathResult:
        return PathResult(self.scenario, self.features, self.effects, self.chain(row),
                          self.outcomes[self.outcome[row]], self.costs[self.cost[row]], self.ends[self.end[row]],
                          self.cr3s[self.cr3[row]], bool(self.converged[row]))

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[PathResult]:
        for r in range(start, len(self) if stop is None else stop):
            yield self.row(r)


__all__ = ["Cost", "NO_COST", "Finding", "PathResult", "PathTable", "event_cost", "cr3_trace_of",
           "cr3_entry", "Injection"]
