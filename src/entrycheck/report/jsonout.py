"""JSON documents of check and trace (DESIGN.md §4): deterministic, keys sorted by the writer."""

from __future__ import annotations

from collections import Counter

from entrycheck import __version__
from entrycheck.explore.check import CheckResult
from entrycheck.explore.paths import Cost
from entrycheck.explore.replay import Trace
from entrycheck.image.image import Image
from entrycheck.kernelabi.linux import speculation_checked
from entrycheck.machine import events as ev
from entrycheck.machine.model import decode_cr3


def findings_json(findings, cfg) -> list[dict]:
    """Findings as JSON, each of a set run under --allow-infeasible with the rule it breaks."""
    bad = cfg.infeasible_sets()
    out = []
    for f in findings:
        d = f.to_json()
        if str(f.features) in bad:
            d["infeasible"] = bad[str(f.features)]
        out.append(d)
    return out


def fix_groups(findings) -> list[dict]:
    """The findings by what one fix changes (explore/fixes.py), each naming its findings by
    their index in the list of findings."""
    from entrycheck.explore.fixes import group

    index = {id(f): k for k, f in enumerate(findings)}
    return [g.to_json(index) for g in group(findings)]


def configurations_json(cfg) -> list[dict]:
    """Per feature set, the CPU and boot options that have it, or the rule it breaks."""
    return [{"features": fs, "cpu": cpu or None, **({"infeasible": rule} if rule else {})}
            for fs, cpu, rule in cfg.configurations]


def check_json(result: CheckResult, *, target: str, kernel_version: str | None, feature_numbers: str,
               matches: list | None = None, baseline: tuple | None = None, redundant=(), coverage=(),
               kernel_c: str = "") -> dict:
    """``matches``: per finding its address-free identity (explore/baseline.py); ``baseline``:
    (the file, the findings not in it)."""
    cfg = result.config
    violations = findings_json(result.findings, cfg)
    if matches is not None:
        for v, m in zip(violations, matches):
            v["match"] = m
    extra = {}
    if baseline is not None:
        new = {id(f) for f in baseline[1]}
        for v, f in zip(violations, result.findings):
            v["known"] = id(f) not in new
        extra["baseline"] = {"file": baseline[0], "known": len(result.findings) - len(new), "new": len(new)}
    if coverage:
        extra["coverage"] = [{"object": c.name, "instructions": c.total, "covered": c.covered,
                              "percent": round(c.percent, 2), "runnable_percent": round(c.runnable_percent, 2),
                              "uncovered": [{"first": s.first, "last": s.last, "count": s.count, "why": s.why}
                                            for s in c.spans]} for c in coverage]
    base = result.cost()
    every = result.total_cost()
    by_invariant = Counter(f.invariant for f in result.findings)
    return {
        "entrycheck_version": __version__,
        "target": target,
        "kernel_version": kernel_version,
        "kernel_c": kernel_c,
        "feature_numbers": feature_numbers,
        "feature_sets": [str(fs) for fs in result.feature_sets],
        "configurations": configurations_json(cfg),
        "scenarios": list(cfg.scenarios),
        "vectors": [v.label for v in cfg.vectors],
        "depth": cfg.depth,
        "paths_only": [str(fs) for fs in cfg.paths_only],
        "user_values": {v: sets for v, sets in result.user_values.items()},
        "handler_effects": [e.value for e in cfg.effects],
        "runs": result.runs,
        "converged_runs": result.converged,
        "skipped_points": result.skipped,
        **({"mispredicted_branches": result.speculated} if result.speculated else {}),
        "stopped_because": result.stopped_because,
        "errors": list(result.errors),
        "violations": violations,
        "fixes": fix_groups(result.findings),
        "speculation_checked": speculation_checked(result.feature_sets),
        "not_checked": list(cfg.not_checked),
        "violations_before_dedup": result.all_findings,
        "violations_by_invariant": dict(sorted(by_invariant.items())),
        "cr3": base.cr3_json(),
        "cost": base.to_json(),
        "cr3_sites": dict(base.cr3_sites),
        "redundant_sites": dict(base.redundant_sites),
        "redundant_writes": [w.to_json() for w in redundant],
        "all_paths": {"cost": every.to_json(), "cr3_sites": dict(every.cr3_sites),
                      "redundant_sites": dict(every.redundant_sites)},
        "paths": [{"scenario": p.scenario, "features": str(p.features), "effects": list(p.effects),
                   "outcome": p.outcome, "cr3": p.cost.cr3_json()}
                  for p in result.base_paths()],
        **extra,
    }


