"""The demo's report: 80-column text and deterministic JSON (the command line prints them)."""

from __future__ import annotations

import textwrap

from entrycheck import __version__
from entrycheck.demo.run import COST_FEATURES, COST_SCENARIOS, FIXTURE, DemoResult, ReturnCost, VariantResult, \
    invariant_counts
from entrycheck.explore.paths import Finding

WIDTH = 80


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False)


def chain(f: Finding) -> str:
    """The injection chain as `entrycheck trace --inject` takes it."""
    return " ".join(i.spec() for i in f.injections) or "(none: the path alone)"


def replay_command(v: VariantResult, f: Finding) -> str | None:
    """The `entrycheck trace` command that replays ``f`` on the kept object, if it was kept."""
    if v.object_path is None:
        return None
    parts = [f"entrycheck trace {v.object_path} --scenario {f.scenario} --features {f.features}"]
    if f.effects:
        parts.append(f"--handler-effects {','.join(f.effects)}")
    parts += [f"--inject {i.spec()}" for i in f.injections]
    return " ".join(parts)


def _verdict(v: VariantResult) -> str:
    return "safe" if v.safe else "NOT SAFE"


def _cost_cell(c: ReturnCost) -> str:
    if not c.writes:
        return "0"
    return f"{c.writes}" + (f" ({c.redundant} redundant)" if c.redundant else "")


def demo_text(result: DemoResult) -> str:
    cfg = result.config
    sets = ", ".join(str(fs) for fs in cfg.feature_sets)
    lines = [f"entrycheck demo: the bundled entry fixture ({FIXTURE}) in {len(result.variants)} variants,",
             f"assembled with {result.assembler}."]
    lines += _wrap(f"Each variant: {len(cfg.scenarios)} scenarios x {len(cfg.feature_sets)} feature sets "
                   f"({sets}); {', '.join(v.label for v in cfg.vectors)} injected at every instruction "
                   f"boundary, depth {cfg.depth}.", "")
    for v in result.variants:
        lines.append("")
        head = f"variant {v.variant.number}  {v.variant.name:<26s}{_verdict(v):<10s}"
        lines.append(f"{head}{f'{v.runs} runs':>{WIDTH - len(head)}}")
        lines += _wrap(v.variant.description, "    ")
        for name in v.invariants():
            lines += _finding_lines(v, name)
    lines.append("")
    lines += _cost_table(result)
    lines.append("")
    problems = result.problems
    if problems:
        lines.append("UNEXPECTED:")
        for p in problems:
            lines += _wrap(p, "    ")
    else:
        safe = [str(v.variant.number) for v in result.variants if v.safe]
        unsafe = [str(v.variant.number) for v in result.variants if not v.safe]
        lines += _wrap(f"As expected: variants {' and '.join(safe)} are safe; the broken variants "
                       f"{' and '.join(unsafe)} are caught.", "")
    if result.kept_in is None and any(not v.safe for v in result.variants):
        lines += _wrap("To replay a reproducer with 'entrycheck trace', rerun with --keep DIR: the "
                       "assembled objects stay in DIR.", "")
    return "\n".join(lines)


def _finding_lines(v: VariantResult, invariant: str) -> list[str]:
    f = v.shortest(invariant)
    n = v.count(invariant)
    designed = " - designed to trip this" if invariant in v.variant.designed_to_trip else ""
    out = [f"  {invariant} ({n} finding{'s' if n != 1 else ''}){designed}"]
    out += _wrap(f.message, "      ")
    out += _wrap(f"reproducer: inject {chain(f)}", "      ")
    out += _wrap(f"into scenario {f.scenario}, features {f.features}", " " * 18)
    cmd = replay_command(v, f)
    if cmd:
        out += textwrap.wrap(f"replay: {cmd}", WIDTH, initial_indent="      ", subsequent_indent=" " * 10,
                             break_long_words=True, break_on_hyphens=False)
    return out


def _cost_table(result: DemoResult) -> list[str]:
    shown = [v for v in result.variants if v.variant.expect_safe]
    lines = ["CR3 writes per paranoid return from kernel context (the exception",
             "interrupted kernel code running with the kernel CR3; no injection):"]
    head = f"  {'scenario':<18s}{'features':<11s}" + "".join(f"{v.variant.name:<25.24s}" for v in shown)
    lines.append(head.rstrip())
    for features in COST_FEATURES:
        for name in COST_SCENARIOS:
            cells = [next(c for c in v.costs if c.scenario == name and c.features == features) for v in shown]
            row = f"  {name:<18s}{features:<11s}" + "".join(f"{_cost_cell(c):<25s}" for c in cells)
            lines.append(row.rstrip())
    lines += _wrap("Redundant: a write that leaves CR3 as it was, with nothing to flush.", "")
    return lines


# ---- JSON -------------------------------------------------------------------------------
def demo_json(result: DemoResult) -> dict:
    cfg = result.config
    return {
        "entrycheck_version": __version__,
        "fixture": FIXTURE,
        "assembler": result.assembler,
        "scenarios": list(cfg.scenarios),
        "feature_sets": [str(fs) for fs in cfg.feature_sets],
        "vectors": [v.label for v in cfg.vectors],
        "depth": cfg.depth,
        "kept_in": str(result.kept_in) if result.kept_in is not None else None,
        "as_expected": result.as_expected,
        "problems": list(result.problems),
        "variants": [_variant_json(v) for v in result.variants],
    }


def _variant_json(v: VariantResult) -> dict:
    return {
        "variant": v.variant.number,
        "name": v.variant.name,
        "description": v.variant.description,
        "expected": "safe" if v.variant.expect_safe else "not safe",
        "designed_to_trip": list(v.variant.designed_to_trip),
        "verdict": "safe" if v.safe else "not safe",
        "object": str(v.object_path) if v.object_path is not None else None,
        "runs": v.runs,
        "converged_runs": v.converged,
        "stopped_because": v.stopped_because,
        "violations_by_invariant": invariant_counts(v),
        "reproducers": [_reproducer_json(v, name) for name in v.invariants()],
        "violations": [f.to_json() for f in v.findings],
        "paranoid_return_cr3": [{"scenario": c.scenario, "features": c.features, "writes": c.writes,
                                 "redundant_writes": c.redundant, "flushing_writes": c.flushing,
                                 "noflush_writes": c.noflush, "sites": dict(c.sites)} for c in v.costs],
    }


def _reproducer_json(v: VariantResult, invariant: str) -> dict:
    f = v.shortest(invariant)
    return {"invariant": invariant, "scenario": f.scenario, "features": str(f.features),
            "injections": [i.to_json() for i in f.injections], "inject": [i.spec() for i in f.injections],
            "site": f.site, "message": f.message, "command": replay_command(v, f)}
