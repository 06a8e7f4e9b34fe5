"""Redundant privileged writes — the seed patch's own class — each explained from a path.

A CR3 or MSR write is redundant when it writes the value the register already holds
(and, for CR3, has nothing to flush).  For each site where that happens on the paths
without injection, one such path is replayed to say why: where the register got the
value it holds (read there and not written since, written there, or held from the
path's start), and so the condition under which the code could skip the write — as
PARANOID_RESTORE_CR3 skips the CR3 write when the saved CR3 is the current one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from entrycheck.explore.check import CheckResult
from entrycheck.explore.costmodel import CostModel
from entrycheck.explore.replay import trace
from entrycheck.explore.scenarios import scenario
from entrycheck.kernelabi.stubs import Effect
from entrycheck.kernelabi.world import World
from entrycheck.machine.events import Cr3Written, MsrRead, MsrWritten
from entrycheck.machine.model import MSR_SPEC_CTRL

MSR_NAMES = {MSR_SPEC_CTRL: "SPEC_CTRL"}


@dataclass(frozen=True)
class RedundantWrite:
    site: str
    register: str                 # "CR3", "SPEC_CTRL", "MSR 0x..."
    value: int
    paths: tuple[tuple[str, str], ...]   # (scenario, features) of the paths without injection
    writes: int                   # on those paths
    all_writes: int               # on every explored path
    held_since: str               # where the register got its value
    why: str
    skip_if: str
    cycles: int                   # per write, from the cost model
    per_path: tuple[int, ...] = ()   # the redundant writes at the site on each of ``paths`` (distinct counts)

    def per_path_text(self) -> str:
        """'1 per path' when every path through the site writes it as often, else the range."""
        if len(self.per_path) == 1:
            n = self.per_path[0]
            return "once per path" if n == 1 else f"{n} times per path"
        return f"{min(self.per_path)} to {max(self.per_path)} times per path"

    def to_json(self) -> dict:
        return {"site": self.site, "register": self.register, "value": hex(self.value),
                "paths": [{"scenario": s, "features": f} for s, f in self.paths],
                "writes_per_path": list(self.per_path), "writes": self.writes,
                "writes_on_all_paths": self.all_writes, "held_since": self.held_since, "why": self.why,
                "skip_if": self.skip_if, "cycles_per_write": self.cycles,
                "cycles_on_these_paths": self.cycles * self.writes}


def redundant_writes(result: CheckResult, world_of: Callable[[object], World],
                     model: CostModel = CostModel()) -> list[RedundantWrite]:
    base = result.base_paths()
    every = dict(result.total_cost().redundant_sites)
    out = []
    for site, writes in result.cost().redundant_sites:
        paths = [p for p in base if dict(p.cost.redundant_sites).get(site)]
        if not paths:
            continue
        p = paths[0]
        world = world_of(p.features)
        t = trace(world, scenario(p.scenario), (), frozenset(Effect(e) for e in p.effects))
        image = world.image
        events = t.events
        k = next((j for j, e in enumerate(events) if image.symbolize(e.pc) == site and
                  isinstance(e, (MsrWritten, Cr3Written)) and e.write.redundant), None)
        if k is None:
            continue
        e = events[k]
        if isinstance(e, Cr3Written):
            register, value, cycles = "CR3", e.write.written, model.cr3
            held = _cr3_held(events[:k], image)
            why = "CR3 is written with the value it holds, with nothing to flush"
            skip = f"the CR3 to write equals the current CR3 ({held})"
        else:
            msr = e.write.msr
            register = MSR_NAMES.get(msr, f"MSR {msr:#x}")
            value, cycles = e.write.new, model.wrmsr
            how, at = _msr_held(events[:k], msr, image)
            held = f"{how} at {at} and not written since" if at else "held since the path started"
            why = f"{register} is written with {value:#x}, the value it holds ({held})"
            if how == "read":
                skip = (f"the value to write equals the value read at {at} (the code keeps it in a register): "
                        f"nothing writes {register} in between on these paths")
            else:
                skip = f"the value to write equals the value {register} holds"
        per = tuple(sorted({dict(q.cost.redundant_sites)[site] for q in paths}))
        out.append(RedundantWrite(site, register, value, tuple((q.scenario, str(q.features)) for q in paths),
                                  writes, every.get(site, writes), held, why, skip, cycles, per))
    return out


def _msr_held(events, msr: int, image) -> tuple[str, str | None]:
    """How the MSR got the value it holds: ("written" or "read", site) of the last write or
    read before, or ("held", None) from the path's start."""
    for e in reversed(events):
        if isinstance(e, MsrWritten) and e.write.msr == msr:
            return "written", image.symbolize(e.pc)
        if isinstance(e, MsrRead) and e.msr == msr:
            return "read", image.symbolize(e.pc)
    return "held", None


def _cr3_held(events, image) -> str:
    for e in reversed(events):
        if isinstance(e, Cr3Written):
            return f"written at {image.symbolize(e.pc)}"
    return "held since the path started"


__all__ = ["RedundantWrite", "redundant_writes"]
