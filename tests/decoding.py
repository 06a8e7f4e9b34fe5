"""Decoding helpers shared by the image tests (capstone, AT&T syntax, full detail)."""

from __future__ import annotations

import capstone


def _engine() -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    md.syntax = capstone.CS_OPT_SYNTAX_ATT
    return md


CS = _engine()


def decode_exact(code: bytes, address: int) -> list[capstone.CsInsn]:
    """Whole instructions covering ``code`` exactly; fails on anything capstone cannot decode."""
    insns = list(CS.disasm(code, address))
    decoded = sum(i.size for i in insns)
    assert decoded == len(code), f"{code.hex()} at {address:#x}: undecodable byte at {address + decoded:#x}"
    return insns
