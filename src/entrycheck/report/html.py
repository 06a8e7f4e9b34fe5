"""Self-contained HTML reports of check, diff and review (``--html PATH``).

One file, nothing fetched: CSS, JavaScript and the SVG plots are inline, and a
Content-Security-Policy forbids every network request and every script but the
report's own (allowed by its hash).  Every string that comes from the input —
symbol names, messages, labels, paths, patch text — goes through jinja2's
autoescaping (or ``markupsafe.escape`` in the plots).

A finding's trace is replayed (``explore.replay.trace``) and shown as the last
``TRACE_WINDOW`` instructions before the violation, each with the CPU state in
force when it ran: CR3 (decoded), GSBASE, KERNEL_GS_BASE, SPEC_CTRL and CPL are
reconstructed by walking the run's events in step order from the scenario's
initial state (``states_along``).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import os
import shlex
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from markupsafe import Markup

from entrycheck import __version__
from entrycheck.explore.check import CheckResult
from entrycheck.explore.costmodel import CostModel
from entrycheck.explore.diff import DiffResult
from entrycheck.explore.paths import Cost, Finding, PathResult
from entrycheck.machine.events import Injection
from entrycheck.explore.scenarios import SCENARIOS, Scenario, base_name
from entrycheck.machine import events as ev
from entrycheck.machine import model
from entrycheck.machine.model import CpuState, decode_cr3
from entrycheck.report.plots import Series, grouped_bars
from entrycheck.report.srclines import SourceLines

TRACE_WINDOW = 40          # instructions shown before a violation
MAX_TRACES = 60            # findings replayed per report; the others show the explorer's recorded window
TEMPLATES = Path(__file__).with_name("templates")
MSR_NAMES = {model.MSR_SPEC_CTRL: "SPEC_CTRL", model.MSR_PRED_CMD: "PRED_CMD", model.MSR_MCG_STATUS: "MCG_STATUS",
             model.MSR_GS_BASE: "GS_BASE", model.MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
             model.MSR_FS_BASE: "FS_BASE"}


# ---- the command line ------------------------------------------------------------------------------
def command_line(argv: Sequence[str] | None = None) -> str:
    """The entrycheck command line of this process, quoted for a shell."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "entrycheck " + shlex.join(args)


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


# ---- matrices and plots ---------------------------------------------------------------------
def _needs_missing(scenario: str, features: str) -> bool:
    sc = SCENARIOS.get(scenario)
    return bool(sc and sc.needs and sc.needs not in features.split(","))


def check_matrix(result: CheckResult, views: Sequence[FindingView]) -> list[list[Cell]]:
    # A user-value variant (syscall[rsp=...]) counts in its scenario's cell.
    paths: Counter = Counter()
    for table, a, b in result.segments:
        paths[(base_name(table.scenario), str(table.features))] += b - a
    counts = Counter((base_name(f.scenario), str(f.features)) for f in result.raw_findings)
    first: dict[tuple, str] = {}
    for v in views:
        first.setdefault((base_name(v.finding.scenario), str(v.finding.features)), v.anchor)
    rows = []
    for sc in result.config.scenarios:
        row = []
        for fs in (str(x) for x in result.feature_sets):
            key = (sc, fs)
            if _needs_missing(sc, fs):
                row.append(Cell(sc, fs, "na", title=f"{sc} needs {SCENARIOS[sc].needs}"))
                continue
            n = counts.get(key, 0)
            cls = "finding" if n else "clean"
            title = f"{sc}, {fs}: {paths.get(key, 0)} paths, {n} findings (before deduplication)"
            row.append(Cell(sc, fs, cls, findings=n, paths=paths.get(key, 0),
                            href=f"#{first[key]}" if key in first else None, title=title))
        rows.append(row)
    return rows


