"""Loading the entry objects linked with the noinstr C they reach (kernel/noinstr.py builds them).

Only ``.entry.text`` and ``.noinstr.text`` (and ``.altinstr_aux``, the slow path of
static_cpu_has) run.  Every other executable section of the C objects is instrumented code:
a function there is the boundary noinstr code may call only between instrumentation_begin and
instrumentation_end, so it resolves to a stub like an undefined function, and its section is
mapped without execute permission (running into it by any other way faults).  The objects'
per-cpu sections (``.data..percpu*``) are not memory of the image: their symbols are offsets
into the per-cpu area, where the world puts their initial contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from entrycheck.image import layout
from entrycheck.image.objfile import ObjectFile

RUNNABLE = (".entry.text", ".noinstr.text", ".altinstr_aux")
REPLACEMENT = ".altinstr_replacement"
PERCPU_PREFIX = ".data..percpu"
PERCPU_C_BASE = 0x10000          # per-cpu offset of the objects' own per-cpu data (after the modelled ones)


@dataclass(frozen=True)
class NoinstrLink:
    """How to load a linked object that holds noinstr C: the tree's per-cpu variable names (code
    that only takes the address of an undefined one, this_cpu_ptr, does not say it is per-cpu)."""

    percpu_names: frozenset[str] = frozenset()
    aliases: tuple[tuple[str, str], ...] = ()     # (name, the symbol it is another name of): the linker script
    structs: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()   # struct -> (member, offset): DWARF
    keys: tuple[tuple[str, bool], ...] = ()       # static keys the objects do not define: enabled at boot?
    entry_calls: frozenset[str] = frozenset()     # the functions the entry objects (the asm) call
    constants: tuple[tuple[str, int], ...] = ()   # the tree's constants the model uses (TIF_* bits)
    stubbed: frozenset[str] = frozenset()         # noinstr functions that run as stubs all the same

    def layout(self, struct: str) -> dict[str, int]:
        """The members' offsets of ``struct`` (empty when the build's DWARF did not have it)."""
        return dict(next((m for name, m in self.structs if name == struct), ()))


@dataclass(frozen=True)
class Plan:
    runnable: tuple[str, ...]                 # the code sections that run
    boundary_sections: frozenset[int]         # executable sections that do not run (instrumented code)
    percpu: Mapping[int, int]                 # per-cpu section index -> per-cpu offset of its start
    percpu_size: int                          # per-cpu bytes after PERCPU_C_BASE
    boundary_functions: frozenset[str]        # functions defined in boundary sections: stubs


def plan(obj: ObjectFile, stubbed: frozenset[str] = frozenset()) -> Plan:
    boundary = frozenset(s.index for s in obj.sections
                         if s.alloc and s.executable and s.name not in RUNNABLE and s.name != REPLACEMENT)
    percpu: dict[int, int] = {}
    cursor = PERCPU_C_BASE
    for s in obj.sections:
        if s.alloc and s.name.startswith(PERCPU_PREFIX):
            cursor = layout.align_up(cursor, max(s.align, 8))
            percpu[s.index] = cursor
            cursor += s.size
    functions = frozenset(s.name for s in obj.symbols
                          if s.name and not s.undefined and ((s.section in boundary
                          and s.kind in ("STT_FUNC", "STT_NOTYPE")) or (s.name in stubbed and s.kind == "STT_FUNC")))
    defined = {s.name for s in obj.symbols if s.name and not s.undefined}
    functions |= frozenset(n for n in stubbed if n not in defined)    # a booted value's function pointer
    return Plan(tuple(s.name for s in obj.sections if s.alloc and s.name in RUNNABLE), boundary,
                MappingProxyType(percpu), cursor - PERCPU_C_BASE, functions)


__all__ = ["NoinstrLink", "Plan", "plan", "RUNNABLE", "PERCPU_C_BASE"]
