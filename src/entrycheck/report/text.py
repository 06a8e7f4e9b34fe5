"""Plain-text reports that fit 80 columns and paste well into a mail reply."""

from __future__ import annotations

import shlex
import textwrap
from collections import defaultdict

from entrycheck.explore.check import CheckResult
from entrycheck.explore.coverage import COPY
from entrycheck.explore.paths import Cost, Finding
from entrycheck.explore.replay import Trace
from entrycheck.image.image import Image
from entrycheck.kernelabi.linux import speculation_checked
from entrycheck.machine import events as ev
from entrycheck.machine.model import decode_cr3

WIDTH = 80


ROOT_CAUSE = "ist-reentered"


def _wrap(text: str, indent: str = "", first: str | None = None, width: int = WIDTH) -> list[str]:
    """Wrap to ``width`` columns (80); continuation lines get ``indent``, the first ``first``
    (default: indent)."""
    first = indent if first is None else first
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [first.rstrip()]


def reproduce_command(target: str, f: Finding, infeasible: bool = False) -> str:
    """The trace command that replays ``f`` (``infeasible``: its set is on no machine)."""
    parts = [f"entrycheck trace {target} --scenario {f.scenario}", f"--features {f.features}"]
    if infeasible:
        parts.append("--allow-infeasible")
    if f.effects:
        parts.append(f"--handler-effects {','.join(f.effects)}")
    parts += [f"--inject {i.spec()}" for i in f.injections]
    return " ".join(parts)


def shell_lines(command: str, indent: str, first: str, width: int = WIDTH) -> list[str]:
    """A shell command in lines of at most ``width`` columns that can be pasted as printed:
    wrapped between its words (each quoted for a shell), each line but the last ending in a
    backslash.  A word longer than a line goes on at column 0 of the next (backslash-newline
    joins the two)."""
    lines: list[str] = []
    line, empty = first, True
    for raw in shlex.split(command):
        word = shlex.quote(raw)
        if not empty and len(line) + 1 + len(word) > width - 2:
            lines.append(line + " \\")
            line = indent
        elif not empty:
            line += " "
        empty = False
        while len(line) + len(word) > width - 1:
            room = width - 2 - len(line)                 # the backslash is the last column
            cut = room
            while cut > 1 and len(shlex.quote(raw[:cut])) > room:
                cut -= 1
            lines.append(line + shlex.quote(raw[:cut]) + "\\")
            line, raw = "", raw[cut:]
            word = shlex.quote(raw)
        line += word
    return lines + [line]


def cost_lines(cost: Cost, title: str) -> list[str]:
    out = [f"{title}:", f"  {cost.cr3_writes} (flushing {cost.cr3_flushing}, NOFLUSH "
           f"{cost.cr3_noflush}, redundant {cost.cr3_redundant})"]
    if cost.cr3_sites:
        out.append("  by site (writes):")
        out += [f"    {site:<60.60s}{n:>8d}" for site, n in cost.cr3_sites]
    if cost.redundant_sites:
        out.append("  redundant writes (CR3 unchanged with nothing to flush, or an MSR")
        out.append("  written with the value it held), by site:")
        out += [f"    {site:<60.60s}{n:>8d}" for site, n in cost.redundant_sites]
    out.append(f"MSR writes: {cost.msr_writes} (redundant {cost.msr_redundant}); SWAPGS: {cost.swapgs}")
    return out


def redundant_lines(writes) -> list[str]:
    """The redundant writes of the paths without injection, each explained."""
    if not writes:
        return []
    out = ["", "Redundant writes on the paths without injection, explained:"]
    for w in writes:
        scen = ", ".join(sorted({s for s, _ in w.paths}))
        out += _wrap(f"{w.site}: {w.register} <- {w.value:#x}: {w.per_path_text()} through it, on "
                     f"{len(w.paths)} path(s) without injection ({scen}), {w.writes} in all; {w.all_writes} on "
                     f"all explored paths; {w.cycles} cycles each (estimate)", "      ", "  - ")
        out += _wrap(f"why: {w.why}", "      ", "    ")
        out += _wrap(f"skip it when: {w.skip_if}", "      ", "    ")
    return out