def _event_json(e: ev.Event, image: Image) -> dict:
    out: dict = {"step": e.step, "at": image.symbolize(e.pc), "event": type(e).__name__}
    if isinstance(e, ev.Cr3Written):
        w = e.write
        out.update(written=f"{w.written:#x}", value=f"{w.new:#x}", decoded=decode_cr3(w.written),
                   noflush=w.noflush, redundant=w.redundant, stale_made_current=w.stale_made_current,
                   flushed=[f"{p:#x}" for p in w.flushed])
    elif isinstance(e, ev.Cr3Read):
        out.update(value=f"{e.value:#x}")
    elif isinstance(e, ev.MsrWritten):
        out.update(msr=f"{e.write.msr:#x}", value=f"{e.write.new:#x}", redundant=e.write.redundant)
    elif isinstance(e, ev.MsrRead):
        out.update(msr=f"{e.msr:#x}", value=f"{e.value:#x}")
    elif isinstance(e, ev.GsChange):
        out.update(how=e.how, gs_base=f"{e.gs_base:#x}", kernel_gs_base=f"{e.kernel_gs_base:#x}")
    elif isinstance(e, ev.Delivered):
        out.update(vector=e.vector.label, stack=f"{e.stack:#x}", latched=e.from_latch,
                   **({"single_step": True} if e.single_step else {}),
                   frame={"rip": f"{e.frame.rip:#x}", "cs": f"{e.frame.cs:#x}", "rsp": f"{e.frame.rsp:#x}"})
    elif isinstance(e, ev.Latched):
        out.update(vector=e.vector.label)
    elif isinstance(e, ev.Resumed):
        out.update(vector=e.injection.vector.label)
    elif isinstance(e, ev.Iret):
        out.update(to=image.symbolize(e.frame.rip), to_user=e.to_user)
    elif isinstance(e, ev.IretFaulted):
        out.update(vector=e.vector.label, error_code=f"{e.error_code:#x}", reason=e.reason,
                   to=f"{e.frame.rip:#x}")
    elif isinstance(e, ev.Sysret):
        out.update(to=f"{e.rip:#x}")
    elif isinstance(e, ev.StubCall):
        out.update(function=e.name, returns_to=image.symbolize(e.return_address), note=e.note)
    elif isinstance(e, ev.Fence):
        out.update(kind=e.kind)
    elif isinstance(e, ev.Fault):
        out.update(kind=e.kind.value, message=e.message)
    elif isinstance(e, ev.Ended):
        out.update(outcome=e.outcome.value, reason=e.reason)
    return out


def trace_json(t: Trace, image: Image, *, target: str, kernel_version: str | None, features: str) -> dict:
    from entrycheck.report.disasm import instruction_text

    cost: Cost = t.cost
    return {
        "entrycheck_version": __version__,
        "target": target,
        "kernel_version": kernel_version,
        "scenario": t.scenario.name,
        "features": features,
        "injections": [i.to_json() for i in t.injections],
        "instructions": [{"step": s.step, "at": image.symbolize(s.pc), "text": instruction_text(image, s.pc),
                          "rsp": f"{s.rsp:#x}"} for s in t.steps],
        "events": [_event_json(e, image) for e in t.events],
        "totals": {**cost.to_json(), "outcome": _outcome_name(t), "instructions": len(t.steps)},
        "outcome": _outcome_name(t),
        "violations": [{"invariant": v.invariant, "at": image.symbolize(v.pc), "step": v.step, "message": v.message}
                       for v in t.violations],
        "unknown_functions": list(t.unknown_functions),
    }


def _outcome_name(t: Trace) -> str:
    return t.outcome.value
