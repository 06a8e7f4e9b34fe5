"""The one adapter between the privileged-state model and Unicorn.

Unicorn executes the kernel's instructions; the few it cannot do for us (CR3,
MSRs, SWAPGS, RD/WRGSBASE, LSL of the CPU-number segment, IRETQ, SYSRETQ, VERW
and fences, and every call into a C stub) are found by decoding the image once
and hooked at their addresses only; the hook applies the model's pure function
and skips the instruction.  Exceptions are delivered here, through the TSS's IST
slots, because Unicorn never delivers through an IDT.

Two modes share this code.  RECORD hooks every instruction (exact step counts,
the instruction trace, snapshots at boundaries, every memory access); FAST hooks
only the sites and runs at Unicorn's speed.  A ``Snapshot`` is plain data
(registers, the writable memory span, model state), so a snapshot taken by one
emulator can be restored in another — also in another process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import capstone
from capstone import x86_const as CX
from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE,
                     UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, Uc, UcError)
from unicorn import unicorn_const as UCC
from unicorn import x86_const as UX

from entrycheck.errors import InternalError
from entrycheck.image.image import CODE_SECTIONS, Image
from entrycheck.image.layout import USER_GSBASE_POISON, Perm, Region
from entrycheck.machine import model
from entrycheck.machine.events import (Cr3Read, Cr3Written, Delivered, Ended, Event, Fault, FaultKind,
                                       Fence, GsChange, Injection, Iret, Latched, MsrRead, MsrWritten,
                                       Outcome, Resumed, Sysret)
from entrycheck.machine.fastuc import FastUc
from entrycheck.machine.memory import AddressSpace, build_address_space
from entrycheck.machine.model import CpuState, Frame, Vector

GPRS: tuple[int, ...] = (UX.UC_X86_REG_RAX, UX.UC_X86_REG_RBX, UX.UC_X86_REG_RCX, UX.UC_X86_REG_RDX,
                         UX.UC_X86_REG_RSI, UX.UC_X86_REG_RDI, UX.UC_X86_REG_RBP, UX.UC_X86_REG_R8,
                         UX.UC_X86_REG_R9, UX.UC_X86_REG_R10, UX.UC_X86_REG_R11, UX.UC_X86_REG_R12,
                         UX.UC_X86_REG_R13, UX.UC_X86_REG_R14, UX.UC_X86_REG_R15)
GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15")
RSP, RIP, RFLAGS = UX.UC_X86_REG_RSP, UX.UC_X86_REG_RIP, UX.UC_X86_REG_RFLAGS
CONTEXT_REGS = GPRS + (RSP, RIP, RFLAGS)      # what a Snapshot carries
RFLAGS_ZF = 1 << 6
DEFAULT_BUDGET = 20000


class Mode(enum.Enum):
    FAST = "fast"
    RECORD = "record"


@dataclass(frozen=True)
class MachineConfig:
    """Everything the emulator needs besides the image (built by kernelabi)."""

    regions: tuple[Region, ...]
    idt: Mapping[Vector, int]            # vector -> handler address
    tss: int                             # address of the hardware TSS (per-cpu cpu_tss_rw)
    cpunode_selector: int                # __CPUNODE_SEG
    cpunode_limit: int                   # what LSL of it yields (cpu | node << 12)
    stubs: Mapping[int, str]             # stub address -> C function name
    user_gs_poison: int = USER_GSBASE_POISON


@dataclass(frozen=True)
class Snapshot:
    regs: tuple[int, ...]                # CONTEXT_REGS order
    memory: bytes                        # the writable span
    cpu: CpuState
    steps: int
    outstanding: tuple[Injection, ...]
    chain: int                           # injections delivered so far
    home: tuple[int, int] | None         # (rip, rsp) of the scenario's kernel context


StubHandler = Callable[["Emulator", str], None]


@dataclass
class RunState:
    """Mutable bookkeeping of the current run (reset on restore)."""

    steps: int = 0
    events: list[Event] = field(default_factory=list)
    pcs: list[int] = field(default_factory=list)
    rsps: list[int] = field(default_factory=list)
    # (step, physical address, size, write, by an instruction (not by the model or a stub))
    accesses: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)
    outstanding: list[Injection] = field(default_factory=list)
    chain: int = 0
    outcome: Outcome | None = None
    reason: str = ""
    final_regs: tuple[int, ...] = ()
    pending_fault: tuple[FaultKind, str, int | None] | None = None


class Emulator:
    def __init__(self, image: Image, config: MachineConfig, stub_handler: StubHandler, *,
                 mode: Mode = Mode.FAST, budget: int = DEFAULT_BUDGET) -> None:
        self.image = image
        self.config = config
        self.mode = mode
        self.budget = budget
        self.stub_handler = stub_handler
        self.space: AddressSpace = build_address_space(config.regions)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_tlb_mode(UCC.UC_TLB_VIRTUAL)
        for chunk in self.space.chunks:
            self.uc.mem_map(chunk.phys, len(chunk.data), UCC.UC_PROT_ALL)
            self.uc.mem_write(chunk.phys, chunk.data)
        self.regs = FastUc(self.uc)
        self.cpu: CpuState | None = None
        self.run = RunState()
        self.home: tuple[int, int] | None = None       # (rip, rsp) of the scenario's kernel context
        self.snapshot_steps: bool = False               # RECORD: snapshot before every instruction
        self.snapshots: dict[int, Snapshot] = {}
        # RECORD: deliver (vector) before the hit-th execution of address, counted from the previous one
        self.inject_at_pc: list[tuple[int, Vector, int]] = []
        self._hits = 0
        self.trace_rsp = False                          # RECORD: keep RSP before every instruction
        self.on_resume: Callable[["Emulator", Resumed], bool] | None = None   # True: stop the run
        self._user_view = False
        self._sites: dict[int, Callable[[int, int], None]] = {}
        self._find_sites()
        self._install_hooks()

    # ---- memory -------------------------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        if self.mode is Mode.RECORD:
            self._log(addr, size, False)
        if (addr & 0xFFF) + size <= 0x1000:
            return self.regs.mem_read(self.space.phys(addr), size)
        out = bytearray()
        while size > 0:
            chunk = min(size, 0x1000 - (addr & 0xFFF))
            out += self.regs.mem_read(self.space.phys(addr), chunk)
            addr += chunk
            size -= chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        if self.mode is Mode.RECORD:
            self._log(addr, len(data), True)
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
            self.regs.mem_write(self.space.phys(addr + pos), bytes(data[pos:pos + chunk]))
            pos += chunk

    def _log(self, addr: int, size: int, write: bool) -> None:
        """Log an access made by the model or a stub, in physical addresses like Unicorn's hooks."""
        while size > 0:
            chunk = min(size, 0x1000 - (addr & 0xFFF))
            if self.mapped(addr):
                self.run.accesses.append((self.run.steps, self.space.phys(addr), chunk, write, False))
            addr += chunk
            size -= chunk

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, (value & ((1 << 64) - 1)).to_bytes(8, "little"))

    def mapped(self, addr: int) -> bool:
        return (addr >> 12) in self.space.pages

    # ---- state --------------------------------------------------------------------------
    def set_cpu(self, cpu: CpuState) -> None:
        """Install a new model state and keep Unicorn's GSBASE and TLB in step with it."""
        old = self.cpu
        self.cpu = cpu
        if old is None or old.gs_base != cpu.gs_base:
            self.regs.write(UX.UC_X86_REG_GS_BASE, cpu.gs_base)
        view = bool(cpu.cr3 & model.PTI_USER_PGTABLE)
        if old is None or view != self._user_view or old.cr3 != cpu.cr3:
            self._user_view = view
            self.uc.ctl(UCC.UC_CTL_TLB_FLUSH, UCC.UC_CTL_IO_WRITE)

    def gprs(self) -> tuple[int, ...]:
        return self.regs.read_all(GPRS + (RFLAGS,))

    def snapshot(self) -> Snapshot:
        return Snapshot(self.regs.read_all(CONTEXT_REGS), self.writable_memory(),
                        self.cpu, self.run.steps, tuple(self.run.outstanding), self.run.chain, self.home)

    def writable_memory(self) -> bytes:
        """The whole writable span (physical), as a snapshot keeps it."""
        return self.regs.mem_read(self.space.writable_base, self.space.writable_size)

    def restore(self, snap: Snapshot) -> None:
        self.regs.write_all(CONTEXT_REGS, snap.regs)
        self.regs.mem_write(self.space.writable_base, snap.memory)
        self.cpu = None
        self.set_cpu(snap.cpu)
        self.run = RunState(steps=snap.steps, outstanding=list(snap.outstanding), chain=snap.chain)
        self.home = snap.home
        self.snapshots = {}

    def emit(self, event_type, **fields) -> None:
        self.run.events.append(event_type(step=self.run.steps, pc=fields.pop("pc", self._pc()), **fields))

    def _pc(self) -> int:
        return self.regs.read(RIP)

    # ---- run control ----------------------------------------------------------------------
    def fault(self, kind: FaultKind, message: str, address: int | None = None) -> None:
        """End the run with an emulation fault (callable from hooks and stubs)."""
        if self.run.outcome is None:
            self.emit(Fault, kind=kind, message=message, address=address)
            self._end(Outcome.EMULATION_FAULT, f"{kind.value}: {message}")

    def _end(self, outcome: Outcome, reason: str) -> None:
        if self.run.outcome is not None:
            return
        self.run.outcome = outcome
        self.run.reason = reason
        self.run.final_regs = self.gprs()
        self.emit(Ended, outcome=outcome, reason=reason)
        self.uc.emu_stop()

    def stop(self, reason: str) -> None:
        """Stop the run on purpose (the controller has learnt what it needed)."""
        self._end(Outcome.STOPPED, reason)

    def go(self) -> Outcome:
        """Run from the current state until the path ends."""
        while self.run.outcome is None:
            pc = self._pc()
            remaining = self.budget - self.run.steps if self.mode is Mode.RECORD else self.budget
            if remaining <= 0:
                self._end(Outcome.NO_RETURN, f"no return within {self.budget} instructions")
                break
            try:
                self.uc.emu_start(pc, 0, count=0 if self.mode is Mode.RECORD else remaining)
            except UcError as exc:
                self._unicorn_error(exc)
                break
            if self.run.outcome is None:
                if self.mode is Mode.FAST:
                    self._end(Outcome.NO_RETURN, f"no return within {self.budget} instructions")
                elif self.run.pending_fault is None and self.run.steps < self.budget:
                    continue
        return self.run.outcome

    def _unicorn_error(self, exc: UcError) -> None:
        pending = self.run.pending_fault
        pc = self._pc()
        if pending is not None:
            kind, message, address = pending
            self.fault(kind, f"{message} at {self.image.symbolize(pc)}", address)
            return
        errno = exc.errno
        if errno == UCC.UC_ERR_INSN_INVALID:
            self.fault(FaultKind.UD, f"invalid opcode at {self.image.symbolize(pc)}")
        elif errno in (UCC.UC_ERR_WRITE_PROT, UCC.UC_ERR_READ_PROT, UCC.UC_ERR_FETCH_PROT):
            self.fault(FaultKind.GP, f"access violates page permissions at {self.image.symbolize(pc)}")
        elif errno in (UCC.UC_ERR_READ_UNMAPPED, UCC.UC_ERR_WRITE_UNMAPPED, UCC.UC_ERR_FETCH_UNMAPPED):
            self.fault(FaultKind.UNMAPPED, f"unmapped access at {self.image.symbolize(pc)}")
        else:
            self.fault(FaultKind.GP, f"{exc} at {self.image.symbolize(pc)}")

    # ---- exceptions -----------------------------------------------------------------------
    def deliver(self, vector: Vector, error_code: int | None = None, *, from_latch: bool = False) -> bool:
        """Deliver ``vector`` at the current instruction boundary; an NMI while blocked is latched."""
        cpu = self.cpu
        if vector is Vector.NMI and cpu.nmi_blocked:
            if not cpu.nmi_pending:
                self.set_cpu(model.latch_nmi(cpu))
                self.emit(Latched, vector=vector)
            return False
        if not model.can_deliver(cpu, vector):
            raise InternalError(f"{vector.label} cannot be delivered now (MCIP set)")
        rip, rsp, rflags = self.regs.read(RIP), self.regs.read(RSP), self.regs.read(RFLAGS)
        if vector.ist:
            top = self.read_u64(self.config.tss + 36 + 8 * (vector.ist - 1))
        elif cpu.cpl == 3:
            top = self.read_u64(self.config.tss + 4)
        else:
            top = rsp
        injection = Injection(vector, self.run.steps, rip, rsp, self.gprs(), cpu, self.run.chain)
        new_cpu, frame, new_rsp, new_flags = model.deliver(
            cpu, vector, rip=rip, rsp=rsp, rflags=rflags,
            error_code=error_code if error_code is not None else 0, stack_top=top)
        if not self.mapped(new_rsp) or not self.mapped(new_rsp + 8 * len(frame.words()) - 1):
            self.fault(FaultKind.UNMAPPED, f"{vector.label} frame at unmapped stack {new_rsp:#x}", new_rsp)
            return False
        words = b"".join((w & ((1 << 64) - 1)).to_bytes(8, "little") for w in frame.words())
        self.write(new_rsp, words)
        self.regs.write(RSP, new_rsp)
        self.regs.write(RFLAGS, new_flags)
        self.regs.write(RIP, self.config.idt[vector])
        self.set_cpu(new_cpu)
        self.run.outstanding.append(injection)
        self.run.chain += 1
        self.emit(Delivered, pc=rip, vector=vector, frame=frame, stack=new_rsp, from_latch=from_latch)
        return True

    # ---- sites --------------------------------------------------------------------------------
    def _find_sites(self) -> None:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        md.detail = True
        for sec in self.image.loaded.sections:
            if sec.name not in CODE_SECTIONS:
                continue
            code = self.image.contents[sec.name]
            offset = 0
            while offset < len(code):
                for ins in md.disasm(code[offset:], sec.address + offset):
                    self._classify(ins)
                    offset += ins.size
                offset += 1          # past a byte capstone cannot decode (or the end)
        for addr, name in self.config.stubs.items():
            self._sites[addr] = self._stub_site(name)

    def _classify(self, ins) -> None:
        m = ins.mnemonic
        a = ins.address
        if m == "mov" and len(ins.operands) == 2:
            dst, src = ins.operands
            if src.type == CX.X86_OP_REG and src.reg == CX.X86_REG_CR3:
                self._sites[a] = self._cr3_read(_uc_reg(ins.reg_name(dst.reg)))
            elif dst.type == CX.X86_OP_REG and dst.reg == CX.X86_REG_CR3:
                self._sites[a] = self._cr3_write(_uc_reg(ins.reg_name(src.reg)))
            elif dst.type == CX.X86_OP_REG and ins.reg_name(dst.reg) in ("cs", "ss", "ds", "es", "fs", "gs"):
                self._sites[a] = self._unsupported(f"load of segment register {ins.reg_name(dst.reg)}")
        elif m == "rdmsr":
            self._sites[a] = self._rdmsr
        elif m == "wrmsr":
            self._sites[a] = self._wrmsr
        elif m == "swapgs":
            self._sites[a] = self._swapgs
        elif m in ("rdgsbase", "wrgsbase"):
            reg = _uc_reg(ins.reg_name(ins.operands[0].reg))
            self._sites[a] = self._rdgsbase(reg) if m == "rdgsbase" else self._wrgsbase(reg)
        elif m in ("rdfsbase", "wrfsbase", "rdpid", "invpcid", "hlt", "cpuid"):
            self._sites[a] = self._unsupported(m)
        elif m == "lsl":
            dst, src = ins.operands
            if src.type != CX.X86_OP_REG:
                self._sites[a] = self._unsupported("lsl with a memory operand")
            else:
                self._sites[a] = self._lsl(_uc_reg64(ins.reg_name(dst.reg)), _uc_reg(ins.reg_name(src.reg)))
        elif m == "iretq":
            self._sites[a] = self._iretq
        elif m in ("sysretq", "sysret"):
            self._sites[a] = self._sysretq
        elif m in ("verw", "lfence", "mfence", "clac", "stac"):
            self._sites[a] = self._fence(m)

    def _install_hooks(self) -> None:
        uc = self.uc
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INTR, self._intr)
        if self.mode is Mode.RECORD:
            for sec in self.image.loaded.sections:
                if sec.name in CODE_SECTIONS:
                    uc.hook_add(UC_HOOK_CODE, self._step, begin=sec.address, end=sec.address + sec.size - 1)
            if self.config.stubs:
                lo, hi = min(self.config.stubs), max(self.config.stubs)
                uc.hook_add(UC_HOOK_CODE, self._step, begin=lo, end=hi + 15)
            uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._mem)
        else:
            for addr in sorted(self._sites):
                uc.hook_add(UC_HOOK_CODE, self._site, begin=addr, end=addr)

    # ---- hooks --------------------------------------------------------------------------------
    def _tlb_fill(self, uc, vaddr: int, access: int, entry, _user) -> bool:
        page = self.space.pages.get(vaddr >> 12)
        if page is None:
            if self.cpu is not None and self.cpu.gs_base == self.config.user_gs_poison and \
                    0 <= vaddr - self.config.user_gs_poison < 0x100000:
                self.run.pending_fault = (FaultKind.USER_GS, f"%gs: access with the user GSBASE ({vaddr:#x})",
                                          vaddr)
            else:
                self.run.pending_fault = (FaultKind.UNMAPPED, f"access to unmapped {vaddr:#x}", vaddr)
            return False
        if self._user_view and not page.user:
            what = "fetch of" if access == UCC.UC_MEM_FETCH else "access to"
            self.run.pending_fault = (FaultKind.USER_CR3, f"{what} {page.region} {vaddr:#x} under the user CR3",
                                      vaddr)
            return False
        entry.paddr = page.phys
        perms = UC_PROT_READ
        if Perm.W in page.perm:
            perms |= UC_PROT_WRITE
        if Perm.X in page.perm:
            perms |= UC_PROT_EXEC
        entry.perms = perms
        return True

    def _intr(self, uc, intno: int, _user) -> None:
        self.fault(FaultKind.TRAP, f"exception {intno} raised by the code at {self.image.symbolize(self._pc())}")

    def _mem(self, uc, access: int, addr: int, size: int, value: int, _user) -> None:
        self.run.accesses.append((self.run.steps, addr, size, access == UCC.UC_MEM_WRITE, True))

    def _step(self, uc, addr: int, size: int, _user) -> None:
        run = self.run
        if run.outcome is not None:
            uc.emu_stop()
            return
        if run.steps >= self.budget:
            self._end(Outcome.NO_RETURN, f"no return within {self.budget} instructions")
            return
        if self.inject_at_pc and self.inject_at_pc[0][0] == addr:
            self._hits += 1
            address, vector, hit = self.inject_at_pc[0]
            if self._hits == hit:
                self.inject_at_pc.pop(0)
                self._hits = 0
                delivered = self.deliver(vector, 0)
                if delivered and self.run.outcome is None:
                    uc.emu_stop()       # restart at the handler (RIP was changed)
                    return
        if self.snapshot_steps:
            self.snapshots[run.steps] = self.snapshot()
        run.pcs.append(addr)
        if self.trace_rsp:
            run.rsps.append(self.regs.read(RSP))
        run.steps += 1
        action = self._sites.get(addr)
        if action is not None:
            action(addr, size)

    def _site(self, uc, addr: int, size: int, _user) -> None:
        if self.run.outcome is not None:
            uc.emu_stop()
            return
        self.run.steps += 1
        self._sites[addr](addr, size)

    def _skip(self, addr: int, size: int) -> None:
        self.regs.write(RIP, addr + size)

    # ---- privileged instructions ----------------------------------------------------------------
    def _cr3_read(self, reg: int):
        def act(addr: int, size: int) -> None:
            self.regs.write(reg, self.cpu.cr3)
            self.emit(Cr3Read, pc=addr, value=self.cpu.cr3)
            self._skip(addr, size)
        return act

    def _cr3_write(self, reg: int):
        def act(addr: int, size: int) -> None:
            value = self.regs.read(reg)
            cpu, write = model.write_cr3(self.cpu, value)
            self.set_cpu(cpu)
            self.emit(Cr3Written, pc=addr, write=write, user_view=self._user_view)
            self._skip(addr, size)
        return act

    def _rdmsr(self, addr: int, size: int) -> None:
        msr = self.regs.read(UX.UC_X86_REG_RCX) & 0xFFFFFFFF
        try:
            value = model.rdmsr(self.cpu, msr)
        except model.MsrError as exc:
            self.fault(FaultKind.GP, str(exc))
            return
        self.regs.write(UX.UC_X86_REG_RAX, value & 0xFFFFFFFF)
        self.regs.write(UX.UC_X86_REG_RDX, value >> 32)
        self.emit(MsrRead, pc=addr, msr=msr, value=value)
        self._skip(addr, size)

    def _wrmsr(self, addr: int, size: int) -> None:
        msr = self.regs.read(UX.UC_X86_REG_RCX) & 0xFFFFFFFF
        value = (self.regs.read(UX.UC_X86_REG_RAX) & 0xFFFFFFFF) | \
            ((self.regs.read(UX.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32)
        try:
            cpu, write = model.wrmsr(self.cpu, msr, value)
        except model.MsrError as exc:
            self.fault(FaultKind.GP, str(exc))
            return
        self.set_cpu(cpu)
        self.emit(MsrWritten, pc=addr, write=write)
        if msr in (model.MSR_GS_BASE, model.MSR_KERNEL_GS_BASE):
            self.emit(GsChange, pc=addr, how="wrmsr", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        self._skip(addr, size)

    def _swapgs(self, addr: int, size: int) -> None:
        cpu = model.swapgs(self.cpu)
        self.set_cpu(cpu)
        self.emit(GsChange, pc=addr, how="swapgs", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        self._skip(addr, size)

    def _rdgsbase(self, reg: int):
        def act(addr: int, size: int) -> None:
            if not self.cpu.fsgsbase:
                self.fault(FaultKind.UD, f"RDGSBASE with CR4.FSGSBASE clear at {self.image.symbolize(addr)}")
                return
            self.regs.write(reg, self.cpu.gs_base)
            self._skip(addr, size)
        return act

    def _wrgsbase(self, reg: int):
        def act(addr: int, size: int) -> None:
            if not self.cpu.fsgsbase:
                self.fault(FaultKind.UD, f"WRGSBASE with CR4.FSGSBASE clear at {self.image.symbolize(addr)}")
                return
            cpu = model.wrgsbase(self.cpu, self.regs.read(reg))
            self.set_cpu(cpu)
            self.emit(GsChange, pc=addr, how="wrgsbase", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
            self._skip(addr, size)
        return act

    def _lsl(self, dst: int, src: int):
        def act(addr: int, size: int) -> None:
            selector = self.regs.read(src) & 0xFFFF
            if selector != self.config.cpunode_selector:
                self.fault(FaultKind.GP, f"LSL of selector {selector:#x}: only the CPU-number segment is modelled")
                return
            self.regs.write(dst, self.config.cpunode_limit)
            self.regs.write(RFLAGS, self.regs.read(RFLAGS) | RFLAGS_ZF)
            self._skip(addr, size)
        return act

    def _fence(self, kind: str):
        def act(addr: int, size: int) -> None:
            self.emit(Fence, pc=addr, kind=kind)
            self._skip(addr, size)
        return act

    def _unsupported(self, what: str):
        def act(addr: int, size: int) -> None:
            self.fault(FaultKind.UD, f"{what} at {self.image.symbolize(addr)} is not modelled")
        return act

    def _iretq(self, addr: int, size: int) -> None:
        rsp = self.regs.read(RSP)
        if not (self.mapped(rsp) and self.mapped(rsp + 39)):
            self.fault(FaultKind.UNMAPPED, f"IRET frame at unmapped {rsp:#x}", rsp)
            return
        raw = self.read(rsp, 40)
        frame = Frame(None, *(int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(5)))
        try:
            cpu = model.iret(self.cpu, frame)
        except model.FrameError as exc:
            self.fault(FaultKind.GP, f"{exc} at {self.image.symbolize(addr)}")
            return
        to_user = frame.cs & 3 == 3
        self.emit(Iret, pc=addr, frame=frame, to_user=to_user, cpu=cpu)
        self.regs.write(RIP, frame.rip)
        self.regs.write(RSP, frame.rsp)
        self.regs.write(RFLAGS, frame.rflags | model.RFLAGS_FIXED)
        self.set_cpu(cpu)
        self._landed(frame.rip, frame.rsp)
        if self.run.outcome is not None:
            return
        if self.cpu.nmi_pending and not self.cpu.nmi_blocked:
            # A latched NMI arrives at the first boundary after the unblocking IRET (in user
            # mode too: the path then goes on through the NMI-from-user entry).
            self.set_cpu(replace(self.cpu, nmi_pending=False))
            self.deliver(Vector.NMI, from_latch=True)
            return
        if to_user:
            self._end(Outcome.RETURNED, "IRET to user mode")
            return
        if self.home is not None and (frame.rip, frame.rsp) == self.home and not self.run.outstanding:
            self._end(Outcome.RETURNED, "IRET to the interrupted kernel context")

    def _landed(self, rip: int, rsp: int) -> None:
        """An IRET landed at (rip, rsp): the exceptions that interrupted exactly there resumed."""
        outstanding = self.run.outstanding
        for k in range(len(outstanding) - 1, -1, -1):
            inj = outstanding[k]
            if inj.rip == rip and inj.rsp == rsp:
                del outstanding[k:]
                event = Resumed(step=self.run.steps, pc=rip, injection=inj, regs=self.gprs(), cpu=self.cpu)
                self.run.events.append(event)
                if self.on_resume is not None and self.on_resume(self, event):
                    self.stop("converged")
                return

    def _sysretq(self, addr: int, size: int) -> None:
        rcx = self.regs.read(UX.UC_X86_REG_RCX)
        r11 = self.regs.read(UX.UC_X86_REG_R11)
        try:
            cpu = model.sysret(self.cpu, rcx)
        except model.FrameError as exc:
            self.fault(FaultKind.GP, str(exc))
            return
        self.emit(Sysret, pc=addr, rip=rcx)
        self.regs.write(RIP, rcx)
        self.regs.write(RFLAGS, (r11 & 0x3C7FD7) | model.RFLAGS_FIXED)
        self.set_cpu(cpu)
        self._end(Outcome.RETURNED, "SYSRET to user mode")

    def _stub_site(self, name: str):
        def act(addr: int, size: int) -> None:
            self.stub_handler(self, name)
        return act


def _uc_reg(name: str) -> int:
    try:
        return getattr(UX, "UC_X86_REG_" + name.upper())
    except AttributeError:
        raise InternalError(f"no Unicorn register for {name}") from None


_WIDE = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi", "ebp": "rbp",
         "esp": "rsp", **{f"r{n}d": f"r{n}" for n in range(8, 16)}}


def _uc_reg64(name: str) -> int:
    return _uc_reg(_WIDE.get(name, name))
