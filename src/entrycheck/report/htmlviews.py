"""What the HTML reports show of a finding, built from the check's results (html.py renders it):
each finding replayed (``explore.replay.trace``) as the instructions before its violation, each
with the CPU state in force when it ran — CR3 (decoded), GSBASE, KERNEL_GS_BASE, SPEC_CTRL and
CPL, reconstructed by walking the run's events in step order from the scenario's initial state
(``states_along``) — with its source line, its chain and the command that replays it."""

from __future__ import annotations

import bisect
import shlex
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from entrycheck.explore.paths import Finding
from entrycheck.machine.events import Injection
from entrycheck.explore.scenarios import Scenario
from entrycheck.machine import events as ev
from entrycheck.machine import model
from entrycheck.machine.model import CpuState, decode_cr3
from entrycheck.report.srclines import SourceLines

TRACE_WINDOW = 40          # instructions shown before a violation
MAX_TRACES = 60            # findings replayed per report; the others show the explorer's recorded window
MSR_NAMES = {model.MSR_SPEC_CTRL: "SPEC_CTRL", model.MSR_PRED_CMD: "PRED_CMD", model.MSR_MCG_STATUS: "MCG_STATUS",
             model.MSR_GS_BASE: "GS_BASE", model.MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
             model.MSR_FS_BASE: "FS_BASE"}


# ---- CPU state along a recorded run ---------------------------------------------------------
def initial_cpu(world, sc: Scenario) -> CpuState:
    """The scenario's CPU state before its first event (its own exception is the first event)."""
    if sc.vector is None:
        return model.syscall(world.user_cpu())
    return world.user_cpu() if sc.from_user else world.kernel_cpu()


def apply_event(cpu: CpuState, e: ev.Event) -> CpuState:
    """The CPU state after event ``e``: every event carries it."""
    return e.cpu


def states_along(t, world) -> list[CpuState]:
    """``out[k]``: the CPU state in force when step k ran (``out[len(steps)]``: at the end).

    An event with ``step == s`` happened before step s ran (after step s-1)."""
    cpu = initial_cpu(world, t.scenario)
    out: list[CpuState] = []
    events = sorted(t.events, key=lambda e: e.step)      # stable: same-step events keep their order
    i = 0
    for k in range(len(t.steps) + 1):
        while i < len(events) and events[i].step <= k:
            cpu = apply_event(cpu, events[i])
            i += 1
        out.append(cpu)
    while i < len(events):
        cpu = apply_event(cpu, events[i])
        i += 1
    out[-1] = cpu
    return out


def describe_event(e: ev.Event, image) -> str | None:
    """One line for an event worth showing in a trace (None for the others)."""
    if isinstance(e, ev.Cr3Written):
        w = e.write
        what = "redundant" if w.redundant else ("NOFLUSH" if w.noflush else "flushing")
        return f"CR3 := {w.new:#x} [{decode_cr3(w.written)}] ({what})"
    if isinstance(e, ev.GsChange):
        return f"{e.how}: GSBASE={e.gs_base:#x} KERNEL_GS_BASE={e.kernel_gs_base:#x}"
    if isinstance(e, ev.MsrWritten):
        name = MSR_NAMES.get(e.write.msr, f"MSR {e.write.msr:#x}")
        return f"{name} := {e.write.new:#x}" + (" (redundant)" if e.write.redundant else "")
    if isinstance(e, ev.Delivered):
        how = " (latched, now delivered)" if e.from_latch else (" (single-step trap: TF)" if e.single_step else "")
        return (f"{e.vector.label.upper()} delivered at {image.symbolize(e.pc)}{how}: CPL 0, "
                f"frame rip={image.symbolize(e.frame.rip)} cs={e.frame.cs:#x}, rsp={e.stack:#x}")
    if isinstance(e, ev.Latched):
        return f"{e.vector.label.upper()} latched (NMIs blocked)"
    if isinstance(e, ev.Mispredicted):
        return f"mispredicted: speculatively on at {image.symbolize(e.target)} (nothing of it commits)"
    if isinstance(e, ev.Branch):
        return f"{'RET' if e.kind == 'ret' else 'indirect branch'} before {' and '.join(e.missing)}"
    if isinstance(e, ev.Iret):
        return (f"{e.eret or 'IRET'} to {image.symbolize(e.frame.rip)} (CPL {e.frame.cs & 3}); NMIs "
                f"{'unblocked' if not e.eret or not e.cpu.nmi_blocked else 'still blocked'}")
    if isinstance(e, ev.IretFaulted):
        return (f"{'ERETU' if e.reason.startswith('ERET') else 'IRET'} faults: {e.reason}; "
                f"{e.vector.label.upper()}({e.error_code:#x})"
                + ("" if e.reason.startswith("ERET") else ", NMIs unblocked"))
    if isinstance(e, ev.Sysret):
        return f"SYSRET to {e.rip:#x} (CPL 3)"
    if isinstance(e, ev.Resumed):
        return f"{e.injection.vector.label} returned to what it interrupted"
    if isinstance(e, ev.StubCall):
        return f"C {e.name}()" + (f" [{e.note}]" if e.note else "")
    if isinstance(e, ev.Fault):
        return f"FAULT {e.kind.value}: {e.message}"
    if isinstance(e, ev.Ended):
        return f"run ended: {e.outcome.value} ({e.reason})"
    return None


