"""How the dataflow analysis (machine/flow.py) classes an instruction of the image: a plain copy
between registers and memory (whose value it only moves), a compare and a conditional branch
(whose outcome it records), or anything else (whose inputs are uses and whose outputs are
computed), with the registers and flag groups it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass

from capstone import x86_const as X

from entrycheck.image import decode as image_decode
from entrycheck.image.insns import PARENT
from entrycheck.machine.api import FLAG_LOCS
from entrycheck.machine.state import REG_INDEX

RSP_LOC, RIP_LOC = REG_INDEX["rsp"], REG_INDEX["rip"]
ARITH, DF, CTRL, OTHER = FLAG_LOCS
GROUPS = FLAG_LOCS


def _flag_bits() -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """capstone eflags bits -> group, for reads (TEST, PRIOR) and writes (the rest)."""
    group = {"AF": ARITH, "CF": ARITH, "SF": ARITH, "ZF": ARITH, "PF": ARITH, "OF": ARITH, "0F": ARITH,
             "DF": DF, "TF": CTRL, "IF": CTRL, "NT": CTRL, "RF": CTRL, "AC": OTHER}
    reads, writes, per_flag = {}, {}, {}
    for name in dir(X):
        if not name.startswith("X86_EFLAGS_"):
            continue
        kind, flag = name[len("X86_EFLAGS_"):].rsplit("_", 1)
        g = group.get(flag)
        if g is None:
            continue
        bit = getattr(X, name)
        (reads if kind in ("TEST", "PRIOR") else writes)[bit] = g
        if kind not in ("TEST", "PRIOR"):
            per_flag[bit] = 1 << list(group).index(flag) if g == ARITH else 0
    return reads, writes, per_flag


_FLAG_READS, _FLAG_WRITES, _ARITH_FLAG = _flag_bits()
_ALL_ARITH = 0
for _f in ("AF", "CF", "SF", "ZF", "PF", "OF"):
    _ALL_ARITH |= 1 << ["AF", "CF", "SF", "ZF", "PF", "OF", "0F"].index(_f)


@dataclass(frozen=True)
class Insn:
    """What one instruction reads and writes, for the dataflow."""

    kind: str                       # copy kinds (see _KINDS) or "generic"
    dst: int = -1                   # register location of a copy kind
    src: int = -1
    reads: tuple[int, ...] = ()     # register locations read (generic; addresses of copies)
    writes: tuple[tuple[int, bool], ...] = ()   # (register location, whole register written)
    flags_read: tuple[int, ...] = ()
    flags_written: tuple[tuple[int, bool], ...] = ()   # (group, whole group written)
    operands: tuple = ()            # cmp/test: ("r", loc, width) | ("m", size) | ("i", value)
    addr: tuple[int, ...] = ()      # cmp/test: address registers of the memory operand
    cond: str = ""                  # jcc: the condition (mnemonic)
    target: int = 0                 # jcc: where it goes when taken


def _loc_width(ins, reg_id: int) -> tuple[int, int] | None:
    name = ins.reg_name(reg_id)
    parent = PARENT.get(name)
    if parent is None:
        return None
    if name == parent:
        width = 8
    elif name.startswith("e") or name.endswith("d"):
        width = 4
    else:
        width = 2
    return REG_INDEX[parent], width


def describe(decoded: image_decode.Insn) -> Insn:
    """The dataflow class of an instruction of the image's table (image/insns.py)."""
    ins = decoded.cs
    m = decoded.name
    ops = decoded.operands
    addr_regs = []
    for op in ops:
        if op.type == X.X86_OP_MEM:
            for r in (op.mem.base, op.mem.index):
                if r:
                    lw = _loc_width(ins, r)
                    if lw is not None and lw[0] != RIP_LOC:
                        addr_regs.append(lw[0])
    addr = tuple(addr_regs)

    def reg(op) -> tuple[int, int] | None:
        return _loc_width(ins, op.reg) if op.type == X.X86_OP_REG else None

    if m == "mov" and len(ops) == 2:
        d, s = ops
        rd, rs = reg(d), reg(s)
        if rd and rs and rd[1] == 8 and rs[1] == 8:
            return Insn("mov_rr", dst=rd[0], src=rs[0])
        # A %gs: operand is a copy too: its address adds the GS base, which is model state (the
        # memo's key), and the access's physical address is in the log like any other.
        if rd and rd[1] == 8 and s.type == X.X86_OP_MEM and s.size == 8 and not _segment(ins, s, "fs"):
            return Insn("load", dst=rd[0], reads=addr)
        if rs and rs[1] == 8 and d.type == X.X86_OP_MEM and d.size == 8 and not _segment(ins, d, "fs"):
            return Insn("store", src=rs[0], reads=addr)
        if s.type == X.X86_OP_IMM and rd and rd[1] >= 4:
            return Insn("const_r", dst=rd[0])
        if s.type == X.X86_OP_IMM and d.type == X.X86_OP_MEM:
            return Insn("const_m", reads=addr)
    if m == "push" and len(ops) == 1:
        r = reg(ops[0])
        if r and r[1] == 8:
            return Insn("push_r", src=r[0])
        if ops[0].type == X.X86_OP_IMM:
            return Insn("push_i")
        if ops[0].type == X.X86_OP_MEM and ops[0].size == 8 and not _segment(ins, ops[0]):
            return Insn("push_m", reads=addr)
    if m == "pop" and len(ops) == 1:
        r = reg(ops[0])
        if r and r[1] == 8:
            return Insn("pop_r", dst=r[0])
    if m in ("xor", "sub") and len(ops) == 2:
        rd, rs = reg(ops[0]), reg(ops[1])
        if rd and rs and rd == rs and rd[1] >= 4:
            return Insn("zero", dst=rd[0])
    if m == "pushfq":
        return Insn("pushf")
    if m in ("nop", "endbr64", "jmp") and not (m == "jmp" and ops and ops[0].type != X.X86_OP_IMM):
        return Insn("none")             # a nop's memory operand is never accessed
    if m == "call" and ops and ops[0].type == X.X86_OP_IMM:
        return Insn("call")
    if m == "ret" and not ops:
        return Insn("ret")
    if m in ("cmp", "test") and len(ops) == 2:
        described = []
        for op in ops:
            if op.type == X.X86_OP_IMM:
                described.append(("i", op.imm & ((1 << (8 * op.size)) - 1)))
            elif op.type == X.X86_OP_REG:
                r = reg(op)
                if r is None or ins.reg_name(op.reg).endswith("h"):
                    return _generic(ins, addr)
                described.append(("r", r[0], op.size))
            elif op.type == X.X86_OP_MEM and not _segment(ins, op):
                described.append(("m", op.size))
            else:
                return _generic(ins, addr)
        if sum(1 for d in described if d[0] == "m") <= 1:
            from dataclasses import replace
            # The generic reads/writes stand when the operands are not copies.
            return replace(_generic(ins, addr), kind=m, operands=tuple(described), addr=addr)
    if m in _CONDITIONS and ops and ops[0].type == X.X86_OP_IMM:
        return Insn("jcc", cond=m, target=ops[0].imm & ((1 << 64) - 1))
    if m == "lea":
        rd = reg(ops[0])
        return Insn("generic", reads=addr, writes=((rd[0], rd[1] >= 4),) if rd else ())
    return _generic(ins, addr)


