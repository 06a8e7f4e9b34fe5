"""The kernel's alternatives: parse ``.altinstructions`` and patch code for a feature set.

Entry layouts (DESIGN.md §3):
  6.1  (12 bytes): s32 instr, s32 repl, u16 cpuid (bit 15 = ALT_NOT), u8 instrlen, u8 replacementlen
  6.12 (14 bytes): s32 instr, s32 repl, u32 ft_flags = cpuid | flags << 16
                   (ALT_FLAG_NOT = 1, ALT_FLAG_DIRECT_CALL = 2), u8 instrlen, u8 replacementlen
The layout is recognised from where the relocations fall (two per entry, at 0 and 4).

Patching follows the kernel's apply_alternatives(): entries apply in order, so a
later entry for the same site wins; consecutive entries for one site (nested
ALTERNATIVE_2) share the largest length; a replacement's relative branches and
RIP-relative operands that point outside it are re-targeted for its new place;
the rest of the site is filled with NOPs, and runs of one-byte NOPs are merged
into long NOPs as the kernel's optimize_nops() does (so instruction boundaries
match the real kernel's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from entrycheck.errors import InputError
from entrycheck.image import relocs
from entrycheck.image.decode import sweep

ALT_FLAG_NOT = 1
ALT_FLAG_DIRECT_CALL = 2

# P6 NOPs as the kernel's x86_nops table (lengths 1..8).
NOPS: tuple[bytes, ...] = (
    b"",
    bytes.fromhex("90"),
    bytes.fromhex("6690"),
    bytes.fromhex("0f1f00"),
    bytes.fromhex("0f1f4000"),
    bytes.fromhex("0f1f440000"),
    bytes.fromhex("660f1f440000"),
    bytes.fromhex("0f1f8000000000"),
    bytes.fromhex("0f1f840000000000"),
)


@dataclass(frozen=True)
class AltEntry:
    index: int
    instr: int            # address of the site
    repl: int             # address of the replacement in .altinstr_replacement
    feature: int          # X86_FEATURE number
    flags: int            # ALT_FLAG_*
    instrlen: int
    replen: int

    @property
    def inverted(self) -> bool:
        return bool(self.flags & ALT_FLAG_NOT)


@dataclass(frozen=True)
class AltSite:
    """One patched site: what the code there is for this feature set, and why."""

    address: int
    length: int
    entries: tuple[int, ...]       # AltEntry indexes for this site, in order
    applied: int | None            # the entry whose replacement is in place, or None (original kept)
    decided_by: str                # "+pti": replaced as pti is set; "!xenpv": ALT_NOT, xenpv absent;
                                   # "-pti,-pcid": original kept (for ALT_NOT entries "+F")


@dataclass(frozen=True)
class PcRelField:
    """A PC-relative relocation inside .altinstr_replacement, for re-targeting."""

    address: int          # where the field is, in the replacement section
    rtype: int
    target: int           # S + A
    symbol: str


def parse_entries(data: bytes, address: int, reloc_offsets: Sequence[int], where: str) -> tuple[AltEntry, ...]:
    """Decode relocated ``.altinstructions`` bytes laid out at ``address``."""
    if not data:
        return ()
    stride = _stride(len(data), sorted(reloc_offsets), where)
    entries = []
    for k, off in enumerate(range(0, len(data), stride)):
        if stride == 12:
            instr, repl, cpuid, ilen, rlen = struct.unpack_from("<iiHBB", data, off)
            feature, flags = cpuid & 0x7FFF, (ALT_FLAG_NOT if cpuid & 0x8000 else 0)
        else:
            instr, repl, ft, ilen, rlen = struct.unpack_from("<iiIBB", data, off)
            feature, flags = ft & 0xFFFF, ft >> 16
        entries.append(AltEntry(k, address + off + instr, address + off + 4 + repl, feature, flags, ilen, rlen))
    return tuple(entries)


def _stride(size: int, offsets: Sequence[int], where: str) -> int:
    for stride in (12, 14):
        if size % stride:
            continue
        want = [o for k in range(size // stride) for o in (k * stride, k * stride + 4)]
        if list(offsets) == want:
            return stride
    raise InputError(f"{where}: .altinstructions has neither the 12-byte (6.1) nor the 14-byte (6.12) "
                     "layout; the object is corrupt or from an unsupported kernel")


def patch(code: Mapping[str, tuple[int, bytes]], replacement: tuple[int, bytes],
          entries: Sequence[AltEntry], pcrel: Sequence[PcRelField], enabled: frozenset[int],
          feature_name, where: str) -> tuple[dict[str, bytearray], tuple[AltSite, ...]]:
    """Patch the code sections for the ``enabled`` feature numbers.

    ``code`` maps section name -> (address, relocated bytes); ``replacement`` is the
    relocated .altinstr_replacement.  Returns patched copies and the site list.
    """
    out = {name: bytearray(data) for name, (_, data) in code.items()}
    entries_by_index = {e.index: e for e in entries}
    repl_addr, repl_data = replacement

    def locate(addr: int, length: int) -> tuple[str, int]:
        for name, (start, data) in code.items():
            if start <= addr and addr + length <= start + len(data):
                return name, addr - start
        raise InputError(f"{where}: alternative site {addr:#x}+{length} lies outside the code")

    # Group consecutive entries of one site; nested alternatives share the largest length.
    groups: list[list[AltEntry]] = []
    for e in entries:
        if groups and groups[-1][0].instr == e.instr:
            groups[-1].append(e)
        else:
            groups.append([e])

    sites = []
    for group in groups:
        length = max(e.instrlen for e in group)
        name, off = locate(group[0].instr, length)
        applied = None
        for e in group:
            if e.flags & ALT_FLAG_DIRECT_CALL:
                raise InputError(f"{where}: alternative #{e.index} uses ALT_FLAG_DIRECT_CALL, "
                                 "which entrycheck does not model")
            present = e.feature in enabled
            if present == e.inverted:
                continue
            if e.replen > length:
                raise InputError(f"{where}: alternative #{e.index} replacement ({e.replen} bytes) is longer "
                                 f"than its site ({length} bytes)")
            r0 = e.repl - repl_addr
            if r0 < 0 or r0 + e.replen > len(repl_data):
                raise InputError(f"{where}: alternative #{e.index} replacement lies outside .altinstr_replacement")
            buf = bytearray(repl_data[r0:r0 + e.replen])
            _retarget(buf, e, group[0].instr, pcrel, where)
            out[name][off:off + e.replen] = buf
            out[name][off + e.replen:off + length] = b"\x90" * (length - e.replen)
            applied = e.index
        _optimize_nops(out[name], off, length, group[0].instr)
        if applied is None:
            # Original kept: a plain entry's feature is absent ("-F"), an ALT_NOT entry's present ("+F").
            decided = ",".join(("+" if e.inverted else "-") + feature_name(e.feature) for e in group)
        else:
            e = entries_by_index[applied]
            decided = ("!" if e.inverted else "+") + feature_name(e.feature)
        sites.append(AltSite(group[0].instr, length, tuple(e.index for e in group), applied, decided))
    return out, tuple(sites)


def _retarget(buf: bytearray, e: AltEntry, site: int, pcrel: Sequence[PcRelField], where: str) -> None:
    """Fix PC-relative fields that point outside the replacement for its new address."""
    for f in pcrel:
        if not (e.repl <= f.address < e.repl + e.replen):
            continue
        if e.repl <= f.target < e.repl + e.replen:
            continue
        new_p = site + (f.address - e.repl)
        field = relocs.encode(f.rtype, f.target, 0, new_p, symbol=f.symbol,
                              where=f"{where}: alternative #{e.index}")
        k = f.address - e.repl
        buf[k:k + len(field)] = field


def _optimize_nops(code: bytearray, off: int, length: int, address: int) -> None:
    """Merge runs of one-byte NOPs inside a site into the longest NOPs (as the kernel)."""
    insns = list(sweep(bytes(code[off:off + length]), address))
    k = 0
    while k < len(insns):
        if insns[k].raw != b"\x90":
            k += 1
            continue
        j = k
        while j < len(insns) and insns[j].raw == b"\x90":
            j += 1
        start = insns[k].address - address + off
        run = j - k
        pos = start
        while run:
            n = min(run, len(NOPS) - 1)
            code[pos:pos + n] = NOPS[n]
            pos += n
            run -= n
        k = j
