"""What goes into the machine and what comes out: requests, records, and the stop rule.

Plain data (no Unicorn here): ``Request`` says where a run starts, what to deliver,
what to record and when to stop; ``Record`` is what the run did.  ``Context`` is
what a stub (a C function's model) may do to the machine while it runs.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Protocol, Sequence

from entrycheck.image.layout import USER_GSBASE_POISON, USER_GSBASE_VALUES, Region
from entrycheck.machine.events import Event, FaultKind, Injection, Outcome
from entrycheck.machine.fred import FredConfig
from entrycheck.machine.model import SPEC_WINDOW, CpuState, SpecConfig, Vector
from entrycheck.machine.state import RFLAGS, Interrupted, Regs, Snapshot

DEFAULT_BUDGET = 20000
MASK64 = (1 << 64) - 1


class Level(enum.IntEnum):
    EVENTS = 0     # hooks at the privileged sites only
    PCS = 1        # + the address of every instruction executed
    STEPS = 2      # + the state at every instruction boundary, every memory access
    FLOW = 3       # + the dataflow log (machine.flow)


class Op(enum.IntEnum):
    """Entries of the FLOW log (what each instruction and each hook read and wrote)."""

    INSN = 0        # (pc): an instruction starts
    READ = 1        # (phys, size): the instruction read memory
    WRITE = 2       # (phys, size): the instruction wrote memory
    SKIP = 3        # (): a hook carried out the instruction (its own semantics do not apply)
    USE = 4         # (loc): a hook's result depends on this location's value
    CONST = 5       # (loc): a hook set it to a value computed from used inputs only
    COPY = 6        # (dst loc, src loc)
    MREAD = 7       # (phys, size): a hook read memory (a use)
    MWRITE = 8      # (phys, size): a hook wrote memory (a computed value)
    MCOPY = 9       # (dst phys, src phys, size): a hook copied memory
    DELIVER = 10    # (frame phys, words, index): exception delivery pushed a frame; outstanding[index]
    IRET = 11       # (frame phys): IRETQ popped RIP/CS/RFLAGS/RSP/SS from the frame
    LANDED = 12     # (scanned indices, matched index or -1)
    STOP = 13       # (): the run converged


# Locations of the FLOW log: REG_INDEX for the whole registers (RAX..RIP, below REG_LOCS); RFLAGS
# split in four groups of flags, which take the locations from RFLAGS's own index on; physical
# addresses (multiples of 8, all at least N_LOCS) for words of writable memory.
REG_LOCS = RFLAGS
FLAG_GROUPS = {"arith": RFLAGS, "df": RFLAGS + 1, "ctrl": RFLAGS + 2, "other": RFLAGS + 3}
FLAG_LOCS = tuple(FLAG_GROUPS.values())
N_LOCS = RFLAGS + len(FLAG_GROUPS)
_ARITH, _DF, _CTRL = 0x8D5, 0x400, 0x14300       # CF PF AF ZF SF OF; DF; TF IF NT RF
GROUP_MASKS = dict(zip(FLAG_LOCS, (_ARITH, _DF, _CTRL, MASK64 & ~(_ARITH | _DF | _CTRL))))


@dataclass(frozen=True)
class MachineConfig:
    """Everything the machine needs besides the image (built by kernelabi)."""

    regions: tuple[Region, ...]
    idt: Mapping[Vector, int]            # vector -> handler address
    ist_slots: Mapping[Vector, int]      # vector -> address of the TSS slot with its IST stack
    sp0_slot: int                        # address of TSS.sp0 (the stack of a CPL change)
    cpunode_selector: int                # __CPUNODE_SEG
    cpunode_limit: int                   # what LSL of it yields (cpu | node << 12)
    stubs: Mapping[int, str]             # stub address -> C function name
    user_gs_poison: int = USER_GSBASE_POISON    # the GSBASE user space runs with by default
    user_gs_values: frozenset[int] = USER_GSBASE_VALUES   # every GSBASE the model gives user space
    iret_faults: bool = True             # a refused IRET delivers #GP (off: the run ends with a fault)
    fred: FredConfig | None = None       # events are delivered by FRED, not through the IDT
    spec: SpecConfig | None = None       # speculation-hygiene checks the feature set asks for
    asm_stubs: frozenset[int] = frozenset()     # stubs of asm helpers that return (speculation runs through)
    unbacked: tuple[tuple[int, int, str], ...] = ()   # (start, end, symbol): data nothing defines, not mapped
    noinstr_c: bool = False              # the kernel's noinstr C runs (CR2 and DR6 are recorded at delivery)
    c_entries: Mapping[int, str] = field(default_factory=dict)   # C functions the entry code calls: address -> name


class LiveIndex:
    """Which words of writable memory a recorded run still reads before it writes them.

    Per 8-byte word (offset into the writable span): the steps that access it and
    whether that access reads it (a partial write counts as a read)."""

    def __init__(self, accesses: Sequence[tuple], base: int, size: int) -> None:
        per: dict[int, dict[int, bool]] = {}
        for step, phys, n, write, *_ in accesses:
            lo, hi = max(phys, base), min(phys + n, base + size)
            if lo >= hi:
                continue
            for w in range((lo - base) & ~7, hi - base, 8):
                full = write and phys <= base + w and base + w + 8 <= phys + n
                d = per.setdefault(w, {})
                d[step] = d.get(step, False) or not full
        self._index = {w: ([s for s in sorted(d)], [d[s] for s in sorted(d)]) for w, d in per.items()}

    def words(self) -> frozenset[int]:
        return frozenset(self._index)

    def live(self, word: int, boundary: int) -> bool:
        """Whether the value of ``word`` at ``boundary`` is read later (accesses of instruction k
        carry step k + 1)."""
        return self.after(word, boundary) is True

    def after(self, word: int, boundary: int) -> bool | None:
        """Whether the next access of ``word`` after ``boundary`` reads it; None: there is none."""
        got = self._index.get(word)
        if got is None:
            return None
        steps, reads = got
        j = bisect.bisect_left(steps, boundary + 1)
        return reads[j] if j < len(steps) else None


class JoinedLive:
    """The liveness of a run that stopped where it rejoined another (``then`` at its boundary
    ``at``): its own accesses first, then the other's from there."""

    def __init__(self, first: LiveIndex, then, at: int) -> None:
        self.first, self.then, self.at = first, then, at

    def words(self) -> frozenset[int]:
        return self.first.words() | self.then.words()

    def after(self, word: int, boundary: int) -> bool | None:
        got = self.first.after(word, boundary)
        return self.then.after(word, self.at) if got is None else got

    def live(self, word: int, boundary: int) -> bool:
        return self.after(word, boundary) is True


