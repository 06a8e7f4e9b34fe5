"""Scenarios: realistic starting states, each running to its return.

A scenario puts the machine where an entry path begins — user space about to
execute SYSCALL, or user or kernel code at the instant an exception arrives — and
the path runs until it is back where it started (SYSRET/IRET to user mode, or the
IRET into the interrupted kernel code).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from entrycheck.errors import InputError
from entrycheck.image import layout
from entrycheck.kernelabi.stubs import Effect, StubOptions
from entrycheck.kernelabi.world import World
from entrycheck.kernelabi.linux import SYSCALL_MASK
from entrycheck.machine import model
from entrycheck.machine.model import Vector
from entrycheck.machine.state import GPR_NAMES, Regs, Snapshot

USER_RIP = 0x0000_0000_0040_1A2C
USER_RSP = 0x0000_7FFD_C0DE_0F80
USER_RFLAGS = 0x246
KERNEL_RIP = layout.KERNEL_TEXT_BASE + 0x123
KERNEL_RFLAGS = 0x246
SYSCALL_NR = 39                      # getpid
# A 32-bit task: its int $0x80 / SYSCALL site and stack below 4 GiB, and the vDSO's landing pad
# (__kernel_vsyscall's int80_landing_pad) where do_fast_syscall_32 sends every fast system call back.
USER32_RIP = 0x0804_9A2C
USER32_RSP = 0xFFFF_CF80
VDSO32_LANDING_PAD = layout.VDSO32_LANDING_PAD
SYSCALL32_NR = 20                    # getpid in the 32-bit table
# Where each kind of system-call instruction enters (a scenario with no vector).
ENTRY_SYMBOLS = {"syscall": "entry_SYSCALL_64", "syscall32": "entry_SYSCALL_compat",
                 "sysenter": "entry_SYSENTER_compat"}


@dataclass(frozen=True)
class UserState:
    """What user space controls when the path begins, where it differs from the defaults.

    ``rsp`` and ``gsbase`` are live in kernel mode until the entry code replaces them (the
    SYSCALL gap, the paranoid entry's GSBASE test); ``rflags`` is what user space set with
    POPF (SYSCALL saves it in R11 and masks it); ``ret_rip`` is the user RIP (and RCX) the
    system call returns to, as rt_sigreturn or ptrace can set it, and ``ret_cs``/``ret_ss`` the
    selectors it returns with (rt_sigreturn takes them from the user's frame, RPL forced to 3)."""

    rsp: int | None = None
    gsbase: int | None = None
    rflags: int | None = None
    ret_rip: int | None = None
    ret_cs: int | None = None
    ret_ss: int | None = None

    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple((f, v) for f in USER_FIELDS if (v := getattr(self, f)) is not None)

    def suffix(self) -> str:
        items = self.items()
        return "[" + ",".join(f"{k}={v:#x}" for k, v in items) + "]" if items else ""

    def user_return(self) -> tuple[tuple[str, int], ...]:
        """The pt_regs fields do_syscall_64 sets (a sigreturn frame with RCX = RIP)."""
        out = (("ip", self.ret_rip), ("rcx", self.ret_rip)) if self.ret_rip is not None else ()
        if self.ret_cs is not None:
            out += (("cs", self.ret_cs),)
        if self.ret_ss is not None:
            out += (("ss", self.ret_ss),)
        return out


USER_FIELDS = ("rsp", "gsbase", "rflags", "ret_rip", "ret_cs", "ret_ss")
RETURN_FIELDS = ("ret_rip", "ret_cs", "ret_ss")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    vector: Vector | None            # None: SYSCALL
    from_user: bool
    sysret: bool = True              # syscall: do_syscall_64 allows SYSRET
    needs: str | None = None         # a feature the scenario needs (vc: sev_es)
    user: UserState = UserState()    # hostile user values (the name then carries them: syscall[rsp=0x...])
    entry: str = "syscall"           # no vector: the instruction that enters (syscall, syscall32, sysenter)
    compat: bool = False             # the user task is 32-bit (CS __USER32_CS, values below 4 GiB)

    @property
    def entry_symbol(self) -> str | None:
        """Where a system-call scenario enters (None: through the IDT, ``IDT_SYMBOLS[vector]``)."""
        return ENTRY_SYMBOLS[self.entry] if self.vector is None else None

    @property
    def base(self) -> str:
        return base_name(self.name)

    def with_user(self, user: UserState) -> "Scenario":
        """This scenario started from ``user`` (checked against what user space can set)."""
        check_user(self, user)
        return replace(self, name=self.base + user.suffix(), user=user)


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
    Scenario("vc-from-user", "SEV-ES #VC in user code (a CPUID, an MSR or I/O access the hypervisor intercepts)",
             Vector.VC, True, needs="sev_es"),
    Scenario("sysenter", "SYSENTER from a 32-bit task (the vDSO's fast path), returning with SYSRETL", None,
             True, entry="sysenter", compat=True),
    Scenario("syscall32", "SYSCALL from a 32-bit task (AMD's fast path), returning with SYSRETL", None, True,
             entry="syscall32", compat=True),
    Scenario("int80", "int $0x80 from a 32-bit task (asm_int80_emulation), returning with IRET", Vector.INT80,
             True, compat=True),
)
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({s.name: s for s in _ALL})
DEFAULT_SCENARIOS: tuple[str, ...] = tuple(s.name for s in _ALL if s.needs is None)


def base_name(name: str) -> str:
    """The scenario a name with user values is a variant of: syscall[rsp=...] -> syscall."""
    return name.split("[", 1)[0]


def scenario(name: str) -> Scenario:
    """A scenario by name; ``NAME[field=value,...]`` starts it from hostile user values."""
    base, _, rest = name.partition("[")
    try:
        sc = SCENARIOS[base]
    except KeyError:
        raise InputError(f"unknown scenario {base!r}; choose from {', '.join(SCENARIOS)}") from None
    if not _:
        return sc
    if not rest.endswith("]"):
        raise InputError(f"scenario {name!r}: user values go in brackets, e.g. syscall[rsp=0x7ffd0000]")
    values: dict[str, int] = {}
    for item in rest[:-1].split(","):
        key, eq, text = item.strip().partition("=")
        if key not in USER_FIELDS or not eq:
            raise InputError(f"scenario {name!r}: {item.strip()!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(USER_FIELDS)}")
        try:
            value = int(text, 0)
        except ValueError:
            raise InputError(f"scenario {name!r}: {key} value {text!r} is not a number") from None
        if not 0 <= value < 1 << 64:
            raise InputError(f"scenario {name!r}: {key} value {text} is not a 64-bit value")
        values[key] = value
    return sc.with_user(UserState(**values))


def check_user(sc: Scenario, user: UserState) -> None:
    """Refuse user values the scenario cannot start from (one line, InputError)."""
    where = f"scenario {sc.base}{user.suffix()}"
    if not sc.from_user and user.items():
        raise InputError(f"{where}: a scenario from kernel mode has no user values")
    if sc.compat and user.rsp is not None and user.rsp >> 32:
        raise InputError(f"{where}: rsp {user.rsp:#x} does not fit a 32-bit task's ESP")
    for name in RETURN_FIELDS:
        if getattr(user, name) is not None and (sc.vector is not None or sc.compat):
            raise InputError(f"{where}: {name} is part of the context a system call returns to; only SYSCALL "
                             "scenarios have one")
    for name in ("ret_cs", "ret_ss"):
        value = getattr(user, name)
        if value is not None and (value > 0xFFFF or value & 3 != 3):
            raise InputError(f"{where}: {name} {value:#x} is not a selector with RPL 3 (rt_sigreturn forces it)")
    if user.rflags is not None and user.rflags & ~(model.USER_SETTABLE_FLAGS | model.RFLAGS_IF | model.RFLAGS_FIXED):
        raise InputError(f"{where}: rflags {user.rflags:#x} has bits user space cannot set "
                         f"(settable: {model.USER_SETTABLE_FLAGS:#x})")
    if user.rsp is not None and user.rsp % 8:
        raise InputError(f"{where}: rsp {user.rsp:#x} is not 8-byte aligned")
    if user.gsbase is not None and not layout.canonical(user.gsbase):
        raise InputError(f"{where}: gsbase {user.gsbase:#x} is not canonical (WRGSBASE and arch_prctl refuse it)")


def user_gprs() -> tuple[int, ...]:
    """Recognisable user register values (none of them a kernel address)."""
    return tuple(0x0000_5EED_0000_0000 | (0x1111 * (k + 1)) for k in range(len(GPR_NAMES)))


def kernel_gprs() -> tuple[int, ...]:
    return tuple(0xFFFF_8880_0BAD_0000 | (0x11 * (k + 1)) for k in range(len(GPR_NAMES)))


def stub_options(sc: Scenario, effects: frozenset[Effect] = frozenset(), pt_regs: bool = True) -> StubOptions:
    """What the stubbed C code does on this scenario's path."""
    return StubOptions(effects=effects, sysret=sc.sysret, pt_regs=pt_regs, user_return=sc.user.user_return())


def delivery(world: World, sc: Scenario) -> Vector | None:
    """What the machine delivers to start ``sc``: its vector; with FRED a system call is an event too."""
    if sc.vector is None and world.config.fred is not None:
        return Vector.SYSENTER if sc.entry == "sysenter" else Vector.SYSCALL
    return sc.vector


def start_state(world: World, sc: Scenario, memory: bytes) -> Snapshot:
    """Where ``sc``'s path begins, as data: the machine then delivers ``sc.vector`` (if any)."""
    if sc.needs and sc.needs not in world.image.features:
        raise InputError(f"scenario {sc.name} needs the {sc.needs} feature")
    if sc.vector is not None and sc.vector not in world.config.idt:
        raise InputError(f"this kernel has no entry point for {sc.vector.label} (scenario {sc.name})")
    user = sc.user
    flags = USER_RFLAGS if user.rflags is None else user.rflags | model.RFLAGS_IF | model.RFLAGS_FIXED
    if sc.compat:
        regs = Regs(*(v & 0xFFFF_FFFF for v in user_gprs()), USER32_RSP if user.rsp is None else user.rsp,
                    USER32_RIP, flags)
        cpu, home = world.user_cpu().but(compat=True), None
    elif sc.from_user:
        regs = Regs(*user_gprs(), USER_RSP if user.rsp is None else user.rsp, USER_RIP, flags)
        cpu, home = world.user_cpu(), None
    if sc.from_user:
        if user.gsbase is not None:
            if user.gsbase >> 63 and not world.fsgsbase:
                raise InputError(f"scenario {sc.name}: a negative GSBASE needs the fsgsbase feature (without "
                                 "WRGSBASE the kernel never lets user space load one)")
            cpu = cpu.but(gs_base=user.gsbase)
    else:
        rsp = world.task_stack_top - 0x800
        regs = Regs(*kernel_gprs(), rsp, KERNEL_RIP, KERNEL_RFLAGS)
        cpu, home = world.kernel_cpu(), (KERNEL_RIP, rsp)
    if sc.vector is None and world.config.fred is not None:
        # FRED delivers SYSCALL and SYSENTER as events (``delivery``): the path starts in user mode.
        regs = regs.with_(rax=SYSCALL32_NR if sc.compat else SYSCALL_NR)
    elif sc.vector is None:
        entry = world.image.address_of(sc.entry_symbol)
        if sc.entry == "sysenter":
            # SYSENTER: RSP from SYSENTER_ESP (the entry stack's top), RIP from SYSENTER_EIP; only
            # VM, IF and RF cleared; nothing of the user's RIP or RSP is saved (the vDSO keeps them).
            regs = regs.with_(rax=SYSCALL32_NR, rsp=world.entry_stack_top, rip=entry,
                              rflags=(flags & ~model.SYSENTER_CLEARS) | model.RFLAGS_FIXED)
            cpu = model.sysenter(cpu)
        else:
            # SYSCALL (from compat mode too): RCX = return RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK,
            # CPL 0; RSP and GS untouched.
            regs = regs.with_(rax=SYSCALL32_NR if sc.compat else SYSCALL_NR, rcx=regs.rip, r11=flags,
                              rflags=(flags & ~SYSCALL_MASK) | model.RFLAGS_FIXED, rip=entry)
            cpu = model.syscall(cpu)
    elif sc.vector is Vector.INT80:
        regs = regs.with_(rax=SYSCALL32_NR)
    spec = world.config.spec
    if spec is not None and spec.tracks and cpu.cpl == 0:
        # Kernel code ran its entry's mitigations long ago; a SYSCALL/SYSENTER has just entered.
        cpu = cpu.but(spec=model.SPEC_SYSCALL if sc.from_user else model.SPEC_KERNEL)
    return Snapshot(regs, memory, cpu, 0, (), 0, home)
