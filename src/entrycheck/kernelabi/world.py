"""The rest of the kernel as the entry code sees it: memory, per-cpu data, IDT, a booted CPU.

``build_world(image)`` lays out every region the entry code can touch besides the
object's own sections — stubs for C functions, model memory for data symbols, the
per-cpu area initialised as on a booted CPU, the cpu_entry_area (GDT, entry stack,
IST stacks between guard pages), the task stack — and says which of them the PTI
user page tables map.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from entrycheck.errors import InputError
from entrycheck.image import layout
from entrycheck.image.image import Image
from entrycheck.image.layout import KERNEL_DS, PAGE, USER_DS, Perm, Region
from entrycheck.kernelabi import booted, linux
from entrycheck.kernelabi.linux import IST_ORDER
from entrycheck.machine.api import MachineConfig
from entrycheck.machine.fred import FredConfig
from entrycheck.machine.model import (MCG_STATUS_MCIP, PTI_USER_PCID, PTI_USER_PGTABLE, SPEC_CTRL_IBRS, CpuState,
                                      Vector)

# Linux's IDT entries for the vectors entrycheck delivers.
IDT_SYMBOLS: Mapping[Vector, str] = MappingProxyType({
    Vector.DB: "asm_exc_debug",
    Vector.NMI: "asm_exc_nmi",
    Vector.DF: "asm_exc_double_fault",
    Vector.GP: "asm_exc_general_protection",
    Vector.PF: "asm_exc_page_fault",
    Vector.MC: "asm_exc_machine_check",
    Vector.VC: "asm_exc_vmm_communication",
    Vector.IRQ: "irq_entries_start",        # the stub for vector 0x20: pushes it, jumps to common code
    Vector.INT80: "asm_int80_emulation",    # IA32_SYSCALL_VECTOR, a DPL 3 gate (IA32_EMULATION)
})

# cpu_entry_area, per CPU: GDT, entry stack, then IST stacks (linux.IST_ORDER) each behind a guard page.
EXCEPTION_STKSZ = layout.IST_STACK_SIZE
PREEMPT_ENABLED = 0x8000_0000      # x86's preempt count with PREEMPT_NEED_RESCHED clear (inverted): none pending
CPUNODE_SELECTOR = layout.CPUNODE_SELECTOR
ASM_OFFSET_DEFAULTS: Mapping[str, int] = MappingProxyType(dict(layout.ASM_OFFSET_DEFAULTS))
# DR7 with a kernel data breakpoint installed (perf's, CAP_SYS_ADMIN): breakpoint 0, global enable,
# read/write, 8 bytes, GE (arch/x86/kernel/hw_breakpoint.c __encode_dr7 | DR_GLOBAL_SLOWDOWN).
DR7_ARMED = 0x400 | 0x200 | (1 << 1) | (0b1011 << 16)


@dataclass(frozen=True)
class WorldParams:
    cpu: int = 3                   # not 0, so that a wrong per-cpu index is visible
    node: int = 1
    asid: int = 1                  # current ASID: kernel PCID 2, user PCID 0x802
    other_asid: int = 4            # what "switch-kernel-asid" switches to
    kernel_pgd: int = 0x0000_0000_0A0C_0000   # physical address of the mm's 8 KiB PGD
    other_pgd: int = 0x0000_0000_0B1E_0000
    stack_canary: int = 0x5EED_CA11_AB1E_0000


@dataclass(frozen=True)
class World:
    image: Image
    config: MachineConfig
    params: WorldParams
    pti: bool
    pcid: bool
    fsgsbase: bool
    kernel_ibrs: bool
    percpu_base: int
    percpu: Mapping[str, int]          # per-cpu symbol -> offset
    offsets: Mapping[str, int]         # asm-offsets in use
    task_stack_top: int
    entry_stack_top: int
    ist_tops: Mapping[Vector, int]
    syscall_returns_bool: bool         # 6.12's do_syscall_64 says whether SYSRET may be used
    vc2_top: int = 0                   # the VC2 stack: vc_switch_off_ist's fall-back (no IDT slot)
    irq_stack_top: int = 0             # the hard-IRQ stack (with the noinstr C: common_interrupt runs on it)
    constants: Mapping[str, int] = field(default_factory=dict)   # the tree's constants (TIF_* bits), with the C
    task_flags: int = 0                # where the current task's thread_info.flags is, with the C

    @property
    def syscall_gaps(self) -> tuple[tuple[int, int], ...]:
        """ip_within_syscall_gap()'s ranges: where RSP is still the user's (64-bit and compat)."""
        sym = self.image.loaded.symbols
        pairs = (("entry_SYSCALL_64", "entry_SYSCALL_64_safe_stack"), ("entry_SYSRETQ_unsafe_stack", "entry_SYSRETQ_end"),
                 ("entry_SYSCALL_compat", "entry_SYSCALL_compat_safe_stack"),
                 ("entry_SYSRETL_compat_unsafe_stack", "entry_SYSRETL_compat_end"))
        return tuple((sym[a], sym[b]) for a, b in pairs if a in sym and b in sym)

    # ---- CR3 values ------------------------------------------------------------------
    @property
    def sysenter_range(self) -> tuple[int, int]:
        """[entry_SYSENTER_compat, __end_entry_SYSENTER_compat): where exc_debug expects single-steps."""
        sym = self.image.loaded.symbols
        if "entry_SYSENTER_compat" not in sym or "__end_entry_SYSENTER_compat" not in sym:
            return (0, 0)
        return sym["entry_SYSENTER_compat"], sym["__end_entry_SYSENTER_compat"]

    def kernel_cr3(self, asid: int | None = None, pgd: int | None = None) -> int:
        asid = self.params.asid if asid is None else asid
        pcid = asid + 1 if self.pcid else 0
        return (self.params.kernel_pgd if pgd is None else pgd) | pcid

    def user_cr3(self) -> int:
        if not self.pti:
            return self.kernel_cr3()
        cr3 = self.kernel_cr3() | PTI_USER_PGTABLE
        return cr3 | PTI_USER_PCID if self.pcid else cr3

    def kernel_spec_ctrl(self) -> int:
        return SPEC_CTRL_IBRS if self.kernel_ibrs else 0

    def user_spec_ctrl(self) -> int:
        return 0

    def percpu_addr(self, name: str, offset: int = 0) -> int:
        if name not in self.percpu:
            raise KeyError(name)
        return self.percpu_base + self.percpu[name] + offset

    def tlbstate_flush_mask(self) -> int | None:
        if "cpu_tlbstate" not in self.percpu:
            return None
        return self.percpu_addr("cpu_tlbstate", self.offsets["TLB_STATE_user_pcid_flush_mask"])

    def top_of_stack_slot(self) -> int:
        """Where this kernel keeps the current task's top of stack (6.12: pcpu_hot, 6.1: its own var)."""
        if "pcpu_hot" in self.percpu:
            return self.percpu_addr("pcpu_hot", self.offsets["X86_top_of_stack"])
        return self.percpu_addr("cpu_current_top_of_stack")

    def user_cpu(self) -> CpuState:
        """CPU state while user space runs."""
        return CpuState(cr3=self.user_cr3(), pcide=self.pcid, fsgsbase=self.fsgsbase, cpl=3, ss=USER_DS,
                        gs_base=self.config.user_gs_poison, kernel_gs_base=self.percpu_base,
                        spec_ctrl=self.user_spec_ctrl(), mcg_status=0, nmi_blocked=False, nmi_pending=False,
                        stale=frozenset(), dr7=DR7_ARMED if self.config.noinstr_c else model_dr7_fixed())

    def kernel_cpu(self) -> CpuState:
        """CPU state while ordinary kernel code runs (kernel CR3, GS and SPEC_CTRL)."""
        return replace(self.user_cpu(), cr3=self.kernel_cr3(), cpl=0, ss=KERNEL_DS, gs_base=self.percpu_base,
                       kernel_gs_base=self.config.user_gs_poison, spec_ctrl=self.kernel_spec_ctrl())

    def idt(self, vector: Vector) -> int:
        return self.config.idt[vector]