@dataclass(frozen=True)
class ConvergePoint:
    """Stop rule: when outstanding exception ``index`` resumes and the state equals ``ref``
    in everything the reference run still reads, the rest of the run is the reference's."""

    index: int
    ref: Snapshot
    live: LiveIndex
    boundary: int
    tag: int


@dataclass(frozen=True)
class Request:
    start: Snapshot
    deliver: Vector | None = None                # delivered at the start boundary
    injections: tuple[Injection, ...] = ()       # delivered before the hit-th execution of their site
    level: Level = Level.EVENTS
    converge: tuple[ConvergePoint, ...] = ()
    options: Hashable = None                     # handed to the stub handler
    budget: int = DEFAULT_BUDGET
    budget_from: int = 0                         # the path step the budget counts from
    cut_loops: bool = False                      # end as no-return once the state repeats (see machine)
    speculate: bool = False                      # a mispredicted path: ends at a serialising instruction,
    #                                              an LFENCE, a C function or the budget, its faults squashed
    window: int = SPEC_WINDOW                    # instructions a mispredict injection runs ahead


@dataclass(frozen=True)
class StepLog:
    """Per instruction boundary of a STEPS run: the state before that instruction."""

    start: int                                   # first boundary
    pcs: tuple[int, ...]
    regs: tuple[tuple[int, ...], ...]           # REG_NAMES order
    cpus: tuple[CpuState, ...]
    outstanding: tuple[tuple[Interrupted, ...], ...]
    chains: tuple[int, ...]
    memory: bytes                                # writable memory at the start (before delivery)
    writes: tuple[tuple[int, int, bytes], ...]   # (step, offset into the span, data) in order
    accesses: tuple[tuple[int, int, int, bool, bool], ...]   # (step, phys, size, write, by an instruction)
    home: tuple[int, int] | None

    def state(self, k: int, memory: bytes) -> Snapshot:
        """The snapshot at boundary k, given the memory there (see ``MemoryCursor``)."""
        i = k - self.start
        return Snapshot(Regs(*self.regs[i]), memory, self.cpus[i], k, self.outstanding[i], self.chains[i], self.home)

    def cursor(self) -> "MemoryCursor":
        return MemoryCursor(self)


