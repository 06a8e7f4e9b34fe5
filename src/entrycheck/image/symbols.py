"""Resolving the symbols entry_64.o leaves undefined.

An undefined symbol is one of three things, decided by how the code uses it:

* **per-cpu** — some instruction reaches it through a %gs: operand.  It resolves to a
  zero-based offset in the per-cpu area (6.1 addresses these absolutely, R_X86_64_32S;
  6.12 RIP-relatively, R_X86_64_PC32 — both work because the offsets are small and
  the text lives in the top 2 GiB).  Known per-cpu variables get fixed offsets, so
  that the same variable has the same per-cpu address in every kernel.
* **function** — called or jumped to: a stub address, one per symbol.
* **data** — anything else: a slot of model memory.  A few data symbols live, in
  the real kernel, inside .entry.text and are therefore mapped under the user CR3
  (x86_verw_sel, read by VERW right before SYSRET/IRET to user mode).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from entrycheck.errors import InternalError
from entrycheck.image import layout
from entrycheck.image.decode import sweep
from entrycheck.image.objfile import ObjectFile


class SymbolClass(enum.Enum):
    PERCPU = "per-cpu"
    FUNCTION = "function"
    DATA = "data"
    ENTRY_DATA = "entry-data"


# Per-cpu variables at fixed offsets (size in bytes).  fixed_percpu_data must be at 0
# (the stack protector reads %gs:40); cpu_tss_rw gets a page of its own because PTI
# maps exactly that page for user mode.
PERCPU_FIXED: tuple[tuple[str, int, int], ...] = (
    ("fixed_percpu_data", 0x0000, 0x40),
    ("cpu_tss_rw", 0x1000, 0x1000),
    ("cpu_tlbstate", 0x2000, 0x100),
    ("pcpu_hot", 0x2100, 0x80),
    ("cpu_current_top_of_stack", 0x2180, 0x8),
    ("x86_spec_ctrl_current", 0x2188, 0x8),
    ("espfix_waddr", 0x2190, 0x8),
    ("espfix_stack", 0x2198, 0x8),
    ("cpu_dr7", 0x21A0, 0x8),
)
PERCPU_DYNAMIC_START = 0x3000
PERCPU_DYNAMIC_STRIDE = 0x100
PERCPU_DYNAMIC_END = 0x10000      # an object's own per-cpu data (noinstr C) starts there

# Per-cpu variables PTI maps for user mode (whole pages).
PTI_USER_PERCPU: tuple[str, ...] = ("cpu_tss_rw",)

# Code whose address the entry code only compares against (never calls): still code.
KNOWN_CODE: frozenset[str] = frozenset({"srso_safe_ret", "srso_alias_safe_ret"})

# Data symbols the kernel places in .entry.text (mapped for user mode).
ENTRY_DATA: frozenset[str] = frozenset({"x86_verw_sel"})

# Model memory sizes of known data symbols (others get DATA_STRIDE bytes).
DATA_SIZES: Mapping[str, int] = MappingProxyType({"__per_cpu_offset": 8 * 64})
DATA_STRIDE = 0x100


@dataclass(frozen=True)
class Resolution:
    classes: Mapping[str, SymbolClass]
    percpu: Mapping[str, int]        # name -> per-cpu offset
    functions: Mapping[str, int]     # name -> stub address
    data: Mapping[str, int]          # name -> model memory address (DATA and ENTRY_DATA)
    data_sizes: Mapping[str, int]

    def address(self, name: str) -> int:
        cls = self.classes[name]
        if cls is SymbolClass.PERCPU:
            return self.percpu[name]
        if cls is SymbolClass.FUNCTION:
            return self.functions[name]
        return self.data[name]


def classify_undefined(obj: ObjectFile, percpu_names: frozenset[str] = frozenset()) -> dict[str, SymbolClass]:
    """How each undefined symbol is used, from the instructions holding its relocations (a name in
    ``percpu_names``, the tree's per-cpu variables, is per-cpu however it is used)."""
    undefined = {s.index: s.name for s in obj.symbols if s.undefined and s.name}
    uses: dict[str, set[str]] = {name: set() for name in undefined.values()}
    for sec_index, rels in obj.relocations.items():
        sec = obj.sections[sec_index]
        if not sec.alloc:
            continue
        targets = [r for r in rels if r.symbol in undefined]
        if not targets:
            continue
        if not sec.executable:
            for r in targets:
                uses[undefined[r.symbol]].add("data")
            continue
        insns = list(sweep(sec.data, 0))
        starts = [i.address for i in insns]
        for r in targets:
            k = bisect.bisect_right(starts, r.offset) - 1
            ins = insns[k] if k >= 0 else None
            name = undefined[r.symbol]
            if ins is None or not (ins.address <= r.offset < ins.end):
                uses[name].add("data")
            elif ins.gs:
                uses[name].add("gs")
            elif (ins.is_call or ins.is_jump) and ins.branch_target is not None:
                uses[name].add("branch")
            else:
                uses[name].add("data")
    classes: dict[str, SymbolClass] = {}
    for name, how in uses.items():
        if "gs" in how or name in percpu_names:
            classes[name] = SymbolClass.PERCPU
        elif "branch" in how or name in KNOWN_CODE:
            classes[name] = SymbolClass.FUNCTION
        elif name in ENTRY_DATA:
            classes[name] = SymbolClass.ENTRY_DATA
        else:
            classes[name] = SymbolClass.DATA
    return classes


def resolve(obj: ObjectFile, functions_too: frozenset[str] = frozenset(), percpu_names: frozenset[str] = frozenset(),
            percpu_defined: Mapping[str, int] | None = None, aliases: tuple[tuple[str, str], ...] = (),
            data_stride: int = DATA_STRIDE) -> Resolution:
    """Where each undefined symbol goes; ``functions_too``: defined functions that are stubs as well
    (instrumented code noinstr C calls); ``percpu_defined``: per-cpu symbols the object defines,
    at their offsets; ``data_stride``: the model memory each data symbol gets (a page each, when
    an access to one that no booted value gives must be told by its page)."""
    classes = classify_undefined(obj, percpu_names)
    for name in functions_too:
        classes.setdefault(name, SymbolClass.FUNCTION)
    fixed = {name: off for name, off, _ in PERCPU_FIXED}
    percpu: dict[str, int] = dict(percpu_defined or {})
    for name in percpu:
        classes[name] = SymbolClass.PERCPU
    next_dyn = PERCPU_DYNAMIC_START
    for name in sorted(n for n, c in classes.items() if c is SymbolClass.PERCPU and n not in percpu):
        if name in fixed:
            percpu[name] = fixed[name]
        else:
            percpu[name] = next_dyn
            next_dyn += PERCPU_DYNAMIC_STRIDE
    for name, target in aliases:       # another name of a per-cpu variable (the kernel's linker script)
        if classes.get(name) is SymbolClass.PERCPU and (target in percpu or target in fixed):
            percpu[name] = percpu.get(target, fixed.get(target))
    if next_dyn > PERCPU_DYNAMIC_END:
        raise InternalError(f"{obj.path}: more undefined per-cpu variables than the per-cpu area has room for")
    functions = {name: layout.STUB_BASE + i * layout.STUB_STRIDE
                 for i, name in enumerate(sorted(n for n, c in classes.items() if c is SymbolClass.FUNCTION))}
    data: dict[str, int] = {}
    sizes: dict[str, int] = {}
    cursor = {SymbolClass.DATA: layout.DATA_BASE, SymbolClass.ENTRY_DATA: layout.ENTRY_DATA_BASE}
    for name in sorted(n for n, c in classes.items() if c in cursor):
        cls = classes[name]
        size = layout.align_up(DATA_SIZES.get(name, data_stride), max(0x40, data_stride))
        data[name] = cursor[cls]
        sizes[name] = size
        cursor[cls] += size
    return Resolution(MappingProxyType(classes), MappingProxyType(percpu), MappingProxyType(functions),
                      MappingProxyType(data), MappingProxyType(sizes))