def coverage_lines(coverage, shown: int = 10) -> list[str]:
    """Per object: the share of its instructions the recorded paths executed, and what was not."""
    if not coverage:
        return []
    lines = ["", "Coverage (instructions the recorded paths executed, any feature set):"]
    for c in coverage:
        lines += _wrap(f"{c.name}: {c.percent:.1f}% ({c.covered} of {c.total}); {c.runnable_percent:.1f}% of the "
                       f"{c.total - c.explained} that can run here; {c.copied_percent:.1f}% counting {c.copies} "
                       "copies of code that ran", "    ", "  ")
        missing = [s for s in c.spans if not s.why]
        for s in missing[:shown]:
            lines += _wrap(f"not reached: {s.first}" + (f" .. {s.last}" if s.count > 1 else "")
                           + f" ({s.count})", "      ", "    - ")
        if len(missing) > shown:
            lines.append(f"    - ... {len(missing) - shown} more spans ({sum(s.count for s in missing[shown:])} "
                         "instructions; --json lists them)")
        why: dict[str, int] = {}
        for s in c.spans:
            if s.why and s.why != COPY:
                why[s.why] = why.get(s.why, 0) + s.count
        for reason, n in sorted(why.items(), key=lambda kv: -kv[1]):
            lines += _wrap(f"cannot run here ({n}): {reason}", "      ", "    - ")
    return lines


def paths_only_lines(cfg) -> list[str]:
    """What the sets explored at depth 0 whatever the depth are there for."""
    if not cfg.paths_only or cfg.depth == 0:
        return []
    return _wrap(f"and the {len(cfg.paths_only)} preset CPUs as they boot at depth 0: their paths and the "
                 "paths' mispredicted branches, for the speculation checks (--cpu presets injects there too)",
                 "    ", "")


def not_checked_lines(cfg) -> list[str]:
    """Entry code the object has that no feature set ran, each with how to run it."""
    return [line for what in cfg.not_checked for line in _wrap(f"not checked: {what}", "    ", "")]


def configuration_lines(cfg) -> list[str]:
    """Per feature set, the CPU and boot options that have it (or the rule it breaks)."""
    if not cfg.configurations:
        return []
    lines = _wrap("feature sets, each with a CPU and boot options that have it ('entrycheck cpus'):", "    ", "")
    for fs, cpu, rule in cfg.configurations:
        what = f"ON NO MACHINE: {rule}" if rule else cpu or "none of the presets has it"
        if cfg.depth and fs in {str(p) for p in cfg.paths_only}:
            what += " (depth 0)"
        if len(fs) + len(what) + 4 <= WIDTH:
            lines.append(f"  {fs}: {what}")
            continue
        # the set on lines of its own, cut after a comma (it is pasted back into --features)
        line = "  "
        for name in fs.split(","):
            if len(line) + len(name) + 1 > WIDTH - 1 and line.strip():
                lines.append(line)
                line = "    "
            line += name + ","
        lines.append(line[:-1] + ":")
        lines += _wrap(what, "      ", "      ")
    return lines


def finding_lines(findings: list[Finding], target: str, cfg, before_dedup: int) -> list[str]:
    """The findings, one entry per thing to fix (explore/fixes.py): root causes first, then
    the easiest to reach; each with its shortest path, how to replay it and its other sites."""
    from entrycheck.explore.fixes import group, to_fix

    groups = group(findings)
    documented = len(groups) - to_fix(groups)
    lines = _wrap(f"VIOLATIONS: {len(findings)} distinct ({before_dedup} before deduplication), {to_fix(groups)} "
                  "thing(s) to fix" + (f", {documented} corner case(s) the kernel leaves on purpose"
                                       if documented else ""), "    ", "")
    order = sorted(groups, key=lambda g: (g.invariant != ROOT_CAUSE, min(f.reach for f in g.findings),
                                          groups.index(g)))
    bad = cfg.infeasible_sets()
    for g in order:
        fs = list(g.findings)
        shortest = min(fs, key=lambda f: (f.reach, len(f.injections), fs.index(f)))
        lines.append("")
        lines += _wrap(f"{g.invariant}: {g.mechanism} ({len(fs)} distinct, {g.paths} paths; "
                       f"{shortest.reach.label} at the easiest)", "    ", "")
        if g.watched():
            lines += _wrap("data watched: " + ", ".join(g.watched()), "      ", "    ")
        if g.documented:
            lines += _wrap("not to fix: " + g.documented, "      ", "    ")
        needs = [p.text for p in shortest.preconditions]
        if needs:
            lines += _wrap("needs: " + "; ".join(needs), "      ", "    ")
        lines += _wrap(f"{shortest.message}", "    ", "  - ")
        lines += _wrap(f"at {shortest.site}, scenario {shortest.scenario}, features "
                       f"{shortest.features}" + (" (ON NO MACHINE: --allow-infeasible)"
                                                 if str(shortest.features) in bad else ""), "    ", "    ")
        folded = sorted({name for f in fs for name in f.folded})
        if folded:
            lines += _wrap("symptoms folded under it (--unfold lists them): " + ", ".join(folded), "    ", "    ")
        lines.append("    reproduce:")
        lines += shell_lines(reproduce_command(target, shortest, str(shortest.features) in bad), "        ",
                             "      ")
        others = [(s, n) for s, n in g.sites() if s != shortest.site]
        if others:
            lines += _wrap("also at (paths): " + ", ".join(f"{s} ({n})" for s, n in others[:8])
                           + (f" and {len(others) - 8} more" if len(others) > 8 else ""), "    ", "    ")
    return lines


