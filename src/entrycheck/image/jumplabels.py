"""Jump labels (static branches) of the noinstr C, set as a booted kernel has them.

Every ``static_branch_likely/unlikely()`` leaves an entry in ``__jump_table``: the address of
a 2- or 5-byte site, the address it jumps to, and its static key plus two flag bits (bit 0:
the branch's sense; bit 1: objtool's jump-label hack, the site was compiled as a JMP).  A
booted kernel (kernel/jump_label.c, jump_label_init) makes the site a JMP exactly when the
key is enabled XOR the sense bit is set, else a NOP.  The key's state is the image's own data
where an object of the image defines it (``static_key.enabled`` is its first member), else
what the tree says of it (kernel/noinstr.py ``static_keys``, given as ``keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from entrycheck.errors import InputError

JUMP_TABLE = "__jump_table"
ENTRY_SIZE = 16                    # struct jump_entry: s32 code, s32 target, long key
NOP2 = b"\x66\x90"
NOP5 = b"\x0f\x1f\x44\x00\x00"


@dataclass(frozen=True)
class JumpLabel:
    site: int
    target: int
    key: str                   # the key's symbol (+ offset of a member or element)
    enabled: bool
    branch: bool               # the sense bit: the site jumps when the key is disabled

    @property
    def jumps(self) -> bool:
        return self.enabled != self.branch


def _s(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


def apply(contents: dict[str, bytearray], sections, relocations, keys: Mapping[str, bool],
          where: str) -> tuple[JumpLabel, ...]:
    """Set every site of ``__jump_table`` in ``contents`` (section name -> bytes, changed in place).

    ``sections``: the placed sections (name, address, size); ``relocations``: the applied
    relocations (the key field's names the key); ``keys``: the state of keys the image does not
    define.  A key neither says is an error that names it."""
    table = next((s for s in sections if s.name == JUMP_TABLE), None)
    if table is None:
        return ()
    key_relocs = {r.address: r for r in relocations if r.section == JUMP_TABLE}
    data = contents[JUMP_TABLE]
    out = []
    for off in range(0, len(data) - ENTRY_SIZE + 1, ENTRY_SIZE):
        entry = table.address + off
        site = entry + _s(data[off:off + 4])
        target = entry + 4 + _s(data[off + 4:off + 8])
        key_field = entry + 8 + _s(data[off + 8:off + 16])
        reloc = key_relocs.get(entry + 8)
        if reloc is None:
            raise InputError(f"{where}: __jump_table entry at +{off:#x} has no key relocation")
        member = reloc.addend & ~3
        name = reloc.symbol + (f"+{member:#x}" if member else "")
        key_addr = key_field & ~3
        home = next((s for s in sections if s.address <= key_addr < s.address + s.size), None)
        if home is not None and home.name != JUMP_TABLE:
            at = key_addr - home.address
            enabled = _s(contents[home.name][at:at + 4]) > 0
        elif reloc.symbol in keys:
            enabled = keys[reloc.symbol]
        else:
            raise InputError(f"{where}: the static key {reloc.symbol} (a jump label's) is neither in the image nor "
                             "found in the tree: its state on a booted kernel is unknown")
        label = JumpLabel(site, target, name, enabled, bool(key_field & 1))
        _set(contents, sections, label, where)
        out.append(label)
    return tuple(out)


def _set(contents: dict[str, bytearray], sections, label: JumpLabel, where: str) -> None:
    sec = next((s for s in sections if s.address <= label.site < s.address + s.size), None)
    if sec is None:
        raise InputError(f"{where}: a jump label's site {label.site:#x} is in no loaded section")
    code = contents[sec.name]
    at = label.site - sec.address
    head = bytes(code[at:at + 5])
    if head[0] == 0xEB or head[:2] == NOP2:
        size = 2
    elif head[0] == 0xE9 or head == NOP5:
        size = 5
    else:
        raise InputError(f"{where}: the jump label at {sec.name}+{at:#x} is neither a JMP nor a NOP "
                         f"({head.hex(' ')})")
    if not label.jumps:
        code[at:at + size] = NOP2 if size == 2 else NOP5
        return
    rel = label.target - (label.site + size)
    if size == 2:
        if not -128 <= rel < 128:
            raise InputError(f"{where}: the jump label at {sec.name}+{at:#x} cannot reach its target")
        code[at:at + 2] = bytes([0xEB, rel & 0xFF])
    else:
        code[at:at + 5] = b"\xe9" + rel.to_bytes(4, "little", signed=True)


__all__ = ["JumpLabel", "apply", "JUMP_TABLE"]
