"""Text and JSON of `diff` / `review`: what a reviewer can paste into a reply."""

from __future__ import annotations

from entrycheck import __version__
from entrycheck.explore.costmodel import CostModel
from entrycheck.explore.diff import DiffResult, scenario_summary
from entrycheck.report.jsonout import configurations_json, findings_json
from entrycheck.report.text import WIDTH, _wrap, configuration_lines, not_checked_lines, paths_only_lines

PARANOID_FROM_KERNEL = ("nmi-from-kernel", "mc-from-kernel", "db-from-kernel")


def _base_rows(result: DiffResult) -> list:
    return result.base


def diff_text(result: DiffResult, *, old_label: str, new_label: str, model: CostModel,
              nmi_rate: float | None, patch=None, kernel_c: tuple[str, str] = ("", "")) -> str:
    cfg = result.old.config
    lines = ["entrycheck diff"]
    lines += _wrap(f"old: {old_label}", "       ", "  ")
    lines += _wrap(f"new: {new_label}", "       ", "  ")
    for which, text in (("both", kernel_c[0]),) if kernel_c[0] == kernel_c[1] else zip(("old", "new"), kernel_c):
        if text:
            lines += _wrap(f"{which}: {text}", "       ", "  ")
    lines += _wrap(f"{len(cfg.scenarios)} scenarios x {cfg.sets_at_depth()} feature sets; vectors "
                   f"{','.join(v.label for v in cfg.vectors)}; depth {cfg.depth}"
                   + (f"; handler effects {','.join(e.value for e in cfg.effects)}" if cfg.effects else ""))
    lines += paths_only_lines(cfg)
    lines += configuration_lines(cfg)
    lines += not_checked_lines(cfg)
    lines += _wrap(f"{result.matched_count} paths matched, {result.only_old_count} only in old, "
                   f"{result.only_new_count} only in new")
    both = len(result.new.findings) - len(result.new_violations)
    lines.append(f"Violations: {len(result.new_violations)} new, {len(result.fixed_violations)} fixed, "
                 f"{both} in both")
    for title, fs in (("new", result.new_violations), ("fixed", result.fixed_violations)):
        for f in fs[:10]:
            lines += _wrap(f"{title}: {f.invariant} at {f.site} ({f.scenario}, {f.features}; "
                           f"{' '.join(i.spec() for i in f.injections) or 'no injection'}): {f.message}",
                           "      ", "  - ")
    lines.append("")
    if not result.changed_count:
        lines.append("Behaviour and costs are the same on every matched path.")
    else:
        lines.append(f"What changed ({result.changed_count} of {result.matched_count} paths, grouped):")
        for g in result.groups:
            lines.append("")
            lines += _wrap(f"[{g.count} paths] {g.description}", "      ", "  ")
            lines += _wrap("feature sets: " + "; ".join(g.feature_sets), "      ", "    ")
            lines += _wrap("scenarios: " + ", ".join(g.scenarios), "      ", "    ")
            ex = g.example
            lines += _wrap("e.g. " + ex.scenario + ", " + str(ex.features) + (
                ", " + " ".join(i.spec() for i in ex.injections) if ex.injections else ", no injection"),
                "      ", "    ")
        changed_fs = {fs for _, fs in result.changed_cells}
        unchanged_pti = sorted({fs for _, fs in result.matched_cells if "pti" in fs.split(",")} - changed_fs)
        no_pti_changed = sorted(fs for fs in changed_fs if "pti" not in fs.split(","))
        lines.append("")
        if not no_pti_changed:
            lines.append("Without pti: no change on any path.")
        else:
            lines += _wrap("Without pti, changes in: " + "; ".join(no_pti_changed))
        if unchanged_pti:
            lines += _wrap("Unchanged feature sets with pti: " + "; ".join(unchanged_pti))
    unmatched = result.unmatched_groups()
    if unmatched:
        lines.append("")
        lines += _wrap("Paths without a counterpart inject at instructions the other build does not have "
                       "(the code differs there), by symbol:")
        for side, sym, n in unmatched:
            lines += _wrap(f"only in {side}: {n:6d} paths at {sym}", "      ", "  ")
    rows = [d for d in _base_rows(result) if d.scenario in PARANOID_FROM_KERNEL]
    quiet = [d for d in rows if not d.old.cost.cr3_writes and not d.new.cost.cr3_writes]
    rows = [d for d in rows if d not in quiet]
    if rows or quiet:
        lines.append("")
        lines.append("CR3 writes on a paranoid return from kernel context (no injection):")
        lines.append(f"  {'scenario':<18s}{'features':<32s}{'old':>5s}{'new':>5s}"
                     f"{'cycles saved':>17s}"[:WIDTH])
        for d in sorted(rows, key=lambda d: (d.scenario, str(d.features))):
            saved = model.cycles(d.old.cost) - model.cycles(d.new.cost)
            lines.append(f"  {d.scenario:<18s}{str(d.features):<32.32s}{d.old.cost.cr3_writes:>5d}"
                         f"{d.new.cost.cr3_writes:>5d}{saved:>17d}")
        if quiet:
            lines += _wrap("no CR3 write in either build: " + "; ".join(sorted({str(d.features) for d in quiet})),
                           "    ", "  ")
        lines += _wrap(f"cycles: cr3={model.cr3}, cr3_flush={model.cr3_flush}, wrmsr={model.wrmsr} "
                       "per operation (estimates; set with --cost)", "  ", "  ")
        if nmi_rate:
            for d in sorted(rows, key=lambda d: str(d.features)):
                if d.scenario != "nmi-from-kernel":
                    continue
                saved = (model.cycles(d.old.cost) - model.cycles(d.new.cost)) * nmi_rate
                lines += _wrap(f"at {nmi_rate:g} NMIs/s from kernel context ({d.features}): "
                               f"{saved:,.0f} cycles/s per CPU saved", "    ", "  ")
    if patch is not None:
        lines.append("")
        lines += patch_lines(patch)
    lines.append("")
    if result.new_violations:
        verdict = "NEW VIOLATIONS"
    elif patch is not None and not patch.checked:
        verdict = "NOT CHECKED: no explored path ran anything the patch changed"
    else:
        verdict = "no new violations"
    lines += _wrap("Verdict: " + verdict, "  ", "")
    return "\n".join(lines)


