"""Where the kernel's noinstr C calls code the image does not run: what that callee does.

With the noinstr C in the image, a stub stands only where noinstr code calls instrumented code
(objtool allows it between instrumentation_begin/end), an asm helper, or a function no object
of the image defines.  Such a callee returns 0 unless this table says otherwise, with a line
each saying why: its effect on the state the entry paths depend on is the whole contract.

Two more rules come from the handler-effect switches (kernelabi/stubs.py ``Effect``): a callee
reached while the CPU handles an NMI, #MC, #DB, #DF or #VC is where the handler's work (perf,
the breakpoint handlers, the MCE code) runs, so the switched-on effects happen there; one
reached while handling a device interrupt is where a TLB-flush IPI flushes.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.image.layout import SIGNAL_HANDLER_RIP, SIGNAL_STACK, USER_CS, USER_DS
from entrycheck.machine.model import Vector

# pt_regs fields by offset (the layout every x86-64 kernel has; the C reads it through DWARF too).
PTREGS = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "rbp": 32, "rbx": 40, "r11": 48, "r10": 56, "r9": 64,
          "r8": 72, "rax": 80, "rcx": 88, "rdx": 96, "rsi": 104, "rdi": 112, "orig_ax": 120, "ip": 128,
          "cs": 136, "flags": 144, "sp": 152, "ss": 160}

HANDLER_VECTORS = frozenset({Vector.NMI, Vector.MC, Vector.DB, Vector.DF, Vector.VC})


@dataclass(frozen=True)
class Returns:
    rax: int
    why: str
    rdx: int | None = None


# Callee (its name without a compiler suffix: .part.N, .constprop.N, .isra.N, .cold) -> what it returns.
RETURNS: dict[str, Returns] = {
    "_raw_spin_trylock": Returns(1, "the lock is free: no other CPU holds it (default_do_nmi's nmi_reason_lock)"),
    "nmi_handle": Returns(1, "a registered NMI handler (perf's) claims the NMI, so default_do_nmi is done "
                             "with it"),
    "__get_user_nocheck_4": Returns(0, "the user word is readable (EAX: no fault; EDX: the value)", 0),
    "__get_user_4": Returns(0, "the user word is readable (EAX: no fault; EDX: the value)", 0),
    "vc_raw_handle_exception": Returns(1, "the #VC's instruction was emulated through the GHCB (the instruction "
                                          "decoder and the hypervisor's side are not run): handled"),
    "native_apic_mem_read": Returns(0, "the APIC register reads 0: no vector in service (kernelabi/booted.py's apic)"),
}
# A retpoline thunk the C calls through (__x86_indirect_thunk_<reg>): it jumps to the register.
INDIRECT_THUNK = "__x86_indirect_thunk_"

# The system call itself (6.12 and later stables: x64_sys_call and friends; before: the table).
SYSTEM_CALLS = frozenset({"x64_sys_call", "ia32_sys_call", "x32_sys_call"})
# Sending a signal to the current task: TIF_SIGPENDING, delivered on the way out.
SIGNAL_SENDERS = ("force_sig", "send_sig", "send_sigtrap", "force_fatal_sig", "force_exit_sig",
                  "force_sigsegv", "force_sig_fault", "force_sig_mceerr", "gp_user_force_sig_segv")
# Where the way out delivers pending signals: the user context becomes the handler's.
SIGNAL_DELIVERY = frozenset({"exit_to_user_mode_loop", "exit_to_user_mode_prepare", "arch_do_signal_or_restart"})
# Callees that do not return (the run ends: the kernel oopses, panics or kills the task).
NORETURN = frozenset({"die", "die_addr", "panic", "nmi_panic", "make_task_dead", "do_exit", "mce_panic",
                      "__stack_chk_fail", "kernel_exc_vmm_communication_panic", "sev_es_terminate", "__sev_es_terminate",
                      "BUG_func", "oops_end"})
# noinstr functions the image compiles but runs as a stub all the same, each with the reason.
STUBBED = {
    "do_machine_check": "its work is the machine-check banks' (MCi_STATUS and the severity grading), hardware "
                        "state no model here has; the stub records the #MC as handled and clears MCG_STATUS.MCIP, "
                        "as the end of do_machine_check does",
    "__sev_es_nmi_complete": "its VMGEXIT (SVM_VMGEXIT_NMI_COMPLETE through the per-cpu GHCB) tells the hypervisor "
                             "the NMI is done, which lets the next NMI in before the handler's IRET; the GHCB "
                             "protocol is not modelled, so NMIs stay blocked until the IRET here",
}
# IRQ handlers' work: where a TLB-shootdown IPI would flush (flush_tlb_func).
IRQ_WORK = ("__common_interrupt", "__sysvec_", "sysvec_")


def base_name(name: str) -> str:
    """A callee's name without the suffix of a compiler-made clone."""
    return name.split(".", 1)[0]


def sends_signal(name: str) -> bool:
    return base_name(name).startswith(SIGNAL_SENDERS)


def signal_frame(emu, regs: int) -> None:
    """The user context a signal handler starts in (setup_rt_frame), written to pt_regs."""
    for field, value in (("ip", SIGNAL_HANDLER_RIP), ("cs", USER_CS), ("flags", 0x246), ("sp", SIGNAL_STACK),
                         ("ss", USER_DS)):
        emu.write_u64(regs + PTREGS[field], value)


__all__ = ["INDIRECT_THUNK", "STUBBED", "RETURNS", "Returns", "SYSTEM_CALLS", "SIGNAL_SENDERS", "SIGNAL_DELIVERY", "NORETURN", "HANDLER_VECTORS",
           "IRQ_WORK", "base_name", "sends_signal", "signal_frame", "PTREGS"]
