"""Dataflow over a FLOW record: which inputs a run's course depends on, and where its results came from.

A run is deterministic: started from two states that agree on every value it *uses*,
it executes the same instructions, makes the same model transitions and writes the
same values — except for values it only *copies* (pushes a register, pops it back,
copies an exception frame), which may differ.  ``analyse`` walks the FLOW log of one
run and returns

* ``uses``: the input locations (registers, flag groups, words of writable memory)
  whose values steered the run: read by any instruction that is not a plain 64-bit
  copy, used to form an address, tested by a branch, read by a hook or a stub;
* the final *tag* of every location the run wrote: ``None`` (a value computed from
  used inputs only, so the same for any start state that agrees on ``uses``), an
  input location (a copy of that input), or a flags composite (RFLAGS pushed to
  memory: per group of flags, copied from an input or computed).  A flag group's
  tag names the input whose bits of that group it holds;
* ``checks``: comparisons of copied values the machine made outside the code
  (IRET landing on an exception that was already outstanding, canonical RIP).

Anything the analysis cannot follow exactly is treated as a use, so the result is
conservative: ``uses`` may be larger than needed, never smaller.  The explorer's
memo (explore/memo.py) relies on this to stand one run for many.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.image import decode as image_decode
from entrycheck.image.image import Image
from entrycheck.machine.api import GROUP_MASKS, N_LOCS, REG_LOCS, Op, Record
from entrycheck.machine.insnclass import (ARITH, CTRL, GROUPS, RIP_LOC, RSP_LOC, Insn, condition,  # noqa: F401
                                          describe)
from entrycheck.machine.state import RFLAGS

@dataclass(frozen=True)
class Flow:
    """The dataflow of one run, up to where it converged."""

    uses: tuple[int, ...]                          # input locations (sorted)
    regs: tuple[object, ...]                       # final tag of each register location (N_LOCS)
    memory: tuple[tuple[int, object], ...]         # (word, final tag) of each word written
    landed: tuple[tuple[int, object, object, bool], ...]   # (outstanding index, rip, rsp, matched)
    canonical: tuple[object, ...]                  # values IRET required to be canonical RIPs
    branches: tuple[tuple, ...] = ()               # (cond, kind, width, a, b, taken): compares of copies
    landings: tuple[tuple, ...] = ()               # (((a, b), ...), same): the run's own frames an IRET scanned


class Unfollowable(Exception):
    """The run did something the dataflow does not model."""


class Analyser:
    """Static instruction table of one image, and the dataflow walk."""

    def __init__(self, image: Image, wbase: int, wsize: int) -> None:
        self.image = image
        self.wbase, self.wend = wbase, wbase + wsize
        self._insns: dict[int, Insn] = {}

    def insn(self, pc: int) -> Insn:
        got = self._insns.get(pc)
        if got is None:
            try:
                self.image.read(pc, 1)
                decoded = self.image.instructions.at(pc)
            except KeyError:
                decoded = image_decode.decode_one(b"\xc3", pc)     # a C function's stub: `ret`
            if decoded is None or decoded.cs is None:
                raise Unfollowable(f"cannot decode {pc:#x}")
            got = self._insns[pc] = describe(decoded)
        return got

    def analyse(self, record: Record) -> Flow | None:
        """The run's dataflow, or None when it did not converge at its own exception's return
        or did something the analysis cannot follow."""
        if record.flow is None or record.converged is None:
            return None
        try:
            return _Walk(self, record).run()
        except Unfollowable:
            return None


class _Walk:
    def __init__(self, an: Analyser, record: Record) -> None:
        self.an = an
        self.record = record
        self.regs: list[object] = list(range(N_LOCS))
        self.mem: dict[int, object] = {}
        self.uses: set[int] = set()
        self.n_start = len(record.request.start.outstanding)
        self.own: dict[int, tuple[object, object]] = {}
        self.landed: list[tuple[int, object, object, bool]] = []
        self.canonical: list[object] = []
        self.branches: list[tuple] = []
        self.landings: list[tuple] = []
        self.step_regs = record.steps.regs if record.steps is not None else ()
        self.index = -1
        self.popped: tuple[object, object, int, int] | None = None
        self.iret_values = iter([(e.frame.rip, e.frame.rsp) for e in record.events if type(e).__name__ == "Iret"])

    # ---- tags ------------------------------------------------------------------------
    def use_tag(self, tag: object) -> None:
        if tag is None:
            return
        if isinstance(tag, int):
            self.uses.add(tag)
        elif tag[0] == "f":
            for g in tag[1:]:
                self.use_tag(g)
        elif tag[0] == "cmp":                 # flags of a compare of copies, used some other way
            for d in tag[3:5]:
                if d[0] == "t":
                    self.uses.add(d[1])

    def use(self, loc: int) -> None:
        self.use_tag(self.tag(loc))

    def tag(self, loc: int) -> object:
        if loc < N_LOCS:
            return self.regs[loc]
        return self.mem.get(loc, loc)

    def set(self, loc: int, tag: object) -> None:
        if loc < N_LOCS:
            self.regs[loc] = tag
        else:
            self.mem[loc] = tag

    def words(self, phys: int, size: int):
        """(word, fully covered) for the writable words [phys, phys+size) overlaps."""
        lo, hi = max(phys, self.an.wbase), min(phys + size, self.an.wend)
        for w in range(lo & ~7, hi, 8):
            yield w, phys <= w and w + 8 <= phys + size

    def read_mem(self, phys: int, size: int) -> None:
        for w, _ in self.words(phys, size):
            self.use(w)

    def write_mem(self, phys: int, size: int) -> None:
        for w, full in self.words(phys, size):
            if not full:
                self.use(w)
            self.mem[w] = None

    def word_of(self, access: tuple) -> int | None:
        """The writable word an aligned 8-byte access touches (None: read-only memory)."""
        _, phys, size = access
        if not (self.an.wbase <= phys < self.an.wend):
            if self.an.wbase < phys + size and phys < self.an.wend:
                raise Unfollowable("access straddles the writable span")
            return None
        if size != 8 or phys & 7:
            return -1
        return phys

    # ---- the walk -------------------------------------------------------------------------
    def run(self) -> Flow:
        pc, accesses, skipped = None, [], False
        stopped = False
        for entry in self.record.flow:
            op = entry[0]
            if op == Op.INSN:
                if pc is not None and not skipped:
                    self.insn(pc, accesses, entry[1])
                pc, accesses, skipped = entry[1], [], False
                self.index += 1
                rip = self.regs[RIP_LOC]
                if rip is not None:          # executing at a copied address depends on it
                    self.use_tag(rip)
                    self.regs[RIP_LOC] = None
            elif op == Op.READ or op == Op.WRITE:
                accesses.append(entry)
            elif op == Op.SKIP:
                skipped = True
            elif op == Op.USE:
                self.use(entry[1])
            elif op == Op.CONST:
                self.set(entry[1], None)
            elif op == Op.COPY:
                self.set(entry[1], self.tag(entry[2]))
            elif op == Op.MREAD:
                self.read_mem(entry[1], entry[2])
            elif op == Op.MWRITE:
                self.write_mem(entry[1], entry[2])
            elif op == Op.MCOPY:
                self.mcopy(*entry[1:])
            elif op == Op.DELIVER:
                self.deliver(*entry[1:])
            elif op == Op.IRET:
                self.iret(entry[1])
            elif op == Op.LANDED:
                self.land(entry[1], entry[2])
            elif op == Op.STOP:
                stopped = True
                break
        if not stopped:
            raise Unfollowable("the run did not converge")
        written = tuple(sorted((w, t) for w, t in self.mem.items() if t != w))
        return Flow(tuple(sorted(self.uses)), tuple(self.regs), written, tuple(self.landed),
                    tuple(self.canonical), tuple(self.branches), tuple(self.landings))

    def mcopy(self, dst: int, src: int, size: int) -> None:
        if dst & 7 or src & 7 or size & 7:
            self.read_mem(src, size)
            self.write_mem(dst, size)
            return
        tags = [self.tag(src + k) if self.an.wbase <= src + k < self.an.wend else None for k in range(0, size, 8)]
        for k, t in enumerate(tags):
            if self.an.wbase <= dst + 8 * k < self.an.wend:
                self.mem[dst + 8 * k] = t

    def deliver(self, frame: int, words: int, index: int) -> None:
        rip, rsp = self.regs[RIP_LOC], self.regs[RSP_LOC]
        flags = ("f",) + tuple(self.regs[g] for g in GROUPS)
        base = frame + 8 * (words - 5)
        if words == 6:
            self.mem[frame] = None                       # error code
        self.mem[base] = rip
        self.mem[base + 8] = None                        # CS
        self.mem[base + 16] = flags
        self.mem[base + 24] = rsp
        self.mem[base + 32] = None                       # SS
        self.own[index] = (rip, rsp)
        self.regs[RSP_LOC] = None
        self.regs[RIP_LOC] = None
        self.regs[CTRL] = None                           # IF, TF, NT, RF cleared

    def iret(self, frame: int) -> None:
        rip, cs, flags, rsp, ss = (self.tag(frame + 8 * k) for k in range(5))
        self.use_tag(cs)
        self.use_tag(ss)
        if rip is not None:
            self.canonical.append(rip)
        if isinstance(flags, tuple):
            for g, t in zip(GROUPS, flags[1:]):
                self.regs[g] = t
        else:
            for g in GROUPS:             # each group: those bits of the word's value (or computed)
                self.regs[g] = flags
        self.regs[RIP_LOC] = rip
        self.regs[RSP_LOC] = rsp
        rip_value, rsp_value = next(self.iret_values)
        self.popped = (rip, rsp, rip_value, rsp_value)

    def land(self, scanned: tuple[int, ...], matched: int) -> None:
        rip, rsp, rip_value, rsp_value = self.popped
        for k in scanned:
            if k >= self.n_start:
                # Whether the IRET landed on the run's own delivery k: an equality of copies,
                # recorded as one (like a compare's outcome) so that the copied values stay copies.
                own_rip, own_rsp = self.own[k]
                pairs = []
                for own, popped, value in ((own_rip, rip, rip_value), (own_rsp, rsp, rsp_value)):
                    if own == popped:
                        continue                 # the same tag: equal in every run that agrees on uses
                    if isinstance(own, int) and (popped is None or isinstance(popped, int)):
                        pairs.append((("t", own, 0, 8), ("k", value) if popped is None else ("t", popped, 0, 8)))
                    else:
                        pairs = None
                        break
                if pairs is None:
                    for t in (own_rip, rsp, own_rsp, rip):
                        self.use_tag(t)
                elif pairs:
                    self.landings.append((tuple(pairs), k == matched))
            else:
                self.landed.append((k, rip if rip is not None else ("k", rip_value),
                                    rsp if rsp is not None else ("k", rsp_value), k == matched))

    def insn(self, pc: int, accesses: list, next_pc: int) -> None:
        ins = self.an.insn(pc)
        kind = ins.kind
        regs = self.regs
        if kind == "jcc":
            flags = regs[ARITH]
            if isinstance(flags, tuple) and flags[0] == "cmp":
                _, how, width, a, b = flags
                self.branches.append((ins.cond, how, width, a, b, next_pc == ins.target))
            else:
                self.use_tag(flags)
            return
        if kind in ("cmp", "test") and self._compare(ins, accesses):
            return
        if kind in ("generic", "cmp", "test"):
            for r in ins.reads:
                self.use(r)
            for g in ins.flags_read:
                self.use(g)
            for a in accesses:
                if a[0] == Op.READ:
                    self.read_mem(a[1], a[2])
            for a in accesses:
                if a[0] == Op.WRITE:
                    self.write_mem(a[1], a[2])
            for r, full in ins.writes:
                if not full:
                    self.use(r)
                regs[r] = None
            for g, full in ins.flags_written:
                if not full:
                    self.use(g)
                regs[g] = None
            return
        for r in ins.reads:                  # address registers of the copy kinds
            self.use(r)
        if kind == "mov_rr":
            regs[ins.dst] = regs[ins.src]
        elif kind == "load":
            regs[ins.dst] = self._load(accesses)
        elif kind == "store":
            self._store(accesses, regs[ins.src])
        elif kind == "const_r":
            regs[ins.dst] = None
        elif kind == "const_m":
            self._store(accesses, None)
        elif kind == "push_r":
            value = regs[ins.src]
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            self._store(accesses, value)
        elif kind == "push_i" or kind == "call":
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            self._store(accesses, None)
        elif kind == "push_m":
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            reads = [a for a in accesses if a[0] == Op.READ]
            writes = [a for a in accesses if a[0] == Op.WRITE]
            if len(reads) != 1 or len(writes) != 1:
                raise Unfollowable(f"push of memory at {pc:#x}")
            value = self._load(reads, keep_flags=True)
            self._store(writes, value)
        elif kind == "pop_r":
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            regs[ins.dst] = self._load(accesses)
        elif kind == "ret":
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            self.use_tag(self._load(accesses))
        elif kind == "zero":
            regs[ins.dst] = None
            regs[ARITH] = None
        elif kind == "pushf":
            self.use(RSP_LOC)
            regs[RSP_LOC] = None
            self._store(accesses, ("f",) + tuple(regs[g] for g in GROUPS))
        elif kind != "none":
            raise Unfollowable(f"unknown kind {kind}")

    def _compare(self, ins: Insn, accesses: list) -> bool:
        """cmp/test: flags that remember what they compared (when an operand is a copy)."""
        descs = []
        width = 8
        regs_now = self.step_regs[self.index] if self.index < len(self.step_regs) else None
        for op in ins.operands:
            if op[0] == "i":
                descs.append(("k", op[1]))
            elif op[0] == "r":
                _, loc, width = op
                tag = self.regs[loc]
                if tag is None:
                    if regs_now is None:
                        return False
                    descs.append(("k", regs_now[loc] & ((1 << (8 * width)) - 1)))
                elif isinstance(tag, int) and not (REG_LOCS <= tag < N_LOCS):
                    descs.append(("t", tag, 0, width))
                else:
                    return False
            else:
                width = op[1]
                reads = [a for a in accesses if a[0] == Op.READ]
                if len(reads) != 1 or reads[0][2] != width:
                    return False
                phys = reads[0][1]
                w = phys & ~7
                if not (self.an.wbase <= phys < self.an.wend) or (phys - w) + width > 8:
                    return False
                tag = self.tag(w)
                if isinstance(tag, tuple) and tag[0] == "f":
                    tag = _tested_group(ins, tag, phys - w)
                    if tag is None:
                        return False
                elif not isinstance(tag, int) or REG_LOCS <= tag < N_LOCS:
                    return False
                descs.append(("t", tag, phys - w, width))
        if not any(d[0] == "t" for d in descs):
            return False                   # compares computed values only: flags are computed too
        for r in ins.addr:
            self.use(r)
        self.regs[ARITH] = ("cmp", ins.kind, width, descs[0], descs[1])
        return True

    def _load(self, accesses: list, keep_flags: bool = False) -> object:
        reads = [a for a in accesses if a[0] == Op.READ]
        if len(reads) != 1:
            raise Unfollowable("load without one read")
        w = self.word_of(reads[0])
        if w is None:
            return None                       # read-only memory: the same in every run
        if w == -1:
            self.read_mem(reads[0][1], reads[0][2])
            return None
        t = self.tag(w)
        if isinstance(t, tuple) and not keep_flags:   # pushed flags loaded into a register
            self.use_tag(t)
            return None
        return t

    def _store(self, accesses: list, value: object) -> None:
        writes = [a for a in accesses if a[0] == Op.WRITE]
        if len(writes) != 1:
            raise Unfollowable("store without one write")
        w = self.word_of(writes[0])
        if w is None:
            return
        if w == -1:
            self.use_tag(value)
            self.write_mem(writes[0][1], writes[0][2])
            return
        self.mem[w] = value


def _tested_group(ins: Insn, tag: tuple, offset: int) -> int | None:
    """A TEST of an immediate against a word of pushed flags (``tag``: one tag per flag group)
    whose mask lies in one group: the input that group's bits were copied from (its value
    tested with the same mask gives the same outcome), else None."""
    if ins.kind != "test":
        return None
    imm = next((op[1] for op in ins.operands if op[0] == "i"), None)
    if imm is None:
        return None
    mask = imm << (8 * offset)
    hit = [k for k, g in enumerate(GROUPS) if GROUP_MASKS[g] & mask]
    if len(hit) != 1 or mask & ~GROUP_MASKS[GROUPS[hit[0]]]:
        return None
    source = tag[1 + hit[0]]
    return source if isinstance(source, int) else None


def operand(desc: tuple, regs, memory, wbase: int) -> int:
    """The value of a compare's operand: ("k", value) or ("t", input, byte offset, size)."""
    if desc[0] == "k":
        return desc[1]
    _, loc, off, size = desc
    return (value_of(loc, regs, memory, wbase) >> (8 * off)) & ((1 << (8 * size)) - 1)


def value_of(loc: int, regs, memory, wbase: int) -> int:
    """The value of location ``loc`` in a state (registers in REG_NAMES order, writable memory)."""
    if loc < REG_LOCS:
        return regs[loc]
    if loc < N_LOCS:
        return regs[RFLAGS] & GROUP_MASKS[loc]
    off = loc - wbase
    return int.from_bytes(memory[off:off + 8], "little")


__all__ = ["Analyser", "Flow", "Insn", "describe", "value_of", "operand", "condition"]