# ---- views ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceRow:
    step: int
    location: str
    instruction: str
    source: str | None          # file:line
    source_file: str | None
    source_text: str | None
    same_source: bool           # same line as the row before
    rsp: str
    stack: str
    cr3: str
    cr3_decoded: str
    gs_base: str
    kernel_gs_base: str
    spec_ctrl: str
    cpl: int
    changed: frozenset[str]
    events: tuple[str, ...]     # what happened as this instruction ran


@dataclass(frozen=True)
class TraceView:
    rows: tuple[TraceRow, ...]
    before: tuple[str, ...]     # events just before the first row
    violation: str
    skipped: int                # steps before the window
    total: int                  # steps of the run
    matched: bool               # the replay showed the finding's violation
    outcome: str


@dataclass(frozen=True)
class FindingView:
    anchor: str
    finding: Finding
    summary: str                # the invariant's one-line summary
    command: str
    chain: str
    where: str | None           # source location of the violation's site
    where_text: str | None
    trace: TraceView | None
    recorded: tuple[str, ...]
    side: str = ""              # "new", "fixed", "both" in a diff
    replay_error: str | None = None     # why the replay (and so the command) failed


@dataclass(frozen=True)
class Cell:
    scenario: str
    features: str
    cls: str                    # clean, finding, changed, na
    findings: int = 0
    changed: int = 0
    paths: int = 0
    fixed: int = 0
    href: str | None = None
    title: str = ""


class _Side:
    """One build: its loaded object, source lines and replays of findings on it."""

    def __init__(self, build, loaded, target: str, lines: SourceLines | None = None) -> None:
        self.build, self.loaded, self.target = build, loaded, target
        if lines is None:
            lines = SourceLines.from_build(build, loaded) if build is not None and loaded is not None \
                else SourceLines.empty()
        self.lines = lines
        self._worlds: dict[str, object] = {}

    def world(self, features):
        from entrycheck.image.features import FeatureSet
        from entrycheck.kernelabi.world import build_world

        key = str(features)
        got = self._worlds.get(key)
        if got is None:
            got = self._worlds[key] = build_world(self.loaded.image(FeatureSet.parse(key)))
        return got

    def image(self, features: str):
        return self.world(features).image

    def site_source(self, site: str, features: str) -> tuple[str | None, str | None]:
        if not self.lines:
            return None, None
        try:
            addr = self.image(features).parse_location(site)
        except Exception:  # noqa: BLE001 - a site outside the object has no line
            return None, None
        return self.lines.location(addr), self.lines.text(addr)

    def replay(self, f: Finding) -> TraceView:
        from entrycheck.explore.replay import parse_injection, trace
        from entrycheck.explore.scenarios import scenario
        from entrycheck.kernelabi.stubs import Effect
        from entrycheck.report.disasm import instruction_text

        world = self.world(f.features)
        image = world.image
        injections = tuple(parse_injection(i.spec(), image) for i in f.injections)
        t = trace(world, scenario(f.scenario), injections, frozenset(Effect(e) for e in f.effects))
        candidates = [v for v in t.violations if v.invariant == f.invariant and image.symbolize(v.pc) == f.site]
        candidates.sort(key=lambda v: v.message != f.message)
        v = candidates[0] if candidates else None
        upto = min(v.step if v else len(t.steps), len(t.steps))
        first = max(0, upto - TRACE_WINDOW)
        states = states_along(t, world)
        after: dict[int, list[str]] = defaultdict(list)
        before: list[str] = []
        for e in t.events:
            if e.step > upto or e.step < first:
                continue
            text = describe_event(e, image)
            if text is None:
                continue
            if e.step == first:
                before.append(text)
            else:
                after[e.step - 1].append(text)
        stacks = _StackNames(world)
        rows: list[TraceRow] = []
        prev: CpuState | None = states[first - 1] if first else None
        prev_src = None
        for s in t.steps[first:upto]:
            cpu = states[s.step]
            loc = self.lines.line(s.pc) if self.lines else None
            src = f"{loc[0]}:{loc[1]}" if loc else None
            changed = frozenset(name for name, a, b in (
                ("cr3", prev.cr3 if prev else None, cpu.cr3), ("gs", prev.gs_base if prev else None, cpu.gs_base),
                ("kgs", prev.kernel_gs_base if prev else None, cpu.kernel_gs_base),
                ("spec", prev.spec_ctrl if prev else None, cpu.spec_ctrl), ("cpl", prev.cpl if prev else None,
                                                                               cpu.cpl))
                if prev is not None and a != b)
            rows.append(TraceRow(
                step=s.step, location=image.symbolize(s.pc), instruction=instruction_text(image, s.pc),
                source=src, source_file=loc[0] if loc else None,
                source_text=self.lines.text(s.pc) if loc else None, same_source=src is not None and src == prev_src,
                rsp=f"{s.rsp:#x}", stack=stacks.name(s.rsp), cr3=f"{cpu.cr3:#x}",
                cr3_decoded=decode_cr3(cpu.cr3, cpu.pcide), gs_base=f"{cpu.gs_base:#x}",
                kernel_gs_base=f"{cpu.kernel_gs_base:#x}", spec_ctrl=f"{cpu.spec_ctrl:#x}", cpl=cpu.cpl,
                changed=changed, events=tuple(after.get(s.step, ()))))
            prev, prev_src = cpu, src
        if v is not None:
            violation = f"{v.invariant} at {image.symbolize(v.pc)}: {v.message}"
        else:
            violation = (f"the replay did not show {f.invariant} at {f.site} "
                         f"(outcome {t.outcome.value}: {t.reason})")
        return TraceView(tuple(rows), tuple(before), violation, first, len(t.steps), v is not None,
                         f"{t.outcome.value} ({t.reason})")