def check_summary(result: CheckResult, *, target: str, kernel_version: str | None, redundant=(),
                  coverage=(), kernel_c: str = "") -> str:
    cfg = result.config
    lines = _wrap(f"entrycheck check {target}" + (f" (kernel {kernel_version})" if kernel_version else ""), "    ",
                  "")
    if kernel_c:
        lines += _wrap(kernel_c, "    ", "")
    lines += _wrap(f"{len(cfg.scenarios)} scenarios x {cfg.sets_at_depth()} feature sets"
                   + (f" x {len(cfg.branches())} handler-effect branches" if cfg.effects else "")
                   + f"; vectors {','.join(v.label for v in cfg.vectors)}; depth {cfg.depth}")
    lines += paths_only_lines(cfg)
    lines += configuration_lines(cfg)
    if not speculation_checked(result.feature_sets):
        lines += _wrap("not checked: speculation (no set has a CPU bug or a speculation mitigation such as "
                       "bug_swapgs, clear_cpu_buf or a return thunk); --cpu presets checks the seven preset "
                       "CPUs as they boot", "    ", "")
    lines += not_checked_lines(cfg)
    if result.user_values:
        n = len(result.feature_sets)
        shown = [v + ("" if len(sets) == n else f" ({len(sets)} sets)") for v, sets in result.user_values.items()]
        lines += _wrap(f"user values the entry code tells apart (depth {min(cfg.depth, cfg.user_depth)}): "
                       + ", ".join(shown), "    ", "")
    lines += _wrap(f"{result.runs} runs ({result.converged} rejoined a checked run early, "
                   f"{result.skipped} latched-NMI points shared); stopped: {result.stopped_because}")
    if result.speculated:
        lines += _wrap(f"{result.speculated} mispredicted branches followed (up to {cfg.spec_window} "
                       "instructions each)")
    for err in result.errors:
        lines += _wrap(f"exploration error (reported, the rest went on): {err}", "    ", "  ")
    lines.append("")
    if result.findings:
        lines += finding_lines(result.findings, target, cfg, result.all_findings)
    else:
        lines.append("No violations.")
    lines.append("")
    lines += cost_lines(result.cost(), "CR3 writes on the entry paths (no injection)")
    lines += redundant_lines(redundant)
    lines += coverage_lines(coverage)
    lines.append("")
    if result.findings:
        verdict = "VIOLATIONS FOUND"
    elif result.errors:
        verdict = f"INCOMPLETE ({len(result.errors)} exploration error(s) above; not checked there)"
    else:
        verdict = "clean"
    lines.append("Verdict: " + verdict)
    return "\n".join(lines)