def diff_matrix(result: DiffResult, views: Sequence[FindingView]) -> list[list[Cell]]:
    matched = result.matched_cells
    changed = result.changed_cells
    new = Counter((base_name(f.scenario), str(f.features)) for f in result.new_violations)
    fixed = Counter((base_name(f.scenario), str(f.features)) for f in result.fixed_violations)
    first: dict[tuple, str] = {}
    for v in views:
        if v.side == "new":
            first.setdefault((base_name(v.finding.scenario), str(v.finding.features)), v.anchor)
    rows = []
    for sc in result.old.config.scenarios:
        row = []
        for fs in (str(x) for x in result.old.feature_sets):
            key = (sc, fs)
            if _needs_missing(sc, fs) or not matched.get(key):
                row.append(Cell(sc, fs, "na", title=f"{sc}, {fs}: no matched paths"))
                continue
            n, c = new.get(key, 0), changed.get(key, 0)
            if not n and key in result.new_violation_cells:
                n = 1                    # a repeat of a new violation first seen in another cell
            cls = "finding" if n else ("changed" if c else "clean")
            href = f"#{first[key]}" if key in first else ("#changes" if c else None)
            title = (f"{sc}, {fs}: {c} of {matched[key]} paths changed, {n} new violations, "
                     f"{fixed.get(key, 0)} fixed")
            row.append(Cell(sc, fs, cls, findings=n, changed=c, paths=matched[key], fixed=fixed.get(key, 0),
                            href=href, title=title))
        rows.append(row)
    return rows


def _scenario_costs(paths: Iterable[PathResult], scenarios: Sequence[str]) -> dict[str, Cost]:
    """The paths without injection of each scenario, from its default user state (a variant
    with hostile user values is a path of its own, left out of the sums)."""
    acc = {s: Cost() for s in scenarios}
    for p in paths:
        if not p.injections and p.scenario in acc:
            acc[p.scenario] = acc[p.scenario] + p.cost
    return acc


def check_plots(result: CheckResult) -> list[dict]:
    scen = list(result.config.scenarios)
    acc = _scenario_costs(result.base_paths(), scen)
    n = len(result.feature_sets)
    return [{
        "title": "CR3 writes per scenario, by kind",
        "note": f"Paths without injection, summed over {n} feature set{'s' if n != 1 else ''}. A redundant "
                "write (CR3 unchanged, nothing stale to flush) is also counted as flushing or NOFLUSH.",
        "svg": grouped_bars("CR3 writes per scenario, by kind", scen, [
            Series("flushing", tuple(acc[s].cr3_flushing for s in scen)),
            Series("NOFLUSH", tuple(acc[s].cr3_noflush for s in scen)),
            Series("redundant", tuple(acc[s].cr3_redundant for s in scen))], ylabel="CR3 writes",
            chart_id="plot-cr3-kinds"),
    }]


def diff_plots(result: DiffResult) -> list[dict]:
    scen = list(result.old.config.scenarios)
    base = result.base
    old = _scenario_costs((d.old for d in base), scen)
    new = _scenario_costs((d.new for d in base), scen)
    n = len(result.old.feature_sets)
    told = sum((old[s] for s in scen), Cost())
    tnew = sum((new[s] for s in scen), Cost())
    kinds = ("flushing", "NOFLUSH", "redundant")
    note = f"Matched paths without injection, summed over {n} feature set{'s' if n != 1 else ''}."
    return [{
        "title": "CR3 writes per scenario, old vs new",
        "note": note,
        "svg": grouped_bars("CR3 writes per scenario, old vs new", scen, [
            Series("old", tuple(old[s].cr3_writes for s in scen)),
            Series("new", tuple(new[s].cr3_writes for s in scen))], ylabel="CR3 writes",
            chart_id="plot-cr3-scenarios"),
    }, {
        "title": "CR3 writes by kind, old vs new",
        "note": note + " A redundant write (CR3 unchanged, nothing stale to flush) is also counted as "
                       "flushing or NOFLUSH.",
        "svg": grouped_bars("CR3 writes by kind, old vs new", kinds, [
            Series("old", (told.cr3_flushing, told.cr3_noflush, told.cr3_redundant)),
            Series("new", (tnew.cr3_flushing, tnew.cr3_noflush, tnew.cr3_redundant))], ylabel="CR3 writes",
            chart_id="plot-cr3-kinds"),
    }]