class MemoryCursor:
    """Writable memory at increasing boundaries of a StepLog (replays its write log)."""

    def __init__(self, log: StepLog) -> None:
        self._log = log
        self.memory = bytearray(log.memory)
        self._next = 0
        self._frozen: bytes | None = None

    def advance(self, k: int) -> bytearray:
        """Memory at boundary k (writes with step <= k applied); k never decreases."""
        writes = self._log.writes
        n = self._next
        mem = self.memory
        while n < len(writes) and writes[n][0] <= k:
            _, off, data = writes[n]
            mem[off:off + len(data)] = data
            n += 1
            self._frozen = None
        self._next = n
        return mem

    def frozen(self) -> bytes:
        if self._frozen is None:
            self._frozen = bytes(self.memory)
        return self._frozen


@dataclass(frozen=True)
class Record:
    """What one run did."""

    request: Request
    events: tuple[Event, ...]
    outcome: Outcome
    reason: str
    final: Snapshot                    # memory is b"" below STEPS
    delivered: Interrupted | None      # the exception Request.deliver delivered
    resumed_step: int | None           # when it resumed
    converged: int | None              # tag of the ConvergePoint it stopped at
    steps: StepLog | None = None       # STEPS and FLOW
    flow: tuple[tuple, ...] | None = None   # FLOW


class Context(Protocol):
    """What a stub (C function) may do to the machine."""

    cpu: CpuState
    options: Hashable

    def reg(self, name: str) -> int: ...
    def flags(self, mask: int) -> int: ...     # RFLAGS & mask (a use of only those bits' flag groups)
    def set_reg(self, name: str, value: int) -> None: ...
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def read_u64(self, addr: int) -> int: ...
    def write_u64(self, addr: int, value: int) -> None: ...
    def copy(self, dst: int, src: int, size: int) -> None: ...
    def mapped(self, addr: int) -> bool: ...
    def set_cpu(self, cpu: CpuState) -> None: ...
    def emit(self, event_type: type, **fields) -> None: ...
    def fault(self, kind: FaultKind, message: str, address: int | None = None) -> None: ...
    def symbolize(self, addr: int) -> str: ...
    @property
    def handling(self) -> tuple: ...     # the vectors whose frames are outstanding, innermost last


class StubHandler(Protocol):
    """The model of the C the image does not run (called at its stubs), and the checks on entering the C
    it runs (``enter``, at the first instruction of a C function the entry code calls)."""

    def __call__(self, ctx: Context, name: str) -> None: ...

    def enter(self, ctx: Context, name: str) -> None: ...


__all__ = ["Level", "Op", "REG_LOCS", "FLAG_GROUPS", "FLAG_LOCS", "N_LOCS", "GROUP_MASKS", "MachineConfig", "LiveIndex", "JoinedLive", "ConvergePoint", "Request",
           "StepLog", "MemoryCursor", "Record", "Context", "StubHandler", "DEFAULT_BUDGET"]
