"""objdump-like listing of the code that really runs for one feature set."""

from __future__ import annotations

import re
from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.image.decode import sweep
from entrycheck.image.image import Image



@dataclass(frozen=True)
class DisasmLine:
    address: int
    location: str          # sym+off
    raw: bytes
    text: str              # mnemonic and operands, targets named
    reloc: str | None      # "R_X86_64_PC32 cpu_tlbstate+0x12" when a relocation is in the bytes
    alt: str | None        # "+pti" on the first instruction of a patched site, "|" inside one


def disassemble(image: Image, symbol: str, *, att: bool = True) -> list[DisasmLine]:
    start, end = image.symbol_range(symbol)
    if image.code_section(start) is None:
        raise InputError(f"{symbol} is not in the object's code (a data or per-cpu symbol?): disasm shows code")
    sites = {s.address: s for s in image.alt_sites}
    inside: dict[int, int] = {}
    for s in image.alt_sites:
        for a in range(s.address + 1, s.address + s.length):
            inside[a] = s.address
    lines = []
    # AT&T is the image's own decoding; Intel syntax is a listing of its own.
    insns = image.instructions.sweep(start, end) if att else sweep(image.read(start, end - start), start, att=False)
    for ins in insns:
        text = f"{ins.mnemonic:<6s} {ins.op_str}".rstrip()
        if ins.branch_target is not None:
            text = f"{text} <{image.symbolize(ins.branch_target)}>"
        elif ins.gs:
            off = ins.rip_target if ins.rip_target is not None else _absolute_disp(ins.op_str)
            if off is not None:
                text = f"{text}  # {image.symbolize_percpu(off)}"
        elif ins.rip_target is not None:
            text = f"{text}  # {image.symbolize(ins.rip_target)}"
        rel = image.relocation_in(ins.address, ins.size)
        reloc = None
        if rel is not None:
            sign = "-" if rel.addend < 0 else "+"
            reloc = f"{rel.type_name} {rel.symbol}{sign}{abs(rel.addend):#x}" if rel.addend else \
                f"{rel.type_name} {rel.symbol}"
        alt = None
        if ins.address in sites:
            alt = sites[ins.address].decided_by
        elif ins.address in inside:
            alt = "|"
        lines.append(DisasmLine(ins.address, image.symbolize(ins.address), ins.raw, text, reloc, alt))
    return lines


def _absolute_disp(op_str: str) -> int | None:
    m = re.search(r"%gs:(-?0x[0-9a-f]+|\d+)(?!\()", op_str)
    return int(m.group(1), 0) if m else None


def format_lines(image: Image, symbol: str, lines: list[DisasmLine]) -> str:
    start, _ = image.symbol_range(symbol)
    out = [f"{start:016x} <{symbol}>:"]
    for ln in lines:
        raw = " ".join(f"{b:02x}" for b in ln.raw)
        alt = f"  [alt {ln.alt}]" if ln.alt and ln.alt != "|" else ("  [alt  |]" if ln.alt else "")
        out.append(f"  {ln.address:x}:\t{raw:<30s}\t{ln.text}{alt}")
        if ln.reloc:
            out.append(f"\t\t\t{ln.reloc}")
    return "\n".join(out)


def instruction_text(image: Image, address: int) -> str:
    """One instruction's text ('(C) do_syscall_64' for a stub)."""
    return image.instruction_text(address)