def trace_text(t: Trace, image: Image, *, target: str, features: str) -> str:
    from entrycheck.report.disasm import instruction_text

    lines = [f"entrycheck trace {target} --scenario {t.scenario.name} --features {features}"]
    for i in t.injections:
        lines.append(f"  inject {i.spec()}")
    by_step: dict[int, list[ev.Event]] = defaultdict(list)
    for e in t.events:
        by_step[e.step].append(e)
    last_rsp = None
    from entrycheck.report.srclines import SourceLines

    src, last_src = SourceLines.from_object(image.loaded), None   # DWARF line info, if the object has it
    for e in by_step.get(0, []):
        lines += _event_lines(e, image)
    for s in t.steps:
        where = src.location(s.pc) if src else None
        if where and where != last_src:
            lines += _wrap(f"# {where}  {src.text(s.pc) or ''}".rstrip(), "          ", "      ")
        last_src = where or last_src
        rsp = f"  rsp={s.rsp:#x}" if s.rsp != last_rsp else ""
        last_rsp = s.rsp
        lines.append(f"{s.step:5d} {image.symbolize(s.pc):<34.34s} "
                     f"{instruction_text(image, s.pc)[:28]:<28s}{rsp}"[:WIDTH + 24])
        for e in by_step.get(s.step + 1, []):
            lines += _event_lines(e, image)
    c = t.cost
    lines.append("")
    lines.append(f"outcome: {t.outcome.value} ({t.reason})")
    lines.append(f"CR3 writes: {c.cr3_writes} (flushing {c.cr3_flushing}, NOFLUSH {c.cr3_noflush}, "
                 f"redundant {c.cr3_redundant}); MSR writes: {c.msr_writes}; SWAPGS: {c.swapgs}; "
                 f"exceptions: {c.exceptions}")
    if t.unknown_functions:
        lines += _wrap("unknown functions (returned): " + ", ".join(t.unknown_functions))
    if t.violations:
        lines.append("violations:")
        for v in t.violations:
            lines += _wrap(f"{v.invariant} at {image.symbolize(v.pc)}: {v.message}", "    ", "  - ")
    else:
        lines.append("violations: none")
    return "\n".join(lines)


def _event_lines(e: ev.Event, image: Image) -> list[str]:
    pre = "        -> "
    if isinstance(e, ev.Cr3Written):
        w = e.write
        what = "redundant" if w.redundant else ("NOFLUSH" if w.noflush else "flushing")
        return [f"{pre}CR3 := {w.new:#x} [{decode_cr3(w.written)}] ({what})"]
    if isinstance(e, ev.GsChange):
        return [f"{pre}{e.how}: GSBASE={e.gs_base:#x} KERNEL_GS_BASE={e.kernel_gs_base:#x}"]
    if isinstance(e, ev.MsrWritten):
        names = {0x48: "SPEC_CTRL", 0x49: "PRED_CMD", 0x17A: "MCG_STATUS"}
        name = names.get(e.write.msr, f"MSR {e.write.msr:#x}")
        return [f"{pre}{name} := {e.write.new:#x}" + (" (redundant)" if e.write.redundant else "")]
    if isinstance(e, ev.Delivered):
        how = " (latched, now delivered)" if e.from_latch else (" (single-step trap: TF)" if e.single_step else "")
        return [f"{pre}{e.vector.label.upper()} delivered at {image.symbolize(e.pc)}{how}, CPL 0, "
                f"rsp={e.stack:#x}"]
    if isinstance(e, ev.Latched):
        return [f"{pre}{e.vector.label.upper()} latched (NMIs blocked)"]
    if isinstance(e, ev.Mispredicted):
        return [f"{pre}mispredicted: speculatively on at {image.symbolize(e.target)} (nothing of it commits)"]
    if isinstance(e, ev.Branch):
        return [f"{pre}{'RET' if e.kind == 'ret' else 'indirect branch'} before {' and '.join(e.missing)}"]
    if isinstance(e, ev.Iret):
        return [f"{pre}{e.eret or 'IRET'} to {image.symbolize(e.frame.rip)} (CPL {e.frame.cs & 3}); NMIs "
                f"{'unblocked' if not e.eret or not e.cpu.nmi_blocked else 'still blocked'}"]
    if isinstance(e, ev.IretFaulted):
        return [f"{pre}{'ERETU' if e.reason.startswith('ERET') else 'IRET'} faults: {e.reason}; "
                f"{e.vector.label.upper()}({e.error_code:#x})"
                + ("" if e.reason.startswith("ERET") else ", NMIs unblocked")]
    if isinstance(e, ev.Sysret):
        return [f"{pre}SYSRET to {e.rip:#x} (CPL 3)"]
    if isinstance(e, ev.Resumed):
        return [f"{pre}{e.injection.vector.label} returned to what it interrupted"]
    if isinstance(e, ev.StubCall):
        return [f"{pre}C {e.name}()" + (f" [{e.note}]" if e.note else "")]
    if isinstance(e, ev.Fault):
        return [f"{pre}FAULT {e.kind.value}: {e.message}"]
    return []
