"""A finding class written up for the maintainers: `check --format mail`.

Plain text in 72 columns: subject, what happens, what it needs, the shortest
reproducer, the trace before it (with source lines when the build has DWARF), where
else the class shows, and, where the fix is mechanical, the suggested diff — for a #DB
that re-enters its IST stack after an access to data hw_breakpoint.c does not protect,
the lines that add that data to within_cpu_entry().
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from entrycheck import __version__
from entrycheck.explore import fixes
from entrycheck.explore.paths import Finding
from entrycheck.kernel.guards import BREAKPOINT_SOURCE
from entrycheck.props.invariants import INVARIANTS, VERW_AFTER_NMI
from entrycheck.report.text import ROOT_CAUSE, reproduce_command, shell_lines
from entrycheck.report.text import _wrap as text_wrap

WIDTH = 72


def _wrap(text: str, indent: str = "", first: str | None = None) -> list[str]:
    return text_wrap(text, indent, first, WIDTH)


def classes(findings: list[Finding]) -> list[str]:
    """Invariants in report order: root causes first, then the easiest to reach."""
    names = list(dict.fromkeys(f.invariant for f in findings))
    return sorted(names, key=lambda inv: (inv != ROOT_CAUSE,
                                          min(f.reach for f in findings if f.invariant == inv)))


def class_findings(findings: list[Finding], invariant: str | None) -> list[Finding]:
    """The findings of ``invariant`` (default: the first class in report order)."""
    name = invariant or classes(findings)[0]
    return [f for f in findings if f.invariant == name]


def write(findings: list[Finding], *, target: str, kernel_version: str | None, invariant: str | None,
          source_tree: Path | None, source_line: Callable[[Finding, str], str | None],
          verify: Callable[[list[Finding], "Fix"], tuple[int, int, list[Finding]]] | None = None) -> str:
    """The mail for the findings of ``invariant`` (default: the first class in report order).
    ``verify(class findings, fix)``: (how many of them the fix removes, of how many, the
    findings it adds), from a check with the fix applied."""
    fs = class_findings(findings, invariant)
    name = fs[0].invariant
    shortest = min(fs, key=lambda f: (f.reach, len(f.injections), fs.index(f)))
    symbol = shortest.site.partition("+")[0]
    inv = INVARIANTS.get(name)
    fix = suggested_fix(fs, source_tree)
    verified = verify(fs, fix) if fix and verify is not None else None
    proven = fix is not None and verified is not None and verified[0] > 0
    lines = [subject(fix if proven else None, f"{name} in {symbol}", name)]
    lines.append("")
    lines += _wrap(f"Found by exhaustive exception injection into the compiled entry code of {target}"
                   + (f" (kernel {kernel_version})" if kernel_version else "")
                   + f", feature set {shortest.features}. {len(fs)} distinct path(s) show it.")
    lines += [""] + _wrap("Reach: " + reach_line(shortest))
    lines += ["", "What happens"]
    lines += _wrap(shortest.message, "  ", "  ")
    if inv is not None:
        lines.append("")
        lines += _wrap(inv.rationale, "  ", "  ")
    if shortest.folded:
        lines.append("")
        lines += _wrap("What breaks after it (symptoms): " + ", ".join(shortest.folded) + ".", "  ", "  ")
    lines += ["", f"What it needs ({shortest.reach.label})"]
    for p in shortest.preconditions:
        lines += _wrap(f"{p.text} ({p.reach.label})", "    ", "  - ")
    origin = introduced(fs)
    lines += ["", "Introduced by"]
    lines += _wrap(origin[1] if origin else "not known to entrycheck: the tree carries no history and no "
                   "change entrycheck cites matches this class.", "  ", "  ")
    lines += ["", "Reproduce"]
    lines += _shell(reproduce_command(target, shortest))
    if shortest.trace:
        lines += ["", "The instructions before it"]
        for t in shortest.trace:
            src = source_line(shortest, t.partition(":")[0])
            lines += _wrap(t + (f"  [{src}]" if src else ""), "      ", "  ")
    others = Counter(f.site for f in fs if f is not shortest)
    if others:
        lines += ["", "Also at"]
        lines += _wrap(", ".join(f"{s} (x{n})" if n > 1 else s for s, n in sorted(others.items())[:12])
                       + (" ..." if len(others) > 12 else ""), "  ", "  ")
    lines += ["", "Suggested fix"]
    groups = fixes.group(fs)
    if fix and verified is not None and verified[0] == 0:
        lines += _wrap(f"{fix.what} was tried and removed none of these findings: no fix to suggest.", "  ", "  ")
    elif fix:
        lines += _wrap(f"{fix.what}, {fix.why}.", "  ", "  ")
        if verified is None:
            lines += _wrap("Not verified: no check was run with it.", "  ", "  ")
        else:
            gone, total, added = verified
            # The fix's own VERW moves the known corner case here: an NMI after it returns without one.
            known = [f for f in added if f.invariant == "verw-missing" and VERW_AFTER_NMI in f.message]
            added = [f for f in added if f not in known]
            lines += _wrap(f"Verified by entrycheck with the change applied: {gone} of the {total} "
                           f"findings fixed, {len(added)} new"
                           + (": " + ", ".join(sorted({f'{f.invariant} at {f.site}' for f in added})[:6])
                              if added else "") + "."
                           + (f" {len(known)} finding(s) now show the corner case the IDT exits have too: an NMI "
                              "after the exit's VERW returns to it without one (entry_64.S leaves it on "
                              "purpose)." if known else ""), "  ", "  ")
        lines.append("")
        if origin and origin[2] and proven:
            lines += [f"Fixes: {origin[0]}", ""]
        lines += fix.diff.rstrip("\n").splitlines()
    elif all(g.documented for g in groups):
        lines += _wrap("None: the kernel leaves this on purpose: " + groups[0].documented + ".", "  ", "  ")
    else:
        lines += _wrap("Not mechanical: the trace above shows where the path goes wrong.", "  ", "  ")
    lines += ["", "-- ", f"entrycheck {__version__}"]
    return "\n".join(lines) + "\n"


# IBRS_EXIT restores the SPEC_CTRL IBRS_ENTER saved; IBRS_ENTER wrote nothing when that value
# had IBRS set (calling.h: "test $SPEC_CTRL_IBRS, %eax; jz .Ldo_wrmsr"), so the MSR still holds it.
_IBRS_EXIT_SAVED = "\tmov\t\\save_reg, %rdx\n"
_IBRS_EXIT_SKIP = ("\t/* IBRS_ENTER wrote nothing if IBRS was on: the MSR holds it */\n"
                   "\ttestl\t$SPEC_CTRL_IBRS, %edx\n\tjnz\t.Lend_\\@\n")


def redundant_fix(w, source_tree: Path | None) -> Fix | None:
    """The mechanical fix of a redundant SPEC_CTRL write by IBRS_EXIT with a saved value (the
    paranoid and NMI returns): skip the write when the saved value has IBRS, as
    PARANOID_RESTORE_CR3 skips the CR3 write when the saved CR3 is the current one."""
    if w.register != "SPEC_CTRL" or source_tree is None or "held since" in w.held_since:
        return None
    path = "arch/x86/entry/calling.h"
    try:
        old = (Path(source_tree) / path).read_text()
    except OSError:
        return None
    start = old.find(".macro IBRS_EXIT save_reg")
    at = old.find(_IBRS_EXIT_SAVED, start)
    if start < 0 or at < 0 or old.count(_IBRS_EXIT_SAVED) != 1:
        return None
    at += len(_IBRS_EXIT_SAVED)
    new = old[:at] + _IBRS_EXIT_SKIP + old[at:]
    return Fix("Skip IBRS_EXIT's write when the value IBRS_ENTER saved has IBRS set",
               "as PARANOID_RESTORE_CR3 skips the CR3 write when the saved CR3 is current: IBRS_ENTER "
               "did not write SPEC_CTRL then, so it still holds that value", path, new, _diff(path, old, new, 3),
               True, "Skip IBRS_EXIT's redundant SPEC_CTRL write")


def write_redundant(w, *, target: str, kernel_version: str | None, others=(), source_tree: Path | None = None,
                    verify: Callable[[object, "Fix"], tuple[int, int, list[Finding]]] | None = None) -> str:
    """The mail for one redundant-write site (explore/redundant.py).  ``verify(w, fix)``: (the
    redundant writes of that register on the paths without injection before and after the fix,
    the findings it adds)."""
    scenario, features = w.paths[0]
    fix = redundant_fix(w, source_tree)
    verified = verify(w, fix) if fix is not None and verify is not None else None
    proven = fix is not None and verified is not None and verified[1] < verified[0]
    lines = [subject(fix if proven else None, f"redundant {w.register} write at {w.site}",
                     f"redundant {w.register} write")]
    lines.append("")
    lines += _wrap(f"Found by running the compiled entry code of {target}"
                   + (f" (kernel {kernel_version})" if kernel_version else "")
                   + f" on a model CPU, feature set {features}.")
    lines += ["", "What happens"]
    lines += _wrap(f"{w.why}. It happens {w.per_path_text()} through {w.site}: {w.writes} time(s) on "
                   f"the {len(w.paths)} path(s) without injection ({', '.join(sorted({s for s, _ in w.paths}))}), "
                   f"{w.all_writes} time(s) over every explored path.", "  ", "  ")
    lines += ["", "When it could be skipped"]
    lines += _wrap(w.skip_if + ", as PARANOID_RESTORE_CR3 skips the CR3 write when the saved CR3 is "
                   "the current one.", "  ", "  ")
    lines += ["", "What it costs"]
    lines += _wrap(f"{w.cycles} cycles per write (an estimate), "
                   f"{w.cycles * w.writes} on these paths.", "  ", "  ")
    lines += ["", "Reproduce"]
    lines += _shell(f"entrycheck trace {target} --scenario {scenario} --features {features}")
    if others:
        lines += ["", "Other redundant writes"]
        lines += _wrap(", ".join(f"{o.site} ({o.register})" for o in others), "  ", "  ")
    lines += ["", "Suggested fix"]
    if fix is not None and (verified is None or verified[1] < verified[0]):
        lines += _wrap(f"{fix.what}, {fix.why}.", "  ", "  ")
        if verified is None:
            lines += _wrap("Not verified: no check was run with it.", "  ", "  ")
        else:
            before, after, added = verified
            lines += _wrap(f"Verified by entrycheck with the change applied: {w.register} written "
                           f"redundantly {before} time(s) on these paths before, {after} after; {len(added)} "
                           "new findings" + (": " + ", ".join(sorted({f'{f.invariant} at {f.site}'
                                                                       for f in added})[:6]) if added else "")
                           + ".", "  ", "  ")
        lines.append("")
        lines += fix.diff.rstrip("\n").splitlines()
    else:
        lines += _wrap(("A fix was tried and removed none of them. " if fix is not None else "")
                       + f"Not mechanical: test the condition above before the write at {w.site} and skip it; "
                       "entrycheck review of such a patch shows whether every path still restores what it "
                       "must.", "  ", "  ")
    lines += ["", "-- ", f"entrycheck {__version__}"]
    return "\n".join(lines) + "\n"


# The subsystem prefix of a change to each file, as the tree's history names it.
_SUBSYSTEM = {
    "arch/x86/kernel/hw_breakpoint.c": "x86/hw_breakpoint",
    "arch/x86/entry/entry_64_fred.S": "x86/fred",
    "arch/x86/entry/entry_64.S": "x86/entry/64",
    "arch/x86/entry/calling.h": "x86/entry",
}


def subject(fix: Fix | None, what: str, short: str = "") -> str:
    """The mail's subject: a patch's when a fix was verified, else a report's (``short`` when
    ``what`` makes it too long)."""
    if fix is not None and fix.summary:
        line = f"Subject: [PATCH] {_SUBSYSTEM.get(fix.file, 'x86/entry')}: {fix.summary}"
        if len(line) <= WIDTH:
            return line
    line = f"Subject: [BUG] x86/entry: {what}"
    return line if len(line) <= WIDTH or not short else f"Subject: [BUG] x86/entry: {short}"


def reach_line(f: Finding) -> str:
    """Who can cause the finding and on which machine, in one line."""
    machine = [p.text for p in f.preconditions if p.kind == "machine"]
    return f.reach.label + (f"; {machine[0]}" if machine else "")


# Where a class comes from, as the history entrycheck cites has it: (invariant, where it shows —
# a site's symbol or a datum a breakpoint watches —, commit, what it did).
INTRODUCED = (
    ("verw-missing", "asm_fred_exit_user", "6613d82e617d",
     "6613d82e617d moved the exit-to-user VERW out of C into the IDT exits' assembly; the FRED exit "
     "to user mode has none, and no C code on its path clears the buffers any more."),
    ("swapgs-unfenced", "native_irq_return_ldt", "18ec54fdd6d1",
     "18ec54fdd6d1 fenced the SWAPGS of the kernel entries against speculation; the espfix64 "
     "return to kernel mode, which runs SWAPGS twice, was left out."),
    ("ist-reentered", "cpu_current_top_of_stack", "1591584e2e76",
     "1591584e2e76 moved the top of stack out of cpu_tss_rw, which within_cpu_entry() refuses, into "
     "a per-cpu variable it does not refuse."),
)


def introduced(findings: list[Finding]) -> tuple[str, str, bool] | None:
    """(commit, why, whether it accounts for the whole class) of the change that introduced the
    class, if a cited one matches it: at its site, or for one of the data its breakpoints watch
    (the others' origin unknown)."""
    sites = {f.site.partition("+")[0] for f in findings}
    data = watched_data(findings)
    for invariant, where, commit, why in INTRODUCED:
        if findings[0].invariant != invariant:
            continue
        if where in sites:
            return commit, why, True
        if where in data:
            rest = [d for d in data if d != where]
            return commit, f"for {where}: {why}" + (
                f" For {', '.join(rest)}: not known to entrycheck." if rest else ""), not rest
    return None


def _shell(command: str) -> list[str]:
    """A command split before its options, each line ending in a backslash; an option too long
    for a line is cut inside its value (backslash-newline joins the pieces)."""
    parts = re.split(r" (?=--)", command)
    out: list[str] = []
    for k, part in enumerate(parts):
        chunk = shell_lines(part, "        ", "  " if k == 0 else "      ", WIDTH - 2)
        if k + 1 < len(parts):
            chunk[-1] += " \\"
        out += chunk
    return out


def watched_data(findings: list[Finding]) -> list[str]:
    """The per-cpu variables the class's #DB preconditions name (breakpoints on them)."""
    return fixes.watched_data(findings, per_cpu_only=True)


@dataclass(frozen=True)
class Fix:
    """A mechanical fix: what it does and why, the file it changes, that file as the fix leaves
    it and the unified diff.  ``compiled``: the file is built into the image (the fix is checked
    by building it), else the checks read it from the tree."""

    what: str
    why: str
    file: str
    patched: str
    diff: str
    compiled: bool
    summary: str = ""              # the patch's subject after the subsystem prefix


# Fixes that add one line of the entry code after another: (invariant, site symbol, file,
# the line after which, the line to add, what, why, the patch's subject).
_ASM_FIXES = (
    ("swapgs-unfenced", "native_irq_return_ldt", "arch/x86/entry/entry_64.S",
     "\tswapgs\t\t\t\t\t/* to kernel GS */\n", "\tFENCE_SWAPGS_USER_ENTRY\n",
     "Fence the espfix64 exit's SWAPGS with FENCE_SWAPGS_USER_ENTRY",
     "as 18ec54fdd6d1 fenced the entries' SWAPGS: without PTI nothing serialises before the per-cpu "
     "load of espfix_waddr, which a mispredicted SS test reaches with the user GSBASE",
     "Fence SWAPGS in the espfix64 return"),
    ("verw-missing", "asm_fred_exit_user", "arch/x86/entry/entry_64_fred.S",
     "SYM_INNER_LABEL(asm_fred_exit_user, SYM_L_GLOBAL)\n\tFRED_EXIT\n", "\tCLEAR_CPU_BUFFERS\n",
     "Clear the CPU buffers before ERETU in asm_fred_exit_user",
     "as the IDT exits to user mode do since 3c7501722e6b put VERW just before the user-space "
     "transition in assembly and 6613d82e617d left it to the asm exits: the FRED exit was added "
     "without it, and no C code on its path does it",
     "Clear CPU buffers before ERETU to user mode"),
)


def suggested_fix(findings: list[Finding], source_tree: Path | None) -> Fix | None:
    """The mechanical fix of a class, or None: for an ist-reentered class that a #DB after an
    access to unprotected per-cpu data causes, those data added to within_cpu_entry(); for
    the classes of ``_ASM_FIXES`` at their site, the line they lack."""
    if not findings or source_tree is None:
        return None
    if findings[0].invariant != ROOT_CAUSE:
        return _asm_fix(findings, source_tree)
    names = watched_data(findings)
    if not names:
        return None
    path = Path(source_tree) / BREAKPOINT_SOURCE
    try:
        old = path.read_text()
    except OSError:
        return None
    m = re.search(r"\bwithin_cpu_entry\s*\([^)]*\)\s*\{", old)
    if not m:
        return None
    body_end = old.find("\n}\n", m.end())
    loop = old.rfind("for_each_possible_cpu(cpu)", m.end(), body_end)
    last = old.rfind("\t\t\treturn true;\n", loop if loop >= 0 else m.end(), body_end)
    if loop < 0 or last < 0:
        return None
    at = last + len("\t\t\treturn true;\n")
    # Laid out to stay within 72 columns with 8-column tabs.
    add = "".join(f"\n\t\t/* The entry code reads it on an IST stack. */\n"
                  f"\t\tif (within_area(addr, end, (unsigned long)&per_cpu(\n"
                  f"\t\t\t\t{n}, cpu),\n\t\t\t\tsizeof({n})))\n\t\t\treturn true;\n" for n in names)
    new = old[:at] + add + old[at:]
    short = f"Protect {names[0]}" if len(names) == 1 and len(names[0]) <= 30 else \
        "Refuse breakpoints on entry data"
    return Fix(f"Refuse hardware breakpoints on {', '.join(names)} in within_cpu_entry()",
               "as on the other data the entry code reads there", BREAKPOINT_SOURCE, new,
               _diff(BREAKPOINT_SOURCE, old, new, 1), False, short)


def _diff(path: str, old: str, new: str, context: int) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}",
                                        n=context))


def _asm_fix(findings: list[Finding], source_tree: Path) -> Fix | None:
    for invariant, symbol, path, after, add, what, why, short in _ASM_FIXES:
        if not all(f.invariant == invariant and f.site.startswith(symbol) for f in findings):
            continue
        try:
            old = (Path(source_tree) / path).read_text()
        except OSError:
            return None
        if old.count(after) != 1:
            return None
        new = old.replace(after, after + add)
        return Fix(what, why, path, new, _diff(path, old, new, 3), True, short)
    return None


__all__ = ["Fix", "INTRODUCED", "introduced", "reach_line", "subject", "redundant_fix", "write", "write_redundant",
           "classes", "class_findings", "suggested_fix", "watched_data"]
