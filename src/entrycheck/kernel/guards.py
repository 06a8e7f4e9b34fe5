"""What the tree's C and assembly source says that the object does not.

* Which build options put an IRET into the entry code (entry_64.S).  An IRET that
  returns to the next instruction does nothing but unmask NMIs; whether a path that
  relies on it can happen depends on the option that compiled it in: for every `iretq`
  inside an ``#ifdef CONFIG_X`` block, the label it follows and X.
* Which data the kernel refuses hardware breakpoints on (within_cpu_entry() in
  arch/x86/kernel/hw_breakpoint.c): a #DB can follow an access to anything else.  A
  patch to hw_breakpoint.c is then reviewable like one to the entry code.
"""

from __future__ import annotations

import re
from pathlib import Path

ENTRY_SOURCE = "arch/x86/entry/entry_64.S"
BREAKPOINT_SOURCE = "arch/x86/kernel/hw_breakpoint.c"

# Who may set a kernel breakpoint: hw_breakpoint_arch_parse's caller in kernel/events/hw_breakpoint.c
# ("Don't let unprivileged users set a breakpoint in the trap path"), the same in 6.1 and 6.12;
# kernel_breakpoint_capability() reads it from a tree.
KERNEL_BREAKPOINT_SOURCE = "kernel/events/hw_breakpoint.c"
KERNEL_BREAKPOINT_CAPABILITY = "CAP_SYS_ADMIN"

# within_cpu_entry() of 6.1 and 6.12 (the same list), for a bare object with no source.
BUILTIN_REFUSALS = ("cpu_entry_area", "__per_cpu_offset", "pcpu_unit_offsets", "gdt_page", "cpu_tss_rw",
                    "cpu_tlbstate", "cpu_dr7")

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


def breakpoint_refusals(source_tree: Path | None) -> tuple[str, ...] | None:
    """The data within_cpu_entry() protects, by name ("cpu_entry_area", a data symbol or
    a per-cpu variable; get_cpu_gdt_rw() is gdt_page), or None when the source is not
    at hand or has no such function."""
    if source_tree is None:
        return None
    try:
        text = (Path(source_tree) / BREAKPOINT_SOURCE).read_text(errors="replace")
    except OSError:
        return None
    return parse_refusals(text)


def parse_refusals(text: str) -> tuple[str, ...] | None:
    m = re.search(r"\bwithin_cpu_entry\s*\([^)]*\)\s*\{", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    body = re.sub(r"/\*.*?\*/", "", text[m.end():i], flags=re.S)
    out = []
    for call in re.finditer(r"\bwithin_area\s*\((.*?)\)\s*\)", body, flags=re.S):
        args = call.group(1)
        if "CPU_ENTRY_AREA_BASE" in args:
            out.append("cpu_entry_area")
        elif (pc := re.search(r"per_cpu\s*\(\s*(\w+)", args)) is not None:
            out.append(pc.group(1))
        elif "get_cpu_gdt_rw" in args:
            out.append("gdt_page")
        elif (sym := re.search(r"\(unsigned long\)\s*&?\s*(\w+)", args)) is not None:
            out.append(sym.group(1))
    return tuple(dict.fromkeys(out))


def kernel_breakpoint_capability(source_tree: Path) -> str | None:
    """The capability kernel/events/hw_breakpoint.c demands for a breakpoint on a kernel
    address (the ``capable(CAP_X)`` test after arch_check_bp_in_kernelspace()), or None."""
    try:
        text = (Path(source_tree) / KERNEL_BREAKPOINT_SOURCE).read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"arch_check_bp_in_kernelspace\s*\([^)]*\)\s*\)\s*\{(.*?)\n\t\}", text, flags=re.S)
    cap = re.search(r"!\s*capable\s*\(\s*(CAP_\w+)\s*\)", m.group(1)) if m else None
    return cap.group(1) if cap else None


def cite_decisions(source_tree: Path | None, sources) -> dict[str, str | None]:
    """Where the tree makes each decision of ``sources`` (image/cpus.py's ``SOURCES``: per key a
    file, the text of its line, that line in 6.12.118): "file:line", or None when its line is
    not in the tree (the rule resting on it then does not hold there).  Without a tree, the line
    in Debian's 6.12.118, marked so."""
    if source_tree is None:
        return {k: f"{s.file}:{s.line} (6.12.118)" for k, s in sources.items()}
    lines: dict[str, list[str] | None] = {}
    out: dict[str, str | None] = {}
    for key, s in sources.items():
        if s.file not in lines:
            try:
                lines[s.file] = (Path(source_tree) / s.file).read_text(errors="replace").splitlines()
            except OSError:
                lines[s.file] = None
        text = lines[s.file]
        anchor = " ".join(s.anchor.split())
        at = next((n for n, line in enumerate(text or (), 1) if anchor in " ".join(line.split())), None)
        out[key] = f"{s.file}:{at}" if at is not None else None
    return out


FRED_SOURCE = "arch/x86/kernel/cpu/common.c"


def reach_facts(source_tree: Path | None, config_file: Path | None) -> dict[str, str | None]:
    """What the tree and the build's .config say about how a machine gets to code the entry
    objects hold: the boot option FRED needs (common.c clears the feature unless ``fred=on``),
    whether espfix64 exists (CONFIG_MODIFY_LDT_SYSCALL: the LDT a 16-bit SS needs), and who may
    set a kernel data breakpoint.  None where the file is not at hand."""
    out: dict[str, str | None] = {"fred": None, "modify_ldt": None, "breakpoint": None}
    if source_tree is not None:
        try:
            lines = (Path(source_tree) / FRED_SOURCE).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        at = next((n for n, line in enumerate(lines, 1) if 'cmdline_find_option(boot_command_line, "fred"' in line),
                  None)
        if at is not None and any('strncmp(arg, "on", 2)' in line for line in lines[at:at + 3]):
            out["fred"] = f"{FRED_SOURCE}:{at}"
        out["breakpoint"] = kernel_breakpoint_capability(source_tree)
    if config_file is not None:
        try:
            text = Path(config_file).read_text(errors="replace")
        except OSError:
            text = None
        if text is not None:
            out["modify_ldt"] = "y" if re.search(r"^CONFIG_MODIFY_LDT_SYSCALL=y$", text, re.M) else "n"
    return out


def tree_facts(source_tree: Path | None) -> dict[str, tuple]:
    """What the checks read from files of the tree that are not compiled into the image, by
    file: a patch to one of them is reviewed by whether these facts change."""
    cap = kernel_breakpoint_capability(source_tree) if source_tree is not None else None
    return {BREAKPOINT_SOURCE: ("the data within_cpu_entry() refuses breakpoints on",
                                breakpoint_refusals(source_tree)),
            KERNEL_BREAKPOINT_SOURCE: ("who may set a kernel data breakpoint", cap)}


__all__ = ["cite_decisions", "reach_facts", "tree_facts", "kernel_breakpoint_capability", "KERNEL_BREAKPOINT_CAPABILITY", "iret_guards", "parse", "breakpoint_refusals", "parse_refusals", "BUILTIN_REFUSALS"]
