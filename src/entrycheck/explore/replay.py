"""Run one path with explicit injections, recording everything: `entrycheck trace`.

An injection ``VEC@SYM+OFF[#N]`` delivers VEC at the boundary before the N-th
execution of that instruction counted from the previous injection (or from the
start of the path); an NMI arriving while NMIs are blocked is latched, as on
hardware.  Findings replay this way from their JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.explore.paths import Cost
from entrycheck.explore.scenarios import Scenario, delivery, start_state, stub_options
from entrycheck.image.image import Image
from entrycheck.kernelabi.linux import ist_index
from entrycheck.kernelabi.stubs import Effect, Stubs
from entrycheck.kernelabi.world import World
from entrycheck.machine.events import Delivered, Event, Injection, Outcome, Resumed
from entrycheck.machine.api import DEFAULT_BUDGET, Level, LiveIndex, Record, Request
from entrycheck.machine.machine import Machine
from entrycheck.machine.model import CpuState, Vector
from entrycheck.explore.summary import Summaries
from entrycheck.props import reentry
from entrycheck.props.invariants import End, Violation, local_violations, verdict


@dataclass(frozen=True)
class Step:
    step: int
    pc: int
    rsp: int


@dataclass(frozen=True)
class Trace:
    scenario: Scenario
    injections: tuple[Injection, ...]
    steps: tuple[Step, ...]
    events: tuple[Event, ...]
    outcome: Outcome
    reason: str
    final_cpu: CpuState
    cost: Cost
    violations: tuple[Violation, ...]
    unknown_functions: tuple[str, ...]


def parse_injection(text: str, image: Image) -> Injection:
    """VEC@SYM+OFF[#N], checked against the image: a boundary of the entry code (or a C
    function's stub) of a vector this kernel has.  The site comes back as sym+off."""
    inj = Injection.parse(text)
    address = image.parse_location(inj.at)
    stubs = set(image.loaded.resolution.functions.values())
    section = image.code_section(address)
    if section is None and address not in stubs:
        raise InputError(f"{inj.at} is not in the entry code")
    # A C function's stub is one boundary: the exception arrives while C code runs.
    starts = {address} if address in stubs else boundaries_around(image, address)
    if address not in starts:
        near = ", ".join(image.symbolize(a) for a in sorted(starts, key=lambda a: abs(a - address))[:3])
        raise InputError(f"{inj.at} is not an instruction boundary; nearby: {near}")
    if inj.vector is Vector.MISPREDICT:
        if image.instructions.conditional(address) is None:
            raise InputError(f"mispredict@{inj.at}: not a conditional branch")
    elif inj.vector not in _idt_vectors(image):
        raise InputError(f"this kernel has no entry point for {inj.vector.label}")
    return Injection(inj.vector, image.symbolize(address), inj.hit)


def _idt_vectors(image: Image) -> set[Vector]:
    from entrycheck.kernelabi.world import IDT_SYMBOLS

    return {v for v, sym in IDT_SYMBOLS.items() if sym in image.loaded.symbols}


def boundaries_around(image: Image, address: int) -> set[int]:
    """Instruction starts of the code symbol around ``address`` (as patched)."""
    addrs = sorted(a for a in image.loaded.symbols.values() if image.code_section(a))
    import bisect

    k = bisect.bisect_right(addrs, address) - 1
    start = addrs[k] if k >= 0 else image.code_section(address).address
    end = addrs[k + 1] if k + 1 < len(addrs) else start + 0x1000
    sec = image.code_section(address)
    end = min(end, sec.address + sec.size)
    return {ins.address for ins in image.instructions.sweep(start, end)}


def trace(world: World, sc: Scenario, injections: tuple[Injection, ...],
          effects: frozenset[Effect] = frozenset(), budget: int = DEFAULT_BUDGET) -> Trace:
    stubs = Stubs(world)
    machine = Machine(world.image, world.config, stubs)
    start = start_state(world, sc, machine.layout.pristine)
    rec = machine.run(Request(start, deliver=delivery(world, sc), injections=injections, level=Level.STEPS,
                              options=stub_options(sc, effects), budget=budget))
    log = rec.steps
    steps = tuple(Step(log.start + k, pc, regs[15]) for k, (pc, regs) in enumerate(zip(log.pcs, log.regs)))
    summary = Summaries(world.image).of(rec.events)
    end = End(rec.outcome, rec.reason, rec.final.cpu, False, rec.final.outstanding, rec.events[-1], summary.nmi,
              lambda: rec.events)
    violations = verdict(world, local_violations(world, rec.events), end)
    violations = ist_reentries(machine, world, start, sc, injections, effects, budget, rec) + violations
    return Trace(sc, injections, steps, rec.events, rec.outcome, rec.reason, rec.final.cpu,
                 summary.cost, tuple(violations), tuple(sorted(stubs.unknown)))


def ist_reentries(machine: Machine, world: World, start, sc: Scenario, injections: tuple[Injection, ...],
                  effects: frozenset[Effect], budget: int, rec: Record) -> list[Violation]:
    """The ist-reentered deliveries of a recorded path, as the explorer finds them: a
    delivery through an IST slot whose frame covers words that the same path without
    that exception (recorded once more) still reads later.  A latched NMI let in by an
    IRET is judged against the path without the exception that IRET returned from."""
    if world.config.fred is not None:
        return []                   # FRED has no IST: a nested event goes below the outer frame
    options = stub_options(sc, effects)
    space = machine.layout
    wbase = space.writable_base
    # Deliveries are numbered in order (an Interrupted's chain_index); which injection each was.
    injection_of: dict[int, int] = {}
    delivered = [e for e in rec.events if type(e) is Delivered]
    j = 0
    for c, e in enumerate(delivered):
        if e.from_latch or e.single_step or e.vector is Vector.GP or (c == 0 and sc.vector is not None):
            continue
        injection_of[c] = j
        j += 1
    refs: dict[int, Record] = {}
    out = []
    prev = None
    c = -1
    for e in rec.events:
        if type(e) is Delivered:
            c += 1
        if (type(e) is Delivered and ist_index(e.vector) and not e.single_step
                and (not e.from_latch or type(prev) is Resumed)):
            if e.from_latch:
                at, j = prev.injection.step, injection_of.get(prev.injection.chain_index)
            else:
                at, j = e.step, injection_of.get(c)
            if j is not None:
                ref = refs.get(j)
                if ref is None:
                    ref = refs[j] = machine.run(Request(start, deliver=delivery(world, sc), injections=injections[:j],
                                                        level=Level.STEPS, options=options, budget=budget))
                log = ref.steps
                i = at - log.start
                if 0 <= i < len(log.pcs):
                    live = LiveIndex(log.accesses, wbase, space.writable_size)
                    found = reentry.live_frame(space, live, log.outstanding[i], e.vector,
                                               e.stack + e.vector.frame_bytes, at)
                    if found is not None:
                        outer, words, in_frame = found
                        how = reentry.latched(prev.injection, prev.pc, world.image.symbolize) if e.from_latch else ""
                        out.append(Violation("ist-reentered", e.pc, e.step, reentry.message(
                            e.vector, outer, len(words), how, world.image.symbolize, in_frame)))
        prev = e
    return out
