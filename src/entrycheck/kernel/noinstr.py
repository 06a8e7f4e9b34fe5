"""The kernel's own C the entry paths reach before they are "settled": the objects whose
``.noinstr.text`` (or ``.entry.text``) holds a function the entry objects call, and, following
their relocations, every noinstr function those call in turn.

Nothing is listed by hand: the functions come from the objects' relocations, the files that
may define them from a scan of the tree's sources (a C function definition, one of the
``DEFINE_IDTENTRY*`` macros that generate the IDT handlers, an assembler ``SYM_*_START``), and
each candidate is built and read to see whether it really defines the function in noinstr code.
A callee outside ``.noinstr.text``/``.entry.text`` is where objtool allows noinstr code to call
instrumented code (between instrumentation_begin/end): the boundary, where a stub stands.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

RUNNABLE = (".noinstr.text", ".entry.text")
# Where the functions the entry code reaches are defined (the rest of the tree is drivers,
# file systems, networking: nothing an entry path calls before it is settled).
SEARCHED = ("arch/x86/entry", "arch/x86/kernel", "arch/x86/coco", "arch/x86/lib", "arch/x86/mm",
            "arch/x86/events", "arch/x86/xen", "kernel/entry", "kernel", "kernel/rcu", "kernel/sched",
            "kernel/locking", "kernel/trace", "kernel/time", "kernel/irq", "lib")
# A line that defines a function: "<type and qualifiers> name(" at column 0, not a declaration.
_C_DEF = re.compile(r"^(?!static\b)(?:[A-Za-z_][\w\s\*]*?[\s\*])(\w+)\s*\([^;]*$")
_IDT_DEF = re.compile(r"^\s*DEFINE_(?:IDTENTRY|FREDENTRY)\w*\(\s*(\w+)")
_ASM_DEF = re.compile(r"^\s*SYM_(?:FUNC|TYPED_FUNC|CODE|INNER_LABEL)\w*_START\w*\(\s*(\w+)")
_IDT_PREFIXES = ("", "noist_", "kernel_", "user_", "xenpv_", "fred_")
_PERCPU = re.compile(r"\b(?:DEFINE|DECLARE)_PER_CPU\w*\(\s*(?:[^,()]|\([^()]*\))+,\s*(\w+)\s*\)")
PERCPU_SEARCHED = SEARCHED + ("arch/x86/include/asm", "include/linux", "mm")


def definitions(tree: Path, dirs: Iterable[str] = SEARCHED) -> dict[str, tuple[str, ...]]:
    """name -> the source files (relative to ``tree``) with a line that may define it."""
    out: dict[str, list[str]] = {}
    for d in dirs:
        base = tree / d
        if not base.is_dir():
            continue
        files = sorted(base.glob("*.[cS]")) if d in ("kernel", "lib") else sorted(base.rglob("*.[cS]"))
        for path in files:
            rel = str(path.relative_to(tree))
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            asm = path.suffix == ".S"
            for line in text.splitlines():
                if asm:
                    m = _ASM_DEF.match(line)
                    names = (m.group(1),) if m else ()
                else:
                    m = _IDT_DEF.match(line)
                    if m:
                        names = tuple(p + m.group(1) for p in _IDT_PREFIXES)
                    else:
                        m = _C_DEF.match(line)
                        names = (m.group(1),) if m else ()
                for name in names:
                    files_of = out.setdefault(name, [])
                    if rel not in files_of:
                        files_of.append(rel)
    return {k: tuple(v) for k, v in out.items()}


def percpu_names(tree: Path, dirs: Iterable[str] = PERCPU_SEARCHED) -> frozenset[str]:
    """The per-cpu variables the tree defines or declares (DEFINE_PER_CPU*/DECLARE_PER_CPU*): how
    code that only takes such a variable's address (this_cpu_ptr) is told from data."""
    out: set[str] = set()
    for d in dirs:
        base = tree / d
        if not base.is_dir():
            continue
        pattern = "*.[chS]"
        files = sorted(base.glob(pattern)) if d in ("kernel", "lib", "mm", "include/linux") else \
            sorted(base.rglob(pattern))
        for path in files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if "PER_CPU" in text:
                out.update(m.group(1) for m in _PERCPU.finditer(text))
    return frozenset(out)


