"""Findings grouped by what one fix changes: one entry per thing to fix.

A stock kernel's report lists many distinct findings that are one mechanism at neighbouring
sites: every #DB that re-enters its IST stack after an access to data within_cpu_entry()
does not refuse is fixed by refusing those data, whatever instruction made the access; every
mispredicted path of one function's conditional SWAPGS by one fence there.  The group key is
the invariant and the mechanism (the data a breakpoint watches, the outstanding exception
whose stack is re-entered, the function of the mispredicted branch, the exit without VERW);
under it are the sites and how many explored paths showed each.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from entrycheck.explore.paths import Finding
from entrycheck.props.invariants import VERW_AFTER_NMI

BREAKPOINT = "a kernel data breakpoint on "
_PER_CPU = re.compile(r"\w+(?:\+0x[0-9a-f]+)? \(per-cpu\)")
_REENTRY = re.compile(r"^(\w+) delivered through IST \d+ while the frame of the (\w+)")


@dataclass(frozen=True)
class FixGroup:
    invariant: str
    mechanism: str                 # what one fix changes
    findings: tuple[Finding, ...]

    @property
    def documented(self) -> str:
        """Why the kernel leaves the group alone on purpose, where its source says so ("": a thing
        to fix)."""
        return VERW_AFTER_NMI if self.mechanism == VERW_CORNER_CASE else ""

    @property
    def paths(self) -> int:
        return sum(f.paths for f in self.findings)

    def sites(self) -> list[tuple[str, int]]:
        """Each site with the explored paths that showed a finding there, most first."""
        count: Counter = Counter()
        for f in self.findings:
            count[f.site] += f.paths
        return sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))

    def watched(self) -> list[str]:
        """The data the group's #DB breakpoints watch, for the group of an IST stack re-entered."""
        return watched_data(self.findings) if self.invariant == "ist-reentered" else []

    def to_json(self, index: dict[int, int]) -> dict:
        return {"invariant": self.invariant, "mechanism": self.mechanism, "paths": self.paths,
                "findings": [index[id(f)] for f in self.findings],
                "sites": [{"site": s, "paths": n} for s, n in self.sites()],
                **({"documented": self.documented} if self.documented else {}),
                **({"watched": self.watched()} if self.watched() else {})}


def watched_data(findings, per_cpu_only: bool = False) -> list[str]:
    """The data the findings' #DB breakpoints watch, by name (offsets and addresses dropped; the
    task stack as "the task stack"), each once in order; ``per_cpu_only``: the per-cpu variables."""
    out: list[str] = []
    for f in findings:
        for p in f.preconditions:
            if p.kind != "db" or not p.text.startswith(BREAKPOINT):
                continue
            what = p.text[len(BREAKPOINT):]
            if per_cpu_only and not _PER_CPU.match(what):
                continue
            name = "the task stack" if what.startswith("task stack") else re.split(r"[+ ]", what, maxsplit=1)[0]
            if name not in out:
                out.append(name)
    return out


# One mechanism wherever the exit is: the exit's VERW ran, an exception came after it and its
# return to kernel mode did not clear the buffers again.
VERW_CORNER_CASE = ("an exception after the exit's VERW (an NMI, #MC or #DB) returns to it without "
                    "clearing the CPU buffers again")


def _symbol(site: str) -> str:
    return site.partition("+")[0]


def mechanism(f: Finding) -> str:
    """What one fix of ``f`` changes (see the module's doc)."""
    if f.invariant == "ist-reentered":
        if any(p.kind == "db" and p.text.startswith(BREAKPOINT) for p in f.preconditions):
            return ("a #DB on its IST stack after a kernel data breakpoint on data within_cpu_entry() "
                    "does not refuse")
        m = _REENTRY.match(f.message)
        if m:
            return f"{m.group(1)} re-enters the IST stack of an outstanding {m.group(2)}"
        return f"re-entered IST stack at {_symbol(f.site)}"
    if f.invariant == "swapgs-unfenced":
        branch = next((i for i in reversed(f.injections) if i.vector.label == "mispredict"), None)
        where = _symbol(branch.at) if branch is not None else _symbol(f.site)
        return f"a mispredicted branch in {where} reaches a %gs: access with the user GSBASE unfenced"
    if f.invariant == "verw-missing":
        if VERW_AFTER_NMI in f.message:
            return VERW_CORNER_CASE
        return f"a return to user mode without VERW in {_symbol(f.site)}"
    return f"{f.invariant} in {_symbol(f.site)}"


def group(findings: list[Finding]) -> list[FixGroup]:
    """The findings by (invariant, mechanism), in the order each group first appears."""
    by: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        by.setdefault((f.invariant, mechanism(f)), []).append(f)
    return [FixGroup(inv, mech, tuple(fs)) for (inv, mech), fs in by.items()]


def to_fix(groups: list[FixGroup]) -> int:
    """How many of ``groups`` are things to fix (not corner cases the kernel documents)."""
    return sum(1 for g in groups if not g.documented)


__all__ = ["FixGroup", "VERW_CORNER_CASE", "group", "mechanism", "to_fix", "watched_data"]