def model_dr7_fixed() -> int:
    return CpuState.__dataclass_fields__["dr7"].default


def _page_region(name: str, start: int, size: int, perm: Perm, user: bool, data: bytes = b"") -> Region:
    return Region(name, start, layout.page_up(size), perm, user, data)


def build_world(image: Image, params: WorldParams = WorldParams()) -> World:
    loaded = image.loaded
    res = loaded.resolution
    offsets = dict(ASM_OFFSET_DEFAULTS)
    offsets.update({k: v for k, v in loaded.offsets.items() if k in ASM_OFFSET_DEFAULTS})
    feats = image.features
    pti, pcid, fsgsbase, ibrs = ("pti" in feats, "pcid" in feats, "fsgsbase" in feats, "kernel_ibrs" in feats)

    regions: list[Region] = list(image.regions())

    # Stubs: one `ret` per undefined function; the machine hooks each address.
    stubs = dict(sorted(((addr, name) for name, addr in res.functions.items())))
    if stubs:
        size = max(stubs) + layout.STUB_STRIDE - layout.STUB_BASE
        code = bytearray(b"\xcc" * size)
        for addr in stubs:
            code[addr - layout.STUB_BASE] = 0xC3
        regions.append(_page_region("C code (stubs)", layout.STUB_BASE, size, Perm.R | Perm.X, False, bytes(code)))

    # Ordinary kernel code that exceptions interrupt (never executed: runs end when they return to it).
    regions.append(Region("kernel text", layout.KERNEL_TEXT_BASE, PAGE, Perm.R | Perm.X, False, b"\xcc" * PAGE))

    # Task stack and cpu_entry_area.
    task_top = layout.TASK_STACK_BASE + layout.TASK_STACK_SIZE
    regions.append(Region("task stack", layout.TASK_STACK_BASE, layout.TASK_STACK_SIZE, Perm.R | Perm.W, False))
    cea = layout.CEA_BASE
    regions.append(Region("cpu_entry_area GDT", cea, PAGE, Perm.R, True))
    regions.append(Region("cpu_entry_area entry stack", cea + PAGE, layout.ENTRY_STACK_SIZE, Perm.R | Perm.W, True))
    ist_tops: dict[Vector, int] = {}
    entry_top = cea + PAGE + layout.ENTRY_STACK_SIZE
    cursor = entry_top + PAGE                     # guard page after the entry stack
    for vec in IST_ORDER:
        regions.append(Region(f"cpu_entry_area {vec.label} stack", cursor, EXCEPTION_STKSZ, Perm.R | Perm.W, True))
        ist_tops[vec] = cursor + EXCEPTION_STKSZ
        cursor += EXCEPTION_STKSZ + PAGE          # guard page
    regions.append(Region("cpu_entry_area vc2 stack", cursor, EXCEPTION_STKSZ, Perm.R | Perm.W, True))
    vc2_top = cursor + EXCEPTION_STKSZ

    # Model memory for data symbols.
    percpu_offsets = dict(res.percpu)
    percpu_base = layout.PERCPU_BASE
    data_regions: dict[int, bytearray] = {}

    def data_put(addr: int, value: int, size: int = 8) -> None:
        page = layout.page_down(addr)
        buf = data_regions.setdefault(page, bytearray(PAGE))
        off = addr - page
        buf[off:off + size] = value.to_bytes(size, "little")

    unbacked: list[tuple[int, int, str]] = []
    booting = booted.Booting(params.cpu, percpu_base, loaded.noinstr.layout if loaded.noinstr_c else lambda _: {},
                             res.functions.get, features=frozenset(image.features.names))
    if loaded.noinstr_c:
        # What boot code sets in data an object of the image defines (its initial value is a build's).
        for name, b in booted.BOOTED.items():
            addr = loaded.symbols.get(name)
            if b.defined_too and addr is not None and name not in res.data:
                data = booted.value(name, dataclasses.replace(booting, address=addr))
                for n, r in enumerate(regions):
                    if r.start <= addr and addr + len(data) <= r.end:
                        body = bytearray(r.data.ljust(r.size, b"\0"))
                        body[addr - r.start:addr - r.start + len(data)] = data
                        regions[n] = dataclasses.replace(r, data=bytes(body))
    for name, addr in res.data.items():
        if loaded.noinstr_c:
            # With the C in the image, only what a booted kernel is known to hold is there.
            if name not in booted.BOOTED:
                unbacked.append((addr, addr + res.data_sizes[name], name))
                continue
            data = booted.value(name, dataclasses.replace(booting, address=addr))
            for k in range(0, len(data), 8):
                chunk = data[k:k + 8]
                data_put(addr + k, int.from_bytes(chunk, "little"), len(chunk))
            continue
        data_regions.setdefault(layout.page_down(addr), bytearray(PAGE))
        for extra in range(PAGE, res.data_sizes[name], PAGE):
            data_regions.setdefault(layout.page_down(addr + extra), bytearray(PAGE))
    if "__per_cpu_offset" in res.data and not loaded.noinstr_c:
        base = res.data["__per_cpu_offset"]
        for cpu in range(res.data_sizes["__per_cpu_offset"] // 8):
            # Only this CPU's slot holds a mapped per-cpu base; others point at nothing.
            value = percpu_base if cpu == params.cpu else 0xFFFF_8880_DEAD_0000 + cpu * 0x10000
            data_put(base + 8 * cpu, value)
    if "x86_verw_sel" in res.data and not loaded.noinstr_c:
        data_put(res.data["x86_verw_sel"], KERNEL_DS, 2)
    user_ranges = image.pti_user_ranges()

    def pti_maps(addr: int) -> bool:
        return any(start <= addr < end for start, end, _ in user_ranges)

    for page, buf in sorted(data_regions.items()):
        regions.append(Region("entry data" if pti_maps(page) else "kernel data", page, PAGE,
                              Perm.R | Perm.W, pti_maps(page), bytes(buf)))

    # The per-cpu area, as on a booted CPU.
    percpu_size = layout.page_up(max([*percpu_offsets.values(), *(o + len(d) for o, d in loaded.percpu_data)],
                                     default=0) + 0x100)
    pc = bytearray(percpu_size)
    for at, data in loaded.percpu_data:          # the C objects' own per-cpu data, as initialised
        pc[at:at + len(data)] = data

    def put(name: str, off: int, value: int, size: int = 8) -> None:
        if name in percpu_offsets:
            at = percpu_offsets[name] + off
            pc[at:at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    tss = percpu_offsets.get("cpu_tss_rw")
    if tss is None:
        raise InputError(f"{loaded.path}: the entry code never uses cpu_tss_rw; cannot model its TSS")
    put("cpu_tss_rw", offsets["TSS_sp0"], entry_top)
    # task_top_of_stack(): pt_regs's end, below the stack's end by TOP_OF_KERNEL_STACK_PADDING
    pt_regs_top = task_top - linux.stack_padding(loaded.symbols)
    put("cpu_tss_rw", offsets["TSS_sp1"], pt_regs_top)
    for vec in IST_ORDER:
        put("cpu_tss_rw", linux.tss_ist_slot(0, offsets, vec), ist_tops[vec])
    put("cpu_tlbstate", offsets["TLB_STATE_loaded_mm_asid"], params.asid, 2)
    put("cpu_tlbstate", offsets["TLB_STATE_user_pcid_flush_mask"], 0, 2)
    put("pcpu_hot", offsets["X86_top_of_stack"], pt_regs_top)
    put("cpu_current_top_of_stack", 0, pt_regs_top)
    put("x86_spec_ctrl_current", 0, SPEC_CTRL_IBRS if ibrs else 0)
    put("fixed_percpu_data", offsets["FIXED_stack_canary"], params.stack_canary)
    if loaded.noinstr_c:
        # arch_install_hw_breakpoint() keeps DR7's value in cpu_dr7 (hw_breakpoint_active() reads it).
        put("cpu_dr7", 0, DR7_ARMED)
    if loaded.noinstr_c:
        link = loaded.noinstr
        hot = link.layout("pcpu_hot")
        put("this_cpu_off", 0, percpu_base)                     # this CPU's per-cpu base (setup_per_cpu_areas)
        # percpu_setup_exception_stacks(): struct cea_exception_stacks starts at the guard page
        # after the entry stack; the IST stacks above are laid out as its ESTACKS_MEMBERS are.
        put("cea_exception_stacks", 0, entry_top)
        put("current_task", 0, layout.CURRENT_TASK)             # current (6.1)
        put("cpu_number", 0, params.cpu)                        # smp_processor_id() (6.1)
        put("__preempt_count", 0, PREEMPT_ENABLED, 4)           # preemptible, no resched pending (6.1)
        for member, value, size in (("current_task", layout.CURRENT_TASK, 8), ("preempt_count", PREEMPT_ENABLED, 4),
                                    ("cpu_number", params.cpu, 4)):
            if member in hot:                                   # the same, in pcpu_hot (6.9+)
                put("pcpu_hot", hot[member], value, size)
        irq_top = layout.IRQ_STACK_BASE + layout.IRQ_STACK_SIZE
        # irq_init_percpu_irqstack(): the hard-IRQ stack's top, less one word (6.1: a per-cpu variable).
        put("hardirq_stack_ptr", 0, irq_top - 8)
        if "hardirq_stack_ptr" in hot:
            put("pcpu_hot", hot["hardirq_stack_ptr"], irq_top - 8)
        regions.append(Region("hard-IRQ stack", layout.IRQ_STACK_BASE, layout.IRQ_STACK_SIZE, Perm.R | Perm.W, False))
        regions.append(Region("current task", layout.CURRENT_TASK, layout.CURRENT_TASK_SIZE, Perm.R | Perm.W, False,
                              _current_task(link.layout("task_struct"), params.cpu)))
        regions.append(Region("current mm", layout.CURRENT_MM, layout.CURRENT_MM_SIZE, Perm.R | Perm.W, False,
                              _fill(layout.CURRENT_MM_SIZE, link.layout("mm_struct"),
                                    (("context.vdso", layout.VDSO32_BASE, 8),))))
    for page in range(0, percpu_size, PAGE):
        user = pti_maps(percpu_base + page)
        regions.append(Region("per-cpu cpu_tss_rw" if user else "per-cpu data",
                              percpu_base + page, PAGE, Perm.R | Perm.W, user,
                              bytes(pc[page:page + PAGE])))

    idt = {}
    for vec, sym in IDT_SYMBOLS.items():
        if sym in loaded.symbols:
            idt[vec] = loaded.symbols[sym]
    for vec in (Vector.NMI, Vector.DB, Vector.MC):
        if vec not in idt:
            raise InputError(f"{loaded.path}: no {IDT_SYMBOLS[vec]}; is this the x86-64 entry_64.o?")
    tss_base = percpu_base + tss
    fred = None
    if "fred" in image.features.names and linux.fred_built(loaded.symbols):
        # cpu_init_fred_exceptions()/cpu_init_fred_rsps(): RSP0 the task stack, RSP1..3 as linux.py says.
        fred = FredConfig(loaded.symbols[linux.FRED_ENTRY],
                                (task_top,) + tuple(ist_tops[v] for v in linux.FRED_STACKS), linux.FRED_LEVELS)
    config = MachineConfig(regions=tuple(regions), idt=MappingProxyType(idt),
                           ist_slots=MappingProxyType({v: linux.tss_ist_slot(tss_base, offsets, v)
                                                       for v in IST_ORDER}),
                           sp0_slot=tss_base + offsets["TSS_sp0"],
                           cpunode_selector=CPUNODE_SELECTOR, cpunode_limit=params.cpu | (params.node << 12),
                           stubs=MappingProxyType(stubs), fred=fred, spec=linux.spec_config(image.features.names),
                           asm_stubs=frozenset(a for a, n in stubs.items() if n in linux.RETURNING_HELPERS),
                           unbacked=tuple(sorted(unbacked)), noinstr_c=loaded.noinstr_c,
                           c_entries=MappingProxyType(_c_entries(loaded)))
    return World(image, config, params, pti, pcid, fsgsbase, ibrs, percpu_base, MappingProxyType(percpu_offsets),
                 MappingProxyType(offsets), task_top, entry_top, MappingProxyType(ist_tops),
                 _syscall_returns_bool(image), vc2_top,
                 layout.IRQ_STACK_BASE + layout.IRQ_STACK_SIZE if loaded.noinstr_c else 0,
                 MappingProxyType(dict(loaded.noinstr.constants)) if loaded.noinstr_c else MappingProxyType({}),
                 layout.CURRENT_TASK + loaded.noinstr.layout("task_struct").get("thread_info.flags", 0)
                 if loaded.noinstr_c else 0)


# C functions the entry paths enter from elsewhere than the asm, checked on entry all the same:
# FRED's dispatcher calls the NMI handler (the NMI invariant counts its entries).
C_ENTRIES_TOO = ("fred_exc_nmi", "exc_nmi")


def _c_entries(loaded) -> dict[int, str]:
    """address -> name: the C functions the entry code calls, where the image has their code."""
    if not loaded.noinstr_c:
        return {}
    names = sorted(set(loaded.noinstr.entry_calls) | set(C_ENTRIES_TOO))
    return {loaded.symbols[n]: n for n in names if n in loaded.symbols and n not in loaded.resolution.classes}


def _current_task(task: dict[str, int], cpu: int) -> bytes:
    """The task user space entered the kernel from, as its task_struct holds it: its stack, the CPU
    it runs on, its mm, no work pending (thread_info.flags and syscall_work 0), everything else zero."""
    return _fill(layout.CURRENT_TASK_SIZE, task, (("stack", layout.TASK_STACK_BASE, 8), ("cpu", cpu, 4),
                                                  ("thread_info.cpu", cpu, 4), ("mm", layout.CURRENT_MM, 8),
                                                  ("active_mm", layout.CURRENT_MM, 8)))


def _fill(size: int, members: dict[str, int], values) -> bytes:
    """``size`` zero bytes with (member, value, width) written where ``members`` (DWARF) puts them."""
    data = bytearray(size)
    for member, value, width in values:
        if member in members and members[member] + width <= len(data):
            data[members[member]:members[member] + width] = value.to_bytes(width, "little")
    return bytes(data)


def _syscall_returns_bool(image: Image) -> bool:
    """6.12's do_syscall_64 returns whether SYSRET may be used: the caller tests %al next."""
    stub = image.loaded.resolution.functions.get("do_syscall_64")
    if stub is None:
        return False
    for r in image.loaded.relocations:
        if r.section == ".entry.text" and r.symbol == "do_syscall_64":
            nxt = image.instructions.at(r.address + 4)
            return nxt is not None and nxt.mnemonic.startswith("test") and "%al" in nxt.op_str
    return False


__all__ = ["World", "WorldParams", "build_world", "IDT_SYMBOLS", "MCG_STATUS_MCIP"]
