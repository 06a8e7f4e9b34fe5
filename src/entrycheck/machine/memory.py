"""Virtual memory for the model CPU: regions -> physical pages, and the PTI user view.

Unicorn runs in virtual-TLB mode (DESIGN.md §3): every TLB miss asks ``lookup`` for
a page.  Under a user CR3 only the pages PTI maps for user mode are answered, so a
forbidden access faults on its own with no per-access hook.  Writable regions are
packed into one physical span so that a snapshot is one read and a restore one write.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Mapping, Sequence

from entrycheck.errors import InternalError
from entrycheck.image.layout import PAGE, Perm, Region, page_up

PHYS_WRITABLE = 0x1000_0000
PHYS_READONLY = 0x4000_0000


class Unmapped(InternalError):
    """A guest address with no mapping, reached from Python (a stub); in a stub it is a fault
    of the code under test that gave the stub that address (see ``Machine``)."""

    def __init__(self, addr: int) -> None:
        super().__init__(f"{addr:#x} is not mapped")
        self.addr = addr


@dataclass(frozen=True)
class Page:
    phys: int
    perm: Perm
    user: bool            # mapped by the PTI user page tables
    region: str


@dataclass(frozen=True)
class PhysChunk:
    phys: int
    data: bytes
    perm: Perm


@dataclass(frozen=True)
class AddressSpace:
    """The model's memory: which virtual page is which physical page, what PTI's user tables
    map, and the writable span every snapshot covers.  Frozen: the explorer reads it as the
    machine's layout, and only the machine writes memory."""

    pages: Mapping[int, Page]               # virtual page number -> page
    chunks: tuple[PhysChunk, ...]           # physical memory to map, with initial contents
    writable_base: int                      # physical span of all writable memory
    writable_size: int
    regions: tuple[Region, ...]

    def phys(self, addr: int) -> int:
        page = self.pages.get(addr >> 12)
        if page is None:
            raise Unmapped(addr)
        return page.phys + (addr & (PAGE - 1))

    def mapped(self, addr: int) -> bool:
        return (addr >> 12) in self.pages

    @cached_property
    def pristine(self) -> bytes:
        """The writable span as the world initialised it (every run's memory starts from it)."""
        out = bytearray(self.writable_size)
        for chunk in self.chunks:
            if chunk.phys >= self.writable_base and Perm.W in chunk.perm:
                off = chunk.phys - self.writable_base
                out[off:off + len(chunk.data)] = chunk.data
        return bytes(out)


def build_address_space(regions: Sequence[Region]) -> AddressSpace:
    ordered = sorted(regions, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.start:
            raise InternalError(f"regions {a.name} and {b.name} overlap")
    pages: dict[int, Page] = {}
    chunks: list[PhysChunk] = []
    cursor = {True: PHYS_WRITABLE, False: PHYS_READONLY}
    for r in ordered:
        if r.start % PAGE or r.size % PAGE:
            raise InternalError(f"region {r.name} is not page aligned")
        writable = Perm.W in r.perm
        phys = cursor[writable]
        cursor[writable] += page_up(r.size)
        data = r.data[:r.size] + bytes(r.size - min(len(r.data), r.size))
        chunks.append(PhysChunk(phys, data, r.perm))
        for k in range(r.size // PAGE):
            pages[(r.start >> 12) + k] = Page(phys + k * PAGE, r.perm, r.user_mapped, r.name)
    return AddressSpace(MappingProxyType(pages), tuple(chunks), PHYS_WRITABLE,
                        cursor[True] - PHYS_WRITABLE, tuple(ordered))


def diff_words(a: bytes, b: bytes) -> list[int]:
    """Byte offsets (multiples of 8) of the 8-byte words where two equal-length spans differ."""
    out: list[int] = []
    n = len(a)
    for page in range(0, n, 0x1000):
        end = min(page + 0x1000, n)
        if a[page:end] == b[page:end]:
            continue
        for block in range(page, end, 0x100):
            bend = min(block + 0x100, end)
            if a[block:bend] == b[block:bend]:
                continue
            for off in range(block, bend, 8):
                if a[off:off + 8] != b[off:off + 8]:
                    out.append(off)
    return out
