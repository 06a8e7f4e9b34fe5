"""Scenarios: realistic starting states, each running to its return.

A scenario puts the machine where an entry path begins — user space about to
execute SYSCALL, or user or kernel code at the instant an exception arrives — and
the path runs until it is back where it started (SYSRET/IRET to user mode, or the
IRET into the interrupted kernel code).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from entrycheck.errors import InputError
from entrycheck.image import layout
from entrycheck.kernelabi.world import World
from entrycheck.machine import model
from entrycheck.machine.model import Vector
from entrycheck.machine.state import GPR_NAMES, Regs, Snapshot

USER_RIP = 0x0000_0000_0040_1A2C
USER_RSP = 0x0000_7FFD_C0DE_0F80
USER_RFLAGS = 0x246
KERNEL_RIP = layout.KERNEL_TEXT_BASE + 0x123
KERNEL_RFLAGS = 0x246
SYSCALL_NR = 39                      # getpid


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    vector: Vector | None            # None: SYSCALL
    from_user: bool
    sysret: bool = True              # syscall: do_syscall_64 allows SYSRET
    needs: str | None = None         # a feature the scenario needs (vc: sev_es)


_ALL = (
    Scenario("syscall", "SYSCALL from user mode, returning with SYSRET", None, True),
    Scenario("syscall-iret", "SYSCALL whose return needs IRET (the system call changed the user context)",
             None, True, sysret=False),
    Scenario("irq-from-user", "device interrupt while user code runs", Vector.IRQ, True),
    Scenario("irq-from-kernel", "device interrupt while kernel code runs with the kernel CR3", Vector.IRQ, False),
    Scenario("exception-from-user", "page fault in user mode (error_entry, error_return)", Vector.PF, True),
    Scenario("exception-from-kernel", "page fault in kernel code (error_entry from kernel mode)", Vector.PF,
             False),
    Scenario("nmi-from-user", "NMI while user code runs", Vector.NMI, True),
    Scenario("nmi-from-kernel", "NMI while kernel code runs with the kernel CR3", Vector.NMI, False),
    Scenario("mc-from-user", "machine check while user code runs", Vector.MC, True),
    Scenario("mc-from-kernel", "machine check while kernel code runs (paranoid entry/exit)", Vector.MC, False),
    Scenario("db-from-user", "debug exception while user code runs", Vector.DB, True),
    Scenario("db-from-kernel", "debug exception in kernel code (paranoid entry/exit)", Vector.DB, False),
    Scenario("vc-from-kernel", "SEV-ES #VC in kernel code", Vector.VC, False, needs="sev_es"),
)
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({s.name: s for s in _ALL})
DEFAULT_SCENARIOS: tuple[str, ...] = tuple(s.name for s in _ALL if s.needs is None)


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None


def user_gprs() -> tuple[int, ...]:
    """Recognisable user register values (none of them a kernel address)."""
    return tuple(0x0000_5EED_0000_0000 | (0x1111 * (k + 1)) for k in range(len(GPR_NAMES)))


def kernel_gprs() -> tuple[int, ...]:
    return tuple(0xFFFF_8880_0BAD_0000 | (0x11 * (k + 1)) for k in range(len(GPR_NAMES)))


def start_state(world: World, sc: Scenario, memory: bytes) -> Snapshot:
    """Where ``sc``'s path begins, as data: the machine then delivers ``sc.vector`` (if any)."""
    if sc.needs and sc.needs not in world.image.features:
        raise InputError(f"scenario {sc.name} needs the {sc.needs} feature")
    if sc.vector is not None and sc.vector not in world.config.idt:
        raise InputError(f"this kernel has no entry point for {sc.vector.label} (scenario {sc.name})")
    if sc.from_user:
        regs = Regs(*user_gprs(), USER_RSP, USER_RIP, USER_RFLAGS)
        cpu, home = world.user_cpu(), None
    else:
        rsp = world.task_stack_top - 0x800
        regs = Regs(*kernel_gprs(), rsp, KERNEL_RIP, KERNEL_RFLAGS)
        cpu, home = world.kernel_cpu(), (KERNEL_RIP, rsp)
    if sc.vector is None:
        # SYSCALL: RCX = return RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK, CPL 0; RSP and GS untouched.
        regs = regs.with_(rax=SYSCALL_NR, rcx=USER_RIP, r11=USER_RFLAGS,
                          rflags=(USER_RFLAGS & ~model.SYSCALL_MASK) | model.RFLAGS_FIXED,
                          rip=world.image.address_of("entry_SYSCALL_64"))
        cpu = model.syscall(cpu)
    return Snapshot(regs, memory, cpu, 0, (), 0, home)