_ALIAS = re.compile(r"^\s*(?:PROVIDE\(\s*)?(\w+)\s*=\s*(\w+)\s*\)?\s*;")
LINKER_SCRIPT = "arch/x86/kernel/vmlinux.lds.S"


def linker_aliases(tree: Path) -> dict[str, str]:
    """Symbols the kernel's linker script makes another name of a symbol (``const_pcpu_hot =
    pcpu_hot;``): the link the loader stands for has to resolve them alike."""
    try:
        text = (tree / LINKER_SCRIPT).read_text(errors="replace")
    except OSError:
        return {}
    return {m.group(1): m.group(2) for m in map(_ALIAS.match, text.splitlines())
            if m and not m.group(2).isdigit() and m.group(1) != m.group(2)}


# The structures whose layout the model fills in for a booted CPU (the current task, the per-cpu
# hot data, the boot CPU's data): their members' offsets come from the C objects' DWARF.
STRUCTS = ("task_struct", "thread_info", "pcpu_hot", "cpuinfo_x86", "pt_regs", "irq_cpustat_t", "mm_struct",
           "vdso_image", "apic")


def struct_layouts(objects: Iterable[Path], names: Iterable[str] = STRUCTS) -> dict[str, dict[str, int]]:
    """struct -> member path ('thread.sp', unions and anonymous members flattened) -> byte offset,
    from the DWARF of the first object that defines each struct (objects built with -g)."""
    wanted = set(names)
    out: dict[str, dict[str, int]] = {}
    for path in objects:
        if not wanted:
            break
        with path.open("rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info():
                continue
            dwarf = elf.get_dwarf_info()
            for cu in dwarf.iter_CUs():
                for die in cu.iter_DIEs():
                    if die.tag not in ("DW_TAG_structure_type", "DW_TAG_typedef") or "DW_AT_name" not in die.attributes:
                        continue
                    name = die.attributes["DW_AT_name"].value.decode(errors="replace")
                    if name not in wanted:
                        continue
                    struct = die
                    while struct is not None and struct.tag == "DW_TAG_typedef":
                        struct = struct.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in struct.attributes \
                            else None
                    if struct is None or struct.tag != "DW_TAG_structure_type" or \
                            "DW_AT_declaration" in struct.attributes:
                        continue
                    members: dict[str, int] = {}
                    _members(struct, "", 0, members, 0)
                    if members:
                        out[name] = members
                        wanted.discard(name)
    return out


def _members(die, prefix: str, base: int, out: dict[str, int], depth: int) -> None:
    if depth > 4:
        return
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        loc = child.attributes.get("DW_AT_data_member_location")
        offset = base + (loc.value if loc is not None and isinstance(loc.value, int) else 0)
        name = child.attributes["DW_AT_name"].value.decode(errors="replace") if "DW_AT_name" in child.attributes \
            else ""
        path = f"{prefix}{name}" if name else prefix.rstrip(".")
        if name:
            out.setdefault(path, offset)
        kind = child.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in child.attributes else None
        while kind is not None and kind.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
            kind = kind.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in kind.attributes else None
        if kind is not None and kind.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            _members(kind, f"{path}." if path else "", offset, out, depth + 1)


# Static keys (jump labels): how the tree defines them, hence their state until something flips them.
_KEY_DEF = re.compile(r"\bDEFINE_STATIC_KEY_(?:ARRAY_)?(TRUE|FALSE)(?:_RO)?\(\s*(\w+)\s*[,)]")
_KEY_MAYBE = re.compile(r"\bDEFINE_STATIC_KEY_MAYBE(?:_RO)?\(\s*(CONFIG_\w+)\s*,\s*(\w+)\s*\)")
_TRACEPOINT_KEY_INIT = re.compile(r"\.key\s*=\s*STATIC_KEY_(?:INIT_FALSE|FALSE_INIT)\b")
_KEY_STRUCT = re.compile(r"^[ \t]*(?:static\s+)?struct\s+static_key(?:_true|_false)?\s+(\w+)\s*(?:\[[^\]]*\])?\s*"
                         r"(?:=\s*(\w+))?\s*;", re.M)
TRACEPOINT_KEY = "__tracepoint_"
TRACEPOINT_H = "include/linux/tracepoint.h"
_KEY_GREP_EXCLUDES = ("Documentation", "tools", "samples", "scripts")


def static_keys(tree: Path, names: Iterable[str], config: dict[str, str]) -> dict[str, dict]:
    """name -> {"enabled", "source", "why"} for the static keys ``names``, as the tree defines them
    (``config``: the build's .config, for DEFINE_STATIC_KEY_MAYBE).  A key the tree does not
    define in a way read here is left out (the loader then names it)."""
    wanted = set(names)
    out: dict[str, dict] = {}
    tracepoints = sorted(n for n in wanted if n.startswith(TRACEPOINT_KEY))
    try:
        header = (tree / TRACEPOINT_H).read_text(errors="replace")
    except OSError:
        header = ""
    if tracepoints and _TRACEPOINT_KEY_INIT.search(header):
        for name in tracepoints:
            out[name] = {"enabled": False, "source": TRACEPOINT_H,
                         "why": "DEFINE_TRACE_FN starts every tracepoint's key false; it is enabled only "
                                "when a probe is attached"}
    rest = wanted - set(out)
    if not rest:
        return out
    cmd = ["grep", "-rlE", "--include=*.c", "--include=*.h", *(f"--exclude-dir={d}" for d in _KEY_GREP_EXCLUDES),
           r"DEFINE_STATIC_KEY|struct static_key", "."]
    files = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, errors="replace", check=False).stdout
    for path in sorted(files.splitlines()):
        rel = path.removeprefix("./")
        try:
            text = (tree / rel).read_text(errors="replace")
        except OSError:
            continue
        for m in _KEY_DEF.finditer(text):
            _found(out, rest, m.group(2), m.group(1) == "TRUE", rel, text, m.start(), f"DEFINE_STATIC_KEY_{m.group(1)}")
        for m in _KEY_MAYBE.finditer(text):
            on = config.get(m.group(1)) == "y"
            _found(out, rest, m.group(2), on, rel, text, m.start(),
                   f"DEFINE_STATIC_KEY_MAYBE({m.group(1)}): {m.group(1)} is {'y' if on else 'not set'}")
        if rel.endswith(".c"):
            for m in _KEY_STRUCT.finditer(text):
                init = m.group(2)
                _found(out, rest, m.group(1), bool(init) and "TRUE" in init, rel, text, m.start(),
                       f"a struct static_key {'initialised ' + init if init else 'zero-initialised'}")
    return out


