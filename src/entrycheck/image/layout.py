"""Where everything lives in the model's virtual address space.

Kernel-style, canonical-high addresses throughout: the entry code tests address
signs (a negative GSBASE means "kernel"), compares RIP against its own labels and
RSP against the IST stacks, so nothing may live at a low address except user space.

    0xffffffff81000000  the object's sections (text first)        IMAGE_BASE
    0xffffffff81800000  kernel code that exceptions interrupt     KERNEL_TEXT_BASE
    0xffffffff82000000  one stub per undefined function (C code)  STUB_BASE
    0xffffffff83000000  model memory for undefined data symbols   DATA_BASE
    0xffffffff83800000  data the kernel keeps in .entry.text      ENTRY_DATA_BASE
    0xffff888000100000  the per-cpu area of the one modelled CPU  PERCPU_BASE
    0xffffc90000010000  the current task's stack                  TASK_STACK_BASE
    0xffffc90000020000  this CPU's hard-IRQ stack (noinstr C)     IRQ_STACK_BASE
    0xffff888000400000  the current task and its mm (noinstr C)   CURRENT_TASK
    0xfffffe0000001000  cpu_entry_area: GDT, entry stack, IST     CEA_BASE
    0x0000000000400000  user space (never executed)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAGE = 0x1000

IMAGE_BASE = 0xFFFFFFFF81000000
KERNEL_TEXT_BASE = 0xFFFFFFFF81800000
STUB_BASE = 0xFFFFFFFF82000000
STUB_STRIDE = 0x10
DATA_BASE = 0xFFFFFFFF83000000
ENTRY_DATA_BASE = 0xFFFFFFFF83800000
PERCPU_BASE = 0xFFFF888000100000
TASK_STACK_BASE = 0xFFFFC90000010000
TASK_STACK_SIZE = 0x4000          # THREAD_SIZE (16 KiB)
CURRENT_TASK = 0xFFFF888000400000   # the current task's task_struct (noinstr C reads it through current)
CURRENT_TASK_SIZE = 0x4000
CURRENT_MM = 0xFFFF888000404000     # its mm_struct (current->mm)
CURRENT_MM_SIZE = 0x4000
IRQ_STACK_BASE = 0xFFFFC90000020000  # this CPU's hard-IRQ stack (irq_init_percpu_irqstack), guard pages around
IRQ_STACK_SIZE = 0x4000              # IRQ_STACK_SIZE: 16 KiB
CEA_BASE = 0xFFFFFE0000001000
USER_BASE = 0x0000000000400000

# A user GSBASE no %gs: access can reach: low, canonical, and never mapped.
USER_GSBASE_POISON = 0x00007F5EC0DE0000
# With FSGSBASE user space may load any canonical GSBASE: a negative, kernel-looking one
# (in the direct map's range, never mapped by the model).
USER_GSBASE_NEGATIVE = 0xFFFF_8880_C0DE_0000
# The values a %gs: access is recognised by as one through the user's GSBASE (not 0: a kernel
# bug that zeroes GSBASE is not user space's doing, and reads as an unmapped access).
USER_GSBASE_VALUES = frozenset({USER_GSBASE_POISON, USER_GSBASE_NEGATIVE})
# The user context a signal handler starts in (a C handler that signals rewrites pt_regs to it).
SIGNAL_HANDLER_RIP = USER_BASE + 0x1000
SIGNAL_STACK = 0x00007FFD_C0DE_0000
# TASK_SIZE_MAX with 4-level paging: the last user page is never mapped (a SYSCALL at its end
# would leave a non-canonical RCX).
TASK_SIZE_MAX = (1 << 47) - PAGE
# A 32-bit task's vDSO landing pad (int80_landing_pad of __kernel_vsyscall): do_fast_syscall_32
# returns every SYSENTER and compat SYSCALL there.
VDSO32_BASE = 0xF7FC_1000                  # current->mm->context.vdso of a 32-bit task
VDSO32_LANDING_PAD = 0xF7FC_1549

# ---- x86-64 Linux facts the model lays memory out by (the one table of them) ------------
# Segment selectors (arch/x86/include/asm/segment.h).
KERNEL_CS = 0x10
KERNEL_DS = 0x18
USER_CS = 0x33
USER_DS = 0x2B
USER32_CS = 0x23                           # __USER32_CS: 32-bit user code, also a valid IRET target
CPUNODE_SELECTOR = 15 * 8 + 3              # __CPUNODE_SEG: LSL of it yields cpu | node << 12

# Offsets the entry code and the model share.  The build's asm-offsets.h overrides these
# defaults where it has them (same values in 6.1 and 6.12); TSS_ist is offsetof(struct
# x86_hw_tss, ist), which asm-offsets does not export.
ASM_OFFSET_DEFAULTS = {
    "TSS_sp0": 4, "TSS_sp1": 12, "TSS_sp2": 20, "TSS_ist": 36, "TLB_STATE_user_pcid_flush_mask": 22,
    "TLB_STATE_loaded_mm_asid": 16, "X86_top_of_stack": 24, "PTREGS_SIZE": 168, "FIXED_stack_canary": 40,
    "X86_current_task": 0,
}

# Stacks, as Linux sizes them: THREAD_SIZE 16 KiB; each IST stack EXCEPTION_STKSZ = 8 KiB
# (the NMI entry's `subq $EXCEPTION_STKSZ` range test relies on it); the entry (trampoline)
# stack one page (struct entry_stack).  Guard pages between them.
IST_STACK_SIZE = 0x2000
ENTRY_STACK_SIZE = PAGE


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


@dataclass(frozen=True)
class Region:
    """A range of virtual memory with its contents and permissions."""

    name: str
    start: int
    size: int
    perm: Perm
    user_mapped: bool         # mapped by the PTI user page tables
    data: bytes = b""         # initial contents (zero-filled to size)

    @property
    def end(self) -> int:
        return self.start + self.size

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


def page_up(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


def page_down(value: int) -> int:
    return value & ~(PAGE - 1)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def canonical(addr: int) -> bool:
    """True when ``addr`` is a canonical 48-bit address."""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1
