"""Run one path with explicit injections, recording everything: `entrycheck trace`.

An injection ``VEC@SYM+OFF[#N]`` delivers VEC at the boundary before the N-th
execution of that instruction counted from the previous injection (or from the
start of the path); an NMI arriving while NMIs are blocked is latched, as on
hardware.  Findings replay this way from their JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.explore.paths import Cost, Injected, cost_of
from entrycheck.explore.scenarios import Scenario, prepare
from entrycheck.image.decode import sweep
from entrycheck.image.image import Image
from entrycheck.kernelabi.stubs import Effect, StubOptions, Stubs
from entrycheck.kernelabi.world import World
from entrycheck.machine.emulator import DEFAULT_BUDGET, Emulator, Mode
from entrycheck.machine.events import Event, Outcome
from entrycheck.machine.model import VECTOR_BY_NAME, CpuState, Vector
from entrycheck.props.invariants import Run, Violation, check_run

_SPEC = re.compile(r"^(?P<vec>[a-z]+)@(?P<loc>[^#]+?)(?:#(?P<hit>\d+))?$")
INJECTABLE = ("nmi", "mc", "db", "df", "vc")


@dataclass(frozen=True)
class Injection:
    vector: Vector
    address: int
    hit: int
    label: Injected


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
    m = _SPEC.match(text.strip())
    if not m:
        raise InputError(f"bad injection {text!r}: expected VEC@SYM+OFF or VEC@SYM+OFF#N, e.g. nmi@paranoid_exit+0x43")
    name = m.group("vec").lower()
    if name not in INJECTABLE:
        raise InputError(f"unknown vector {name!r} in {text!r}; choose from {', '.join(INJECTABLE)}")
    vector = VECTOR_BY_NAME[name]
    address = image.parse_location(m.group("loc"))
    stubs = set(image.loaded.resolution.functions.values())
    section = image.code_section(address)
    if section is None and address not in stubs:
        raise InputError(f"{m.group('loc')} is not in the entry code")
    # A C function's stub is one boundary: the exception arrives while C code runs.
    starts = {address} if address in stubs else boundaries_around(image, address)
    if address not in starts:
        near = ", ".join(image.symbolize(a) for a in sorted(starts, key=lambda a: abs(a - address))[:3])
        raise InputError(f"{m.group('loc')} is not an instruction boundary; nearby: {near}")
    if vector not in _idt_vectors(image):
        raise InputError(f"this kernel has no entry point for {name}")
    hit = int(m.group("hit") or 1)
    if hit < 1:
        raise InputError(f"bad hit count in {text!r}: counts start at 1")
    return Injection(vector, address, hit, Injected(name, image.symbolize(address), hit))


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
    stubs = Stubs(world, StubOptions(effects=effects, sysret=sc.sysret))
    emu = Emulator(world.image, world.config, stubs, mode=Mode.RECORD, budget=budget)
    emu.trace_rsp = True
    emu.set_cpu(world.kernel_cpu())
    prepare(emu, world, sc)
    emu.inject_at_pc = [(i.address, i.vector, i.hit) for i in injections]
    emu.go()
    run = Run(tuple(emu.run.events), emu.run.outcome, emu.run.reason, emu.cpu, False, tuple(emu.run.outstanding))
    steps = tuple(Step(k, pc, rsp) for k, (pc, rsp) in enumerate(zip(emu.run.pcs, emu.run.rsps)))
    return Trace(sc, injections, steps, tuple(emu.run.events), emu.run.outcome, emu.run.reason, emu.cpu,
                 cost_of(emu.run.events, world.image), tuple(check_run(world, run)), tuple(sorted(stubs.unknown)))
