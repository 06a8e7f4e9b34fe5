"""Self-contained HTML reports of check, diff and review (``--html PATH``).

One file, nothing fetched: CSS, JavaScript and the SVG plots are inline, and a
Content-Security-Policy forbids every network request and every script but the
report's own (allowed by its hash).  Every string that comes from the input —
symbol names, messages, labels, paths, patch text — goes through jinja2's
autoescaping (or ``markupsafe.escape`` in the plots).

What a report shows of each finding (its replayed trace, the CPU state per step) is built in
htmlviews.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from markupsafe import Markup

from entrycheck import __version__
from entrycheck.explore.check import CheckResult
from entrycheck.explore.costmodel import CostModel
from entrycheck.explore.diff import DiffResult
from entrycheck.explore.paths import Cost, PathResult
from entrycheck.explore.scenarios import SCENARIOS, base_name
from entrycheck.report.htmlviews import (MAX_TRACES, TRACE_WINDOW, Cell, FindingView, _Side, finding_views,
                                         trace_command)
from entrycheck.report.plots import Series, grouped_bars
from entrycheck.report.srclines import SourceLines

TEMPLATES = Path(__file__).with_name("templates")


# ---- the command line ------------------------------------------------------------------------------
def command_line(argv: Sequence[str] | None = None) -> str:
    """The entrycheck command line of this process, quoted for a shell."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "entrycheck " + shlex.join(args)


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
    from entrycheck.explore.fixes import group
    from entrycheck.props.invariants import INVARIANTS

    # One entry per thing to fix (explore/fixes.py), in the order of their first finding.
    fix_groups = group(ordered)
    view_of = {id(v.finding): v for v in views}
    groups = [(g, [view_of[id(f)] for f in g.findings if id(f) in view_of]) for g in fix_groups]

    fs0 = str(result.feature_sets[0]) if result.feature_sets else "none"
    cost = result.cost()
    return _render(
        "check.html.j2", kind="check", target=target, build=build,
        label=getattr(build, "label", target), kernel_version=getattr(build, "kernel_version", None),
        verdict_bad=bool(result.findings), verdict="VIOLATIONS FOUND" if result.findings else "clean",
        command=command, cfg=cfg, result=result, feature_sets=[str(f) for f in result.feature_sets],
        vectors=",".join(v.label for v in cfg.vectors), effects=",".join(e.value for e in cfg.effects),
        matrix=check_matrix(result, views), plots=check_plots(result), groups=groups,
        configurations=cfg.configurations,
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


__all__ = ["check_html", "check_matrix", "command_line", "diff_html", "diff_matrix"]
