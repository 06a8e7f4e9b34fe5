"""Stubs for the C functions entry_64.o calls, each with its real contract.

Every call into real C code is a checkpoint: C needs the kernel CR3, GSBASE equal
to this CPU's per-cpu base and a kernel stack (else the machine stops loudly with a
fault rather than run on with garbage); under kernel_ibrs it should run with IBRS
set (recorded on the call event for the spec-ctrl invariant).  Handlers may carry
*effects* the seed patch's argument assumes they never have; they are off unless
the explorer switches them on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from entrycheck.image.layout import (ENTRY_STACK_SIZE, IRQ_STACK_SIZE, IST_STACK_SIZE, SIGNAL_HANDLER_RIP, SIGNAL_STACK,
                                     TASK_SIZE_MAX, TASK_STACK_SIZE, USER32_CS, USER_CS, USER_DS,
                                     VDSO32_LANDING_PAD)
from entrycheck.kernelabi.linux import ASM_HELPERS, UNTRAIN_FUNCTIONS, Helper
from entrycheck.machine import fred, model
from entrycheck.machine.events import Cr3Written, FaultKind, MsrWritten, StubCall
from entrycheck.machine.api import Context
from entrycheck.machine.model import SPEC_CTRL_IBRS
from entrycheck.kernelabi import boundary
from entrycheck.kernelabi.world import World

PTREGS = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "rbp": 32, "rbx": 40, "r11": 48, "r10": 56, "r9": 64,
          "r8": 72, "rax": 80, "rcx": 88, "rdx": 96, "rsi": 104, "rdi": 112, "orig_ax": 120, "ip": 128,
          "cs": 136, "flags": 144, "sp": 152, "ss": 160}
PTREGS_SIZE = 168


class Effect(enum.Enum):
    """What a stubbed handler may also do, as an explicit assumption."""

    INVALIDATE_USER_ASID = "invalidate-user-asid"   # set the user ASID's flush-mask bit, stale user PCID
    SWITCH_KERNEL_ASID = "switch-kernel-asid"       # write CR3 with another kernel ASID (another mm)
    TLB_SHOOTDOWN = "tlb-shootdown"                 # the interrupt is a TLB-flush IPI: its handler does
                                                    # invalidate_user_asid (flush_tlb_func)
    PAGE_FAULT = "page-fault"                       # the handler takes a page fault (it writes CR2): perf's
                                                    # user call chains read the user stack in an NMI


class Kind(enum.Enum):
    HANDLER = "exception handler"        # C, returns; effects apply
    C_FUNCTION = "C function"            # C, returns
    SYSCALL = "do_syscall_64"
    SYSCALL32 = "do_fast_syscall_32"     # and do_SYSENTER_32: returns whether SYSRETL may return
    INT80 = "do_int80_emulation"         # the int $0x80 system call (returns through IRET)
    VC_SWITCH = "vc_switch_off_ist"      # copies #VC's pt_regs off its IST stack
    FRED = "fred_entry_from_user/kernel" # FRED's C dispatcher: the event's handler, by type and vector
    SYNC_REGS = "sync_regs"
    FIXUP_BAD_IRET = "fixup_bad_iret"
    THUNK = "thunk"                      # asm helper that returns (return thunks, untraining)
    IBPB = "IBPB"
    NORETURN = "does not return"
    UNMODELLED = "not modelled"


def c_footprint(world, name: str) -> tuple[str, ...]:
    """Per-cpu data a C function reads while it may still run on an IST stack with DR7 live
    (sync_regs before it switches stacks; exc_nmi before local_db_save() clears DR7): a
    hardware breakpoint on it raises a #DB there unless hw_breakpoint.c refuses it."""
    hot = "pcpu_hot" in world.percpu
    if name == "sync_regs":
        return ("pcpu_hot" if hot else "cpu_current_top_of_stack",)
    if name == "exc_nmi":
        return ("pcpu_hot" if hot else "cpu_number", "nmi_state", "nmi_cr2")
    return ()


