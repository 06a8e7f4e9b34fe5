"""Facts of Linux x86-64 the model honours, one home each (the kernel sources they come from are
named beside them).  The machine takes what it needs of them through its ``MachineConfig``
(built by kernelabi/world.py); nothing below kernelabi/ knows Linux's choices.

Memory layout, segment selectors and asm-offsets defaults live in image/layout.py (the loader
needs them too); the invariants' own facts live with the invariants.
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Mapping

from entrycheck.machine import model
from entrycheck.machine.model import SpecConfig, Vector

# ---- the IDT's IST use and the cpu_entry_area -------------------------------------------------
# The IST slot (1-based) each IDT gate names: IST_INDEX_* + 1 (arch/x86/include/asm/page_64_types.h).
# struct exception_stacks (cpu_entry_area.h) lays the stacks out in the same order (DF, NMI, DB,
# MCE, VC, then VC2, which no gate names), each EXCEPTION_STKSZ behind a guard page.
IST_INDEX: Mapping[Vector, int] = MappingProxyType({Vector.DF: 1, Vector.NMI: 2, Vector.DB: 3, Vector.MC: 4,
                                                    Vector.VC: 5})
IST_ORDER: tuple[Vector, ...] = tuple(sorted(IST_INDEX, key=IST_INDEX.__getitem__))


def ist_index(vector: Vector) -> int:
    """The IST slot ``vector``'s gate names, 0 for none (delivered on the current or sp0 stack)."""
    return IST_INDEX.get(vector, 0)


def tss_ist_slot(tss: int, offsets: Mapping[str, int], vector: Vector) -> int:
    """Where the TSS at ``tss`` keeps the stack top of ``vector``'s IST slot (x86_hw_tss.ist[])."""
    return tss + offsets["TSS_ist"] + 8 * (IST_INDEX[vector] - 1)


# ---- FRED (arch/x86/kernel/fred.c, cpu_init_fred_exceptions) --------------------------------------
# Each exception's stack level: #DB 1, NMI and #MC 2, #DF 3; everything else (external interrupts
# included) level 0.  RSP1..3 point at the #DB, NMI and #DF stacks.
FRED_LEVELS: tuple[tuple[int, int], ...] = ((int(Vector.DB), 1), (int(Vector.NMI), 2), (int(Vector.MC), 2),
                                            (int(Vector.DF), 3))
FRED_STACKS: tuple[Vector, ...] = (Vector.DB, Vector.NMI, Vector.DF)     # the stacks of levels 1..3

# ---- SYSCALL ----------------------------------------------------------------------------------
# What Linux programs into MSR_SYSCALL_MASK (syscall_init(), arch/x86/kernel/cpu/common.c).
SYSCALL_MASK = (model.RFLAGS_CF | model.RFLAGS_PF | model.RFLAGS_AF | model.RFLAGS_ZF | model.RFLAGS_SF
                | model.RFLAGS_TF | model.RFLAGS_IF | model.RFLAGS_DF | model.RFLAGS_OF | model.RFLAGS_IOPL
                | model.RFLAGS_NT | model.RFLAGS_RF | model.RFLAGS_AC | model.RFLAGS_ID)


# ---- the asm helpers the entry code calls ---------------------------------------------------------
class Helper(enum.Enum):
    """What an asm helper outside the entry objects does (arch/x86/lib/retpoline.S, entry_64.S)."""

    RETURN_THUNK = "return thunk"        # a RET, through the retbleed/SRSO return thunk
    UNTRAIN = "untraining"               # UNTRAIN_RET's call: the return predictor is untrained
    IBPB = "IBPB"                        # entry_ibpb: an IBPB (a write of PRED_CMD), which untrains too
    BHB_CLEAR = "branch history clearing"    # clear_bhb_loop (CLEAR_BRANCH_HISTORY)
    SAFERET = "saferet"                  # FRED's/IDT's return helpers that only return