# ---- rendering ------------------------------------------------------------------------------
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env


def _script() -> tuple[Markup, str]:
    js = (TEMPLATES / "report.js").read_text()
    digest = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    return Markup(js), f"'sha256-{digest}'"


def _render(template: str, **context) -> str:
    script, script_hash = _script()
    env = _environment()
    return env.get_template(template).render(
        script=script, script_hash=script_hash, version=__version__,
        generated=_generated(), **context)


def _generated() -> str | None:
    """The time the page names: none by default, so that the same inputs give the same bytes;
    SOURCE_DATE_EPOCH (the reproducible-builds convention) when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch.isdigit():
        return None
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, ValueError, OSError):
        return None


def _site_rows(cost: Cost, side: _Side, features: str) -> list[dict]:
    redundant = dict(cost.redundant_sites)
    out = []
    for site, n in cost.cr3_sites:
        where, text = side.site_source(site, features)
        out.append({"site": site, "writes": n, "redundant": redundant.get(site, 0), "where": where, "text": text})
    return out


def check_html(result: CheckResult, *, build, loaded, target: str, command: str | None = None, coverage=(),
               lines: SourceLines | None = None) -> str:
    """The HTML report of a check of ``build`` (``target`` as given on the command line; ``lines``:
    its source lines, when the caller has them)."""
    side = _Side(build, loaded, target, lines)
    # Root causes first, then the easiest to reach (the order is stable otherwise).
    ordered = sorted(result.findings, key=lambda f: (f.invariant != "ist-reentered", f.reach))
    views = finding_views(ordered, side)
    cfg = result.config
    by_inv: dict[str, list[FindingView]] = defaultdict(list)
    for v in views:
        by_inv[v.finding.invariant].append(v)
    from entrycheck.props.invariants import INVARIANTS

    fs0 = str(result.feature_sets[0]) if result.feature_sets else "none"
    cost = result.cost()
    return _render(
        "check.html.j2", kind="check", target=target, build=build,
        label=getattr(build, "label", target), kernel_version=getattr(build, "kernel_version", None),
        verdict_bad=bool(result.findings), verdict="VIOLATIONS FOUND" if result.findings else "clean",
        command=command, cfg=cfg, result=result, feature_sets=[str(f) for f in result.feature_sets],
        vectors=",".join(v.label for v in cfg.vectors), effects=",".join(e.value for e in cfg.effects),
        matrix=check_matrix(result, views), plots=check_plots(result), groups=list(by_inv.items()),
        invariants=INVARIANTS, views=views, replayed=sum(1 for v in views if v.trace is not None),
        cost=cost, sites=_site_rows(cost, side, fs0), has_lines=bool(side.lines), window=TRACE_WINDOW,
        coverage=[(c, _by_symbol(c.rows)) for c in coverage])


def _by_symbol(rows) -> list[tuple[str, str, list]]:
    """The listing's rows grouped by symbol: (symbol, its overall status, rows)."""
    out: list[tuple[str, str, list]] = []
    for where, text, status in rows:
        sym = where.split("+")[0]
        if not out or out[-1][0] != sym:
            out.append((sym, status, []))
        out[-1][2].append((where, text, status))
    order = ("missed", "copy", "cannot", "ran")
    return [(sym, min((r[2] for r in rs), key=order.index), rs) for sym, _, rs in out]