EFFECT_HANDLERS = frozenset({"exc_nmi", "exc_machine_check", "exc_debug", "exc_double_fault",
                             "exc_vmm_communication", "noist_exc_machine_check", "noist_exc_debug"})

CONTRACTS: Mapping[str, Kind] = MappingProxyType({
    "do_syscall_64": Kind.SYSCALL,
    "sync_regs": Kind.SYNC_REGS,
    "fixup_bad_iret": Kind.FIXUP_BAD_IRET,
    **{name: Kind.IBPB if helper is Helper.IBPB else Kind.THUNK for name, helper in ASM_HELPERS.items()},
    "make_task_dead": Kind.NORETURN,
    "__switch_to": Kind.UNMODELLED,
    "schedule_tail": Kind.UNMODELLED,
    "ret_from_fork": Kind.UNMODELLED,
    "syscall_exit_to_user_mode": Kind.C_FUNCTION,
    "handle_interrupted_saferet": Kind.C_FUNCTION,
    "int80_emulation": Kind.C_FUNCTION,
    "do_fast_syscall_32": Kind.SYSCALL32,
    "do_SYSENTER_32": Kind.SYSCALL32,
    "do_int80_emulation": Kind.INT80,
    "do_int80_syscall_32": Kind.INT80,
    "vc_switch_off_ist": Kind.VC_SWITCH,
    "fred_entry_from_user": Kind.FRED,
    "fred_entry_from_kernel": Kind.FRED,
})
IRQ_HANDLERS = ("common_interrupt", "sysvec_")      # the C handlers of maskable interrupts
HANDLER_PREFIXES = ("exc_", "noist_exc_", "sysvec_", "common_interrupt", "spurious_interrupt", "kernel_exc_",
                    "user_exc_")


# RFLAGS bits that must be clear whenever C code runs: DF (the ABI) and NT (an IRET with NT set
# would try a task return: #GP in 64-bit mode). SYSCALL masks both; exception delivery clears NT
# (the entry code's CLD does DF); SYSENTER keeps both as user space set them, and its entry
# clears them with POPF.  (AC is not checked: CLAC/STAC are not modelled.)
C_ENTRY_CLEAR = model.RFLAGS_DF | model.RFLAGS_NT

# C functions whose first argument is the pt_regs the entry code built.
PT_REGS_ARG = frozenset({Kind.SYSCALL, Kind.SYSCALL32, Kind.INT80, Kind.SYNC_REGS, Kind.FIXUP_BAD_IRET,
                         Kind.HANDLER, Kind.VC_SWITCH, Kind.FRED})


def contract(name: str) -> Kind | None:
    """The contract of a C function, or None for an unknown one (it returns, and is listed)."""
    if name in CONTRACTS:
        return CONTRACTS[name]
    if name.startswith("__x86_indirect_thunk_"):
        return Kind.UNMODELLED
    if name.startswith(HANDLER_PREFIXES):
        return Kind.HANDLER
    return None


@dataclass(frozen=True)
class StubOptions:
    effects: frozenset[Effect] = frozenset()
    sysret: bool = True                  # do_syscall_64 leaves the user context as SYSCALL saved it
    pt_regs: bool = True                 # C functions check the pt_regs they are given (their contract)
    # The user context the system call returns to, as rt_sigreturn or ptrace can set it:
    # (pt_regs field, value) pairs do_syscall_64 writes.
    user_return: tuple[tuple[str, int], ...] = ()


def sysretl_allowed(regs: dict[str, int]) -> bool:
    """do_fast_syscall_32's verdict (6.1 and 6.12, arch/x86/entry/common.c): SYSRETL only to the vDSO
    landing pad, with the STAR selectors, and without RF, TF or VM (SYSRETL cannot restore them)."""
    return (regs["ip"] == VDSO32_LANDING_PAD and regs["cs"] == USER32_CS and regs["ss"] == USER_DS
            and not regs["flags"] & (model.RFLAGS_RF | model.RFLAGS_TF | model.RFLAGS_VM))