_CONDITIONS = {"ja", "jae", "jb", "jbe", "je", "jne", "js", "jns", "jg", "jge", "jl", "jle", "jo", "jno"}


def condition(cond: str, kind: str, width: int, a: int, b: int) -> bool:
    """Whether jcc ``cond`` is taken after ``cmp a, b`` (kind "cmp": a - b) or ``test a, b``."""
    bits = 8 * width
    mask = (1 << bits) - 1
    sign = 1 << (bits - 1)
    a &= mask
    b &= mask
    if kind == "cmp":
        r = (a - b) & mask
        cf = a < b
        of = bool((a ^ b) & (a ^ r) & sign)
    else:
        r = a & b
        cf = of = False
    zf, sf = r == 0, bool(r & sign)
    return {"ja": not cf and not zf, "jae": not cf, "jb": cf, "jbe": cf or zf, "je": zf, "jne": not zf,
            "js": sf, "jns": not sf, "jg": not zf and sf == of, "jge": sf == of, "jl": sf != of,
            "jle": zf or sf != of, "jo": of, "jno": not of}[cond]


def _segment(ins, op, *names: str) -> bool:
    """Whether a memory operand has a segment prefix (among ``names``, default %gs and %fs)."""
    return op.mem.segment not in (0, X.X86_REG_INVALID) and ins.reg_name(op.mem.segment) in (names or ("gs", "fs"))


def _generic(ins, addr: tuple[int, ...]) -> Insn:
    read_ids, write_ids = ins.regs_access()
    reads = set(addr)
    for r in read_ids:
        lw = _loc_width(ins, r)
        if lw is not None and lw[0] != RIP_LOC:
            reads.add(lw[0])
    writes = {}
    for r in write_ids:
        lw = _loc_width(ins, r)
        if lw is not None and lw[0] != RIP_LOC:
            writes[lw[0]] = writes.get(lw[0], False) or lw[1] >= 4
    flags = ins.eflags
    fr = {g for bit, g in _FLAG_READS.items() if flags & bit}
    fw: dict[int, int] = {}
    for bit, g in _FLAG_WRITES.items():
        if flags & bit:
            fw[g] = fw.get(g, 0) | _ARITH_FLAG.get(bit, 0)
    if ins.insn_name() in ("movsb", "movsq", "stosb", "stosq"):     # with a REP prefix or without
        fr.add(DF)
    written = tuple((g, g != ARITH or (mask & _ALL_ARITH) == _ALL_ARITH) for g, mask in sorted(fw.items()))
    if ins.insn_name() in ("cld", "std"):
        written = ((DF, True),)
    return Insn("generic", reads=tuple(sorted(reads)), writes=tuple(sorted(writes.items())),
                flags_read=tuple(sorted(fr)), flags_written=written)


__all__ = ["Insn", "describe", "condition", "RSP_LOC", "RIP_LOC", "ARITH", "DF", "CTRL", "OTHER", "GROUPS"]