def diff_html(result: DiffResult, *, old_build, old_loaded, new_build, new_loaded, old_target: str,
              new_target: str, model: CostModel, nmi_rate: float | None = None,
              patches: Sequence[tuple[str, str]] = (), command: str | None = None,
              lines: tuple[SourceLines | None, SourceLines | None] = (None, None)) -> str:
    """The HTML report of a diff (or, with ``patches``, a review)."""
    from entrycheck.report.difftext import PARANOID_FROM_KERNEL

    old = _Side(old_build, old_loaded, old_target, lines[0])
    new = _Side(new_build, new_loaded, new_target, lines[1])
    budget = [MAX_TRACES]
    new_views = finding_views(result.new_violations, new, prefix="new", label="new", budget=budget)
    fixed_views = finding_views(result.fixed_violations, old, prefix="fixed", label="fixed", budget=budget)
    new_keys = {id(f) for f in result.new_violations}
    both = [f for f in result.new.findings if id(f) not in new_keys]
    both_views = finding_views(both, new, prefix="both", label="both", budget=budget)
    cfg = result.old.config
    groups = []
    for k, g in enumerate(result.groups):
        ex = g.example
        mapped = tuple(result.sites.link(i) for i in ex.injections)
        groups.append({
            "anchor": f"change-{k}", "paths": g.count, "description": g.description,
            "feature_sets": list(g.feature_sets), "scenarios": list(g.scenarios),
            "example": f"{ex.scenario}, {ex.features}, " + (" ".join(i.spec() for i in ex.injections)
                                                          or "no injection"),
            "old_command": trace_command(old_target, ex.scenario, ex.features, ex.effects, ex.injections),
            "new_command": trace_command(new_target, ex.scenario, ex.features, ex.effects, mapped)
            if all(mapped) else None,
            "old_cr3": [(s, f"{v:#x}", n) for s, v, n in ex.old.cr3_trace],
            "new_cr3": [(s, f"{v:#x}", n) for s, v, n in ex.new.cr3_trace],
        })
    paranoid = []
    for d in sorted((d for d in result.base if d.scenario in PARANOID_FROM_KERNEL),
                    key=lambda d: (d.scenario, str(d.features))):
        paranoid.append({"scenario": d.scenario, "features": str(d.features), "effects": ",".join(d.effects),
                         "old": d.old.cost.cr3_writes, "new": d.new.cost.cr3_writes,
                         "saved": model.cycles(d.old.cost) - model.cycles(d.new.cost),
                         "per_second": (model.cycles(d.old.cost) - model.cycles(d.new.cost)) * nmi_rate
                         if nmi_rate and d.scenario == "nmi-from-kernel" else None})
    both_count = len(result.new.findings) - len(result.new_violations)
    return _render(
        "diff.html.j2", kind="review" if patches else "diff", old_label=old_build.label,
        new_label=new_build.label, old_version=old_build.kernel_version, new_version=new_build.kernel_version,
        old_target=old_target, new_target=new_target, patches=list(patches), command=command,
        verdict_bad=bool(result.new_violations),
        verdict="NEW VIOLATIONS" if result.new_violations else "no new violations",
        cfg=cfg, result=result, feature_sets=[str(f) for f in result.old.feature_sets],
        vectors=",".join(v.label for v in cfg.vectors), effects=",".join(e.value for e in cfg.effects),
        changed=result.changed_count, both_count=both_count, matrix=diff_matrix(result, new_views),
        plots=diff_plots(result), groups=groups, paranoid=paranoid, model=model, nmi_rate=nmi_rate,
        new_views=new_views, fixed_views=fixed_views, both_views=both_views,
        unmatched=result.unmatched_groups(), has_lines=bool(old.lines or new.lines), window=TRACE_WINDOW)


__all__ = ["TRACE_WINDOW", "Cell", "FindingView", "TraceRow", "TraceView", "apply_event", "check_html",
           "check_matrix", "command_line", "describe_event", "diff_html", "diff_matrix",
           "initial_cpu", "states_along", "trace_command"]