def _found(out: dict, wanted: set, name: str, enabled: bool, rel: str, text: str, at: int, why: str) -> None:
    if name in wanted and name not in out:
        out[name] = {"enabled": enabled, "source": f"{rel}:{text.count(chr(10), 0, at) + 1}", "why": why}


# Thread flags the model sets and reads (a signal a handler sends is delivered on the way out).
THREAD_INFO_H = "arch/x86/include/asm/thread_info.h"
THREAD_FLAGS = ("TIF_SIGPENDING", "TIF_NOTIFY_RESUME", "TIF_NEED_RESCHED", "TIF_NOTIFY_SIGNAL")


def thread_flags(tree: Path) -> dict[str, int]:
    """TIF_X -> its bit number, as the tree's thread_info.h defines it."""
    try:
        text = (tree / THREAD_INFO_H).read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for name in THREAD_FLAGS:
        m = re.search(rf"^#define\s+{name}\s+(\d+)\b", text, re.M)
        if m:
            out[name] = int(m.group(1))
    return out


def read_config(path: Path) -> dict[str, str]:
    """CONFIG_X -> its value in a .config."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name.startswith("CONFIG_"):
            out[name] = value.strip().strip('"')
    return out


def jump_label_keys(path: Path) -> frozenset[str]:
    """The symbols the key fields of an object's ``__jump_table`` name."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        rel = elf.get_section_by_name(".rela__jump_table")
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(rel, RelocationSection) or not isinstance(symtab, SymbolTableSection):
            return frozenset()
        names = set()
        for r in rel.iter_relocations():
            if r["r_offset"] % 16 == 8:
                names.add(symtab.get_symbol(r["r_info_sym"]).name)
    return frozenset(n for n in names if n)


