"""The invariants, each declared once in one table with its rationale.

A check reads a path's events and its end, and returns violations as data; nothing
here raises for a violation.  Most checks look at one event at a time (``local``);
the rest look at how the path ended (``end``), with the NMI accounting summarised
over the whole path.  Splitting them this way lets the explorer evaluate a path as
prefix + its own run + the run it rejoined, each summarised once, in time that does
not grow with the path's length (the explorer's summaries: explore/summary.py).
Violations come out in table order, then in event order, then the end checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from entrycheck.errors import InputError
from entrycheck.image.layout import SIGNAL_HANDLER_RIP
from entrycheck.kernelabi.linux import RETURN_THUNKS, UNTRAIN_FUNCTIONS
from entrycheck.kernelabi.stubs import Kind, contract, ibrs_ok
from entrycheck.kernelabi.world import World
from entrycheck.machine import model
from entrycheck.machine.events import (Branch, Cr2Read, Cr3Written, Delivered, Event, Fault, FaultKind, Iret, Latched,
                                       Outcome, Resumed, StubCall, Sysret)
from entrycheck.machine.model import CpuState, Vector
from entrycheck.machine.state import CONTEXT_LABELS, Interrupted


@dataclass(frozen=True)
class Violation:
    invariant: str
    pc: int
    step: int
    message: str


Local = Callable[[World, Event], list]          # -> [(order within the invariant, Violation)]


@dataclass(frozen=True)
class NmiSummary:
    """NMI accounting of a stretch of events: NMIs delivered, exc_nmi calls, and the last of
    the two kinds of event ('nmi' with the arrival event, or 'exc')."""

    delivered: int = 0
    handled: int = 0
    tail: tuple | None = None           # ("nmi", event) or ("exc",)

    def __add__(self, other: "NmiSummary") -> "NmiSummary":
        if not other.delivered and not other.handled and other.tail is None:
            return self
        if not self.delivered and not self.handled and self.tail is None:
            return other
        return NmiSummary(self.delivered + other.delivered, self.handled + other.handled,
                          other.tail if other.tail is not None else self.tail)


NO_NMI = NmiSummary()
# Where an NMI is processed: exc_nmi, and FRED's dispatcher's call of its fred_exc_nmi (the same C).
NMI_HANDLERS = frozenset({"exc_nmi", "fred_exc_nmi"})


def nmi_of(e: Event) -> NmiSummary:
    if isinstance(e, (Delivered, Latched)) and e.vector is Vector.NMI:
        return NmiSummary(1 if isinstance(e, Delivered) else 0, 0, ("nmi", e))
    if isinstance(e, StubCall) and e.name in NMI_HANDLERS:
        return NmiSummary(0, 1, ("exc",))
    return NO_NMI


@dataclass(frozen=True)
class End:
    """How a path ended, as the end checks see it."""

    outcome: Outcome
    reason: str
    final_cpu: CpuState
    converged: bool                    # stopped where a checked run continues identically
    outstanding: tuple[Interrupted, ...]
    last: Event                        # the last event of the path's own run (its Ended)
    nmi: NmiSummary                    # over the whole path, the rejoined run's rest included
    events: Callable[[], Sequence[Event]]   # the path's events up to its end (for no-return)


EndCheck = Callable[[World, End], list]


@dataclass(frozen=True)
class Invariant:
    name: str
    summary: str
    rationale: str
    local: Local | None
    end: EndCheck | None
    history: tuple[tuple[str, str], ...] = ()     # (commit, what it did): the kernel history behind it
    needs: str = ""                               # the features that switch the check on ("" = always)


def _returns_to_user(e: Event) -> bool:
    return isinstance(e, Sysret) or (isinstance(e, Iret) and e.to_user)


def local_user_mode_kernel_cr3(world: World, e: Event) -> list:
    if not world.pti or not _returns_to_user(e):
        return []
    cpu = e.cpu
    if not cpu.cr3 & model.PTI_USER_PGTABLE:
        return [(0, Violation("user-mode-kernel-cr3", e.pc, e.step, "user mode entered with the kernel page "
                              f"tables ({model.decode_cr3(cpu.cr3, cpu.pcide)})"))]
    if world.pcid and not cpu.cr3 & model.PTI_USER_PCID:
        return [(0, Violation("user-mode-kernel-cr3", e.pc, e.step,
                              f"user mode entered with a kernel PCID ({model.decode_cr3(cpu.cr3, cpu.pcide)})"))]
    return []


def local_kernel_memory_under_user_cr3(world: World, e: Event) -> list:
    if isinstance(e, Fault) and e.kind is FaultKind.USER_CR3:
        return [(0, Violation("kernel-memory-under-user-cr3", e.pc, e.step, e.message))]
    return []


SYSTEM_CALLS = frozenset({Vector.INT80, Vector.SYSCALL, Vector.SYSENTER})


def local_context_not_restored(world: World, e: Event) -> list:
    if not isinstance(e, Resumed):
        return []
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
    for label, a, b in zip(CONTEXT_LABELS, e.regs, inj.regs):
        if a != b and not (inj.vector in SYSTEM_CALLS and label == "rax"):   # a system call returns a value
            diffs.append(f"{label} {a:#x} instead of {b:#x}")
    if not diffs:
        return []
    where = "user mode" if before.cpl == 3 else "kernel code"
    return [(0, Violation("context-not-restored", e.pc, e.step,
                          f"{inj.vector.label} returned to {where} with " + "; ".join(diffs[:4]) +
                          (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")))]


def end_context_not_restored(world: World, end: End) -> list:
    if end.converged or end.outcome is not Outcome.RETURNED:
        return []
    last = end.last
    return [Violation("context-not-restored", last.pc, last.step,
                      f"{inj.vector.label} never returned to the code it interrupted "
                      f"(step {inj.step}, RIP {inj.rip:#x})") for inj in end.outstanding
            if not (end.final_cpu.cpl == 3 and (inj.vector in (Vector.GP, *SYSTEM_CALLS) or
                                                (inj.cpu.cpl == 3 and last.pc == SIGNAL_HANDLER_RIP)))]
    # A #GP is raised only by an IRET that faults; the kernel (fixup_bad_iret) turns it into a
    # fault of the user mode that IRET was returning to, so it ends with a return to user mode.
    # A system call delivered as an event (FRED) may return to another user context (sigreturn),
    # and an event from user mode that signals the task (a #DB's SIGTRAP, run by the kernel's C)
    # returns to the signal handler the kernel set up instead of the interrupted code.


def local_cr2_clobbered(world: World, e: Event) -> list:
    if isinstance(e, Cr2Read) and e.handling is Vector.PF and e.value != model.PF_ADDRESS:
        return [(0, Violation("cr2-clobbered", e.pc, e.step,
                              f"the page-fault handler read CR2 {e.value:#x}, not the address of its own fault "
                              f"({model.PF_ADDRESS:#x}): a fault taken since the #PF was delivered overwrote it "
                              "and nothing put it back"))]
    return []


def local_stale_tlb(world: World, e: Event) -> list:
    if isinstance(e, Cr3Written) and e.write.stale_made_current:
        return [(0, Violation("stale-tlb", e.pc, e.step,
                              f"NOFLUSH write made stale PCID {e.write.new & model.CR3_PCID_MASK:#x} current "
                              f"({model.decode_cr3(e.write.written)})"))]
    if isinstance(e, Resumed) and e.cpu.pcide and e.cpu.pcid in e.cpu.stale:
        return [(0, Violation("stale-tlb", e.pc, e.step,
                              f"{e.injection.vector.label} returned with stale PCID {e.cpu.pcid:#x} current"))]
    return []


def end_stale_tlb(world: World, end: End) -> list:
    cpu = end.final_cpu
    if end.outcome is Outcome.RETURNED and not end.converged and cpu.pcide and cpu.pcid in cpu.stale:
        return [Violation("stale-tlb", end.last.pc, end.last.step, f"path ended with stale PCID {cpu.pcid:#x} current")]
    return []


def local_percpu_with_user_gs(world: World, e: Event) -> list:
    if isinstance(e, Fault) and e.kind is FaultKind.USER_GS:
        return [(0, Violation("percpu-with-user-gs", e.pc, e.step, e.message))]
    return []


def local_user_mode_kernel_gs(world: World, e: Event) -> list:
    if not _returns_to_user(e):
        return []
    cpu = e.cpu
    if cpu.gs_base == world.percpu_base:
        return [(0, Violation("user-mode-kernel-gs", e.pc, e.step, "user mode entered with the kernel GSBASE"))]
    if cpu.kernel_gs_base != world.percpu_base:
        return [(0, Violation("user-mode-kernel-gs", e.pc, e.step,
                              f"user mode entered with KERNEL_GS_BASE {cpu.kernel_gs_base:#x}: the next entry's "
                              "SWAPGS would not find the per-cpu base"))]
    return []


def local_spec_ctrl(world: World, e: Event) -> list:
    if not world.kernel_ibrs:
        return []
    if isinstance(e, StubCall):
        if contract(e.name) in (Kind.HANDLER, Kind.C_FUNCTION, Kind.SYSCALL) and not ibrs_ok(world, e.cpu):
            return [(0, Violation("spec-ctrl", e.pc, e.step, f"C function {e.name} runs without IBRS "
                                                              f"(SPEC_CTRL {e.cpu.spec_ctrl:#x})"))]
        return []
    if _returns_to_user(e) and e.cpu.spec_ctrl != world.user_spec_ctrl():
        # Reported after every C-call finding of the path.
        return [(1, Violation("spec-ctrl", e.pc, e.step,
                              f"user mode entered with SPEC_CTRL {e.cpu.spec_ctrl:#x} (the user value is "
                              f"{world.user_spec_ctrl():#x})"))]
    return []


def local_verw_missing(world: World, e: Event) -> list:
    spec = world.config.spec
    if spec is None or not spec.verw or not _returns_to_user(e) or e.cpu.spec & model.SPEC_VERW:
        return []
    how = "SYSRET" if isinstance(e, Sysret) else (e.eret or "IRET")
    if e.cpu.spec & model.SPEC_VERW_UNDONE:
        return [(0, Violation("verw-missing", e.pc, e.step,
                              f"{how} to user mode after an exception that entered the kernel after the exit's VERW "
                              "and returned to it without one: " + VERW_AFTER_NMI))]
    return [(0, Violation("verw-missing", e.pc, e.step,
                          f"{how} to user mode without VERW since the CPU last entered the kernel: the CPU "
                          "buffers may still hold kernel data (CLEAR_CPU_BUFFERS)"))]


# Why the kernel leaves the class above alone (entry_64.S at nmi_restore, 6.1 and 6.12).
VERW_AFTER_NMI = ("the NMI return to kernel mode skips CLEAR_CPU_BUFFERS on purpose ('it only helps in rare cases "
                  "like NMI in kernel after user state is restored. For an unprivileged user these conditions are "
                  "hard to meet', entry_64.S; mds.rst: 'Corner case not handled')")


# C functions and asm helpers, as a retbleed/BHI mitigation sees them: "c" runs RETs and, for a
# system call's dispatcher, the indirect call through the system call table.
_NOT_C = frozenset({Kind.THUNK, Kind.IBPB, Kind.UNMODELLED, Kind.NORETURN})


def local_ret_before_untrain(world: World, e: Event) -> list:
    spec = world.config.spec
    if spec is None or not spec.branches:
        return []
    if isinstance(e, Branch):
        return [(0, Violation("ret-before-untrain", e.pc, e.step,
                              f"{'RET' if e.kind == 'ret' else 'indirect branch'} before "
                              f"{' and '.join(e.missing)}"))]
    if not isinstance(e, StubCall):
        return []
    if e.name in RETURN_THUNKS:
        what, label = "ret", f"RET (through {e.name})"
    elif e.name.startswith("__x86_indirect_thunk_"):
        what, label = "indirect", f"indirect branch (through {e.name})"
    elif contract(e.name) not in _NOT_C and e.name not in UNTRAIN_FUNCTIONS:
        what, label = "c", f"C function {e.name}"
    else:
        return []
    missing = model.unmitigated(e.cpu, spec, what, bool(e.cpu.spec_ctrl & model.SPEC_CTRL_IBRS))
    if what == "c" and "CLEAR_BRANCH_HISTORY" in missing and contract(e.name) not in (
            Kind.SYSCALL, Kind.SYSCALL32, Kind.INT80, Kind.FRED):
        missing = tuple(m for m in missing if m != "CLEAR_BRANCH_HISTORY")   # only the dispatcher branches
    if not missing:
        return []
    return [(0, Violation("ret-before-untrain", e.pc, e.step, f"{label} runs before {' and '.join(missing)}"))]


def end_nmi(world: World, end: End) -> list:
    """NMIs are edge-triggered and exc_nmi handles every pending source, so an NMI is
    processed when an exc_nmi call starts after it was delivered or latched."""
    if end.outcome not in (Outcome.RETURNED, Outcome.STOPPED):
        return []
    if end.outcome is Outcome.STOPPED and not end.converged:
        return []
    out = []
    last = end.last
    nmi = end.nmi
    if nmi.tail is not None and nmi.tail[0] == "nmi":
        e = nmi.tail[1]
        out.append(Violation("nmi-lost-or-corrupted", e.pc, e.step,
                             "an NMI was never processed: no exc_nmi call after it arrived"))
    if nmi.handled > nmi.delivered:
        out.append(Violation("nmi-lost-or-corrupted", last.pc, last.step,
                             f"exc_nmi ran {nmi.handled} times for {nmi.delivered} NMIs (a frame was replayed)"))
    if end.converged:
        return out
    cpu = end.final_cpu
    if cpu.nmi_pending:
        out.append(Violation("nmi-lost-or-corrupted", last.pc, last.step,
                             "an NMI is still latched when the path ends"))
    if end.outcome is Outcome.RETURNED and cpu.nmi_blocked:
        out.append(Violation("nmi-lost-or-corrupted", last.pc, last.step,
                             "NMIs are still blocked when the path ends (no IRET after an NMI)"))
    return out


def local_irq_in_user_context(world: World, e: Event) -> list:
    if not (isinstance(e, Delivered) and e.vector is Vector.IRQ and e.frame.cs & 3 == 0):
        return []
    cpu = e.cpu
    what = []
    if cpu.gs_base != world.percpu_base:
        what.append(f"GSBASE {cpu.gs_base:#x}")
    if cpu.cr3 & model.PTI_USER_PGTABLE:
        what.append(f"the user CR3 ({model.decode_cr3(cpu.cr3, cpu.pcide)})")
    if not what:
        return []
    return [(0, Violation("irq-in-user-context", e.pc, e.step,
                          "a maskable interrupt arrived (IF=1) in kernel mode with " + " and ".join(what)
                          + ": its entry takes the kernel's GSBASE and CR3 for granted when CS says kernel"))]


def local_swapgs_unfenced(world: World, e: Event) -> list:
    if isinstance(e, Fault) and e.kind is FaultKind.SPECULATIVE_USER_GS:
        return [(0, Violation("swapgs-unfenced", e.pc, e.step, "speculatively, " + e.message))]
    return []


def local_emulation_fault(world: World, e: Event) -> list:
    if isinstance(e, Fault) and e.kind not in (FaultKind.USER_CR3, FaultKind.USER_GS, FaultKind.SPECULATIVE_USER_GS):
        return [(0, Violation("emulation-fault", e.pc, e.step, e.message))]
    return []


def end_no_return(world: World, end: End) -> list:
    if end.outcome is not Outcome.NO_RETURN:
        return []
    events = end.events()
    return [Violation("no-return", _loop_site(events[:-1]) or end.last.pc, end.last.step, end.reason)]


def _loop_site(events: Sequence[Event]) -> int | None:
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
              "(bit 11).", local_user_mode_kernel_cr3, None),
    Invariant("kernel-memory-under-user-cr3", "an access or C call the user page tables do not map",
              "Under the user CR3 only .entry.text, the cpu_entry_area and the per-cpu TSS page are mapped.  "
              "Touching anything else (cpu_tlbstate, pcpu_hot, task stacks, C code) before switching to the "
              "kernel CR3, or after switching back, faults on real hardware — usually as a double fault or a "
              "silent reboot.", local_kernel_memory_under_user_cr3, None),
    Invariant("context-not-restored", "an exception returned with different CR3, GS, SPEC_CTRL or registers",
              "An exception that interrupted kernel (or user) code must give that code back exactly what it "
              "had: the same CR3 (page table and PCID), GSBASE, KERNEL_GS_BASE, SPEC_CTRL, general registers, "
              "RSP and RFLAGS.  Paranoid entries (NMI, #MC, #DB, #DF, #VC) can hit any instruction, including "
              "the windows between a CR3 switch and SWAPGS/SYSRET, which is where restores go wrong.",
              local_context_not_restored, end_context_not_restored),
    Invariant("stale-tlb", "a stale PCID becomes current without a flush",
              "With PCID the kernel defers flushing a user ASID: invalidate_user_asid() only sets a bit in "
              "cpu_tlbstate.user_pcid_flush_mask, and whoever next loads that user PCID must write CR3 "
              "without NOFLUSH.  Loading it with NOFLUSH (or returning to it without a write) runs with stale "
              "translations.  The model tracks staleness per PCID itself, whatever the mask says.",
              local_stale_tlb, end_stale_tlb),
    Invariant("percpu-with-user-gs", "a %gs: access with the user GSBASE",
              "Per-cpu data is reached through %gs.  Before SWAPGS (or the paranoid GSBASE write) the GSBASE "
              "is user controlled, so any %gs: access reads or writes wherever user space pointed it — the "
              "SWAPGS bug class (CVE-2019-1125) and the FSGSBASE paranoid-entry bugs.",
              local_percpu_with_user_gs, None),
    Invariant("user-mode-kernel-gs", "user mode runs with the kernel GSBASE",
              "Returning to user mode without the final SWAPGS hands user space the kernel's per-cpu base "
              "(an info leak) and leaves KERNEL_GS_BASE wrong, so the next entry's SWAPGS loads a user "
              "value as the kernel's per-cpu base.", local_user_mode_kernel_gs, None),
    Invariant("spec-ctrl", "C code without IBRS under kernel_ibrs, or user mode with the kernel value",
              "With the kernel_ibrs mitigation every entry must set IBRS in SPEC_CTRL before the first "
              "indirect branch or RET in C code, and every exit must restore the user value; paranoid "
              "entries save and restore the interrupted value.", local_spec_ctrl, None),
    Invariant("nmi-lost-or-corrupted", "an NMI was not processed, or processed twice",
              "NMIs nest through IRETs of #DB/#MC handlers that interrupted an NMI; asm_exc_nmi's "
              "'NMI executing' variable and repeat_nmi loop exist so that every NMI is processed exactly "
              "once and the outer frame survives.  Every delivered NMI must reach exc_nmi once, none may stay "
              "latched, and NMIs must be unblocked when the path ends.", None, end_nmi),
    Invariant("irq-in-user-context", "a maskable interrupt can arrive while the kernel holds user state",
              "Interrupts are off (IF=0) from SYSCALL or exception delivery until the kernel has its own "
              "GSBASE, CR3 and stack, and off again before it gives them back: interrupt entries are not "
              "paranoid, and from kernel mode they neither SWAPGS nor switch CR3 nor stack.  An STI, POPF "
              "or IRET that sets IF inside that window lets a device interrupt or IPI run C code on user "
              "state (or push its frame on the user's stack).", local_irq_in_user_context, None),
    Invariant("emulation-fault", "the code faulted (unmapped access, #UD, #GP) or broke a C contract",
              "A fault inside the entry code is a crash on real hardware; a C function called without what "
              "C needs (kernel CR3, per-cpu GSBASE, a kernel stack) would crash or corrupt memory.  The "
              "machine stops there rather than run on with garbage.", local_emulation_fault, None),
    Invariant("cr2-clobbered", "the page-fault handler read another fault's address from CR2",
              "CR2 holds the address of the last page fault, and exc_page_fault() reads it first thing "
              "(read_cr2()).  Anything that runs before that read and faults itself (an NMI whose handler reads "
              "a user stack: perf's user call chains) overwrites it, so exc_nmi() saves CR2 on entry (nmi_cr2) "
              "and writes it back before it returns.  A #PF handler reading another address handles the wrong "
              "fault: it maps the wrong page, or kills the task for an access it never made.  Checked where "
              "the kernel's C runs; --handler-effects page-fault makes handlers take a page fault.",
              local_cr2_clobbered, None,
              (("7fbb98c5cb07", "x86/entry: save CR2 in NMI in case NMIs take a page fault (nmi_cr2)"),)),
    Invariant("ist-reentered", "an exception delivered through an IST stack that still holds a live frame",
              "An IST gate makes the CPU switch to a fixed stack and write its frame at the top, whatever is "
              "there.  Until the handler has moved off that stack (sync_regs, error_entry) or copied the frame "
              "(the NMI entry), a second delivery through the same slot overwrites the frame the first handler "
              "will return with: #DB and #MC do not nest by design, so the kernel must keep them from arriving "
              "there (hw_breakpoint.c refuses breakpoints on the data the entry code touches).  Found by the "
              "explorer at the second delivery; what goes wrong after it is folded under this finding.",
              None, None),
    Invariant("swapgs-unfenced", "a %gs: access reachable speculatively with the user GSBASE",
              "A conditional SWAPGS (entry from user mode or not, decided by CS or by the sign of GSBASE) is "
              "a branch the CPU predicts.  Mispredicted, it speculatively skips the SWAPGS of an entry from "
              "user mode, or runs one on an entry from kernel mode (CPUs with X86_BUG_SWAPGS), and the "
              "%gs: loads that follow use the user's GSBASE: CVE-2019-1125.  Each side must reach an LFENCE "
              "(FENCE_SWAPGS_KERNEL_ENTRY / FENCE_SWAPGS_USER_ENTRY) or a serialising instruction (the PTI "
              "CR3 write) before its first %gs: access or C call.  The explorer follows the mispredicted "
              "side of every conditional branch for --spec-window instructions, without committing it, "
              "when the feature set has fence_swapgs_kernel or fence_swapgs_user.", local_swapgs_unfenced, None,
              (("18ec54fdd6d1", "x86/speculation: Prepare entry code for Spectre v1 swapgs mitigations (v5.3)"),
               ("c07e45553da1", "x86/entry: Add a fence for kernel entry SWAPGS in paranoid_entry() (v5.16-rc4): "
                                "moving the CR3 switch before SWAPGS (96b2371413e8) had left a branch unfenced"),
               ("1367afaa2ee9", "x86/entry: Use the correct fence macro after swapgs in kernel CR3 (v5.16-rc4): "
                                "a FENCE_SWAPGS_USER_ENTRY relied on a CR3 write that c75890700455 removed")),
              "fence_swapgs_kernel or fence_swapgs_user"),
    Invariant("verw-missing", "a return to user mode without VERW since the last kernel entry",
              "On CPUs with MDS, TAA or RFDS, the CPU's fill buffers, load ports and register files may hold "
              "data the kernel touched; VERW (CLEAR_CPU_BUFFERS) clears them and must be the last thing "
              "before every SYSRET, IRET or ERETU to user mode, after the last kernel memory access.  Any "
              "entry into the kernel (an NMI or #MC in the exit path too) touches kernel data again, so the "
              "check is against the last entry, not the last system call.", local_verw_missing, None,
              (("04dcbdb80578", "x86/speculation/mds: Clear CPU buffers on exit to user (v5.2)"),
               ("3c7501722e6b", "x86/entry_64: Add VERW just before userspace transition (v6.8, in 6.1.y): "
                                "moved from C to the last instructions before SYSRET/IRET")),
              "clear_cpu_buf"),
    Invariant("ret-before-untrain", "a RET or indirect branch before the mitigation that must precede it",
              "After an entry from user mode the return and branch predictors hold what user space trained. "
              "Retbleed: IBRS_ENTER (kernel_ibrs) and UNTRAIN_RET (unret, entry_ibpb) 'must be called before "
              "the first RET' (calling.h): no RET of the entry code, no return thunk and no C function may "
              "run before them.  BHI: CLEAR_BRANCH_HISTORY (clear_bhb_loop) must run before a system call's "
              "first indirect branch (the dispatch through the system call table in its C function).  "
              "Checked for the mitigations the feature set turns on; IBRS before C code alone stays "
              "spec-ctrl's.", local_ret_before_untrain, None,
              (("2dbb887e875b", "x86/entry: Add kernel IBRS implementation (v5.19)"),
               ("a149180fbcf3", "x86: Add magic AMD return-thunk (v5.19): UNTRAIN_RET"),
               ("7c81c0c9210c", "x86/entry: Avoid very early RET (v5.19): a CALL/RET pair had come before "
                                "the CR3 switch and the untraining"),
               ("7390db8aea0d", "x86/bhi: Add support for clearing branch history at syscall entry (v6.9)")),
              "kernel_ibrs with another mitigation, unret, entry_ibpb or clear_bhb_loop"),
    Invariant("no-return", "the path did not return within the step budget",
              "Every entry path must end where it started: back in user mode, or back in the interrupted "
              "kernel code.  A path that loops (an NMI that keeps repeating, a handler that never IRETs) "
              "hangs the CPU.", None, end_no_return),
)

INVARIANTS: Mapping[str, Invariant] = MappingProxyType({inv.name: inv for inv in _TABLE})
_LOCALS = tuple((k, inv.local) for k, inv in enumerate(_TABLE) if inv.local is not None)
_ENDS = tuple((k, inv.end) for k, inv in enumerate(_TABLE) if inv.end is not None)
LocalViolation = tuple       # (invariant index, order, position in the path, Violation)


def invariant(name: str) -> Invariant:
    try:
        return INVARIANTS[name]
    except KeyError:
        raise InputError(f"unknown invariant {name!r}; choose from {', '.join(INVARIANTS)}") from None


def local_violations(world: World, events: Sequence[Event], position: int = 0) -> tuple[LocalViolation, ...]:
    """The per-event violations of ``events`` (the first at path position ``position``)."""
    out = []
    for n, e in enumerate(events):
        for k, check in _LOCALS:
            for order, v in check(world, e):
                out.append((k, order, position + n, v))
    return tuple(out)


def verdict(world: World, local: Sequence[LocalViolation], end: End) -> list[Violation]:
    """The violations of a path, in the order of the table: per invariant its local
    violations in path order, then its end checks."""
    ordered = sorted(local, key=lambda t: (t[0], t[1], t[2])) if local else []
    out: list[Violation] = []
    j = 0
    for k, inv in enumerate(_TABLE):
        while j < len(ordered) and ordered[j][0] == k:
            out.append(ordered[j][3])
            j += 1
        if inv.end is not None:
            out.extend(inv.end(world, end))
    return out

