"""Run one path with explicit injections, recording everything: `entrycheck trace`.

An injection ``VEC@SYM+OFF[#N]`` delivers VEC at the boundary before the N-th
execution of that instruction counted from the previous injection (or from the
start of the path); an NMI arriving while NMIs are blocked is latched, as on
hardware.  Findings replay this way from their JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.explore.paths import Cost, cost_of
from entrycheck.explore.scenarios import Scenario, start_state
from entrycheck.image.decode import sweep
from entrycheck.image.image import Image
from entrycheck.kernelabi.stubs import Effect, StubOptions, Stubs
from entrycheck.kernelabi.world import World
from entrycheck.machine.events import Event, Injection, Outcome
from entrycheck.machine.api import DEFAULT_BUDGET, Level, Request
from entrycheck.machine.machine import Machine
from entrycheck.machine.model import CpuState, Vector
from entrycheck.props.invariants import Violation, check_run


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
    if inj.vector not in _idt_vectors(image):
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
    return {ins.address for ins in sweep(image.read(start, end - start), start)}


def trace(world: World, sc: Scenario, injections: tuple[Injection, ...],
          effects: frozenset[Effect] = frozenset(), budget: int = DEFAULT_BUDGET) -> Trace:
    stubs = Stubs(world)
    machine = Machine(world.image, world.config, stubs)
    start = start_state(world, sc, machine.pristine_memory())
    rec = machine.run(Request(start, deliver=sc.vector, injections=injections, level=Level.STEPS,
                              options=StubOptions(effects=effects, sysret=sc.sysret), budget=budget))
    log = rec.steps
    steps = tuple(Step(log.start + k, pc, regs[15]) for k, (pc, regs) in enumerate(zip(log.pcs, log.regs)))
    violations = check_run(world, rec.events, rec.outcome, rec.reason, rec.final.cpu, rec.final.outstanding)
    return Trace(sc, injections, steps, rec.events, rec.outcome, rec.reason, rec.final.cpu,
                 cost_of(rec.events, world.image), tuple(violations), tuple(sorted(stubs.unknown)))
