"""The instructions the machine carries out itself, found by decoding the image once."""

from __future__ import annotations

import capstone
from capstone import x86_const as CX

from entrycheck.errors import InternalError
from entrycheck.image.image import CODE_SECTIONS, Image
from entrycheck.machine.api import MachineConfig
from entrycheck.machine.state import REG_INDEX


def find_sites(image: Image, config: MachineConfig) -> tuple[dict[int, tuple], frozenset[int]]:
    """address -> (kind, operands): the instructions the machine carries out itself; and the
    loop heads, the targets of backward direct branches: every loop made of direct branches
    passes one (a cycle of addresses needs an edge that goes back).  Loops closed only by an
    indirect jump or a RET are not among them."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    sites: dict[int, tuple] = {}
    heads: set[int] = set()
    spec = config.spec
    branches = spec is not None and spec.branches
    for sec in image.loaded.sections:
        if sec.name not in CODE_SECTIONS:
            continue
        code = image.contents[sec.name]
        offset = 0
        while offset < len(code):
            for ins in md.disasm(code[offset:], sec.address + offset):
                got = _classify(ins)
                if got is None and branches:
                    got = _branch(ins)
                if got is not None:
                    sites[ins.address] = got
                mnemonic, op_str = ins.mnemonic, ins.op_str
                if (mnemonic[0] == "j" or mnemonic.startswith("loop")) and op_str.startswith("0x") \
                        and int(op_str, 16) <= ins.address:
                    heads.add(int(op_str, 16))
                offset += ins.size
            offset += 1          # past a byte capstone cannot decode (or the end)
    if spec is not None and spec.bhb and "clear_bhb_loop" in image.loaded.symbols:
        sites[image.loaded.symbols["clear_bhb_loop"]] = ("bhb",)
    for addr, name in config.stubs.items():
        sites[addr] = ("stub", name)
    return sites, frozenset(heads)


def _branch(ins) -> tuple | None:
    """A RET, or a JMP/CALL through a register or memory: what retbleed and BHI predict."""
    m = ins.mnemonic
    if m in ("ret", "retq"):
        return ("branch", "ret")
    if m in ("jmp", "call", "jmpq", "callq") and ins.operands and ins.operands[0].type != CX.X86_OP_IMM:
        return ("branch", "indirect")
    return None


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


def _reg(ins, op) -> str:
    name = ins.reg_name(op.reg)
    if name not in REG_INDEX:
        raise InternalError(f"no register {name} at {ins.address:#x}")
    return name


def _classify(ins) -> tuple | None:
    m = ins.mnemonic
    if m == "mov" and len(ins.operands) == 2:
        dst, src = ins.operands
        if src.type == CX.X86_OP_REG and src.reg == CX.X86_REG_CR3:
            return ("cr3_read", _reg(ins, dst))
        if dst.type == CX.X86_OP_REG and dst.reg == CX.X86_REG_CR3:
            return ("cr3_write", _reg(ins, src))
        if dst.type == CX.X86_OP_REG and ins.reg_name(dst.reg) in ("cs", "ss", "ds", "es", "fs", "gs"):
            return ("unsupported", f"load of segment register {ins.reg_name(dst.reg)}")
        return None
    if m in ("rdmsr", "wrmsr", "swapgs", "iretq"):
        return (m,)
    if m in ("rdgsbase", "wrgsbase"):
        return (m, _reg(ins, ins.operands[0]))
    if m in ("rdfsbase", "wrfsbase", "rdpid", "invpcid", "hlt", "cpuid"):
        return ("unsupported", m)
    if m == "lsl":
        dst, src = ins.operands
        if src.type != CX.X86_OP_REG:
            return ("unsupported", "lsl with a memory operand")
        return ("lsl", PARENT[ins.reg_name(dst.reg)], ins.reg_name(src.reg))
    if m == "sysretq":
        return ("sysret", False)
    if m in ("sysret", "sysretl"):      # 0f 07 without REX.W: back to compat mode
        return ("sysret", True)
    raw = bytes(ins.bytes)
    if raw == b"\xf3\x0f\x01\xca":         # capstone reads ERETU as a prefixed CLAC
        return ("eret", True)
    if raw == b"\xf2\x0f\x01\xca":         # ERETS
        return ("eret", False)
    if m in ("verw", "lfence", "mfence", "clac", "stac"):
        return ("fence", m)
    return None


__all__ = ["find_sites", "PARENT"]