def sysret_allowed(regs: dict[str, int]) -> bool:
    """do_syscall_64's verdict in 6.12 (arch/x86/entry/common.c): may the return use SYSRET?"""
    return (regs["rcx"] == regs["ip"] and regs["r11"] == regs["flags"]
            and regs["cs"] == USER_CS and regs["ss"] == USER_DS
            and regs["ip"] < TASK_SIZE_MAX
            and not regs["flags"] & (model.RFLAGS_RF | model.RFLAGS_TF))


class Stubs:
    """The stub handler the machine calls at every stub address (the run's options come with
    the request: ``StubOptions``); with the noinstr C in the image, also at the first instruction
    of each C function the entry code calls (``enter``: the checks a stub made, the C then runs)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.unknown: set[str] = set()
        self.c_mode = world.image.loaded.noinstr_c

    def enter(self, emu: Context, name: str) -> None:
        """The entry code calls the kernel's C function ``name``: the state C needs (a stub's
        checkpoint and, for a function given pt_regs, a whole pt_regs); the C then runs."""
        kind = contract(name)
        rsp = emu.reg("rsp")
        ret = emu.read_u64(rsp) if emu.mapped(rsp) else 0
        emu.emit(StubCall, name=name, return_address=ret, rsp=rsp, note="the kernel's C")
        if not self._checkpoint(emu, name, rsp, entry_stack_ok=kind in (Kind.SYNC_REGS, Kind.FIXUP_BAD_IRET,
                                                                       Kind.VC_SWITCH)):
            return
        if kind in PT_REGS_ARG and emu.options.pt_regs:
            self._pt_regs_arg(emu, name, rsp, kind)

    def __call__(self, emu: Context, name: str) -> None:
        kind = contract(name)
        if self.c_mode and (kind in (None, Kind.HANDLER, Kind.C_FUNCTION) or name.startswith(boundary.INDIRECT_THUNK)):
            self._boundary(emu, name)
            return
        rsp = emu.reg("rsp")
        ret = emu.read_u64(rsp) if emu.mapped(rsp) else 0
        note = "unknown function: returns" if kind is None else ""
        if kind is None:
            self.unknown.add(name)
        emu.emit(StubCall, name=name, return_address=ret, rsp=rsp, note=note)
        if kind is Kind.UNMODELLED:
            emu.fault(FaultKind.CHECKPOINT, f"{name} is not modelled (called from {emu.symbolize(ret)})")
            return
        spec = self.world.config.spec
        if spec is not None and spec.tracks:
            # UNTRAIN_RET's call and CLEAR_BRANCH_HISTORY's (when clear_bhb_loop is not in the image).
            done = model.SPEC_UNTRAINED if name in UNTRAIN_FUNCTIONS else \
                model.SPEC_BHB if name == "clear_bhb_loop" else 0
            if done and emu.cpu.spec & done != done:
                emu.set_cpu(emu.cpu.but(spec=emu.cpu.spec | done))
        if kind is Kind.THUNK:
            return
        if kind is Kind.IBPB:
            _, write = model.wrmsr(emu.cpu, model.MSR_PRED_CMD, 1)
            emu.emit(MsrWritten, write=write)
            return
        if not self._checkpoint(emu, name, rsp, entry_stack_ok=kind in (Kind.SYNC_REGS, Kind.FIXUP_BAD_IRET)):
            return
        if kind is Kind.NORETURN:
            emu.fault(FaultKind.CHECKPOINT, f"{name} called: the kernel would kill the task here")
            return
        if kind in PT_REGS_ARG and emu.options.pt_regs and not self._pt_regs_arg(emu, name, rsp, kind):
            return
        if kind is Kind.SYSCALL:
            self._do_syscall_64(emu)
        elif kind is Kind.SYSCALL32:
            self._do_fast_syscall_32(emu, sysenter=name == "do_SYSENTER_32")
        elif kind is Kind.INT80:
            emu.write_u64(emu.reg("rdi") + PTREGS["rax"], 0)
        elif kind is Kind.VC_SWITCH:
            self._vc_switch_off_ist(emu)
        elif kind is Kind.FRED:
            self._fred_dispatch(emu)
        elif kind is Kind.SYNC_REGS:
            self._sync_regs(emu)
        elif kind is Kind.FIXUP_BAD_IRET:
            self._fixup_bad_iret(emu)
        elif kind is Kind.HANDLER:
            if name == "exc_general_protection" and not self._general_protection(emu):
                return
            if name in ("exc_debug", "noist_exc_debug") and not self._single_step(emu):
                return
            if name in ("exc_machine_check", "noist_exc_machine_check"):
                cpu, write = model.wrmsr(emu.cpu, model.MSR_MCG_STATUS, 0)
                emu.set_cpu(cpu)
                emu.emit(MsrWritten, write=write)
            if name in EFFECT_HANDLERS:
                self._effects(emu)
            elif name.startswith(IRQ_HANDLERS) and Effect.TLB_SHOOTDOWN in emu.options.effects:
                self._invalidate_user_asid(emu)

    # ---- the boundary of the noinstr C (kernelabi/boundary.py) ----------------------------------
    def _boundary(self, emu: Context, name: str) -> None:
        rsp = emu.reg("rsp")
        ret = emu.read_u64(rsp) if emu.mapped(rsp) else 0
        base = boundary.base_name(name)
        emu.emit(StubCall, name=name, return_address=ret, rsp=rsp, note="instrumented code: returns")
        if not self._checkpoint(emu, name, rsp, entry_stack_ok=False):
            return
        if base in boundary.NORETURN:
            emu.fault(FaultKind.CHECKPOINT, f"{name} called from {emu.symbolize(ret)}: the kernel does not come "
                                            "back from it (oops, panic or a killed task)")
            return
        if name.startswith(boundary.INDIRECT_THUNK):
            # The stub's RET goes to the register's target; the caller's return address stays below.
            emu.set_reg("rsp", rsp - 8)
            emu.write_u64(rsp - 8, emu.reg(name[len(boundary.INDIRECT_THUNK):]))
            return
        got = boundary.RETURNS.get(base)
        emu.set_reg("rax", got.rax if got is not None else 0)
        if got is not None and got.rdx is not None:
            emu.set_reg("rdx", got.rdx)
        handling = emu.handling
        if base == "do_machine_check":
            cpu, write = model.wrmsr(emu.cpu, model.MSR_MCG_STATUS, 0)
            emu.set_cpu(cpu)
            emu.emit(MsrWritten, write=write)
        if base in boundary.SYSTEM_CALLS:
            self._system_call_return(emu, emu.reg("rdi"))
        elif boundary.sends_signal(name):
            self._task_flags(emu, set_bits=1 << self.world.constants["TIF_SIGPENDING"])
        elif base in boundary.SIGNAL_DELIVERY:
            pending = 1 << self.world.constants["TIF_SIGPENDING"]
            if self._task_flags(emu) & pending:
                boundary.signal_frame(emu, emu.reg("rdi"))
                self._task_flags(emu, clear_bits=pending)
        if handling and handling[-1] in boundary.HANDLER_VECTORS:
            self._effects(emu)
        elif handling and handling[-1] is model.Vector.IRQ and base.startswith(boundary.IRQ_WORK) and \
                Effect.TLB_SHOOTDOWN in emu.options.effects:
            self._invalidate_user_asid(emu)

    def _task_flags(self, emu: Context, set_bits: int = 0, clear_bits: int = 0) -> int:
        """The current task's thread_info.flags (changed as asked)."""
        at = self.world.task_flags
        flags = emu.read_u64(at)
        if set_bits or clear_bits:
            flags = (flags | set_bits) & ~clear_bits
            emu.write_u64(at, flags)
        return flags

    # ---- checkpoint ---------------------------------------------------------------------
    def _checkpoint(self, emu: Context, name: str, rsp: int, entry_stack_ok: bool) -> bool:
        w, cpu = self.world, emu.cpu
        if cpu.cr3 & model.PTI_USER_PGTABLE:
            emu.fault(FaultKind.USER_CR3, f"C function {name} called with the user CR3")
            return False
        if cpu.gs_base != w.percpu_base:
            kind = FaultKind.USER_GS if cpu.gs_base in w.config.user_gs_values else FaultKind.CHECKPOINT
            emu.fault(kind, f"C function {name} called with GSBASE {cpu.gs_base:#x}, not this CPU's per-cpu "
                            f"base {w.percpu_base:#x}")
            return False
        flags = emu.flags(C_ENTRY_CLEAR)
        if flags:
            names = ", ".join(n for bit, n in ((model.RFLAGS_DF, "DF"), (model.RFLAGS_NT, "NT")) if flags & bit)
            emu.fault(FaultKind.CHECKPOINT, f"C function {name} called with RFLAGS.{names} set (C code needs "
                                            "DF clear by the ABI, NT clear for its IRETs)")
            return False
        on_task = w.task_stack_top - TASK_STACK_SIZE <= rsp < w.task_stack_top
        on_ist = any(top - IST_STACK_SIZE <= rsp < top for top in (*w.ist_tops.values(), w.vc2_top))
        on_ist |= bool(w.irq_stack_top) and w.irq_stack_top - IRQ_STACK_SIZE <= rsp < w.irq_stack_top
        # sync_regs and fixup_bad_iret run on the entry stack by design (they move pt_regs off it).
        entry = w.entry_stack_top - ENTRY_STACK_SIZE <= rsp < w.entry_stack_top
        if not (on_task or on_ist or (entry_stack_ok and entry)):
            where = "the entry (trampoline) stack" if entry else f"{rsp:#x}"
            emu.fault(FaultKind.CHECKPOINT, f"C function {name} called on {where}, not a kernel stack")
            return False
        return True

    def _stack_of(self, rsp: int) -> tuple[int, int] | None:
        """The kernel stack (low, top) that ``rsp`` is on, if any."""
        w = self.world
        stacks = [(w.task_stack_top - TASK_STACK_SIZE, w.task_stack_top),
                  (w.entry_stack_top - ENTRY_STACK_SIZE, w.entry_stack_top)]
        stacks += [(top - IST_STACK_SIZE, top) for top in (*w.ist_tops.values(), w.vc2_top)]
        if w.irq_stack_top:
            stacks.append((w.irq_stack_top - IRQ_STACK_SIZE, w.irq_stack_top))
        return next(((lo, hi) for lo, hi in stacks if lo <= rsp < hi), None)

    def _pt_regs_arg(self, emu: Context, name: str, rsp: int, kind: Kind) -> bool:
        """The contract on the first argument of a C function that takes ``struct pt_regs *``:
        a whole, aligned pt_regs above the return address, on the stack it was called on.
        sync_regs copies the pt_regs it is given to the task stack, so that one may be on
        another kernel stack (6.12's bad-IRET path hands it fixup_bad_iret's copy on the entry
        stack while still running on the stack the #GP was delivered on).  Anything else is a
        fault of the calling entry code (C would read or write through it)."""
        regs = emu.reg("rdi")
        stack = self._stack_of(rsp)
        if stack is not None and regs % 8 == 0 and rsp + 8 <= regs and regs + PTREGS_SIZE <= stack[1]:
            return True
        home = self._stack_of(regs)
        if kind is Kind.SYNC_REGS and home is not None and regs % 8 == 0 and regs + PTREGS_SIZE <= home[1]:
            return True
        emu.fault(FaultKind.CHECKPOINT, f"{name} called with pt_regs at {regs:#x}, not a pt_regs above its "
                                        f"return address on the stack it was called on (rsp {rsp:#x})")
        return False

    # ---- contracts ---------------------------------------------------------------------
    def _do_syscall_64(self, emu: Context) -> None:
        regs = emu.reg("rdi")
        self._system_call_return(emu, regs)
        if self.world.syscall_returns_bool:
            fields = {k: emu.read_u64(regs + PTREGS[k]) for k in ("rcx", "ip", "r11", "flags", "cs", "ss")}
            emu.set_reg("rax", 1 if sysret_allowed(fields) else 0)

    def _system_call_return(self, emu: Context, regs: int) -> None:
        """What a 64-bit system call leaves in pt_regs: its return value, and the user context it
        returns to when it changed it (sigreturn, a signal: then an IRET is needed) or when user
        space set it (``user_return``)."""
        emu.write_u64(regs + PTREGS["rax"], 0)
        if not emu.options.sysret:
            ip = emu.read_u64(regs + PTREGS["ip"])
            emu.write_u64(regs + PTREGS["ip"], ip + 0x100)
        for name, value in emu.options.user_return:
            emu.write_u64(regs + PTREGS[name], value)

    def _do_fast_syscall_32(self, emu: Context, sysenter: bool) -> None:
        """do_fast_syscall_32 / do_SYSENTER_32: SYSENTER saves no user RSP (the vDSO passes it in
        EBP) and cleared IF; every fast system call returns to the vDSO's landing pad; the verdict
        in EAX says whether SYSRETL may return."""
        regs = emu.reg("rdi")
        emu.write_u64(regs + PTREGS["rax"], 0)
        if sysenter:
            emu.write_u64(regs + PTREGS["sp"], emu.read_u64(regs + PTREGS["rbp"]) & 0xFFFF_FFFF)
            emu.write_u64(regs + PTREGS["flags"], emu.read_u64(regs + PTREGS["flags"]) | model.RFLAGS_IF)
        emu.write_u64(regs + PTREGS["ip"], VDSO32_LANDING_PAD + (0 if emu.options.sysret else 0x100))
        fields = {k: emu.read_u64(regs + PTREGS[k]) for k in ("ip", "flags", "cs", "ss")}
        emu.set_reg("rax", 1 if sysretl_allowed(fields) else 0)

    def _fred_dispatch(self, emu: Context) -> None:
        """fred_entry_from_user/kernel (arch/x86/entry/entry_fred.c): the handler of the event the
        frame's SS names (type in bits 48-51, vector in 32-39), with that handler's contract: a system
        call returns a value (and the user context sigreturn may have set), NMI/#MC/#DB handlers carry
        the handler effects, an external interrupt may be a TLB-flush IPI, #MC clears MCIP."""
        regs = emu.reg("rdi")
        ss = emu.read_u64(regs + PTREGS["ss"])
        etype, vector = (ss >> 48) & 0xF, (ss >> 32) & 0xFF
        if etype in (fred.FRED_OTHER, fred.FRED_SOFT_INT):
            if etype == fred.FRED_OTHER and vector == 1 and emu.read_u64(regs + PTREGS["cs"]) & 0xFFFF \
                    != USER32_CS:
                self._system_call_return(emu, regs)          # do_syscall_64's, as the IDT path has it
            else:
                emu.write_u64(regs + PTREGS["rax"], 0)
            return
        if etype == fred.FRED_HW_EXCEPTION and vector == int(model.Vector.GP):
            self._fred_general_protection(emu, regs)
            return
        if etype == fred.FRED_EXTERNAL:
            if Effect.TLB_SHOOTDOWN in emu.options.effects:
                self._invalidate_user_asid(emu)
            return
        if etype == fred.FRED_HW_EXCEPTION and vector == int(model.Vector.MC):
            cpu, write = model.wrmsr(emu.cpu, model.MSR_MCG_STATUS, 0)
            emu.set_cpu(cpu)
            emu.emit(MsrWritten, write=write)
        if etype == fred.FRED_NMI:
            # fred_exc_nmi(): what exc_nmi does, called from the dispatcher (the NMI is processed here).
            emu.emit(StubCall, name="exc_nmi", return_address=0, rsp=emu.reg("rsp"), note="called by FRED's dispatcher")
        if etype == fred.FRED_NMI or vector in (int(model.Vector.MC), int(model.Vector.DB)):
            self._effects(emu)

    def _fred_general_protection(self, emu: Context, regs: int) -> None:
        """A #GP under FRED: at a refused ERETU (kernel mode), ex_handler_eretu makes the ERETU's own
        frame a #GP event from user mode and returns to asm_fred_entrypoint_user on it; from user
        mode, exc_general_protection signals the task (the return goes to its handler)."""
        ip, cs = emu.read_u64(regs + PTREGS["ip"]), emu.read_u64(regs + PTREGS["cs"])
        if cs & 3:
            self._general_protection(emu)
            return
        entry = self.world.config.fred.entry
        if not entry <= ip < entry + 256 or emu.read(ip, 4) != b"\xf3\x0f\x01\xca":
            emu.fault(FaultKind.CHECKPOINT, f"general protection fault in kernel mode at {emu.symbolize(ip)}: "
                                            "no exception-table fixup, the kernel oopses")
            return
        uregs = emu.read_u64(regs + PTREGS["sp"]) - PTREGS["orig_ax"]
        gp_ss = emu.read_u64(regs + PTREGS["ss"])
        user_ss = emu.read_u64(uregs + PTREGS["ss"])
        emu.write_u64(uregs + PTREGS["ss"], (gp_ss & ~0xFFFF & ~fred.FRED_SS_NMI) | (user_ss & 0xFFFF))
        emu.write_u64(uregs + PTREGS["orig_ax"], emu.read_u64(regs + PTREGS["orig_ax"]))
        emu.write_u64(regs + PTREGS["ip"], self.world.config.fred.entry)

    def _vc_switch_off_ist(self, emu: Context) -> None:
        """vc_switch_off_ist (arch/x86/kernel/traps.c): in the SYSCALL gap, the task stack (RSP is
        the user's there, 545ac14c16b5's class); else the interrupted RSP when it is on the task
        stack or an exception stack, the VC2 stack when not (the entry stack, anything else). It
        copies pt_regs below that and returns the copy, which the entry code switches to."""
        w = self.world
        regs = emu.reg("rdi")
        ip = emu.read_u64(regs + PTREGS["ip"])
        if any(a <= ip < b for a, b in w.syscall_gaps):
            sp = emu.read_u64(w.top_of_stack_slot())
        else:
            sp = emu.read_u64(regs + PTREGS["sp"])
            safe = [(w.task_stack_top - TASK_STACK_SIZE, w.task_stack_top), (w.vc2_top - IST_STACK_SIZE, w.vc2_top)]
            safe += [(top - IST_STACK_SIZE, top) for top in w.ist_tops.values()]
            if not any(lo <= sp - 1 < hi for lo, hi in safe):
                sp = w.vc2_top
        new = (sp & ~7) - PTREGS_SIZE
        emu.copy(new, regs, PTREGS_SIZE)
        emu.set_reg("rax", new)

    def _single_step(self, emu: Context) -> bool:
        """exc_debug with DR6.BS (the interrupted context had TF set): from kernel mode it is
        expected only inside entry_SYSENTER_compat (is_sysenter_singlestep(): user space entered
        with TF set and the code single-steps until it clears TF); anywhere else in the kernel,
        exc_debug_kernel WARNs (ac8b270b61d4: CLEAR_BRANCH_HISTORY called before the SYSENTER
        code cleared TF)."""
        regs = emu.reg("rdi")
        ip, cs, flags = (emu.read_u64(regs + PTREGS[k]) for k in ("ip", "cs", "flags"))
        if cs & 3 or not flags & model.RFLAGS_TF:
            return True
        start, end = self.world.sysenter_range
        if start <= ip < end:
            return True
        emu.fault(FaultKind.CHECKPOINT, f"single-step #DB in kernel code at {emu.symbolize(ip)}, outside "
                                        "entry_SYSENTER_compat: exc_debug_kernel WARNs (TF from user space "
                                        "was still set)")
        return False

    def _general_protection(self, emu: Context) -> bool:
        """exc_general_protection: from user mode (a bad IRET's frame, moved by fixup_bad_iret,
        says user mode) it signals the task, and the return goes to the signal handler's fresh
        user context; from kernel mode with no exception-table fixup it oopses."""
        regs = emu.reg("rdi")
        ip, cs = emu.read_u64(regs + PTREGS["ip"]), emu.read_u64(regs + PTREGS["cs"])
        if cs & 3 != 3:
            emu.fault(FaultKind.CHECKPOINT, f"general protection fault in kernel mode at {emu.symbolize(ip)}: "
                                            "no exception-table fixup, the kernel oopses")
            return False
        for name, value in (("ip", SIGNAL_HANDLER_RIP), ("cs", USER_CS), ("flags", 0x246),
                            ("sp", SIGNAL_STACK), ("ss", USER_DS)):
            emu.write_u64(regs + PTREGS[name], value)
        return True

    def _sync_regs(self, emu: Context) -> None:
        eregs = emu.reg("rdi")
        regs = emu.read_u64(self.world.top_of_stack_slot()) - PTREGS_SIZE
        if regs != eregs:
            emu.copy(regs, eregs, PTREGS_SIZE)
        emu.set_reg("rax", regs)

    def _fixup_bad_iret(self, emu: Context) -> None:
        bad = emu.reg("rdi")
        user_sp = emu.read_u64(bad + PTREGS["sp"])
        new = emu.read_u64(self.world.config.sp0_slot) - PTREGS_SIZE
        emu.copy(new, bad, PTREGS["ip"])
        if emu.mapped(user_sp):
            emu.copy(new + PTREGS["ip"], user_sp, 40)
        else:
            emu.write(new + PTREGS["ip"], bytes(40))
        emu.set_reg("rax", new)

    def _invalidate_user_asid(self, emu: Context) -> None:
        """invalidate_user_asid(): the user ASID's flush-mask bit set, its TLB entries stale."""
        w = self.world
        if not (w.pti and w.pcid):
            return
        kern_pcid = w.params.asid + 1
        mask_addr = w.tlbstate_flush_mask()
        if mask_addr is not None:
            mask = int.from_bytes(emu.read(mask_addr, 2), "little") | (1 << kern_pcid)
            emu.write(mask_addr, mask.to_bytes(2, "little"))
        emu.set_cpu(model.invalidate_pcid(emu.cpu, kern_pcid | model.PTI_USER_PCID))

    def _effects(self, emu: Context) -> None:
        w = self.world
        effects = emu.options.effects
        if Effect.INVALIDATE_USER_ASID in effects:
            self._invalidate_user_asid(emu)
        if Effect.PAGE_FAULT in effects:
            emu.set_cpu(emu.cpu.but(cr2=model.HANDLER_PF_ADDRESS))
        if Effect.SWITCH_KERNEL_ASID in effects:
            new_cr3 = w.kernel_cr3(asid=w.params.other_asid, pgd=w.params.other_pgd)
            if self.c_mode and emu.cpu.cr3 == new_cr3:
                return                  # switched already, at an earlier callee of this handler
            cpu, write = model.write_cr3(emu.cpu, new_cr3)
            emu.set_cpu(cpu)
            emu.emit(Cr3Written, write=write, user_view=False)
            if "cpu_tlbstate" in w.percpu:
                emu.write(w.percpu_addr("cpu_tlbstate", w.offsets["TLB_STATE_loaded_mm_asid"]),
                          w.params.other_asid.to_bytes(2, "little"))


def ibrs_ok(world: World, cpu) -> bool:
    """Whether C code may run with this SPEC_CTRL (IBRS set under kernel_ibrs)."""
    return not world.kernel_ibrs or bool(cpu.spec_ctrl & SPEC_CTRL_IBRS)


__all__ = ["Effect", "Kind", "StubOptions", "Stubs", "contract", "ibrs_ok"]
