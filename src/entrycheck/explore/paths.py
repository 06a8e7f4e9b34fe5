"""Results of exploration as frozen data: injection links, costs, findings, path results."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from entrycheck.image.image import Image
from entrycheck.machine.events import Cr3Written, Delivered, Event, GsChange, MsrWritten

Sites = tuple[tuple[str, int], ...]


@dataclass(frozen=True, order=True)
class Injected:
    """One exception of an injection chain: delivered at the boundary before ``at``."""

    vector: str               # "nmi", "mc", "db", ...
    at: str                   # sym+off of the interrupted instruction
    hit: int = 1              # which execution of that instruction (counted from the previous injection)

    def spec(self) -> str:
        """The --inject syntax that reproduces it: VEC@SYM+OFF[#HIT]."""
        return f"{self.vector}@{self.at}" + (f"#{self.hit}" if self.hit != 1 else "")

    def to_json(self) -> dict:
        out: dict = {"vector": self.vector, "at": self.at}
        if self.hit != 1:
            out["hit"] = self.hit
        return out


@dataclass(frozen=True)
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

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f) + getattr(other, f) for f in _COUNTS),
                    cr3_sites=_merge(self.cr3_sites, other.cr3_sites, 1),
                    redundant_sites=_merge(self.redundant_sites, other.redundant_sites, 1))

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f) - getattr(other, f) for f in _COUNTS),
                    cr3_sites=_merge(self.cr3_sites, other.cr3_sites, -1),
                    redundant_sites=_merge(self.redundant_sites, other.redundant_sites, -1))

    def cr3_json(self) -> dict:
        return {"writes": self.cr3_writes, "flushing_writes": self.cr3_flushing,
                "noflush_writes": self.cr3_noflush, "redundant_writes": self.cr3_redundant}

    def to_json(self) -> dict:
        return {"cr3": self.cr3_json(), "msr_writes": self.msr_writes,
                "redundant_msr_writes": self.msr_redundant, "swapgs": self.swapgs, "exceptions": self.exceptions}


_COUNTS = ("cr3_writes", "cr3_flushing", "cr3_noflush", "cr3_redundant", "msr_writes", "msr_redundant", "swapgs",
           "exceptions")


def _merge(a: Sites, b: Sites, sign: int) -> Sites:
    c = Counter(dict(a))
    for k, v in b:
        c[k] += sign * v
    return tuple(sorted((k, v) for k, v in c.items() if v))


def cost_of(events: Iterable[Event], image: Image) -> Cost:
    counts = dict.fromkeys(_COUNTS, 0)
    sites: Counter = Counter()
    redundant: Counter = Counter()
    for e in events:
        if isinstance(e, Cr3Written):
            counts["cr3_writes"] += 1
            counts["cr3_noflush" if e.write.noflush else "cr3_flushing"] += 1
            site = image.symbolize(e.pc)
            sites[site] += 1
            if e.write.redundant:
                counts["cr3_redundant"] += 1
                redundant[site] += 1
        elif isinstance(e, MsrWritten):
            counts["msr_writes"] += 1
            if e.write.redundant:
                counts["msr_redundant"] += 1
                redundant[image.symbolize(e.pc)] += 1
        elif isinstance(e, GsChange) and e.how == "swapgs":
            counts["swapgs"] += 1
        elif isinstance(e, Delivered):
            counts["exceptions"] += 1
    return Cost(**counts, cr3_sites=tuple(sorted(sites.items())), redundant_sites=tuple(sorted(redundant.items())))


@dataclass(frozen=True)
class Finding:
    invariant: str
    scenario: str
    features: str
    effects: tuple[str, ...]
    injections: tuple[Injected, ...]
    site: str                 # where the violation showed
    message: str
    trace: tuple[str, ...] = field(default=(), compare=False)   # instructions before the violation

    def key(self) -> tuple:
        """Deduplication key: (invariant, site, vector chain), the chain starting with the
        scenario's own entry (syscall, or the exception it starts with)."""
        from entrycheck.explore.scenarios import SCENARIOS

        sc = SCENARIOS.get(self.scenario)
        entry = sc.vector.label if sc and sc.vector else "syscall"
        return (self.invariant, self.site, (entry,) + tuple(i.vector for i in self.injections))

    def to_json(self) -> dict:
        return {"invariant": self.invariant, "scenario": self.scenario, "features": self.features,
                "effects": list(self.effects), "injections": [i.to_json() for i in self.injections],
                "site": self.site, "message": self.message, "trace": list(self.trace)}


@dataclass(frozen=True)
class PathResult:
    """One explored path: a scenario with an injection chain, on one feature set."""

    scenario: str
    features: str
    effects: tuple[str, ...]
    injections: tuple[Injected, ...]
    outcome: str
    cost: Cost
    end_state: tuple            # comparable summary of where the path ended
    cr3_trace: tuple[tuple[str, int, bool], ...]   # (site, value written, NOFLUSH)
    converged: bool = False


def cr3_trace_of(events: Iterable[Event], image: Image) -> tuple[tuple[str, int, bool], ...]:
    return tuple((image.symbolize(e.pc), e.write.written, e.write.noflush) for e in events
                 if isinstance(e, Cr3Written))
