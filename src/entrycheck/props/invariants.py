"""The invariants, each declared once in one table with its rationale.

A check reads a finished (or converged) run — its events, its end — and returns
violations as data.  Nothing here raises for a violation.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

from entrycheck.errors import InputError
from entrycheck.kernelabi.stubs import Kind, contract, ibrs_ok
from entrycheck.kernelabi.world import World
from entrycheck.machine import model
from entrycheck.machine.events import (Cr3Written, Delivered, Event, Fault, FaultKind, Injection, Iret,
                                       Latched, Outcome, Resumed, StubCall, Sysret)
from entrycheck.machine.model import CpuState, Vector

GPR_LABELS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
              "r15", "rflags")


@dataclass(frozen=True)
class Run:
    """What a check sees of one run."""

    events: tuple[Event, ...]
    outcome: Outcome
    reason: str
    final_cpu: CpuState
    converged: bool            # stopped where a checked run continues identically
    outstanding: tuple[Injection, ...] = ()   # exceptions that never resumed what they interrupted
    start_index: int = 0       # events before this index happened before the run (the path's prefix)
    suffix: tuple[Event, ...] = ()   # converged: the checked run's events that stand for the rest


@dataclass(frozen=True)
class Violation:
    invariant: str
    pc: int
    step: int
    message: str


Check = Callable[[World, Run], Iterator[Violation]]


@dataclass(frozen=True)
class Invariant:
    name: str
    summary: str
    rationale: str
    check: Check


def _returns_to_user(run: Run) -> Iterator[Event]:
    for e in run.events:
        if isinstance(e, Sysret) or (isinstance(e, Iret) and e.to_user):
            yield e


def _user_cpu_at(run: Run, event: Event) -> CpuState:
    """The CPU state right after a return to user mode (a latched NMI may follow an IRET to
    user mode, so the run's final state is not always the one that IRET left)."""
    if isinstance(event, Iret) and event.cpu is not None:
        return event.cpu
    return run.final_cpu


def check_user_mode_kernel_cr3(world: World, run: Run) -> Iterator[Violation]:
    if not world.pti:
        return
    for e in _returns_to_user(run):
        cpu = _user_cpu_at(run, e)
        if not cpu.cr3 & model.PTI_USER_PGTABLE:
            yield Violation("user-mode-kernel-cr3", e.pc, e.step,
                            f"user mode entered with the kernel page tables ({model.decode_cr3(cpu.cr3, cpu.pcide)})")
        elif world.pcid and not cpu.cr3 & model.PTI_USER_PCID:
            yield Violation("user-mode-kernel-cr3", e.pc, e.step,
                            f"user mode entered with a kernel PCID ({model.decode_cr3(cpu.cr3, cpu.pcide)})")


def check_kernel_memory_under_user_cr3(world: World, run: Run) -> Iterator[Violation]:
    for e in run.events:
        if isinstance(e, Fault) and e.kind is FaultKind.USER_CR3:
            yield Violation("kernel-memory-under-user-cr3", e.pc, e.step, e.message)


def check_context_not_restored(world: World, run: Run) -> Iterator[Violation]:
    for e in run.events:
        if not isinstance(e, Resumed):
            continue
        inj, before, after = e.injection, e.injection.cpu, e.cpu
        diffs = []
        if after.cr3 != before.cr3:
            diffs.append(f"CR3 {model.decode_cr3(after.cr3, after.pcide)} instead of "
                         f"{model.decode_cr3(before.cr3, before.pcide)}")
        if after.gs_base != before.gs_base:
            diffs.append(f"GSBASE {after.gs_base:#x} instead of {before.gs_base:#x}")
        if after.kernel_gs_base != before.kernel_gs_base:
            diffs.append(f"KERNEL_GS_BASE {after.kernel_gs_base:#x} instead of {before.kernel_gs_base:#x}")
        if after.spec_ctrl != before.spec_ctrl:
            diffs.append(f"SPEC_CTRL {after.spec_ctrl:#x} instead of {before.spec_ctrl:#x}")
        for label, a, b in zip(GPR_LABELS, e.regs, inj.regs):
            if a != b:
                diffs.append(f"{label} {a:#x} instead of {b:#x}")
        if diffs:
            where = "user mode" if before.cpl == 3 else "kernel code"
            yield Violation("context-not-restored", e.pc, e.step,
                            f"{inj.vector.label} returned to {where} with " + "; ".join(diffs[:4]) +
                            (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""))
    if run.converged or run.outcome is not Outcome.RETURNED:
        return
    end = run.events[-1]
    for inj in run.outstanding:
        yield Violation("context-not-restored", end.pc, end.step,
                        f"{inj.vector.label} never returned to the code it interrupted "
                        f"(step {inj.step}, RIP {inj.rip:#x})")


def check_stale_tlb(world: World, run: Run) -> Iterator[Violation]:
    for e in run.events:
        if isinstance(e, Cr3Written) and e.write.stale_made_current:
            yield Violation("stale-tlb", e.pc, e.step,
                            f"NOFLUSH write made stale PCID {e.write.new & model.CR3_PCID_MASK:#x} current "
                            f"({model.decode_cr3(e.write.written)})")
        elif isinstance(e, Resumed) and e.cpu.pcide and e.cpu.pcid in e.cpu.stale:
            yield Violation("stale-tlb", e.pc, e.step,
                            f"{e.injection.vector.label} returned with stale PCID {e.cpu.pcid:#x} current")
    cpu = run.final_cpu
    if run.outcome is Outcome.RETURNED and not run.converged and cpu.pcide and cpu.pcid in cpu.stale:
        end = run.events[-1]
        yield Violation("stale-tlb", end.pc, end.step, f"path ended with stale PCID {cpu.pcid:#x} current")


def check_percpu_with_user_gs(world: World, run: Run) -> Iterator[Violation]:
    for e in run.events:
        if isinstance(e, Fault) and e.kind is FaultKind.USER_GS:
            yield Violation("percpu-with-user-gs", e.pc, e.step, e.message)


def check_user_mode_kernel_gs(world: World, run: Run) -> Iterator[Violation]:
    for e in _returns_to_user(run):
        cpu = _user_cpu_at(run, e)
        if cpu.gs_base == world.percpu_base:
            yield Violation("user-mode-kernel-gs", e.pc, e.step, "user mode entered with the kernel GSBASE")
        elif cpu.kernel_gs_base != world.percpu_base:
            yield Violation("user-mode-kernel-gs", e.pc, e.step,
                            f"user mode entered with KERNEL_GS_BASE {cpu.kernel_gs_base:#x}: the next entry's "
                            "SWAPGS would not find the per-cpu base")


def check_spec_ctrl(world: World, run: Run) -> Iterator[Violation]:
    if not world.kernel_ibrs:
        return
    for e in run.events:
        if isinstance(e, StubCall) and contract(e.name) in (Kind.HANDLER, Kind.C_FUNCTION, Kind.SYSCALL) \
                and not ibrs_ok(world, e.cpu):
            yield Violation("spec-ctrl", e.pc, e.step, f"C function {e.name} runs without IBRS "
                                                       f"(SPEC_CTRL {e.cpu.spec_ctrl:#x})")
    for e in _returns_to_user(run):
        cpu = _user_cpu_at(run, e)
        if cpu.spec_ctrl != world.user_spec_ctrl():
            yield Violation("spec-ctrl", e.pc, e.step,
                            f"user mode entered with SPEC_CTRL {cpu.spec_ctrl:#x} (the user value is "
                            f"{world.user_spec_ctrl():#x})")


def check_nmi(world: World, run: Run) -> Iterator[Violation]:
    """NMIs are edge-triggered and exc_nmi handles every pending source, so an NMI is
    processed when an exc_nmi call starts after it was delivered or latched."""
    if run.outcome not in (Outcome.RETURNED, Outcome.STOPPED) or not run.events:
        return
    if run.outcome is Outcome.STOPPED and not run.converged:
        return
    events = run.events + run.suffix
    end = run.events[-1]
    last_nmi = None
    delivered = handled = 0
    for e in events:
        if isinstance(e, Delivered) and e.vector is Vector.NMI or isinstance(e, Latched) and e.vector is Vector.NMI:
            last_nmi = e
            delivered += isinstance(e, Delivered)
        elif isinstance(e, StubCall) and e.name == "exc_nmi":
            handled += 1
            last_nmi = None
    if last_nmi is not None:
        yield Violation("nmi-lost-or-corrupted", last_nmi.pc, last_nmi.step,
                        "an NMI was never processed: no exc_nmi call after it arrived")
    if handled > delivered:
        yield Violation("nmi-lost-or-corrupted", end.pc, end.step,
                        f"exc_nmi ran {handled} times for {delivered} NMIs (a frame was replayed)")
    cpu = run.final_cpu
    if run.converged:
        return
    if cpu.nmi_pending:
        yield Violation("nmi-lost-or-corrupted", end.pc, end.step, "an NMI is still latched when the path ends")
    if run.outcome is Outcome.RETURNED and cpu.nmi_blocked:
        yield Violation("nmi-lost-or-corrupted", end.pc, end.step,
                        "NMIs are still blocked when the path ends (no IRET after an NMI)")


def check_emulation_fault(world: World, run: Run) -> Iterator[Violation]:
    for e in run.events:
        if isinstance(e, Fault) and e.kind not in (FaultKind.USER_CR3, FaultKind.USER_GS):
            yield Violation("emulation-fault", e.pc, e.step, e.message)


def check_no_return(world: World, run: Run) -> Iterator[Violation]:
    if run.outcome is Outcome.NO_RETURN:
        end = run.events[-1]
        yield Violation("no-return", _loop_site(run.events[:-1]) or end.pc, end.step, run.reason)


def _loop_site(events: tuple[Event, ...]) -> int | None:
    """The lowest address of the loop a run ended in, wherever the step budget cut it:
    the shortest period p with the last p events repeating the p before them."""
    sig = [(type(e).__name__, e.pc) for e in events[-400:]]
    for p in range(1, len(sig) // 2 + 1):
        if sig[-p:] == sig[-2 * p:-p]:
            return min(pc for _, pc in sig[-p:])
    return None


_TABLE = (
    Invariant("user-mode-kernel-cr3", "PTI on and user mode runs with the kernel page tables",
              "With PTI the kernel page tables must never be live while user code runs: they map all of "
              "kernel memory, which is exactly what Meltdown reads.  Every return to user mode (SYSRET, IRET) "
              "must have switched CR3 to the user half of the PGD (bit 12) and, with PCID, to the user PCID "
              "(bit 11).", check_user_mode_kernel_cr3),
    Invariant("kernel-memory-under-user-cr3", "an access or C call the user page tables do not map",
              "Under the user CR3 only .entry.text, the cpu_entry_area and the per-cpu TSS page are mapped.  "
              "Touching anything else (cpu_tlbstate, pcpu_hot, task stacks, C code) before switching to the "
              "kernel CR3, or after switching back, faults on real hardware — usually as a double fault or a "
              "silent reboot.", check_kernel_memory_under_user_cr3),
    Invariant("context-not-restored", "an exception returned with different CR3, GS, SPEC_CTRL or registers",
              "An exception that interrupted kernel (or user) code must give that code back exactly what it "
              "had: the same CR3 (page table and PCID), GSBASE, KERNEL_GS_BASE, SPEC_CTRL, general registers, "
              "RSP and RFLAGS.  Paranoid entries (NMI, #MC, #DB, #DF, #VC) can hit any instruction, including "
              "the windows between a CR3 switch and SWAPGS/SYSRET, which is where restores go wrong.",
              check_context_not_restored),
    Invariant("stale-tlb", "a stale PCID becomes current without a flush",
              "With PCID the kernel defers flushing a user ASID: invalidate_user_asid() only sets a bit in "
              "cpu_tlbstate.user_pcid_flush_mask, and whoever next loads that user PCID must write CR3 "
              "without NOFLUSH.  Loading it with NOFLUSH (or returning to it without a write) runs with stale "
              "translations.  The model tracks staleness per PCID itself, whatever the mask says.",
              check_stale_tlb),
    Invariant("percpu-with-user-gs", "a %gs: access with the user GSBASE",
              "Per-cpu data is reached through %gs.  Before SWAPGS (or the paranoid GSBASE write) the GSBASE "
              "is user controlled, so any %gs: access reads or writes wherever user space pointed it — the "
              "SWAPGS bug class (CVE-2019-1125) and the FSGSBASE paranoid-entry bugs.",
              check_percpu_with_user_gs),
    Invariant("user-mode-kernel-gs", "user mode runs with the kernel GSBASE",
              "Returning to user mode without the final SWAPGS hands user space the kernel's per-cpu base "
              "(an info leak) and leaves KERNEL_GS_BASE wrong, so the next entry's SWAPGS loads a user "
              "value as the kernel's per-cpu base.", check_user_mode_kernel_gs),
    Invariant("spec-ctrl", "C code without IBRS under kernel_ibrs, or user mode with the kernel value",
              "With the kernel_ibrs mitigation every entry must set IBRS in SPEC_CTRL before the first "
              "indirect branch or RET in C code, and every exit must restore the user value; paranoid "
              "entries save and restore the interrupted value.", check_spec_ctrl),
    Invariant("nmi-lost-or-corrupted", "an NMI was not processed, or processed twice",
              "NMIs nest through IRETs of #DB/#MC handlers that interrupted an NMI; asm_exc_nmi's "
              "'NMI executing' variable and repeat_nmi loop exist so that every NMI is processed exactly "
              "once and the outer frame survives.  Every delivered NMI must reach exc_nmi once, none may stay "
              "latched, and NMIs must be unblocked when the path ends.", check_nmi),
    Invariant("emulation-fault", "the code faulted (unmapped access, #UD, #GP) or broke a C contract",
              "A fault inside the entry code is a crash on real hardware; a C function called without what "
              "C needs (kernel CR3, per-cpu GSBASE, a kernel stack) would crash or corrupt memory.  The "
              "machine stops there rather than run on with garbage.", check_emulation_fault),
    Invariant("no-return", "the path did not return within the step budget",
              "Every entry path must end where it started: back in user mode, or back in the interrupted "
              "kernel code.  A path that loops (an NMI that keeps repeating, a handler that never IRETs) "
              "hangs the CPU.", check_no_return),
)

INVARIANTS: Mapping[str, Invariant] = MappingProxyType({inv.name: inv for inv in _TABLE})


def invariant(name: str) -> Invariant:
    try:
        return INVARIANTS[name]
    except KeyError:
        raise InputError(f"unknown invariant {name!r}; choose from {', '.join(INVARIANTS)}") from None


def check_run(world: World, run: Run) -> list[Violation]:
    out: list[Violation] = []
    for inv in _TABLE:
        out.extend(inv.check(world, run))
    return out