class _StackNames:
    def __init__(self, world) -> None:
        regions = sorted((r.start, r.start + r.size, r.name) for r in world.config.regions)
        self._regions = regions
        self._starts = [r[0] for r in regions]

    def name(self, rsp: int) -> str:
        for addr in (rsp, rsp - 1):
            k = bisect.bisect_right(self._starts, addr) - 1
            if k >= 0 and self._regions[k][0] <= addr < self._regions[k][1]:
                return self._regions[k][2].replace("cpu_entry_area ", "")
        return "user" if rsp < (1 << 47) else ""


def trace_command(target: str, scenario: str, features, effects: Iterable[str],
                  injections: Iterable[Injection]) -> str:
    """``target`` is a shell fragment: the target and the options that chose its build."""
    parts = ["entrycheck", "trace", *shlex.split(target), "--scenario", scenario, "--features", str(features)]
    effects = list(effects)
    if effects:
        parts += ["--handler-effects", ",".join(effects)]
    for i in injections:
        parts += ["--inject", i.spec()]
    return shlex.join(parts)


def _chain(f: Finding) -> str:
    return " ".join(i.spec() for i in f.injections) or "no injection"


def finding_views(findings: Sequence[Finding], side: _Side, *, prefix: str = "f", label: str = "",
                  budget: list[int] | None = None) -> list[FindingView]:
    """Views of ``findings`` (replayed while ``budget[0]`` lasts)."""
    from entrycheck.props.invariants import INVARIANTS

    budget = budget if budget is not None else [MAX_TRACES]
    out = []
    for k, f in enumerate(findings):
        tv, error = None, None
        if budget[0] > 0 and side.loaded is not None:
            budget[0] -= 1
            try:
                tv = side.replay(f)
            except Exception as exc:  # noqa: BLE001 - a replay that fails leaves the recorded window
                error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where, where_text = side.site_source(f.site, f.features)
        inv = INVARIANTS.get(f.invariant)
        out.append(FindingView(f"{prefix}-{k}", f, inv.summary if inv else "",
                               trace_command(side.target, f.scenario, f.features, f.effects, f.injections),
                               _chain(f), where, where_text, tv, tuple(f.trace), label, error))
    return out


__all__ = ["TRACE_WINDOW", "MAX_TRACES", "Cell", "FindingView", "TraceRow", "TraceView", "apply_event", "describe_event",
           "finding_views", "initial_cpu", "states_along", "trace_command"]