def patch_lines(patch) -> list[str]:
    """What a review checked of each hunk (explore/patchcover.py)."""
    from entrycheck.explore.patchcover import FACTS, NO_CODE, NOT_RUN, OUTSIDE, RAN, SAME_FACTS

    lines = _wrap(f"What the review checked of the patch ({patch.changed} instructions of the image changed"
                  + ("; hunks mapped to them by line info)" if patch.line_info else
                     "; without line info, by file)"), "  ", "")
    for h in patch.hunks:
        head = f"{h.file} hunk {h.hunk}: "
        if h.verdict == OUTSIDE:
            text = "not checked: the file is not a source of the image's objects"
        elif h.verdict == FACTS:
            text = (f"not compiled into the image, but the checks read from it {h.facts}: that changed, and "
                    "each build was explored with its own")
        elif h.verdict == SAME_FACTS:
            text = f"not checked: not compiled into the image; what the checks read from it ({h.facts}) is the same"
        elif h.verdict == NO_CODE:
            text = "no instruction of the image changed"
        elif h.verdict == NOT_RUN:
            text = (f"not checked: {len(h.instructions)} changed instructions, none run by an explored path "
                    f"({', '.join(h.instructions[:3])}{', ...' if len(h.instructions) > 3 else ''})")
        elif h.verdict == RAN:
            text = (f"{len(h.executed)} of {len(h.instructions)} changed instructions ran, under "
                    f"{len(h.feature_sets)} feature sets ({', '.join(h.executed[:3])}"
                    f"{', ...' if len(h.executed) > 3 else ''})")
        else:
            text = h.verdict
        if not h.by_line and h.verdict in (RAN, NOT_RUN):
            text += "; a macro or header: the instructions no changed line names"
        lines += _wrap(head + text, "      ", "  ")
    if patch.unattributed:
        lines += _wrap(f"{len(patch.unattributed)} changed instructions no hunk explains: "
                       + ", ".join(patch.unattributed[:5]), "      ", "  ")
    return lines


def diff_json(result: DiffResult, *, old_label: str, new_label: str, old_version: str | None,
              new_version: str | None, model: CostModel, nmi_rate: float | None, patch=None,
              kernel_c: tuple[str, str] = ("", "")) -> dict:
    cfg = result.old.config
    entries = []
    for d, changed, n in result.listed():
        entries.append({
            "scenario": d.scenario, "features": str(d.features), "effects": list(d.effects),
            "injections": [i.to_json() for i in d.injections], "paths": n,
            "old": {**d.old.cost.to_json(), "outcome": d.old.outcome, "cycles": model.cycles(d.old.cost)},
            "new": {**d.new.cost.to_json(), "outcome": d.new.outcome, "cycles": model.cycles(d.new.cost)},
            "behaviour_changed": d.behaviour_changed,
            "cr3_writes_changed": changed,
        })
    summary = []
    for s in scenario_summary(result):
        summary.append({**{k: v for k, v in s.items() if k not in ("old", "new")},
                        "old": s["old"].to_json(), "new": s["new"].to_json()})
    return {
        "entrycheck_version": __version__,
        "old": {"target": old_label, "kernel_version": old_version, "kernel_c": kernel_c[0]},
        "new": {"target": new_label, "kernel_version": new_version, "kernel_c": kernel_c[1]},
        "feature_sets": [str(fs) for fs in result.old.feature_sets],
        "scenario_names": list(cfg.scenarios),
        "vectors": [v.label for v in cfg.vectors],
        "depth": cfg.depth,
        "paths_only": [str(fs) for fs in cfg.paths_only],
        "not_checked": list(cfg.not_checked),
        "handler_effects": [e.value for e in cfg.effects],
        "paths_matched": result.matched_count,
        "paths_only_in_old": result.only_old_count,
        "paths_only_in_new": result.only_new_count,
        "paths_changed": result.changed_count,
        "scenarios": entries,
        "summary": summary,
        "changes": [{"paths": g.count, "description": g.description, "feature_sets": list(g.feature_sets),
                     "scenarios": list(g.scenarios)} for g in result.groups],
        "unmatched": [{"side": side, "symbol": sym, "paths": n} for side, sym, n in result.unmatched_groups()],
        "configurations": configurations_json(cfg),
        "new_violations": findings_json(result.new_violations, cfg),
        "fixed_violations": findings_json(result.fixed_violations, cfg),
        "cost_model": model.to_json(),
        "nmi_rate": nmi_rate,
        **({"patch": patch.to_json()} if patch is not None else {}),
    }
