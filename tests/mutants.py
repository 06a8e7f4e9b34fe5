"""Mutants of the real kernel entry code: each one a known bug class, re-introduced by a small edit.

Every mutant is data: the kernel series it applies to, the file and the exact edit
(``old`` must occur exactly once, so a Debian update that moves the code makes the
mutant fail loudly instead of testing nothing), the invariant that must catch it and
the narrowest check configuration that exercises the broken path.

``build_mutant`` copies the pristine source tree (hard links, arch/x86/entry/ copied
for real), applies the edit to the private copy and builds entry_64.o into the
entrycheck cache, keyed by the mutant's name and a hash of its edit.  A tree build's
cache key also holds the tree's path and its files' mtimes, so the copy is kept at a
stable path under the cache root (test-data/mutant-trees/) and reused while its edited
file is intact: the next run finds the build again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from entrycheck.explore.check import CheckConfig
from entrycheck.session import ObjectRef
from entrycheck.image.cpus import configuration
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.cache import Cache, remove_tree
from entrycheck.kernel.kconfig import parse_request
from entrycheck.kernel.targets import KernelBuild, build_tree_object
from entrycheck.kernelabi.stubs import Effect
from entrycheck.machine.model import VECTOR_BY_NAME

ENTRY_S = "arch/x86/entry/entry_64.S"
COMPAT_S = "arch/x86/entry/entry_64_compat.S"
FRED_S = "arch/x86/entry/entry_64_fred.S"
CALLING_H = "arch/x86/entry/calling.h"
COMMON_C = "arch/x86/entry/common.c"
TRAPS_C = "arch/x86/kernel/traps.c"
NMI_C = "arch/x86/kernel/nmi.c"


class MutantDoesNotApply(Exception):
    """The edit's ``old`` text is not in the source exactly once."""


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` by ``new``; ``old`` must occur exactly once (a regex when ``regex``)."""

    old: str
    new: str
    regex: bool = False

    def apply(self, text: str, where: str) -> str:
        pattern = re.compile(self.old if self.regex else re.escape(self.old), re.MULTILINE)
        found = len(pattern.findall(text))
        if found != 1:
            shown = self.old if len(self.old) <= 160 else self.old[:157] + "..."
            raise MutantDoesNotApply(
                f"{where}: the text to replace occurs {found} times, expected exactly once "
                f"(has the source changed?): {shown!r}")
        if self.regex:
            return pattern.sub(self.new, text, count=1)
        return text.replace(self.old, self.new, 1)


@dataclass(frozen=True)
class Mutant:
    name: str
    kernel: str                       # Debian series: "6.1" or "6.12"
    file: str                         # path inside the tree
    edit: Edit
    description: str                  # what the edit breaks, and the real bug class it mimics
    invariant: str                    # the invariant that must catch it
    scenarios: tuple[str, ...]
    features: tuple[str, ...]         # feature sets, e.g. ("pti,pcid",)
    vectors: tuple[str, ...] = ("nmi", "mc", "db")
    depth: int = 0
    effects: tuple[str, ...] = ()
    kconfig: tuple[str, ...] = ()     # options the kernel is built with (its pristine build too)
    off: tuple[str, ...] = ()         # feature sets without the mitigation: there the edit must go unseen

    def config(self) -> CheckConfig:
        return CheckConfig(
            scenarios=self.scenarios,
            feature_sets=tuple(FeatureSet.parse(f) for f in self.features),
            vectors=tuple(VECTOR_BY_NAME[v] for v in self.vectors),
            depth=self.depth,
            effects=tuple(Effect(e) for e in self.effects),
        )

    def edit_hash(self) -> str:
        text = "\0".join((self.kernel, self.file, self.edit.old, self.edit.new, str(self.edit.regex)))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def build_key(self) -> str:
        return f"mutant:{self.name}:{self.edit_hash()}"

    def mutated_text(self, source_tree: Path) -> str:
        original = (source_tree / self.file).read_text(encoding="utf-8", errors="surrogateescape")
        return self.edit.apply(original, f"mutant {self.name}: {self.file} of {source_tree.name}")


MUTANTS: tuple[Mutant, ...] = (
    # ---- user-mode-kernel-cr3
    Mutant(
        "sysret-keeps-kernel-cr3", "6.1", ENTRY_S,
        Edit("\tSWITCH_TO_USER_CR3_STACK scratch_reg=%rdi\n\n\tpopq\t%rdi\n\tpopq\t%rsp\n"
             "SYM_INNER_LABEL(entry_SYSRETQ_unsafe_stack",
             "\tpopq\t%rdi\n\tpopq\t%rsp\nSYM_INNER_LABEL(entry_SYSRETQ_unsafe_stack"),
        "the SYSRET exit loses SWITCH_TO_USER_CR3_STACK: user code runs on the kernel page tables "
        "(an exit path without its PTI switch, the Meltdown exposure PTI exists to close)",
        "user-mode-kernel-cr3", ("syscall",), ("pti",)),
    # ---- kernel-memory-under-user-cr3
    Mutant(
        "syscall-stack-before-kernel-cr3", "6.12", ENTRY_S,
        Edit("\tSWITCH_TO_KERNEL_CR3 scratch_reg=%rsp\n\tmovq\tPER_CPU_VAR(pcpu_hot + X86_top_of_stack), %rsp\n",
             "\tmovq\tPER_CPU_VAR(pcpu_hot + X86_top_of_stack), %rsp\n\tSWITCH_TO_KERNEL_CR3 scratch_reg=%rsp\n"),
        "entry_SYSCALL_64 reads the top of stack from pcpu_hot before SWITCH_TO_KERNEL_CR3: per-cpu "
        "data the user page tables do not map (kernel data touched in the PTI entry gap)",
        "kernel-memory-under-user-cr3", ("syscall",), ("pti",)),
    Mutant(
        "sysret-user-cr3-before-pop", "6.1", ENTRY_S,
        Edit(r"(syscall_return_via_sysret:\n\tIBRS_EXIT\n)(\tPOP_REGS pop_rdi=0\n)",
             "\\1\tSWITCH_TO_USER_CR3_STACK scratch_reg=%rdi\n\\2", regex=True),
        "the SYSRET exit switches to the user CR3 before POP_REGS, still on the task stack "
        "(exit work left after the CR3 switch reads kernel memory under the user page tables)",
        "kernel-memory-under-user-cr3", ("syscall",), ("pti",)),
    # ---- context-not-restored
    Mutant(
        "paranoid-exit-skips-cr3-restore", "6.12", ENTRY_S,
        Edit("\tPARANOID_RESTORE_CR3 scratch_reg=%rax save_reg=%r14\n", ""),
        "paranoid_exit loses PARANOID_RESTORE_CR3: an #MC where the kernel runs on the user CR3 (SYSCALL "
        "entry before SWITCH_TO_KERNEL_CR3, SYSRET exit after SWITCH_TO_USER_CR3) returns with the kernel "
        "CR3 (the 4.16-era CR3 restore skipped on a paranoid_exit branch)",
        "context-not-restored", ("syscall",), ("pti",), vectors=("mc",), depth=1),
    Mutant(
        "nmi-skips-cr3-restore", "6.1", ENTRY_S,
        Edit("\t/* Always restore stashed CR3 value (see paranoid_entry) */\n"
             "\tRESTORE_CR3 scratch_reg=%r15 save_reg=%r14\n", ""),
        "the NMI return loses RESTORE_CR3: an NMI where the kernel runs on the user CR3 (SYSCALL entry "
        "gap, SYSRET exit window) returns with the kernel CR3 (the KAISER-backport 'paranoid_entry pass "
        "cr3 need to paranoid_exit' class)",
        "context-not-restored", ("syscall",), ("pti,pcid",), vectors=("nmi",), depth=1),
    Mutant(
        "paranoid-exit-skips-swapgs", "6.1", ENTRY_S,
        Edit("\t/* We are returning to a context with user GSBASE */\n\tswapgs\n"
             "\tjmp\t\trestore_regs_and_return_to_kernel\nSYM_CODE_END(paranoid_exit)",
             "\t/* We are returning to a context with user GSBASE */\n"
             "\tjmp\t\trestore_regs_and_return_to_kernel\nSYM_CODE_END(paranoid_exit)"),
        "paranoid_exit's user-GSBASE branch (EBX=0) loses its SWAPGS: an #MC where the kernel runs with "
        "the user GSBASE returns with the kernel's (the paranoid GSBASE convention broken, as on the "
        "FSGSBASE paranoid-path changes)",
        "context-not-restored", ("syscall",), ("none",), vectors=("mc",), depth=1),
    # ---- stale-tlb
    Mutant(
        "user-cr3-ignores-flush-mask", "6.1", CALLING_H,
        Edit("\tandq\t$(0x7FF), \\scratch_reg\t\t/* mask ASID */\n"
             "\tbt\t\\scratch_reg, THIS_CPU_user_pcid_flush_mask\n\tjnc\t.Lnoflush_\\@\n",
             "\tandq\t$(0x7FF), \\scratch_reg\t\t/* mask ASID */\n"
             "\tbt\t\\scratch_reg, THIS_CPU_user_pcid_flush_mask\n\tjmp\t.Lnoflush_\\@\n"),
        "SWITCH_TO_USER_CR3 always sets NOFLUSH and ignores user_pcid_flush_mask: a user ASID that a "
        "handler invalidated is loaded with its stale TLB entries (the deferred user-ASID flush lost)",
        "stale-tlb", ("nmi-from-user",), ("pti,pcid",), effects=("invalidate-user-asid",)),
    Mutant(
        "user-cr3-flush-branch-noflush", "6.12", CALLING_H,
        Edit("\t/* Flush needed, clear the bit */\n\tbtr\t\\scratch_reg, THIS_CPU_user_pcid_flush_mask\n"
             "\tmovq\t\\scratch_reg2, \\scratch_reg\n\tjmp\t.Lwrcr3_pcid_\\@\n",
             "\t/* Flush needed, clear the bit */\n\tbtr\t\\scratch_reg, THIS_CPU_user_pcid_flush_mask\n"
             "\tjmp\t.Lnoflush_\\@\n"),
        "SWITCH_TO_USER_CR3's flush branch clears the flush-mask bit, then takes the NOFLUSH write: the "
        "pending user-ASID flush is consumed but never done (a mis-wired branch in the CR3 macros)",
        "stale-tlb", ("mc-from-user",), ("pti,pcid",), effects=("invalidate-user-asid",)),
    # ---- percpu-with-user-gs
    Mutant(
        "syscall-entry-skips-swapgs", "6.12", ENTRY_S,
        Edit("\tENDBR\n\n\tswapgs\n\t/* tss.sp2 is scratch space. */\n",
             "\tENDBR\n\n\t/* tss.sp2 is scratch space. */\n"),
        "entry_SYSCALL_64 loses its SWAPGS: the first per-cpu store goes through the user GSBASE "
        "(the SWAPGS class of CVE-2019-1125, with the skipped SWAPGS made architectural)",
        "percpu-with-user-gs", ("syscall",), ("none",)),
    # ---- user-mode-kernel-gs
    Mutant(
        "sysret-skips-swapgs", "6.1", ENTRY_S,
        Edit("SYM_INNER_LABEL(entry_SYSRETQ_unsafe_stack, SYM_L_GLOBAL)\n\tANNOTATE_NOENDBR\n\tswapgs\n",
             "SYM_INNER_LABEL(entry_SYSRETQ_unsafe_stack, SYM_L_GLOBAL)\n\tANNOTATE_NOENDBR\n"),
        "the SYSRET exit loses its final SWAPGS: user mode gets the kernel per-cpu base and the next "
        "entry's SWAPGS loads a user value as the per-cpu base (an unpaired SWAPGS on an exit path)",
        "user-mode-kernel-gs", ("syscall",), ("none",)),
    # ---- spec-ctrl
    Mutant(
        "syscall-skips-ibrs-enter", "6.1", ENTRY_S,
        Edit("\t/* clobbers %rax, make sure it is after saving the syscall nr */\n\tIBRS_ENTER\n",
             "\t/* clobbers %rax, make sure it is after saving the syscall nr */\n"),
        "entry_SYSCALL_64 loses IBRS_ENTER: do_syscall_64 runs without IBRS under kernel_ibrs "
        "(the Retbleed kernel IBRS entry write missing on one entry path)",
        "spec-ctrl", ("syscall",), ("kernel_ibrs",)),
    Mutant(
        "sysret-skips-ibrs-exit", "6.12", ENTRY_S,
        Edit("syscall_return_via_sysret:\n\tIBRS_EXIT\n", "syscall_return_via_sysret:\n"),
        "the SYSRET exit loses IBRS_EXIT: user mode keeps the kernel's SPEC_CTRL value "
        "(the kernel IBRS exit write missing on one exit path)",
        "spec-ctrl", ("syscall",), ("kernel_ibrs",)),
    # ---- ist-reentered
    Mutant(
        "paranoid-entry-reads-percpu-on-ist", "6.1", ENTRY_S,
        Edit("\tIBRS_ENTER save_reg=%r15\n\tUNTRAIN_RET\n",
             "\tIBRS_ENTER save_reg=%r15\n\tmovq\tPER_CPU_VAR(x86_spec_ctrl_current), %rax\n\tUNTRAIN_RET\n"),
        "paranoid_entry reads a per-cpu variable hw_breakpoint.c does not protect, whatever the "
        "mitigations (as IBRS_ENTER's read of x86_spec_ctrl_current did from Retbleed's kernel IBRS in "
        "v5.19): a kernel data breakpoint on it nests a #DB on the live frame of a #DB from kernel mode, "
        "which stays on its IST stack",
        "ist-reentered", ("db-from-kernel",), ("pti,pcid",), vectors=("db",), depth=1),
    # ---- nmi-lost-or-corrupted
    Mutant(
        "nested-nmi-dropped-after-mc", "6.1", ENTRY_S,
        Edit("\tcmpl\t$1, -8(%rsp)\n\tje\tnested_nmi\n", "\tcmpl\t$1, -8(%rsp)\n\tje\tnested_nmi_out\n"),
        "asm_exc_nmi returns from a nested NMI (let in by the IRET of an #MC inside the NMI handler) "
        "without arranging the repeat_nmi loop: that NMI is never processed (the nested-NMI class of "
        "CVE-2015-3290)",
        "nmi-lost-or-corrupted", ("nmi-from-kernel",), ("none",), vectors=("mc", "nmi"), depth=2),
    Mutant(
        "nested-nmi-dropped", "6.12", ENTRY_S,
        Edit("\tcmpl\t$1, -8(%rsp)\n\tje\tnested_nmi\n", "\tcmpl\t$1, -8(%rsp)\n\tje\tnested_nmi_out\n"),
        "the same edit on 6.12, whose CONFIG_DEBUG_ENTRY IRET unmasks NMIs inside the NMI handler: an "
        "NMI nested after end_repeat_nmi is dropped instead of repeated (nested-NMI class)",
        "nmi-lost-or-corrupted", ("nmi-from-kernel",), ("none",), vectors=("nmi",), depth=1),
    # ---- emulation-fault
    Mutant(
        "error-entry-keeps-entry-stack", "6.12", ENTRY_S,
        Edit("\tALTERNATIVE \"call error_entry; movq %rax, %rsp\", \\\n",
             "\tALTERNATIVE \"call error_entry\", \\\n"),
        "idtentry_body ignores the stack error_entry returns: the C handler of a user-mode exception runs "
        "on the entry (trampoline) stack (the 5.19 'switch the stack after error_entry() returns' "
        "rework done wrong)",
        "emulation-fault", ("exception-from-user",), ("pti",)),
    Mutant(
        "nmi-executing-never-set", "6.12", ENTRY_S,
        Edit("\tmovq\t$1, 10*8(%rsp)\t\t/* Set \"NMI executing\". */\n", ""),
        "asm_exc_nmi never sets 'NMI executing': a nested NMI takes the first-NMI path on the same IST "
        "stack and overwrites the outer NMI's stack, which then returns to garbage (nested NMI / "
        "espfix class, CVE-2015-3290)",
        "emulation-fault", ("nmi-from-kernel",), ("none",), vectors=("nmi",), depth=1),
    Mutant(
        "syscall-passes-bad-pt-regs", "6.1", ENTRY_S,
        Edit("\tcall\tdo_syscall_64\t\t/* returns with IRQs disabled */\n",
             "\tmovl\t$0xdead0000, %edi\n\tcall\tdo_syscall_64\t\t/* returns with IRQs disabled */\n"),
        "entry_SYSCALL_64 hands do_syscall_64 a pt_regs pointer that is not the frame it built "
        "(C code would read the user's registers from, and write the return value to, wild memory)",
        "emulation-fault", ("syscall",), ("pti",)),
    # ---- no-return (optional)
    Mutant(
        "paranoid-exit-spins", "6.1", ENTRY_S,
        Edit("\tRESTORE_CR3\tscratch_reg=%rax save_reg=%r14\n\n\t/* Handle the three GSBASE cases */\n",
             "\tRESTORE_CR3\tscratch_reg=%rax save_reg=%r14\n\tjmp\t.\n\n\t/* Handle the three GSBASE cases */\n"),
        "paranoid_exit spins on itself after RESTORE_CR3: every #DB/#MC from kernel mode never returns "
        "(found once per path where the state repeats, not by running each injection to the budget)",
        "no-return", ("db-from-kernel",), ("pti",), vectors=("nmi", "mc", "db"), depth=1),
    Mutant(
        "nmi-exit-skips-std", "6.12", ENTRY_S,
        Edit("\tstd\n\tmovq\t$0, 5*8(%rsp)\t\t/* clear \"NMI executing\" */\n",
             "\tmovq\t$0, 5*8(%rsp)\t\t/* clear \"NMI executing\" */\n"),
        "the NMI exit clears 'NMI executing' without setting DF first: an NMI between the clear and the "
        "IRETQ is taken for a first NMI, rewrites the outer IRET frame to point at that IRETQ and the "
        "CPU loops there (the 'use DF to avoid userspace RSP confusing nested NMI' fix undone)",
        "no-return", ("nmi-from-kernel",), ("none",), vectors=("nmi",), depth=1),
)

# ---- what user space controls (hostile user values, faulting returns, interrupts) ------------
# Each is caught only on a path that starts from a user value the explorer derived itself
# (syscall[rsp=...], syscall[ret_rip=...], syscall[gsbase=...]) or through an IRQ where IF=1.
USER_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "nmi-trusts-user-rsp", "6.1", ENTRY_S,
        Edit("\ttestb\t$(X86_EFLAGS_DF >> 8), (3*8 + 1)(%rsp)\n\tjz\tfirst_nmi\t/* RSP was user controlled. */\n", ""),
        "asm_exc_nmi takes an interrupted RSP inside the NMI stack for nesting without its DF test: an NMI "
        "in the SYSCALL gap, where user space chose RSP, is dropped as a nested NMI (CVE-2015-3291, "
        "810bc075f78f)",
        "nmi-lost-or-corrupted", ("syscall",), ("none",), vectors=("nmi",), depth=1),
    Mutant(
        "sysret-skips-canonical-check", "6.1", ENTRY_S,
        Edit("\t/* If this changed %rcx, it was not canonical */\n\tcmpq\t%rcx, %r11\n"
             "\tjne\tswapgs_restore_regs_and_return_to_usermode\n", ""),
        "the SYSRET exit no longer refuses a non-canonical RCX: a system call whose return RIP user space set "
        "(rt_sigreturn, ptrace) SYSRETs to it and the #GP comes in ring 0 on the user's stack "
        "(CVE-2012-0217, CVE-2014-4699)",
        "emulation-fault", ("syscall",), ("none",), vectors=("nmi",), depth=0),
    Mutant(
        "sysret-ignores-syscall-verdict", "6.12", ENTRY_S,
        Edit("\tALTERNATIVE \"testb %al, %al; jz swapgs_restore_regs_and_return_to_usermode\", \\\n",
             "\tALTERNATIVE \"\", \\\n"),
        "entry_SYSCALL_64 drops do_syscall_64's verdict (testb %al,%al): every system call returns with "
        "SYSRET, a non-canonical return RIP included (the CVE-2012-0217 class on 6.12's C check)",
        "emulation-fault", ("syscall",), ("none",), vectors=("nmi",), depth=0),
    Mutant(
        "error-entry-misses-bad-iret", "6.12", ENTRY_S,
        Edit("\tleaq\tnative_irq_return_iret(%rip), %rcx\n\tcmpq\t%rcx, RIP+8(%rsp)\n\tje\t.Lerror_bad_iret\n",
             "\tleaq\tnative_irq_return_iret(%rip), %rcx\n"),
        "error_entry no longer recognises a fault on the IRET to user mode: the #GP of a bad IRET, which "
        "arrives in kernel mode with the user GSBASE, is handled as a kernel fault on it (the BadIRET "
        "class, CVE-2014-9322, 6f442be2fb22)",
        "percpu-with-user-gs", ("syscall",), ("none",), vectors=("nmi",), depth=0),
    Mutant(
        "paranoid-entry-trusts-gsbase-sign", "6.12", ENTRY_S,
        Edit("\tALTERNATIVE \"jmp .Lparanoid_entry_checkgs\", \"\", X86_FEATURE_FSGSBASE\n",
             "\tALTERNATIVE \"jmp .Lparanoid_entry_checkgs\", \"\", X86_FEATURE_FSGSBASE\n"
             "\trdgsbase\t%rbx\n\ttestq\t%rbx, %rbx\n\tjs\t.Lparanoid_gsbase_done\n"),
        "with FSGSBASE the paranoid entry still takes a negative GSBASE for the kernel's and keeps it: user "
        "space can load one with WRGSBASE, and an NMI/#MC/#DB in the SYSCALL gap then runs C code on it "
        "(the convention FSGSBASE broke: reverted in 5.3, 049331f277fe, re-done in 5.9)",
        "percpu-with-user-gs", ("syscall",), ("fsgsbase",), vectors=("nmi",), depth=1),
    Mutant(
        "sysret-exit-restores-if-early", "6.1", ENTRY_S,
        Edit("syscall_return_via_sysret:\n\tIBRS_EXIT\n\tPOP_REGS pop_rdi=0\n",
             "syscall_return_via_sysret:\n\tIBRS_EXIT\n\tPOP_REGS pop_rdi=0\n\tpushq\t%r11\n\tpopfq\n"),
        "the SYSRET exit restores the user's RFLAGS (IF=1) with POPF before it leaves the kernel: a "
        "device interrupt in the window after the user RSP and GSBASE are back is delivered on the "
        "user's stack, or runs C code with the user GSBASE",
        "irq-in-user-context", ("syscall",), ("pti",), vectors=("irq",), depth=1),
)

# Mutants of the 32-bit entry code (entry_64_compat.S), which runs linked with entry_64.o.
COMPAT_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "sysenter-keeps-nt", "6.1", COMPAT_S,
        Edit("\ttestl\t$X86_EFLAGS_NT|X86_EFLAGS_AC|X86_EFLAGS_TF, EFLAGS(%rsp)\n\tjnz\t.Lsysenter_fix_flags\n", ""),
        "entry_SYSENTER_compat no longer clears the flags SYSENTER keeps: with NT set by user space, C code "
        "runs with NT set (8c7aa698baca, 'x86_64, entry: Filter RFLAGS.NT on entry from userspace'); with "
        "TF set, the kernel single-steps on past the SYSENTER code",
        "emulation-fault", ("sysenter",), ("none",), vectors=("nmi",), depth=0),
    Mutant(
        "sysenter-mitigations-before-tf-fix", "6.12", COMPAT_S,
        Edit(r"(\tcld\n)([\s\S]*?\.Lsysenter_flags_fixed:\n)([\s\S]*?)\tIBRS_ENTER\n\tUNTRAIN_RET\n"
             r"\tCLEAR_BRANCH_HISTORY\n",
             "\\1\tIBRS_ENTER\n\tUNTRAIN_RET\n\tCLEAR_BRANCH_HISTORY\n\\2\\3", regex=True),
        "entry_SYSENTER_compat calls its mitigations (clear_bhb_loop) before it clears TF, as before "
        "ac8b270b61d4: with TF set by user space, the single-step #DB traps inside clear_bhb_loop, outside "
        "the SYSENTER code, and exc_debug_kernel WARNs",
        "emulation-fault", ("sysenter",), ("clear_bhb_loop",), vectors=("nmi",), depth=0),
    Mutant(
        "sysretl-keeps-kernel-gs", "6.12", COMPAT_S,
        Edit("\tswapgs\n\tCLEAR_CPU_BUFFERS\n\tsysretl\n", "\tCLEAR_CPU_BUFFERS\n\tsysretl\n"),
        "the compat SYSCALL/SYSENTER exit loses its SWAPGS before SYSRETL: a 32-bit task runs with the "
        "kernel's GSBASE (and the next entry's SWAPGS hands the kernel the user's)",
        "user-mode-kernel-gs", ("syscall32",), ("none",), vectors=("nmi",), depth=0),
)

# Mutants of FRED's entry (entry_64_fred.S), built with X86_FRED=y and checked with the fred feature.
FRED_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "fred-entry-swapgs", "6.12", FRED_S,
        Edit("\tcall\tfred_entry_from_user\n", "\tswapgs\n\tcall\tfred_entry_from_user\n"),
        "the FRED user entry keeps the IDT habit of a SWAPGS: FRED already swapped GS on delivery, and "
        "SWAPGS #UDs with FRED enabled",
        "emulation-fault", ("syscall",), ("fred",), vectors=("nmi",), depth=0, kconfig=("X86_FRED=y",)),
    Mutant(
        "fred-kernel-exit-eretu", "6.12", FRED_S,
        Edit("\tFRED_EXIT\n\tERETS\n", "\tFRED_EXIT\n\tERETU\n"),
        "the FRED kernel entry returns with ERETU: an event in kernel mode 'returns' to ring 3 with a "
        "ring-0 frame, which the CPU refuses (#GP in the kernel, no fixup)",
        "emulation-fault", ("nmi-from-kernel",), ("fred",), vectors=("nmi",), depth=0, kconfig=("X86_FRED=y",)),
)

# Speculation hygiene: each mutant deletes or moves one mitigation, and must be found under a feature
# set that turns that mitigation on (``features``) and not under one that leaves it off (``off``).
# The two SWAPGS-fence configurations of a CPU that speculates SWAPGS: without PTI both fences are
# LFENCEs; with PTI the user-side fence is left empty, the CR3 write after it serialising instead.
BOTH_FENCES = "fence_swapgs_kernel,fence_swapgs_user,bug_swapgs"
PTI_KERNEL_FENCE = "pti,fence_swapgs_kernel,bug_swapgs"

SPEC_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "error-entry-kernel-gs-unfenced", "6.12", ENTRY_S,
        Edit(".Lerror_entry_done_lfence:\n\tFENCE_SWAPGS_KERNEL_ENTRY\n", ".Lerror_entry_done_lfence:\n"),
        "error_entry's kernel-mode side loses FENCE_SWAPGS_KERNEL_ENTRY: an entry from user mode whose "
        "'testb $3, CS' is mispredicted skips the SWAPGS and reaches C code with the user GSBASE "
        "(CVE-2019-1125; 1367afaa2ee9 fixed a wrong fence on this very path)",
        "swapgs-unfenced", ("exception-from-user",), ("fence_swapgs_kernel",), vectors=("nmi",), depth=1,
        off=("none",)),
    Mutant(
        "paranoid-entry-kernel-gs-unfenced", "6.1", ENTRY_S,
        Edit("\tswapgs\n.Lparanoid_kernel_gsbase:\n\tFENCE_SWAPGS_KERNEL_ENTRY\n",
             "\tswapgs\n\tFENCE_SWAPGS_KERNEL_ENTRY\n.Lparanoid_kernel_gsbase:\n"),
        "paranoid_entry's kernel-GSBASE branch skips FENCE_SWAPGS_KERNEL_ENTRY, as after 96b2371413e8 moved "
        "the CR3 switch before the SWAPGS (fixed by c07e45553da1): an NMI in the SYSCALL gap, with the user "
        "GSBASE, whose 'js' is mispredicted runs its %gs: accesses with the user's GSBASE",
        "swapgs-unfenced", ("syscall",), ("fence_swapgs_kernel",), vectors=("nmi",), depth=2, off=("none",)),
    Mutant(
        "error-entry-user-gs-unfenced", "6.12", ENTRY_S,
        Edit("\tswapgs\n\tFENCE_SWAPGS_USER_ENTRY\n\t/* We have user CR3.  Change to kernel CR3. */\n",
             "\tswapgs\n\t/* We have user CR3.  Change to kernel CR3. */\n"),
        "error_entry's user-mode side loses FENCE_SWAPGS_USER_ENTRY: on a CPU that speculates SWAPGS and runs "
        "without PTI, an entry from kernel mode mispredicted as one from user mode swaps in the user GSBASE and "
        "reaches sync_regs with it (18ec54fdd6d1's second fence)",
        "swapgs-unfenced", ("exception-from-kernel",), (BOTH_FENCES,),
        vectors=("nmi",), depth=1, off=(PTI_KERNEL_FENCE,)),
    Mutant(
        "sysret-without-verw", "6.12", ENTRY_S,
        Edit("\tswapgs\n\tCLEAR_CPU_BUFFERS\n\tsysretq\n", "\tswapgs\n\tsysretq\n"),
        "the SYSRET exit loses CLEAR_CPU_BUFFERS: user mode runs with whatever the kernel left in the CPU "
        "buffers (MDS; 3c7501722e6b put the VERW right before SYSRET)",
        "verw-missing", ("syscall",), ("clear_cpu_buf",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "iret-to-user-without-verw", "6.1", ENTRY_S,
        Edit("\tpopq\t%rdi\n\tswapgs\n\tCLEAR_CPU_BUFFERS\n\tjmp\t.Lnative_iret\n",
             "\tpopq\t%rdi\n\tswapgs\n\tjmp\t.Lnative_iret\n"),
        "common_interrupt_return's IRET to user mode loses CLEAR_CPU_BUFFERS (the 6.1.y backport of "
        "3c7501722e6b): every interrupt and exception from user mode returns without VERW",
        "verw-missing", ("irq-from-user",), ("clear_cpu_buf",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "syscall-without-bhb-clearing", "6.12", ENTRY_S,
        Edit("\tUNTRAIN_RET\n\tCLEAR_BRANCH_HISTORY\n\n\tcall\tdo_syscall_64", "\tUNTRAIN_RET\n\n\tcall\tdo_syscall_64"),
        "entry_SYSCALL_64 loses CLEAR_BRANCH_HISTORY: do_syscall_64's indirect call through the system call "
        "table runs with the branch history user space left (BHI; 7390db8aea0d)",
        "ret-before-untrain", ("syscall",), ("clear_bhb_loop",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "error-entry-untrain-after-ret", "6.12", ENTRY_S,
        Edit(r"(ALTERNATIVE \"call error_entry; movq %rax, %rsp\", \\\n\t\t    \"call xen_error_entry\", "
             r"X86_FEATURE_XENPV\n)([\s\S]*?\tSWITCH_TO_KERNEL_CR3 scratch_reg=%rax\n\tIBRS_ENTER\n)"
             r"\tUNTRAIN_RET_FROM_CALL\n",
             "\\1\tUNTRAIN_RET\n\\2", regex=True),
        "error_entry's UNTRAIN_RET moves out to its caller, after the call returns: sync_regs and error_entry's "
        "own RET run before the return predictor is untrained (the class of 7c81c0c9210c, 'x86/entry: Avoid "
        "very early RET')",
        "ret-before-untrain", ("exception-from-user",), ("unret",), vectors=("nmi",), depth=0,
        off=("kernel_ibrs",)),
    Mutant(
        "error-entry-gs-change-user-fence", "6.12", ENTRY_S,
        Edit("\tswapgs\n\n\t/*\n\t * Issue an LFENCE to prevent GS speculation, regardless of whether it is a\n"
             "\t * kernel or user gsbase.\n\t */\n.Lerror_entry_done_lfence:\n\tFENCE_SWAPGS_KERNEL_ENTRY\n"
             "\tCALL_DEPTH_ACCOUNT\n",
             "\tswapgs\n\tFENCE_SWAPGS_USER_ENTRY\n\tjmp .Lerror_entry_done\n\n.Lerror_entry_done_lfence:\n"
             "\tFENCE_SWAPGS_KERNEL_ENTRY\n.Lerror_entry_done:\n\tCALL_DEPTH_ACCOUNT\n"),
        "error_entry's .Lgs_change fixup as it was before 1367afaa2ee9: its SWAPGS is followed by "
        "FENCE_SWAPGS_USER_ENTRY, which PTI kernels leave empty (the CR3 write it relied on had been removed "
        "by c75890700455); an exception from kernel mode whose 'jne .Lerror_entry_done_lfence' is mispredicted "
        "swaps in the user GSBASE and reaches C code unfenced",
        "swapgs-unfenced", ("exception-from-kernel",), (PTI_KERNEL_FENCE,), vectors=("nmi",),
        depth=1, off=(BOTH_FENCES,)),
    Mutant(
        "nmi-from-user-gs-unfenced", "6.12", ENTRY_S,
        Edit("\tswapgs\n\tFENCE_SWAPGS_USER_ENTRY\n\tSWITCH_TO_KERNEL_CR3 scratch_reg=%rdx\n\tmovq\t%rsp, %rdx\n",
             "\tswapgs\n\tSWITCH_TO_KERNEL_CR3 scratch_reg=%rdx\n\tmovq\t%rsp, %rdx\n"),
        "asm_exc_nmi's user-mode side loses FENCE_SWAPGS_USER_ENTRY: without PTI, on a CPU that speculates "
        "SWAPGS, an NMI from kernel mode mispredicted as one from user mode swaps in the user GSBASE before "
        "its per-cpu stack load (18ec54fdd6d1 fenced this SWAPGS too)",
        "swapgs-unfenced", ("nmi-from-kernel",), (BOTH_FENCES,),
        vectors=("nmi",), depth=1, off=(PTI_KERNEL_FENCE,)),
    Mutant(
        "sysretl-without-verw", "6.12", COMPAT_S,
        Edit("\tswapgs\n\tCLEAR_CPU_BUFFERS\n\tsysretl\n", "\tswapgs\n\tsysretl\n"),
        "entry_SYSCALL_compat's SYSRETL exit loses CLEAR_CPU_BUFFERS: a 32-bit task's system calls return "
        "without VERW (3c7501722e6b put it before every return to user mode, the compat ones included)",
        "verw-missing", ("syscall32",), ("clear_cpu_buf",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "sysenter-without-bhb-clearing", "6.12", COMPAT_S,
        Edit("\tCLEAR_BRANCH_HISTORY\n\n\tmovq\t%rsp, %rdi\n\tcall\tdo_SYSENTER_32",
             "\n\tmovq\t%rsp, %rdi\n\tcall\tdo_SYSENTER_32"),
        "entry_SYSENTER_compat loses CLEAR_BRANCH_HISTORY: the 32-bit system call dispatch runs with the "
        "branch history user space left (BHI; 7390db8aea0d cleared it at every system call entry)",
        "ret-before-untrain", ("sysenter",), ("clear_bhb_loop",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "int80-without-bhb-clearing", "6.12", COMPAT_S,
        Edit("\tUNWIND_HINT_FUNC\n\tCLEAR_BRANCH_HISTORY\n\tjmp do_int80_emulation",
             "\tUNWIND_HINT_FUNC\n\tjmp do_int80_emulation"),
        "int80_emulation loses CLEAR_BRANCH_HISTORY, the one thing that asm stub is there for (its comment: "
        "'that scrubbing needs to take place in assembly code prior to entering any C routines')",
        "ret-before-untrain", ("int80",), ("clear_bhb_loop",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "syscall-without-untrain", "6.12", ENTRY_S,
        Edit("\tIBRS_ENTER\n\tUNTRAIN_RET\n\tCLEAR_BRANCH_HISTORY\n\n\tcall\tdo_syscall_64",
             "\tIBRS_ENTER\n\tCLEAR_BRANCH_HISTORY\n\n\tcall\tdo_syscall_64"),
        "entry_SYSCALL_64 loses UNTRAIN_RET: do_syscall_64 returns through the predictions user space "
        "trained (retbleed; a149180fbcf3 added the untraining to every entry)",
        "ret-before-untrain", ("syscall",), ("unret",), vectors=("nmi",), depth=0, off=("none",)),
    Mutant(
        "paranoid-entry-without-untrain", "6.12", ENTRY_S,
        Edit("\tIBRS_ENTER save_reg=%r15\n\tUNTRAIN_RET_FROM_CALL\n", "\tIBRS_ENTER save_reg=%r15\n"),
        "paranoid_entry loses UNTRAIN_RET_FROM_CALL: an NMI in the SYSCALL gap, before entry_SYSCALL_64's own "
        "UNTRAIN_RET, runs paranoid_entry's RET and exc_nmi untrained (a149180fbcf3 untrains in "
        "paranoid_entry for entries from kernel mode that come this early)",
        "ret-before-untrain", ("syscall",), ("unret",), vectors=("nmi",), depth=1, off=("none",)),
)


def _booted(cpu: str, cmdline: str = "") -> str:
    """The feature set of a CPU preset booted with ``cmdline`` (image/cpus.py derives it)."""
    return str(configuration(cpu, cmdline).features)


# Visible only under boot options: a preset at its default boot does not run the broken code.
BOOT_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "paranoid-entry-rdmsr-gs-unfenced", "6.12", ENTRY_S,
        Edit(".Lparanoid_kernel_gsbase:\n\tFENCE_SWAPGS_KERNEL_ENTRY\n", ".Lparanoid_kernel_gsbase:\n"),
        "paranoid_entry's RDMSR path (CPUs before Ivy Bridge, or nofsgsbase) loses FENCE_SWAPGS_KERNEL_ENTRY: "
        "a mispredicted 'js .Lparanoid_kernel_gsbase' runs the SWAPGS from kernel mode and reaches the C "
        "with the user GSBASE (CVE-2019-1125, 18ec54fdd6d1); with FSGSBASE the code never gets there, and "
        "with kernel IBRS (Skylake booted nofsgsbase) IBRS_ENTER's LFENCE stops the mispredicted path (from "
        "kernel mode SPEC_CTRL already holds IBRS)",
        "swapgs-unfenced", ("mc-from-kernel",), (_booted("sandybridge"),), vectors=("nmi",), depth=1,
        off=(_booted("skylake"),)),
    Mutant(
        "syscall-untrain-after-bhb-clearing", "6.12", ENTRY_S,
        Edit("\tIBRS_ENTER\n\tUNTRAIN_RET\n\tCLEAR_BRANCH_HISTORY\n",
             "\tIBRS_ENTER\n\tCLEAR_BRANCH_HISTORY\n\tUNTRAIN_RET\n"),
        "entry_SYSCALL_64 untrains after CLEAR_BRANCH_HISTORY: clear_bhb_loop's RET runs on the return "
        "predictions user space trained; only IBPB-on-entry CPUs untrain here (retbleed=ibpb)",
        "ret-before-untrain", ("syscall",), (_booted("cascadelake", "retbleed=ibpb"),), vectors=("nmi",), depth=0,
        off=(_booted("cascadelake"),)),
)
SPEC_MUTANTS = SPEC_MUTANTS + BOOT_MUTANTS

MUTANTS = MUTANTS + USER_MUTANTS + COMPAT_MUTANTS + FRED_MUTANTS + SPEC_MUTANTS

# Mutants of the noinstr C the entry code calls: caught only when that C runs (the default), not
# by the contract stubs that stood in for it (--c-stubs).
C_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "c-sysret-to-noncanonical", "6.12", COMMON_C,
        Edit("\tif (unlikely(regs->ip >= TASK_SIZE_MAX))\n\t\treturn false;\n", ""),
        "do_syscall_64 no longer refuses SYSRET to a return RIP at or above TASK_SIZE_MAX: a system call whose "
        "return RIP user space set (rt_sigreturn, ptrace) SYSRETs to a non-canonical RIP and the #GP comes in "
        "ring 0 on the user's stack (CVE-2012-0217; in 6.12 the check is this C)",
        "emulation-fault", ("syscall[ret_rip=0x800000000000]",), ("none",), vectors=("nmi",), depth=0),
    Mutant(
        "c-debug-keeps-dr7", "6.12", TRAPS_C,
        Edit("\tunsigned long dr7 = local_db_save();\n\tirqentry_state_t irq_state = irqentry_nmi_enter(regs);\n",
             "\tunsigned long dr7 = 0;\n\tirqentry_state_t irq_state = irqentry_nmi_enter(regs);\n"),
        "exc_debug_kernel no longer clears DR7 first (local_db_save): a data breakpoint on what the #DB handler "
        "touches traps again on the #DB stack while the outer #DB's frame is live (fd501d4f0399 removed the "
        "#DB stack shifting on the premise that DR7 is cleared first)",
        "ist-reentered", ("db-from-kernel",), ("none",), vectors=("db",), depth=1),
    Mutant(
        "c-nmi-leaves-cr2", "6.12", NMI_C,
        Edit("\tsev_es_ist_exit();\n\n\tif (unlikely(this_cpu_read(nmi_cr2) != read_cr2()))\n"
             "\t\twrite_cr2(this_cpu_read(nmi_cr2));\n", "\tsev_es_ist_exit();\n\n"),
        "exc_nmi no longer writes back the CR2 it saved: an NMI that hits a #PF before exc_page_fault's "
        "read_cr2(), and whose handler takes a page fault itself (perf's user call chains), leaves its own "
        "fault's address for the #PF handler to read (7fbb98c5cb07's nmi_cr2)",
        "cr2-clobbered", ("exception-from-kernel",), ("none",), vectors=("nmi",), depth=1, effects=("page-fault",)),
    Mutant(
        "c-bad-iret-frame-not-copied", "6.12", TRAPS_C,
        Edit("\t__memcpy(&tmp.ip, (void *)bad_regs->sp, 5*8);\n", ""),
        "fixup_bad_iret no longer copies the frame the failed IRET was returning with: the #GP of a bad IRET "
        "to user mode is handled with whatever the stack held for ip..ss (the bad-IRET rework, b645af2d5905, "
        "CVE-2014-9090)",
        "emulation-fault", ("syscall[ret_rip=0x800000000000]",), ("none",), vectors=("nmi",), depth=0),
)
MUTANTS_BY_NAME = {m.name: m for m in MUTANTS}


def explained_on_stock(f) -> bool:
    """A finding the pristine kernels have and entrycheck explains (test_speculation.explained):
    the espfix64 exit's conditional SWAPGS, unfenced before its per-cpu load without PTI."""
    return f.invariant == "swapgs-unfenced" and f.site.startswith("native_irq_return_ldt")


def mutant_tree_root() -> Path:
    """Where the edited copies live: next to the cached sources (same file system, so hard links work)."""
    return Cache.open().root / "test-data" / "mutant-trees"


def prepare_tree(mutant: Mutant, source_tree: Path, copy: Callable[[Path, Path], Path]) -> Path:
    """The edited copy of ``source_tree`` for ``mutant`` (made once, then reused while it is intact)."""
    text = mutant.mutated_text(source_tree)
    root = mutant_tree_root()
    home = root / f"{mutant.name}-{mutant.edit_hash()}"
    tree = home / source_tree.name
    edited = tree / mutant.file
    if edited.is_file() and edited.read_text(encoding="utf-8", errors="surrogateescape") == text:
        return tree
    for stale in root.glob(f"{mutant.name}-*"):
        if re.fullmatch(r"[0-9a-f]{12}", stale.name[len(mutant.name) + 1:]):   # an older edit of this mutant
            remove_tree(stale)
    work = root / f".{mutant.name}.{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    copy(source_tree, work / source_tree.name)
    target = work / source_tree.name / mutant.file
    # Never write through a hard link into the pristine tree: write a new file and rename it over.
    fresh = target.with_name(target.name + ".mutant")
    fresh.write_text(text, encoding="utf-8", errors="surrogateescape")
    shutil.copymode(source_tree / mutant.file, fresh)
    os.replace(fresh, target)
    try:
        os.rename(work, home)
    except OSError:
        remove_tree(work)            # published meanwhile by another run
    return tree


def build_mutant(mutant: Mutant, pristine: KernelBuild, copy: Callable[[Path, Path], Path]) -> KernelBuild:
    """Build ``mutant`` from the source tree of ``pristine`` (cached in the entrycheck cache)."""
    if pristine.source_tree is None:
        raise MutantDoesNotApply(f"mutant {mutant.name}: {pristine.label} has no source tree")
    tree = prepare_tree(mutant, pristine.source_tree, copy)
    # The entry-code mutants are checked with the contract stubs: their builds leave the C out (faster).
    return build_tree_object(tree, key_extra=mutant.build_key(), request=parse_request(None, mutant.kconfig),
                             kernel_c=mutant in C_MUTANTS)


def object_ref(build: KernelBuild) -> ObjectRef:
    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)
