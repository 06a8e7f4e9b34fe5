"""Instruction decoding with capstone, shared by the loader, disasm and the machine.

The loader decodes the object once to learn how each undefined symbol is used
(through %gs, called, or plain data); the machine decodes the patched image once
to find the few instructions it must hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import capstone
from capstone import x86_const as X

GS_PREFIX = 0x65


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes
    gs: bool                   # has a %gs segment override
    branch_target: int | None  # for direct call/jmp/jcc
    is_call: bool
    is_jump: bool              # any jmp/jcc (direct or not)
    rip_target: int | None     # address of a RIP-relative memory operand
    name: str = ""             # capstone's name of the instruction, the same in either syntax ("mov", "ret")
    cs: object = field(default=None, compare=False, repr=False)    # capstone's instruction, with details
    operands: tuple = field(default=(), compare=False, repr=False)  # its operands in Intel order

    @property
    def end(self) -> int:
        return self.address + self.size


@lru_cache(maxsize=4)
def _engine(att: bool) -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    if att:
        md.syntax = capstone.CS_OPT_SYNTAX_ATT
    md.skipdata = False
    return md


def _convert(ins: capstone.CsInsn, att: bool) -> Insn:
    gs = ins.prefix[1] == GS_PREFIX
    is_call = ins.group(capstone.CS_GRP_CALL)
    is_jump = ins.group(capstone.CS_GRP_JUMP)
    target = None
    rip_target = None
    for op in ins.operands:
        if op.type == X.X86_OP_IMM and (is_call or is_jump):
            target = op.imm & ((1 << 64) - 1)
        elif op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP:
            rip_target = (ins.address + ins.size + op.mem.disp) & ((1 << 64) - 1)
    mnemonic = ins.mnemonic
    if mnemonic == "clac" and ins.size == 4:           # capstone reads FRED's ERETU/ERETS as a prefixed CLAC
        mnemonic = {0xF3: "eretu", 0xF2: "erets"}.get(ins.bytes[0], mnemonic)
    # AT&T lists the operands the other way round: classification reads them in Intel order.
    operands = tuple(reversed(ins.operands)) if att else tuple(ins.operands)
    return Insn(ins.address, ins.size, mnemonic, ins.op_str, bytes(ins.bytes), gs,
                target, is_call, is_jump, rip_target, ins.insn_name(), ins, operands)


def decode_one(code: bytes, address: int, *, att: bool = True) -> Insn | None:
    for ins in _engine(att).disasm(code[:16], address, 1):
        return _convert(ins, att)
    return None


# Decoded instructions by (syntax, address, the 15 bytes from there): the images of one object
# under different feature sets differ only at their patched sites, so each process decodes an
# instruction once however many feature sets it loads.
_DECODED: dict[tuple[bool, int, bytes], Insn | None] = {}
_DECODED_MAX = 1 << 18


def sweep(code: bytes, address: int, *, att: bool = True) -> Iterator[Insn]:
    """Linear sweep over ``code``; an undecodable byte is skipped (yielded as '.byte')."""
    md = _engine(att)
    cache = _DECODED
    if len(cache) > _DECODED_MAX:
        cache.clear()
    offset = 0
    n = len(code)
    while offset < n:
        window = code[offset:offset + 15]
        key = (att, address + offset, window)
        got = cache.get(key, False)
        if got is False:
            got = None
            for ins in md.disasm(window, address + offset, 1):
                got = _convert(ins, att)
            cache[key] = got
        if got is not None:
            yield got
            offset += got.size
            continue
        byte = code[offset]
        yield Insn(address + offset, 1, ".byte", f"{byte:#04x}", bytes([byte]), False,
                   None, False, False, None)
        offset += 1
