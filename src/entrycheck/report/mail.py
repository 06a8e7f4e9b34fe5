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
from pathlib import Path
from typing import Callable

from entrycheck import __version__
from entrycheck.explore.paths import Finding
from entrycheck.kernel.guards import BREAKPOINT_SOURCE
from entrycheck.props.invariants import INVARIANTS
from entrycheck.report.text import ROOT_CAUSE, reproduce_command
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
          verify: Callable[[list[Finding], str], tuple[int, int, list[Finding]]] | None = None) -> str:
    """The mail for the findings of ``invariant`` (default: the first class in report order).
    ``verify(class findings, the patched file)``: (how many of them the fix removes, of how
    many, the findings it adds), from a check with the fix applied."""
    fs = class_findings(findings, invariant)
    name = fs[0].invariant
    shortest = min(fs, key=lambda f: (f.reach, len(f.injections), fs.index(f)))
    symbol = shortest.site.partition("+")[0]
    inv = INVARIANTS.get(name)
    subject = f"Subject: x86/entry: {name} at {symbol}"
    lines = [subject + (f" ({shortest.reach.label})" if len(subject) + len(shortest.reach.label) < 69 else "")]
    lines.append("")
    lines += _wrap(f"Found by exhaustive exception injection into the compiled entry code of {target}"
                   + (f" (kernel {kernel_version})" if kernel_version else "")
                   + f", feature set {shortest.features}. {len(fs)} distinct path(s) show it.")
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
    fix = suggested_fix(fs, source_tree)
    verified = verify(fs, fix[2]) if fix and verify is not None else None
    lines += ["", "Suggested fix"]
    if fix and verified is not None and verified[0] == 0:
        lines += _wrap(f"Refusing breakpoints on {', '.join(fix[0])} in within_cpu_entry() was tried and "
                       "removed none of these findings: no fix to suggest.", "  ", "  ")
    elif fix:
        lines += _wrap(f"Refuse hardware breakpoints on {', '.join(fix[0])} in within_cpu_entry(), as on "
                       "the other data the entry code reads there.", "  ", "  ")
        if verified is None:
            lines += _wrap("Not verified: no check was run with it.", "  ", "  ")
        else:
            gone, total, added = verified
            lines += _wrap(f"Verified by entrycheck with the change applied: {gone} of the {total} "
                           f"findings fixed, {len(added)} new"
                           + (": " + ", ".join(sorted({f'{f.invariant} at {f.site}' for f in added})[:6])
                              if added else "") + ".", "  ", "  ")
        lines.append("")
        lines += fix[1].rstrip("\n").splitlines()
    else:
        lines += _wrap("Not mechanical: the trace above shows where the path goes wrong.", "  ", "  ")
    lines += ["", "-- ", f"entrycheck {__version__}"]
    return "\n".join(lines) + "\n"


def write_redundant(w, *, target: str, kernel_version: str | None, others=()) -> str:
    """The mail for one redundant-write site (explore/redundant.py)."""
    scenario, features = w.paths[0]
    lines = [f"Subject: x86/entry: redundant {w.register} write at {w.site}"]
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
    lines += _wrap(f"Not mechanical: test the condition above before the write at {w.site} and skip it; "
                   "entrycheck review of such a patch shows whether every path still restores what it "
                   "must.", "  ", "  ")
    lines += ["", "-- ", f"entrycheck {__version__}"]
    return "\n".join(lines) + "\n"


def _shell(command: str) -> list[str]:
    """A command split before its options, each line ending in a backslash."""
    parts = re.split(r" (?=--)", command)
    return [("  " if k == 0 else "      ") + part + (" \\" if k + 1 < len(parts) else "")
            for k, part in enumerate(parts)]


def watched_data(findings: list[Finding]) -> list[str]:
    """The per-cpu variables the class's #DB preconditions name (breakpoints on them)."""
    out = []
    for f in findings:
        for p in f.preconditions:
            m = re.match(r"a kernel data breakpoint on (\w+)(?:\+0x[0-9a-f]+)? \(per-cpu\)", p.text)
            if p.kind == "db" and m and m.group(1) not in out:
                out.append(m.group(1))
    return out


def suggested_fix(findings: list[Finding], source_tree: Path | None) -> tuple[list[str], str, str] | None:
    """(variables, unified diff of hw_breakpoint.c, the file as patched) for an ist-reentered
    class that a #DB after an access to unprotected per-cpu data causes; None when not
    mechanical."""
    if not findings or findings[0].invariant != ROOT_CAUSE or source_tree is None:
        return None
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
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{BREAKPOINT_SOURCE}",
                                        f"b/{BREAKPOINT_SOURCE}", n=1))
    return names, diff, new


__all__ = ["write", "write_redundant", "classes", "class_findings", "suggested_fix", "watched_data"]
