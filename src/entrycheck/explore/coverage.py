"""Coverage: which instructions of each entry object's code the explored paths executed.

The explorer records every path it injects into instruction by instruction; the union of
those instructions over every feature set is what a check executed (leaf runs, recorded
at event level only, add no instruction the recorded paths do not already hold except
inside the handlers they reach).  Each object the image was linked from (entry_64.o,
entry_64_compat.o, entry_64_fred.o) is reported on its own: its code sections are found
in the linked image by its own symbols.  Padding (INT3, and NOPs after an unconditional
transfer, unless executed) is not counted.  Uncovered spans are named sym+off; those in
code that cannot run in the modelled machine say why (``EXPLAINED``), the rest are code
no scenario reaches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from entrycheck.image.image import CODE_SECTIONS, Image
from entrycheck.image.objfile import SHN_ABS, load_object

# Symbol prefixes (of the code an uncovered span is in) and why that code cannot run here.
XEN = "Xen PV only (X86_FEATURE_XENPV: a paravirtualised guest, not bare metal)"
EXPLAINED: tuple[tuple[str, str], ...] = (
    ("xen_", XEN),
    ("asm_xen", XEN),
    ("exc_xen", XEN),
    ("__switch_to_asm", "the context switch, not an entry path"),
    ("ret_from_fork", "a new task's first return, not an entry path"),
    ("rewind_stack_and_make_dead", "a task dying after an oops, not an entry path"),
    ("asm_load_gs_index", "load_gs_index() for a task's GS selector, not an entry path"),
    ("__end_entry_SYSENTER_compat", "SYSENTER's end marker (int3 guard)"),
    ("asm_exc_vmm_communication", "SEV-ES #VC: only in an SEV-ES guest (the sev_es feature)"),
    ("vc_", "SEV-ES #VC: only in an SEV-ES guest (the sev_es feature)"),
    ("entry_SYSRETL_compat_end", "the int3 after SYSRETL (speculation guard)"),
    ("native_irq_return_ldt", "espfix64: an IRET to a 16-bit stack segment of an LDT (modify_ldt); the "
                              "modelled machine has no LDT"),
)
COPY = "a copy of code that ran: the same instructions for another vector or handler"
_NUMBER = re.compile(r"-?(0x[0-9a-f]+|\d+)")
_STOPS = ("jmp", "ret", "retq", "iretq", "sysretq", "sysret", "sysretl", "ud2", "int3")


@dataclass(frozen=True)
class Span:
    """Uncovered instructions in a row."""

    first: str          # sym+off of the first
    last: str           # sym+off of the last
    start: int
    count: int
    why: str | None     # why it cannot run here (None: no scenario reaches it)


@dataclass(frozen=True)
class ObjectCoverage:
    name: str           # entry_64.o, entry_64_compat.o, ...
    total: int          # instructions (padding left out)
    covered: int
    spans: tuple[Span, ...]
    # The annotated listing: (sym+off, instruction, "ran" | "copy" | "cannot" | "missed"), padding left out.
    rows: tuple[tuple[str, str, str], ...] = field(default=(), repr=False, compare=False)

    @property
    def explained(self) -> int:
        """Instructions that cannot run here."""
        return sum(s.count for s in self.spans if s.why and s.why != COPY)

    @property
    def copies(self) -> int:
        return sum(s.count for s in self.spans if s.why == COPY)

    @property
    def copied_percent(self) -> float:
        """Of the instructions that can run here, those that ran or are copies of code that ran."""
        runnable = self.total - self.explained
        return 100.0 * (self.covered + self.copies) / runnable if runnable else 100.0

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.total if self.total else 100.0

    @property
    def runnable_percent(self) -> float:
        """Of the instructions outside code that cannot run here."""
        runnable = self.total - self.explained
        return 100.0 * self.covered / runnable if runnable else 100.0

    @property
    def missing(self) -> int:
        return sum(s.count for s in self.spans if not s.why)


def _ranges(image: Image, part: Path) -> list[tuple[int, int]]:
    """The [start, end) of each code section of ``part`` inside the linked ``image``."""
    obj = load_object(part, entry_text=False)
    symbols = image.loaded.symbols
    out = []
    for sec in obj.sections:
        if sec.name not in CODE_SECTIONS or not sec.size:
            continue
        anchors = [s for s in obj.symbols if s.section == sec.index and s.name and s.section != SHN_ABS
                   and s.kind not in ("STT_SECTION", "STT_FILE") and s.binding.value != "STB_LOCAL"
                   and s.name in symbols]
        if not anchors:
            continue
        a = anchors[0]
        base = symbols[a.name] - a.value
        out.append((base, base + sec.size))
    return out


IDT_UNUSED = "IDT and SYSCALL entry code: every feature set had fred, which delivers all events itself"


def _why(name: str, fred: tuple[bool, bool] = (False, True)) -> str | None:
    """Why code in symbol ``name`` cannot run; ``fred``: (a feature set with fred ran, one without ran)."""
    with_fred, without = fred
    if name.startswith("asm_fred_"):
        return None if with_fred else "FRED event delivery: only with the fred feature"
    if not without:
        return IDT_UNUSED
    for prefix, why in EXPLAINED:
        if name.startswith(prefix):
            return why
    return None


def object_coverage(image: Image, name: str, ranges: Iterable[tuple[int, int]],
                    executed: frozenset[int], fred: tuple[bool, bool] = (False, True)) -> ObjectCoverage:
    total = covered = 0
    spans: list[Span] = []
    rows: list[tuple[str, str, str]] = []
    run: list[tuple[int, str]] = []          # the current uncovered span: (address, sym+off)
    why_of_run: str | None = None

    def close() -> None:
        nonlocal run
        if run:
            spans.append(Span(run[0][1], run[-1][1], run[0][0], len(run), why_of_run))
            run = []

    copies = _copies(image, ranges, executed)
    for start, end in sorted(ranges):
        after_stop = True           # function padding may open a section
        for ins in image.instructions.sweep(start, end):
            hit = ins.address in executed
            padding = not hit and (ins.mnemonic == "int3" or (after_stop and ins.mnemonic.startswith("nop")))
            if ins.mnemonic.startswith(_STOPS) and not ins.mnemonic.startswith("jmp") or ins.mnemonic == "jmp":
                after_stop = True
            elif not ins.mnemonic.startswith(("nop", "int3")):
                after_stop = False
            if padding:
                continue
            total += 1
            where = image.symbolize(ins.address)
            text = f"{ins.mnemonic} {ins.op_str}".strip()
            if hit:
                covered += 1
                rows.append((where, text, "ran"))
                close()
                continue
            why = _why(where.split("+")[0], fred) or (COPY if ins.address in copies else None)
            rows.append((where, text, "missed" if why is None else "copy" if why == COPY else "cannot"))
            if run and why != why_of_run:
                close()
            why_of_run = why
            run.append((ins.address, where))
        close()
    return ObjectCoverage(name, total, covered, tuple(spans), tuple(rows))


def _shape(ins) -> str:
    """An instruction without the numbers that tell copies of one macro apart (vector, target)."""
    if ins.is_call or ins.is_jump:
        return ins.mnemonic
    return f"{ins.mnemonic} {_NUMBER.sub('N', ins.op_str)}"


def _copies(image: Image, ranges: Iterable[tuple[int, int]], executed: frozenset[int]) -> set[int]:
    """Addresses of instructions that are a copy of executed code: a symbol (or one of the equal
    stubs a symbol is made of, as irq_entries_start's) whose instruction shapes equal those of a
    symbol or stub that ran, and which did not run itself."""
    units: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    for start, end in sorted(ranges):
        insns = list(image.instructions.sweep(start, end))
        bounds = sorted({a for a in image.loaded.symbols.values() if start <= a < end} | {start, end})
        for lo, hi in zip(bounds, bounds[1:]):
            body = [i for i in insns if lo <= i.address < hi and i.mnemonic != "int3"]
            while body and body[-1].mnemonic.startswith("nop"):     # alignment before the next symbol
                body.pop()
            units += _stubs(body)
    ran = {shapes for shapes, addrs in units if any(a in executed for a in addrs)}
    return {a for shapes, addrs in units if shapes in ran for a in addrs if a not in executed}


def _trim(shapes: tuple[str, ...]) -> tuple[str, ...]:
    """A stub's shapes without the alignment NOPs that open it."""
    k = 0
    while k < len(shapes) and shapes[k].startswith("nop"):
        k += 1
    return shapes[k:]


def _stubs(body: list) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """A symbol's body as one unit, or as its equal stubs when it is a table of them (each ending
    in a jmp: irq_entries_start, spurious_entries_start)."""
    shapes = tuple(_shape(i) for i in body)
    cuts = [k + 1 for k, i in enumerate(body) if i.mnemonic == "jmp"]
    if len(cuts) > 2 and cuts[-1] == len(body):
        pieces = [(_trim(shapes[a:b]), tuple(i.address for i in body[a:b])) for a, b in zip([0] + cuts, cuts)]
        if len({p for p, _ in pieces}) == 1:
            return pieces
    return [(shapes, tuple(i.address for i in body))]


def coverage(image: Image, parts: tuple[Path, ...], executed: frozenset[int],
             fred: tuple[bool, bool] = (False, True)) -> tuple[ObjectCoverage, ...]:
    """Coverage of each object of ``parts`` (the objects linked into ``image``; one part when the
    target was a single object), by the instructions ``executed`` (any feature set); ``fred``: whether
    a feature set with fred ran, and one without."""
    if not parts:
        parts = (image.loaded.path,)
    return tuple(object_coverage(image, p.name, _ranges(image, p), executed, fred) for p in parts)
