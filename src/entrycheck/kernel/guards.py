"""Which build options put an IRET into the entry code: read from the tree's entry_64.S.

An IRET that returns to the next instruction does nothing but unmask NMIs.  Whether a
path that relies on it can happen on a given kernel depends on the build option that
compiled it in, which only the source says: for every `iretq` inside an
``#ifdef CONFIG_X`` block, the label it follows and X.
"""

from __future__ import annotations

import re
from pathlib import Path

ENTRY_SOURCE = "arch/x86/entry/entry_64.S"

_LABEL = re.compile(r"^\s*(?:SYM_[A-Z_]*START[A-Z_]*\((\w+)|SYM_INNER_LABEL[A-Z_]*\((\w+)|([A-Za-z_]\w*):)")
_IF = re.compile(r"^\s*#\s*(ifdef|ifndef|if|elif|else|endif)\b\s*(.*)$")
_OPTION = re.compile(r"^(?:defined\s*\(\s*)?(CONFIG_\w+)\s*\)?\s*$")


def iret_guards(source_tree: Path | None) -> tuple[tuple[str, str, int], ...]:
    """(label, CONFIG_X, n) for each iretq compiled in only under ``#ifdef CONFIG_X``, n the
    instructions of that block before it (-1: not countable, a macro stands there); ()
    when the source is not at hand."""
    if source_tree is None:
        return ()
    try:
        text = (Path(source_tree) / ENTRY_SOURCE).read_text(errors="replace")
    except OSError:
        return ()
    return parse(text)


_INSN = re.compile(r"^\s*[a-z][a-z0-9]*\b")
_NO_CODE = re.compile(r"^\s*(UNWIND_HINT\w*|ANNOTATE\w*)\b")


def parse(text: str) -> tuple[tuple[str, str, int], ...]:
    stack: list[str | None] = []     # per open #if: the option it requires, or None
    counts: list[int] = []           # per open #if: instructions so far (-1: a macro, unknown)
    label = None
    out = []
    in_comment = False
    for line in text.splitlines():
        if in_comment:
            if "*/" not in line:
                continue
            line, in_comment = line.split("*/", 1)[1], False
        if "/*" in line and "*/" not in line.split("/*", 1)[1]:
            line, in_comment = line.split("/*", 1)[0], True
        code = re.sub(r"/\*.*?\*/", "", line).split("//")[0]
        m = _IF.match(code)
        if m:
            kind, rest = m.group(1), m.group(2).strip()
            if kind in ("ifdef", "if", "ifndef"):
                counts.append(0)
            elif kind in ("else", "elif") and counts:
                counts[-1] = 0
            elif kind == "endif" and counts:
                counts.pop()
            if kind == "ifdef":
                stack.append(rest.split()[0] if rest.startswith("CONFIG_") else None)
            elif kind == "if":
                opt = _OPTION.match(rest)
                stack.append(opt.group(1) if opt else None)
            elif kind in ("ifndef",):
                stack.append(None)
            elif kind in ("else", "elif") and stack:
                stack[-1] = None
            elif kind == "endif" and stack:
                stack.pop()
            continue
        m = _LABEL.match(code)
        if m:
            label = next(g for g in m.groups() if g)
            continue
        if re.search(r"\biretq\b", code) and label:
            option = next((o for o in reversed(stack) if o), None)
            if option:
                out.append((label, option, counts[-1] if counts else -1))
        elif code.strip() and counts and counts[-1] >= 0 and not _NO_CODE.match(code):
            counts[-1] = counts[-1] + 1 if _INSN.match(code) else -1
    return tuple(dict.fromkeys(out))


__all__ = ["iret_guards", "parse"]