ASM_HELPERS: Mapping[str, Helper] = MappingProxyType({
    "__x86_return_thunk": Helper.RETURN_THUNK,
    "srso_safe_ret": Helper.RETURN_THUNK,
    "srso_alias_safe_ret": Helper.RETURN_THUNK,
    "srso_return_thunk": Helper.RETURN_THUNK,
    "srso_alias_return_thunk": Helper.RETURN_THUNK,
    "retbleed_return_thunk": Helper.RETURN_THUNK,
    "zen_return_thunk": Helper.RETURN_THUNK,
    "entry_untrain_ret": Helper.UNTRAIN,
    "srso_untrain_ret": Helper.UNTRAIN,
    "srso_alias_untrain_ret": Helper.UNTRAIN,
    "retbleed_untrain_ret": Helper.UNTRAIN,
    "zen_untrain_ret": Helper.UNTRAIN,
    "entry_ibpb": Helper.IBPB,
    "clear_bhb_loop": Helper.BHB_CLEAR,
    "__handle_intr_saferet": Helper.SAFERET,
    "__handle_intr_saferet_alias": Helper.SAFERET,
})
UNTRAIN_FUNCTIONS = frozenset(n for n, h in ASM_HELPERS.items() if h in (Helper.UNTRAIN, Helper.IBPB))
RETURN_THUNKS = frozenset(n for n, h in ASM_HELPERS.items() if h is Helper.RETURN_THUNK)
IBPB_HELPERS = frozenset(n for n, h in ASM_HELPERS.items() if h is Helper.IBPB)
# Helpers that only return: a mispredicted path runs through them (entry_ibpb's WRMSR serialises).
RETURNING_HELPERS = frozenset(n for n, h in ASM_HELPERS.items() if h is not Helper.IBPB)


# TOP_OF_KERNEL_STACK_PADDING (arch/x86/include/asm/thread_info.h): on x86-64 two words with
# CONFIG_X86_FRED (a FRED frame holds two more, the event data and a reserved word), else none.
# The top of stack the IDT entries and sync_regs put pt_regs under (pcpu_hot.top_of_stack, the
# TSS's sp1: task_top_of_stack()) is that far below the stack's end; FRED's RSP0 is the end itself
# (update_task_stack()).  CONFIG_X86_FRED is what builds entry_64_fred.o, whose entry point the
# object then has.
FRED_STACK_PADDING = 16
FRED_ENTRY = "asm_fred_entrypoint_user"       # the FRED entry point (entry_64_fred.S)


def fred_built(symbols) -> bool:
    """Whether the linked entry objects defining ``symbols`` hold FRED's entry (CONFIG_X86_FRED)."""
    return FRED_ENTRY in symbols


def stack_padding(symbols) -> int:
    """TOP_OF_KERNEL_STACK_PADDING of the kernel whose linked entry objects define ``symbols``."""
    return FRED_STACK_PADDING if fred_built(symbols) else 0


# ---- speculation mitigations, by the X86_FEATURE_* names the alternatives use ------------------
def spec_config(features) -> SpecConfig | None:
    """The checks a feature set asks for: each one when the mitigation whose ordering it checks
    is on.  None: no speculation check."""
    f = set(features)
    cfg = SpecConfig(
        swapgs=bool(f & {"fence_swapgs_kernel", "fence_swapgs_user"}),
        swapgs_speculates=bool(f & {"bug_swapgs", "fence_swapgs_user"}),
        verw="clear_cpu_buf" in f,
        untrain=bool(f & {"unret", "entry_ibpb"}),
        ibrs="kernel_ibrs" in f and bool(f & {"unret", "entry_ibpb", "clear_cpu_buf", "clear_bhb_loop",
                                               "fence_swapgs_kernel", "fence_swapgs_user"}),
        bhb="clear_bhb_loop" in f)
    return cfg if (cfg.swapgs or cfg.tracks or cfg.branches) else None


def speculation_checked(feature_sets) -> bool:
    """Whether any of the feature sets switches a speculation check on."""
    return any(spec_config(fs.names) is not None for fs in feature_sets)


__all__ = ["IST_INDEX", "IST_ORDER", "ist_index", "tss_ist_slot", "FRED_LEVELS", "FRED_STACKS", "SYSCALL_MASK",
           "Helper", "ASM_HELPERS", "UNTRAIN_FUNCTIONS", "RETURN_THUNKS", "IBPB_HELPERS", "RETURNING_HELPERS",
           "spec_config", "speculation_checked", "FRED_STACK_PADDING", "FRED_ENTRY", "fred_built",
           "stack_padding"]
