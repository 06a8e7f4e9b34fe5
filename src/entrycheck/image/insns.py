"""One image's instructions, decoded once (capstone, AT&T syntax with details) and classified.

Everything that asks about an instruction of the patched image asks here: the machine (the
privileged instructions it carries out itself, loop heads), the dataflow analysis (the decoded
instruction behind its class), the explorer (conditional branches to mispredict, the MSR an
RDMSR/WRMSR names, the instructions an SEV-ES hypervisor intercepts), and the reports (each
instruction's text).  Classification reads capstone's syntax-independent instruction names and
the operands in Intel order (AT&T lists them the other way round), never the text.
"""

from __future__ import annotations

import enum
from typing import Iterator

from capstone import x86_const as CX

from entrycheck.image.decode import Insn, decode_one, sweep


class SiteKind(str, enum.Enum):
    """An instruction the machine carries out itself (Unicorn cannot, or not as the CPU would)."""

    CR3_READ = "cr3_read"            # (register)
    CR3_WRITE = "cr3_write"          # (register)
    CR2_READ = "cr2_read"            # (register)
    CR2_WRITE = "cr2_write"          # (register)
    DR_READ = "dr_read"              # (register, debug register number)
    DR_WRITE = "dr_write"            # (register, debug register number)
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    SWAPGS = "swapgs"
    RDGSBASE = "rdgsbase"            # (register)
    WRGSBASE = "wrgsbase"            # (register)
    LSL = "lsl"                      # (destination's 64-bit register, source register)
    IRETQ = "iretq"
    SYSRET = "sysret"                # (to compat mode: SYSRETL)
    ERET = "eret"                    # (to user mode: ERETU)
    FENCE = "fence"                  # (verw, lfence, mfence, clac, stac)
    UNSUPPORTED = "unsupported"      # (what)
    BRANCH = "branch"                # ("ret" | "indirect"): what retbleed and BHI predict


def _parents() -> dict[str, str]:
    """Every x86-64 general register name -> its 64-bit register."""
    out = {}
    for r in ("ax", "bx", "cx", "dx"):
        full = "r" + r
        out.update({full: full, "e" + r: full, r: full, r[0] + "l": full, r[0] + "h": full})
    for r in ("si", "di", "bp", "sp"):
        full = "r" + r
        out.update({full: full, "e" + r: full, r: full, r + "l": full})
    for n in range(8, 16):
        full = f"r{n}"
        out.update({full: full, full + "d": full, full + "w": full, full + "b": full})
    out["rip"] = "rip"
    return out


PARENT = _parents()
VMSA_MSRS = frozenset({0xC0000100, 0xC0000101, 0xC0000102})
# Instructions an SEV-ES guest takes a #VC on (when the hypervisor intercepts them; assumed).  MMIO
# is not in the entry code.
VC_NAMES = frozenset({"cpuid", "rdtsc", "rdtscp", "rdpmc", "wbinvd", "vmmcall", "monitor", "mwait", "monitorx",
                      "mwaitx", "in", "insb", "insw", "insd", "out", "outsb", "outsw", "outsd"})
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_DEBUG_REGS = {getattr(CX, f"X86_REG_DR{n}"): n for n in range(8)}


def site_of(ins: Insn) -> tuple | None:
    """(kind, operands) of an instruction the machine carries out itself, else None."""
    cs = ins.cs
    if cs is None:
        return None
    m = ins.name
    ops = ins.operands
    if m == "mov" and len(ops) == 2:
        dst, src = ops
        if src.type == CX.X86_OP_REG and src.reg == CX.X86_REG_CR3:
            return (SiteKind.CR3_READ.value, cs.reg_name(dst.reg))
        if dst.type == CX.X86_OP_REG and dst.reg == CX.X86_REG_CR3:
            return (SiteKind.CR3_WRITE.value, cs.reg_name(src.reg))
        if src.type == CX.X86_OP_REG and src.reg == CX.X86_REG_CR2:
            return (SiteKind.CR2_READ.value, cs.reg_name(dst.reg))
        if dst.type == CX.X86_OP_REG and dst.reg == CX.X86_REG_CR2:
            return (SiteKind.CR2_WRITE.value, cs.reg_name(src.reg))
        if src.type == CX.X86_OP_REG and src.reg in _DEBUG_REGS:
            return (SiteKind.DR_READ.value, cs.reg_name(dst.reg), _DEBUG_REGS[src.reg])
        if dst.type == CX.X86_OP_REG and dst.reg in _DEBUG_REGS:
            return (SiteKind.DR_WRITE.value, cs.reg_name(src.reg), _DEBUG_REGS[dst.reg])
        if dst.type == CX.X86_OP_REG and cs.reg_name(dst.reg) in _SEGMENTS:
            return (SiteKind.UNSUPPORTED.value, f"load of segment register {cs.reg_name(dst.reg)}")
        return None
    if m in ("rdmsr", "wrmsr", "swapgs", "iretq"):
        return (m,)
    if m in ("rdgsbase", "wrgsbase"):
        return (m, cs.reg_name(ops[0].reg))
    if m in ("rdfsbase", "wrfsbase", "rdpid", "invpcid", "hlt", "cpuid"):
        return (SiteKind.UNSUPPORTED.value, m)
    if m == "lsl":
        dst, src = ops
        if src.type != CX.X86_OP_REG:
            return (SiteKind.UNSUPPORTED.value, "lsl with a memory operand")
        return (SiteKind.LSL.value, PARENT[cs.reg_name(dst.reg)], cs.reg_name(src.reg))
    if m == "sysretq":
        return (SiteKind.SYSRET.value, False)
    if m == "sysret":                     # 0f 07 without REX.W: back to compat mode
        return (SiteKind.SYSRET.value, True)
    if ins.mnemonic in ("eretu", "erets"):
        return (SiteKind.ERET.value, ins.mnemonic == "eretu")
    if m in ("verw", "lfence", "mfence", "clac", "stac"):
        return (SiteKind.FENCE.value, m)
    return None