@dataclass(frozen=True)
class ObjectFacts:
    """What one built object says of its symbols: the functions it defines in runnable (noinstr)
    code and elsewhere, every global it defines, and what its runnable code calls or jumps to
    (PLT32 relocations: calls and tail calls) and reads or writes (the other relocations)."""

    runnable: frozenset[str]
    other: frozenset[str]
    defined: frozenset[str]
    calls: frozenset[str]
    data: frozenset[str]


R_X86_64_PLT32 = 4


def object_facts(path: Path) -> ObjectFacts:
    with path.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            return ObjectFacts(frozenset(), frozenset(), frozenset(), frozenset(), frozenset())
        names = {k: sec.name for k, sec in enumerate(elf.iter_sections())}
        runnable_idx = {i for i, n in names.items() if n in RUNNABLE}
        runnable, other, defined = set(), set(), set()
        symbols = list(symtab.iter_symbols())
        for sym in symbols:
            shndx = sym["st_shndx"]
            if not isinstance(shndx, int) or sym["st_info"]["bind"] not in ("STB_GLOBAL", "STB_WEAK"):
                continue
            defined.add(sym.name)
            if sym["st_info"]["type"] == "STT_FUNC":
                (runnable if shndx in runnable_idx else other).add(sym.name)
        calls, data = set(), set()
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection) or sec["sh_info"] not in runnable_idx:
                continue
            for rel in sec.iter_relocations():
                sym = symbols[rel["r_info_sym"]]
                if sym.name and sym["st_shndx"] == "SHN_UNDEF":
                    (calls if rel["r_info_type"] == R_X86_64_PLT32 else data).add(sym.name)
    return ObjectFacts(frozenset(runnable), frozenset(other), frozenset(defined), frozenset(calls),
                       frozenset(data))


def object_of(source: str) -> str:
    return str(Path(source).with_suffix(".o"))


@dataclass(frozen=True)
class Closure:
    """The objects the entry paths' noinstr code is in, and what was found on the way."""

    objects: tuple[str, ...]            # relative object paths, in the order they were found
    functions: dict                     # noinstr function -> its object
    boundary: frozenset[str]            # functions called from noinstr code that are not noinstr (stubs)
    unresolved: frozenset[str]          # functions no candidate object defines (stubs, reported)


def closure(tree: Path, out: Path, entry_objects: Iterable[Path], build: Callable[[list[str]], None],
            index: dict[str, tuple[str, ...]] | None = None) -> Closure:
    """Follow the calls of the entry objects into the noinstr code of the objects that define them.

    ``out``: where the build puts objects (the O= directory); ``build(objects)``: make them
    (relative paths; a failure to build one leaves it missing, which is not an error here)."""
    index = definitions(tree) if index is None else index
    facts: dict[str, ObjectFacts | None] = {}
    located: dict[str, str] = {}
    boundary: set[str] = set()
    unresolved: set[str] = set()
    seen: set[str] = set()
    order: list[str] = []
    pending: set[str] = set()
    for obj in entry_objects:
        f = object_facts(obj)
        pending |= f.calls
    while pending:
        names = sorted(n for n in pending if n not in seen)
        pending = set()
        seen.update(names)
        wanted = sorted({object_of(src) for n in names for src in index.get(n, ())
                         if object_of(src) not in facts})
        if wanted:
            build(wanted)
            for obj in wanted:
                path = out / obj
                facts[obj] = object_facts(path) if path.is_file() else None
        for name in names:
            home = None
            elsewhere = False
            for src in index.get(name, ()):
                f = facts.get(object_of(src))
                if f is None:
                    continue
                if name in f.runnable:
                    home = object_of(src)
                    break
                if name in f.other:
                    elsewhere = True
            if home is not None:
                located[name] = home
                if home not in order:
                    order.append(home)
                    pending |= facts[home].calls
            elif elsewhere:
                boundary.add(name)
            else:
                unresolved.add(name)
    return Closure(tuple(order), located, frozenset(boundary), frozenset(unresolved))


__all__ = ["thread_flags", "THREAD_FLAGS", "static_keys", "read_config", "jump_label_keys", "struct_layouts", "STRUCTS", "linker_aliases", "percpu_names", "definitions", "object_facts", "closure", "Closure", "ObjectFacts", "RUNNABLE", "SEARCHED"]
