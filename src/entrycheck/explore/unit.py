"""What a unit of exploration is given and gives back: the engine's settings (``ExploreConfig``,
each declared once with its default), the run budget, the paths and findings of each boundary
(``Group``) and of the unit (``UnitResult``), and what a leaf's own run contributes."""

from __future__ import annotations

from dataclasses import dataclass, field

from entrycheck.explore.paths import Finding, PathTable
from entrycheck.explore.summary import PathSummary
from entrycheck.machine.api import DEFAULT_BUDGET
from entrycheck.machine.events import Event, Outcome
from entrycheck.machine.model import SPEC_WINDOW, CpuState, Vector

DEFAULT_VECTORS = (Vector.NMI, Vector.MC, Vector.DB, Vector.IRQ)


@dataclass(frozen=True)
class ExploreConfig:
    vectors: tuple[Vector, ...] = DEFAULT_VECTORS
    depth: int = 2
    db_anywhere: bool = False
    mc_nesting: bool = False       # also deliver #MC inside an #MC handler after MCIP was cleared
    prune: bool = True
    share: bool = True             # a leaf whose start agrees with a recorded handler run's uses is that run (memo)
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
    """What a leaf's own run contributes: summarised once per run (or per shared run)."""

    events: tuple[Event, ...]
    summary: PathSummary
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
    beside: int = 0                  # runs that rejoined a sibling's run (explore/node.py Sibling)
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


@dataclass(frozen=True)
class Shared:
    """What the memo keeps of a shared run."""

    own: Own
    cpu: CpuState


@dataclass(frozen=True)
class Ended:
    """How a shared run ends: where it started, converged."""

    outcome: Outcome
    reason: str
    cpu: CpuState
    outstanding: tuple


__all__ = ["ExploreConfig", "DEFAULT_VECTORS", "Own", "Group", "UnitResult", "Budget", "Shared", "Ended"]
