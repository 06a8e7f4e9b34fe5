"""x86-64 relocation recipes as a table of pure functions.

Each recipe computes the value to store from S (symbol address), A (addend) and P
(address of the field) and says how wide the field is and which range it must fit;
a value that does not fit is an ld-style "relocation truncated to fit" error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from entrycheck.errors import InputError


class Range(enum.Enum):
    U64 = (0, (1 << 64) - 1)
    U32 = (0, (1 << 32) - 1)
    S32 = (-(1 << 31), (1 << 31) - 1)
    S64 = (-(1 << 63), (1 << 63) - 1)

    def fits(self, value: int) -> bool:
        low, high = self.value
        return low <= value <= high


@dataclass(frozen=True)
class Recipe:
    name: str
    size: int
    compute: Callable[[int, int, int], int]
    range: Range
    pc_relative: bool


R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_PC32 = 2
R_X86_64_PLT32 = 4
R_X86_64_32 = 10
R_X86_64_32S = 11
R_X86_64_PC64 = 24

RECIPES: dict[int, Recipe] = {
    R_X86_64_64: Recipe("R_X86_64_64", 8, lambda s, a, p: (s + a) & ((1 << 64) - 1), Range.U64, False),
    R_X86_64_32: Recipe("R_X86_64_32", 4, lambda s, a, p: _unsigned(s + a), Range.U32, False),
    R_X86_64_32S: Recipe("R_X86_64_32S", 4, lambda s, a, p: _signed(s + a), Range.S32, False),
    R_X86_64_PC32: Recipe("R_X86_64_PC32", 4, lambda s, a, p: _signed(s + a - p), Range.S32, True),
    # Without a PLT (the kernel links statically) PLT32 resolves like PC32.
    R_X86_64_PC64: Recipe("R_X86_64_PC64", 8, lambda s, a, p: _signed(s + a - p), Range.S64, True),
    R_X86_64_PLT32: Recipe("R_X86_64_PLT32", 4, lambda s, a, p: _signed(s + a - p), Range.S32, True),
}


def _signed(value: int) -> int:
    """Interpret ``value`` as a 64-bit two's complement number."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _unsigned(value: int) -> int:
    return value & ((1 << 64) - 1)


def recipe(rtype: int) -> Recipe:
    try:
        return RECIPES[rtype]
    except KeyError:
        known = ", ".join(r.name for r in RECIPES.values())
        raise InputError(f"unsupported relocation type {rtype} (entrycheck applies {known})") from None


def encode(rtype: int, s: int, a: int, p: int, *, symbol: str, where: str) -> bytes:
    """The bytes to store for one relocation, or InputError when the value does not fit."""
    rec = recipe(rtype)
    value = rec.compute(s, a, p)
    if not rec.range.fits(value):
        sign = "-" if a < 0 else "+"
        raise InputError(f"{where}: relocation truncated to fit: {rec.name} against `{symbol}' "
                         f"{sign}{abs(a):#x} (value {value:#x})")
    return (value & ((1 << (8 * rec.size)) - 1)).to_bytes(rec.size, "little")


def decode(rtype: int, field: bytes) -> int:
    """The value stored in a relocated field, sign-extended as the recipe's range says."""
    rec = recipe(rtype)
    return int.from_bytes(field[:rec.size], "little", signed=rec.range in (Range.S32, Range.S64))
