"""Turning counts of privileged operations into cycles (configurable; see the defaults' sources).

No per-microarchitecture cycle count for MOV to CR3 is published, so the defaults are
estimates from public measurements and every one can be overridden with --cost:

* cr3 = 200: a NOFLUSH CR3 write.  FreeBSD D13985 (Haswell) measured getppid at
  478 ns with PTI+PCID against 339 ns without PTI; the ~140 ns are two CR3 writes
  and their fences, ~70 ns or ~200 cycles at 3 GHz each.
* cr3_flush = 13000: a flushing CR3 write including the TLB refill it causes.
  Andy Lutomirski's PCID measurements (Skylake): touching 512 pages after a switch
  took 6.2 us without PCID against 1.8 us with it, ~4.4 us or ~13000 cycles.
* wrmsr = 300: a WRMSR to SPEC_CTRL; no public figure was found, it is a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from entrycheck.errors import InputError
from entrycheck.explore.paths import Cost


@dataclass(frozen=True)
class CostModel:
    cr3: int = 200
    cr3_flush: int = 13000
    wrmsr: int = 300

    def cycles(self, cost: Cost) -> int:
        return cost.cr3_noflush * self.cr3 + cost.cr3_flushing * self.cr3_flush + cost.msr_writes * self.wrmsr

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_cost(text: str | None) -> CostModel:
    """'cr3=150,cr3_flush=9000' -> CostModel (unnamed fields keep their defaults)."""
    if not text:
        return CostModel()
    values = {}
    names = {f.name for f in fields(CostModel)}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key not in names:
            raise InputError(f"unknown cost {key!r} in --cost; use {', '.join(sorted(names))}")
        try:
            values[key] = int(value, 0)
        except ValueError:
            raise InputError(f"bad cost value {value!r} for {key}: expected cycles as an integer") from None
        if values[key] < 0:
            raise InputError(f"cost {key} must not be negative")
    return CostModel(**values)