def branch_of(ins: Insn) -> tuple | None:
    """A RET, or a JMP/CALL through a register or memory: what retbleed and BHI predict."""
    m = ins.name
    if m == "ret":
        return (SiteKind.BRANCH.value, "ret")
    if m in ("jmp", "call") and ins.operands and ins.operands[0].type != CX.X86_OP_IMM:
        return (SiteKind.BRANCH.value, "indirect")
    return None


class Instructions:
    """The instructions of one image (see the module's docstring): a linear sweep of each code
    section, and an instruction decoded on its own wherever asked for an address that sweep
    did not start one at."""

    def __init__(self, image) -> None:
        self._image = image
        self._at: dict[int, Insn | None] = {}
        self._starts: list[int] = []
        for sec in image.loaded.sections:
            if sec.name in image.loaded.code_sections:
                for ins in sweep(image.contents[sec.name], sec.address):
                    self._at[ins.address] = ins
                    self._starts.append(ins.address)
        self._conditional: dict[int, tuple[int, int] | None] = {}
        self._msr: dict[int, int | None] = {}

    def at(self, address: int) -> Insn | None:
        """The instruction that starts at ``address`` (None outside the image)."""
        got = self._at.get(address, False)
        if got is False:
            try:
                got = decode_one(self._image.read(address, 16), address)
            except KeyError:
                got = None
            self._at[address] = got
        return got

    def sweep(self, start: int, end: int) -> Iterator[Insn]:
        """The instructions of a linear sweep from ``start`` up to ``end`` (or the end of the
        section ``start`` is in)."""
        sec = next((s for s in self._image.loaded.sections if s.address <= start < s.address + s.size), None)
        if sec is None:
            raise KeyError(f"{start:#x} is not in the image")
        end = min(end, sec.address + sec.size)
        addr = start
        while addr < end:
            ins = self.at(addr)
            if ins is None or ins.end > end:
                yield from sweep(self._image.read(addr, end - addr), addr)
                return
            yield ins
            addr = ins.end

    def __iter__(self) -> Iterator[Insn]:
        for a in self._starts:
            yield self._at[a]

    def text(self, address: int) -> str | None:
        """An instruction's AT&T text (None: no instruction there)."""
        ins = self.at(address)
        return f"{ins.mnemonic} {ins.op_str}".strip() if ins else None

    def conditional(self, pc: int) -> tuple[int, int] | None:
        """(fall-through, target) of the conditional branch at ``pc``; None for any other instruction."""
        got = self._conditional.get(pc, False)
        if got is False:
            got = None
            ins = self.at(pc) if self._image.code_section(pc) is not None else None
            if ins is not None and ins.name.startswith("j") and ins.name != "jmp" and ins.branch_target is not None \
                    and ins.operands and ins.operands[0].type == CX.X86_OP_IMM:
                got = (ins.end, ins.branch_target)
            self._conditional[pc] = got
        return got

    def loop_heads(self) -> frozenset[int]:
        """The targets of backward direct branches: every loop made of direct branches passes one
        (a cycle of addresses needs an edge that goes back).  Loops closed only by an indirect jump
        or a RET are not among them."""
        out = set()
        for ins in self:
            if (ins.name.startswith("j") or ins.name.startswith("loop")) and ins.operands and \
                    ins.operands[0].type == CX.X86_OP_IMM and ins.branch_target is not None \
                    and ins.branch_target <= ins.address:
                out.add(ins.branch_target)
        return frozenset(out)

    def msr(self, pc: int) -> int | None:
        """The MSR an RDMSR/WRMSR at ``pc`` accesses: the last MOV of an immediate to ECX/RCX before
        it in its symbol (None: unknown)."""
        got = self._msr.get(pc, False)
        if got is False:
            image = self._image
            start, _ = image.symbol_range(image.symbolize(pc).split("+")[0])
            got = None
            for ins in self.sweep(start, pc):
                ops = ins.operands
                if ins.name == "mov" and len(ops) == 2 and ops[0].type == CX.X86_OP_REG and \
                        ins.cs.reg_name(ops[0].reg) in ("ecx", "rcx") and ops[1].type == CX.X86_OP_IMM:
                    got = ops[1].imm & 0xFFFFFFFF
            self._msr[pc] = got
        return got

    def raises_vc(self, pc: int) -> bool:
        """#VC is a fault of the instruction at ``pc``: one an SEV-ES hypervisor can intercept (CPUID,
        RDTSC(P), RDPMC, I/O, MOV DR7, WBINVD, VMMCALL, MONITOR/MWAIT, and RDMSR/WRMSR of MSRs the
        VMSA does not hold: all but FS/GS/KERNEL_GS_BASE)."""
        ins = self.at(pc)
        if ins is None or ins.cs is None:
            return False
        if ins.name in VC_NAMES:
            return True
        if ins.name == "mov" and any(o.type == CX.X86_OP_REG and o.reg == CX.X86_REG_DR7 for o in ins.operands):
            return True
        if ins.name in ("rdmsr", "wrmsr"):
            return self.msr(pc) not in VMSA_MSRS
        return False


__all__ = ["Instructions", "SiteKind", "site_of", "branch_of", "PARENT", "VMSA_MSRS", "VC_NAMES"]
