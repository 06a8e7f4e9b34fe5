"""Handler runs shared between injection points: one run stands for every start state
that agrees with it on what it used.

A leaf of the exploration delivers an exception and runs until it returns to the
boundary it interrupted.  Most leaves run the same handler code from states that
differ only in values the handler saves and restores (the interrupted registers, the
interrupted frame, the outer handler's stack).  The dataflow of one such run
(``machine.flow``) says which inputs it used; another start state with the same
model state and the same values at those inputs makes the machine execute the same
instructions and the same model transitions, and write the same values except for
copies.  Whether that run would then rejoin its recorded continuation (the
convergence rule of the explorer) is decided here from the copies' origins, without
running it.  The memo only ever answers for runs that converged where they started
and broke no invariant on their own; everything else runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from entrycheck.image.layout import canonical
from entrycheck.machine.flow import Flow, condition, operand, value_of
from entrycheck.machine.api import FLAG_LOCS as GROUPS, GROUP_MASKS, N_LOCS, REG_LOCS, LiveIndex
from entrycheck.machine.model import CpuState, Vector
from entrycheck.machine.state import RFLAGS, Interrupted


@dataclass(frozen=True)
class Entry:
    """A run that converged, and what it needs to stand for another."""

    uses: tuple[int, ...]
    landed: tuple
    canonical: tuple
    branches: tuple
    landings: tuple                                    # (((a, b), ...), same): equalities of copies at IRETs
    rejoined: int                                      # 0: where it started; 1: where the outer exception returned
    cpu: CpuState                                      # model state at the end
    regs: tuple[tuple[int, int | None, int], ...]      # (loc, source loc or None, value when constant)
    flags: tuple[tuple[int, object], ...]              # RFLAGS by group: (group, tag)
    flags_const: int                                   # RFLAGS at the source's end
    memory: tuple[tuple[int, object, int], ...]        # (offset, tag, final value in the source)
    written: frozenset[int]                            # offsets of the words in ``memory``
    result: object                                     # what the explorer keeps of the run


@dataclass(frozen=True)
class Target:
    """The state a run must rejoin: a recorded run's state at a boundary, and what that run
    still reads.  ``dirty``: words where the start state may differ from ``memory`` (empty
    when the target is the start state itself)."""

    index: int                                         # outstanding exception whose return rejoins
    regs: tuple[int, ...]
    memory: object
    cpu: CpuState
    outstanding: tuple[Interrupted, ...]
    live: LiveIndex
    live_words: frozenset[int]
    boundary: int
    dirty: tuple[int, ...] = ()


def _reader(uses: tuple[int, ...], wbase: int):
    """A function (registers, memory) -> the values of ``uses``, as a hashable key."""
    regs = tuple(u for u in uses if u < REG_LOCS)
    groups = tuple((u, GROUP_MASKS[u]) for u in uses if REG_LOCS <= u < N_LOCS)
    offsets = tuple(u - wbase for u in uses if u >= N_LOCS)

    def read(r, memory) -> tuple:
        return (tuple([r[i] for i in regs]), tuple([r[RFLAGS] & m for _, m in groups]),
                b"".join([memory[o:o + 8] for o in offsets]))
    return read


def _resolve(tag, regs, memory, wbase: int) -> int:
    if isinstance(tag, tuple):
        return tag[1]                                  # ("k", constant)
    return value_of(tag, regs, memory, wbase)


def _compose(parts, regs, memory, wbase: int, const: int) -> int:
    """RFLAGS (or a pushed copy of it) from its groups: each copied from an input's bits of
    that group, or as in the source (``const``)."""
    value = 0
    for group, tag in parts:
        value |= (const if tag is None else value_of(tag, regs, memory, wbase)) & GROUP_MASKS[group]
    return value


class Memo:
    """The shared runs of one explorer (one image, one world)."""

    def __init__(self, wbase: int) -> None:
        self.wbase = wbase
        # key -> [(uses, how to read them, values -> entries)], most useful first
        self._buckets: dict[tuple, list[list]] = {}
        self.entries = 0
        self.hits = 0

    @staticmethod
    def key(vector: Vector, cpu: CpuState, outstanding: tuple[Interrupted, ...], home, options: Hashable) -> tuple:
        return (vector, cpu, len(outstanding), home, options)

    def add(self, key: tuple, flow: Flow, rejoined: int, start_regs, start_memory, final_regs, final_memory,
            final_cpu: CpuState, result: object) -> None:
        wbase = self.wbase
        regs = []
        for loc in range(REG_LOCS):
            tag = flow.regs[loc]
            if tag == loc and rejoined == 0:
                continue                               # restored: equal to the start, which is the target
            if tag is None:
                regs.append((loc, None, final_regs[loc]))
            elif isinstance(tag, int):
                regs.append((loc, tag, 0))
            else:
                return                                 # a register holding pushed flags: not followed
        flags = tuple((g, flow.regs[g]) for g in GROUPS)
        memory = []
        for word, tag in flow.memory:
            off = word - wbase
            memory.append((off, tag, int.from_bytes(final_memory[off:off + 8], "little")))
        entry = Entry(flow.uses, flow.landed, flow.canonical, flow.branches, flow.landings, rejoined, final_cpu,
                      tuple(regs), flags, final_regs[RFLAGS], tuple(memory), frozenset(m[0] for m in memory), result)
        bucket = self._buckets.setdefault(key, [])
        for group in bucket:
            if group[0] == flow.uses:
                break
        else:
            group = [flow.uses, _reader(flow.uses, wbase), {}, 0]
            bucket.append(group)
        group[2].setdefault(group[1](start_regs, start_memory), []).append(entry)
        self.entries += 1

    def uses(self, vector: Vector) -> list[tuple[int, ...]]:
        """The inputs each kind of shared run of ``vector`` used (one tuple per group)."""
        return [group[0] for key, bucket in self._buckets.items() if key[0] is vector for group in bucket]

    def lookup(self, key: tuple, regs: tuple[int, ...], memory, outstanding: tuple[Interrupted, ...],
               targets: tuple[Target | None, ...]) -> Entry | None:
        """An entry that stands for the run from (regs, memory), rejoining ``targets[e.rejoined]``."""
        bucket = self._buckets.get(key)
        if not bucket:
            return None
        for n, group in enumerate(bucket):
            entries = group[2].get(group[1](regs, memory))
            if entries is None:
                continue
            for entry in entries:
                if entry.rejoined >= len(targets) or targets[entry.rejoined] is None:
                    continue
                if self._stands_for(entry, regs, memory, outstanding, targets[entry.rejoined]):
                    self.hits += 1
                    group[3] += 1
                    if n and group[3] > bucket[n - 1][3]:
                        bucket[n - 1], bucket[n] = group, bucket[n - 1]
                    return entry
        return None

    def _stands_for(self, e: Entry, regs, memory, outstanding, t: Target) -> bool:
        wbase = self.wbase
        for index, rip, rsp, matched in e.landed:
            inj = outstanding[index]
            same = inj.rip == _resolve(rip, regs, memory, wbase) and inj.rsp == _resolve(rsp, regs, memory, wbase)
            if same != matched:
                return False
        for cond, kind, width, a, b, taken in e.branches:
            if condition(cond, kind, width, operand(a, regs, memory, wbase), operand(b, regs, memory, wbase)) != taken:
                return False
        for pairs, same in e.landings:
            if all(operand(a, regs, memory, wbase) == operand(b, regs, memory, wbase) for a, b in pairs) != same:
                return False
        for tag in e.canonical:
            if not canonical(_resolve(tag, regs, memory, wbase)):
                return False
        # Would the run rejoin the target? Model state, registers exactly, memory where the
        # target's run still reads it.
        if e.cpu != t.cpu or outstanding[:t.index] != t.outstanding:
            return False
        ref_regs, ref_memory = t.regs, t.memory
        for loc, src, const in e.regs:
            final = const if src is None else value_of(src, regs, memory, wbase)
            if final != ref_regs[loc]:
                return False
        if _compose(e.flags, regs, memory, wbase, e.flags_const) != ref_regs[RFLAGS]:
            return False
        live, live_words, boundary = t.live, t.live_words, t.boundary
        for off, tag, const in e.memory:
            if off not in live_words:
                continue
            if tag is None:
                final = const
            elif isinstance(tag, int):
                final = value_of(tag, regs, memory, wbase)
            else:
                final = _compose(zip(GROUPS, tag[1:]), regs, memory, wbase, const)
            if final != int.from_bytes(ref_memory[off:off + 8], "little") and live.live(off, boundary):
                return False
        written = e.written
        for off in t.dirty:
            if off in written:
                continue
            if memory[off:off + 8] != ref_memory[off:off + 8] and live.live(off, boundary):
                return False
        return True


__all__ = ["Memo", "Entry", "Target"]
