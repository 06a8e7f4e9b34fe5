"""The image layer on the real Debian 6.1 and 6.12 entry_64.o, and the relocation recipes.

Expectations come from outside the code under test: objdump's section headers,
symbol table and relocation records, gcc's preprocessor on the tree's own
cpufeatures.h, the build's asm-offsets.h, and capstone decoding the bytes.
"""

from __future__ import annotations

import bisect
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import capstone

from decoding import decode_exact as decode_all
import pytest
from capstone import x86_const as X
from hypothesis import example, given, settings
from hypothesis import strategies as st

from entrycheck.errors import InputError
from entrycheck.image import FeatureSet, LoadedObject, load_build, relocs
from entrycheck.image.features import builtin_table, load_cpufeatures
from entrycheck.kernel.targets import KernelBuild

MASK64 = (1 << 64) - 1
SERIES = ("6.1", "6.12")
GS = 0x65
FIELD_WIDTH = {"R_X86_64_64": 8, "R_X86_64_32": 4, "R_X86_64_32S": 4, "R_X86_64_PC32": 4, "R_X86_64_PLT32": 4}
PC_RELATIVE = {"R_X86_64_PC32", "R_X86_64_PLT32"}


# --------------------------------------------------------------------------- objdump


def objdump(path: Path, *args: str) -> str:
    return subprocess.run(["objdump", *args, str(path)], capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class DumpSection:
    name: str
    size: int
    alloc: bool
    code: bool


@dataclass(frozen=True)
class DumpSymbol:
    name: str
    section: str      # "*UND*", "*ABS*" or a section name
    value: int
    size: int


@dataclass(frozen=True)
class DumpReloc:
    section: str
    offset: int
    type: str
    symbol: str
    addend: int


SECTION_LINE = re.compile(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+[0-9a-f]+\s+[0-9a-f]+\s+2\*\*\d+\s+(.*)$")
RELOC_VALUE = re.compile(r"^(?P<sym>.+?)(?P<addend>[+-]0x[0-9a-f]+)?$")


def dump_sections(path: Path) -> dict[str, DumpSection]:
    out = {}
    for line in objdump(path, "-h", "-w").splitlines():
        m = SECTION_LINE.match(line)
        if m:
            flags = {f.strip() for f in m.group(3).split(",")}
            out[m.group(1)] = DumpSection(m.group(1), int(m.group(2), 16), "ALLOC" in flags, "CODE" in flags)
    return out


def dump_symbols(path: Path) -> list[DumpSymbol]:
    out = []
    for line in objdump(path, "-t").splitlines():
        if not re.match(r"^[0-9a-f]{16} ", line) or "\t" not in line:
            continue
        value = int(line[:16], 16)
        section, rest = line[25:].split("\t", 1)
        size, _, name = rest.partition(" ")
        out.append(DumpSymbol(name.strip(), section.strip(), value, int(size, 16)))
    return out


def dump_relocs(path: Path) -> list[DumpReloc]:
    out = []
    section = None
    for line in objdump(path, "-r", "-w").splitlines():
        head = re.match(r"^RELOCATION RECORDS FOR \[(.+)\]:$", line)
        if head:
            section = head.group(1)
            continue
        fields = line.split()
        if section is None or len(fields) != 3 or not re.fullmatch(r"[0-9a-f]{16}", fields[0]):
            continue
        m = RELOC_VALUE.match(fields[2])
        addend = int(m.group("addend"), 16) if m.group("addend") else 0
        out.append(DumpReloc(section, int(fields[0], 16), fields[1], m.group("sym"), addend))
    return out


# --------------------------------------------------------------------------- capstone




def is_branch(ins: capstone.CsInsn) -> bool:
    return ins.group(capstone.CS_GRP_JUMP) or ins.group(capstone.CS_GRP_CALL)


def branch_target(ins: capstone.CsInsn) -> int | None:
    if not is_branch(ins):
        return None
    imms = [op.imm for op in ins.operands if op.type == X.X86_OP_IMM]
    return imms[0] & MASK64 if imms else None


def memory_operand(ins: capstone.CsInsn):
    mems = [op for op in ins.operands if op.type == X.X86_OP_MEM]
    return mems[0] if mems else None


def gs_address(ins: capstone.CsInsn) -> int | None:
    """The %gs-relative offset an instruction touches (RIP-relative ones modulo 2^64)."""
    mem = memory_operand(ins)
    if ins.prefix[1] != GS or mem is None:
        return None
    if mem.mem.base == X.X86_REG_RIP:
        return (ins.address + ins.size + mem.mem.disp) & MASK64
    if mem.mem.base == 0 and mem.mem.index == 0:
        return mem.mem.disp & MASK64
    return None


def writes_cr3(ins: capstone.CsInsn) -> bool:
    return ins.mnemonic.startswith("mov") and ins.op_str.replace(" ", "").endswith(",%cr3")


def is_nop(ins: capstone.CsInsn) -> bool:
    return ins.mnemonic.startswith("nop") or (ins.mnemonic.startswith("xchg") and ins.op_str == "%ax, %ax")


# --------------------------------------------------------------------------- kernels


def header_define(path: Path, name: str) -> int:
    m = re.search(rf"^#define\s+{name}\s+(-?\d+)\b", path.read_text(), re.MULTILINE)
    assert m, f"{name} not in {path}"
    return int(m.group(1))


@dataclass
class Kernel:
    series: str
    build: KernelBuild
    loaded: LoadedObject

    @cached_property
    def sections(self) -> dict[str, DumpSection]:
        return dump_sections(self.build.object_path)

    @cached_property
    def symbols(self) -> list[DumpSymbol]:
        return dump_symbols(self.build.object_path)

    @cached_property
    def relocs(self) -> list[DumpReloc]:
        return dump_relocs(self.build.object_path)

    @cached_property
    def symbols_by_name(self) -> dict[str, set[tuple[str, int]]]:
        out: dict[str, set[tuple[str, int]]] = {}
        for s in self.symbols:
            out.setdefault(s.name, set()).add((s.section, s.value))
        return out

    @cached_property
    def model_symbols(self) -> dict[str, int]:
        return self.loaded.image(FeatureSet.parse("none")).all_symbols()

    def defined(self, name: str) -> DumpSymbol:
        found = [s for s in self.symbols if s.name == name and s.section != "*UND*"]
        assert len(found) == 1, (name, found)
        return found[0]

    def symbol_range(self, name: str) -> tuple[int, int]:
        """[start, end) of a function, from objdump's symbol table and the section's place."""
        sym = self.defined(name)
        start = self.loaded.section(sym.section).address + sym.value
        assert sym.size, name
        return start, start + sym.size

    def decode_symbol(self, features: str, name: str) -> list[capstone.CsInsn]:
        image = self.loaded.image(FeatureSet.parse(features))
        start, end = self.symbol_range(name)
        return decode_all(image.read(start, end - start), start)

    @cached_property
    def flush_mask(self) -> int:
        """Per-cpu offset of cpu_tlbstate.user_pcid_flush_mask (the model's cpu_tlbstate + asm-offsets)."""
        offset = header_define(self.build.asm_offsets_h, "TLB_STATE_user_pcid_flush_mask")
        return self.loaded.resolution.percpu["cpu_tlbstate"] + offset


@pytest.fixture(scope="module", params=SERIES, ids=[f"debian-{s}" for s in SERIES])
def kernel(request: pytest.FixtureRequest) -> Kernel:
    build = request.getfixturevalue({"6.1": "kernel61", "6.12": "kernel612"}[request.param])
    return Kernel(request.param, build, load_build(build))


@pytest.fixture(scope="module")
def both(kernel61: KernelBuild, kernel612: KernelBuild) -> dict[str, Kernel]:
    return {"6.1": Kernel("6.1", kernel61, load_build(kernel61)),
            "6.12": Kernel("6.12", kernel612, load_build(kernel612))}


def pti_site(k: Kernel, features: str):
    """The one alternative site in paranoid_exit that X86_FEATURE_PTI decides."""
    image = k.loaded.image(FeatureSet.parse(features))
    start, end = k.symbol_range("paranoid_exit")
    pti = gcc_feature_numbers(k.build.cpufeatures_h)["pti"]
    entries = {e.index: e for e in k.loaded.alternatives}
    sites = [s for s in image.alt_sites
             if start <= s.address < end and any(entries[i].feature == pti for i in s.entries)]
    assert len(sites) == 1, sites
    site = sites[0]
    return image, site, decode_all(image.read(site.address, site.length), site.address)


def reachable(insns: list[capstone.CsInsn]) -> set[int]:
    """Addresses reachable from the first instruction by direct branches and fall-through."""
    at = {i.address: i for i in insns}
    seen: set[int] = set()
    work = [insns[0].address]
    while work:
        addr = work.pop()
        if addr in seen or addr not in at:
            continue
        seen.add(addr)
        ins = at[addr]
        target = branch_target(ins)
        if ins.group(capstone.CS_GRP_RET) or ins.group(capstone.CS_GRP_IRET):
            continue
        if ins.group(capstone.CS_GRP_JUMP):
            if target is not None:
                work.append(target)
            if ins.mnemonic.startswith("jmp"):
                continue
        work.append(ins.address + ins.size)
    return seen


# --------------------------------------------------------------------------- PTI site


@pytest.mark.kernel
def test_paranoid_exit_restores_cr3_with_pti(kernel: Kernel) -> None:
    image, site, insns = pti_site(kernel, "pti,pcid")
    assert site.applied is not None
    assert insns and all(is_nop(i) for i in insns), [f"{i.mnemonic} {i.op_str}" for i in insns]
    assert insns[-1].address + insns[-1].size == site.address + site.length

    body = kernel.decode_symbol("pti,pcid", "paranoid_exit")
    cr3_writes = [i for i in body if writes_cr3(i)]
    assert len(cr3_writes) == 1
    assert cr3_writes[0].address in reachable(body)


@pytest.mark.kernel
def test_paranoid_exit_skips_cr3_without_pti(kernel: Kernel) -> None:
    image, site, insns = pti_site(kernel, "none")
    assert site.applied is None
    assert insns[0].mnemonic.startswith("jmp")
    body = kernel.decode_symbol("none", "paranoid_exit")
    (cr3_write,) = [i for i in body if writes_cr3(i)]
    assert branch_target(insns[0]) > cr3_write.address
    assert cr3_write.address not in reachable(body)
    # the unpatched site is the object's own bytes
    start = kernel.loaded.section(".entry.text").address
    raw = kernel.loaded.contents[".entry.text"]
    assert image.read(site.address, site.length) == raw[site.address - start:site.address - start + site.length]


# --------------------------------------------------------------------------- RESTORE_CR3 shapes


def mask_ops(k: Kernel, insns: list[capstone.CsInsn]) -> list[capstone.CsInsn]:
    return [i for i in insns if gs_address(i) == k.flush_mask]


@pytest.mark.kernel
def test_restore_cr3_shape_61(both: dict[str, Kernel]) -> None:
    k = both["6.1"]
    body = k.decode_symbol("pti,pcid", "paranoid_exit")
    ops = mask_ops(k, body)
    names = [re.sub(r"[bwlq]$", "", i.mnemonic) for i in ops]
    assert "bt" in names and "btr" in names
    assert names.index("bt") < names.index("btr")
    bt = ops[names.index("bt")]
    assert bt.op_str.startswith("%rax, %gs:")


@pytest.mark.kernel
def test_paranoid_restore_cr3_shape_612(both: dict[str, Kernel]) -> None:
    k = both["6.12"]
    body = k.decode_symbol("pti,pcid", "paranoid_exit")
    ops = mask_ops(k, body)
    names = [re.sub(r"[bwlq]$", "", i.mnemonic) for i in ops]
    assert names == ["btr"]
    after = body[body.index(ops[0]) + 1]
    assert after.mnemonic in ("jb", "jc", "jnae")


# --------------------------------------------------------------------------- the flush mask


@pytest.mark.kernel
def test_flush_mask_same_percpu_address(both: dict[str, Kernel]) -> None:
    masks = {}
    for series, k in both.items():
        text = k.loaded.section(".entry.text").address
        start, end = k.symbol_range("paranoid_exit")
        image = k.loaded.image(FeatureSet.parse("pti,pcid"))
        fields = [r for r in k.relocs if r.section == ".entry.text" and r.symbol == "cpu_tlbstate"
                  and start <= text + r.offset < end]
        assert fields, series
        for r in fields:
            addr = text + r.offset
            ins = next(i for i in decode_all(image.read(start, end - start), start)
                       if i.address <= addr < i.address + i.size)
            assert ins.prefix[1] == GS
            value = int.from_bytes(image.read(addr, 4), "little", signed=True)
            if series == "6.1":
                assert r.type == "R_X86_64_32S"
                assert value == k.flush_mask
            else:
                assert r.type == "R_X86_64_PC32"
                following = ins.address + ins.size
                assert following + value > MASK64          # really wraps around
                assert (following + value) & MASK64 == k.flush_mask
        masks[series] = k.flush_mask
    assert masks["6.1"] == masks["6.12"]
    for k in both.values():
        offset = header_define(k.build.asm_offsets_h, "TLB_STATE_user_pcid_flush_mask")
        assert k.flush_mask - offset == k.loaded.resolution.percpu["cpu_tlbstate"]


# --------------------------------------------------------------------------- relocations


def symbol_address(k: Kernel, name: str) -> int:
    """S for a relocation's symbol: the placed section + value; for an undefined symbol the
    model's choice (per-cpu variables are zero-based offsets into the per-cpu area)."""
    found = k.symbols_by_name[name]
    assert len(found) == 1, (name, found)
    ((section, value),) = found
    if section == "*UND*":
        percpu = k.loaded.resolution.percpu
        return percpu[name] if name in percpu else k.model_symbols[name]
    if section == "*ABS*":
        return value
    return k.loaded.section(section).address + value


@pytest.mark.kernel
def test_relocations_match_objdump(kernel: Kernel) -> None:
    lo = kernel.loaded
    alloc = {n for n, s in kernel.sections.items() if s.alloc}
    theirs = Counter((r.section, r.offset, r.type, r.symbol, r.addend) for r in kernel.relocs if r.section in alloc)
    ours = Counter((r.section, r.offset, r.type_name, r.symbol, r.addend) for r in lo.relocations)
    assert len(lo.relocations) == sum(theirs.values())
    assert ours == theirs
    # every relocation of an allocated section that has contents is applied
    assert {r.section for r in lo.relocations} == {r.section for r in kernel.relocs if r.section in alloc}


@pytest.mark.kernel
def test_relocated_bytes_hold_targets(kernel: Kernel) -> None:
    lo = kernel.loaded
    for r in lo.relocations:
        s = symbol_address(kernel, r.symbol)
        assert r.target == s + r.addend, r
        placed = lo.section(r.section)
        assert r.address == placed.address + r.offset
        field = lo.contents[r.section][r.offset:r.offset + FIELD_WIDTH[r.type_name]]
        want = (s + r.addend) & MASK64
        if r.type_name == "R_X86_64_64":
            assert int.from_bytes(field, "little") == want, r
        elif r.type_name == "R_X86_64_32":
            assert int.from_bytes(field, "little") == want, r
        elif r.type_name == "R_X86_64_32S":
            assert int.from_bytes(field, "little", signed=True) & MASK64 == want, r
        else:
            assert (int.from_bytes(field, "little", signed=True) + r.address) & MASK64 == want, r


@pytest.mark.kernel
def test_code_relocations_decode_to_targets(kernel: Kernel) -> None:
    lo = kernel.loaded
    checked = 0
    for name, sec in kernel.sections.items():
        if not (sec.code and sec.alloc and sec.size):
            continue
        placed = lo.section(name)
        insns = decode_all(lo.contents[name], placed.address)
        starts = [i.address for i in insns]
        for r in (r for r in lo.relocations if r.section == name):
            width = FIELD_WIDTH[r.type_name]
            ins = insns[bisect.bisect_right(starts, r.address) - 1]
            assert ins.address <= r.address and r.address + width <= ins.address + ins.size, r
            s_plus_a = symbol_address(kernel, r.symbol) + r.addend
            end = ins.address + ins.size
            where = r.address - ins.address
            # A PC-relative field holds S + A - P; the CPU adds the instruction's end, so the
            # operand lands at S + A + (end - P): A already subtracts the field-to-end distance.
            pc_target = (s_plus_a + end - r.address) & MASK64
            if where == ins.disp_offset and ins.disp_size == width:
                mem = memory_operand(ins)
                assert mem is not None, r
                if mem.mem.base == X.X86_REG_RIP:
                    assert r.type_name in PC_RELATIVE, r
                    assert (end + mem.mem.disp) & MASK64 == pc_target, r
                    if ins.prefix[1] == GS:
                        assert pc_target == gs_address(ins)
                else:
                    assert r.type_name not in PC_RELATIVE, r
                    assert mem.mem.disp & MASK64 == s_plus_a & MASK64, r
            elif where == ins.imm_offset and ins.imm_size == width:
                if is_branch(ins):
                    assert r.type_name in PC_RELATIVE, r
                    assert branch_target(ins) == pc_target, r
                else:
                    assert r.type_name not in PC_RELATIVE, r
                    imm = [op.imm for op in ins.operands if op.type == X.X86_OP_IMM][0]
                    assert imm & MASK64 == s_plus_a & MASK64, r
            else:
                pytest.fail(f"relocation {r} is not a displacement or immediate of {ins.mnemonic} {ins.op_str}")
            checked += 1
    code_relocs = [r for r in kernel.relocs if kernel.sections[r.section].code and kernel.sections[r.section].alloc]
    assert checked == len(code_relocs) > 0


# --------------------------------------------------------------------------- layout and symbols


@pytest.mark.kernel
def test_layout_places_every_allocated_section(kernel: Kernel) -> None:
    lo = kernel.loaded
    wanted = {n for n, s in kernel.sections.items() if s.alloc and s.size}
    assert {s.name for s in lo.sections} == wanted
    spans = sorted((s.address, s.address + s.size, s.name) for s in lo.sections)
    for (_, end, _), (start, _, name) in zip(spans, spans[1:]):
        assert end <= start, name
    for s in lo.sections:
        assert s.address % 0x1000 == 0 and s.size == kernel.sections[s.name].size
        assert s.address >> 63 == 1                    # canonical-high, kernel style
        assert len(lo.contents[s.name]) == s.size
    # code first
    code = [s.address for s in lo.sections if kernel.sections[s.name].code]
    data = [s.address for s in lo.sections if not kernel.sections[s.name].code]
    assert max(code) < min(data)


@pytest.mark.kernel
def test_symbols_follow_objdump(kernel: Kernel) -> None:
    image = kernel.loaded.image(FeatureSet.parse("none"))
    for name in ("paranoid_exit", "entry_SYSCALL_64", "asm_exc_nmi", "restore_regs_and_return_to_kernel"):
        sym = kernel.defined(name)
        assert image.address_of(name) == kernel.loaded.section(sym.section).address + sym.value
        assert image.symbolize(image.address_of(name) + 3) == f"{name}+0x3"
    start, end = kernel.symbol_range("paranoid_exit")
    assert image.symbol_range("paranoid_exit") == (start, end)
    assert image.parse_location("paranoid_exit+0x10") == start + 0x10
    with pytest.raises(InputError):
        image.address_of("no_such_symbol_here")
    # undefined symbols: all resolved, each to exactly one class
    undefined = {s.name for s in kernel.symbols if s.section == "*UND*" and s.name}
    assert set(kernel.loaded.resolution.classes) == undefined
    assert "cpu_tlbstate" in kernel.loaded.resolution.percpu


# --------------------------------------------------------------------------- feature numbers


def evaluate(expr: str) -> int:
    """A small recursive-descent evaluator for + - * and parentheses over integers."""
    tokens = re.findall(r"0x[0-9a-fA-F]+|\d+|[()+*-]|\S", expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> int:
        tok = take()
        if tok == "(":
            value = total()
            assert take() == ")"
            return value
        if tok == "-":
            return -atom()
        assert re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok), (tok, expr)
        return int(tok, 0)

    def product() -> int:
        value = atom()
        while peek() == "*":
            take()
            value *= atom()
        return value

    def total() -> int:
        value = product()
        while peek() in ("+", "-"):
            value = value + product() if take() == "+" else value - product()
        return value

    result = total()
    assert pos == len(tokens), expr
    return result


_GCC_CACHE: dict[tuple[Path, tuple[str, ...]], dict[str, int]] = {}


def gcc_feature_numbers(header: Path, *defines: str) -> dict[str, int]:
    """Every X86_FEATURE_/X86_BUG_ number of ``header`` as gcc's preprocessor expands it."""
    key = (header, defines)
    if key in _GCC_CACHE:
        return _GCC_CACHE[key]
    text = "\n".join(line for line in header.read_text().splitlines() if not re.match(r"\s*#\s*include\b", line))

    def cpp(source: str, *flags: str) -> str:
        return subprocess.run(["gcc", "-E", *flags, *defines, "-x", "c", "-"], input=source, text=True,
                              capture_output=True, check=True).stdout

    macros = re.findall(r"^#define (X86_(?:FEATURE|BUG)_\w+) ", cpp(text, "-dM"), re.MULTILINE)
    probe = text + "\n" + "\n".join(f'"{m}" = {m} ;' for m in macros)
    numbers = {}
    for m in re.finditer(r'^"(X86_(FEATURE|BUG)_(\w+))" = (.*) ;$', cpp(probe, "-P"), re.MULTILINE):
        name = m.group(3).lower() if m.group(2) == "FEATURE" else "bug_" + m.group(3).lower()
        numbers[name] = evaluate(m.group(4))
    assert len(numbers) == len(macros)
    _GCC_CACHE[key] = numbers
    return numbers


def test_evaluator() -> None:
    assert evaluate("( 7*32+11)") == 235
    assert evaluate("(22*32 + (1*32 + 2))") == 22 * 32 + 34
    assert evaluate("-(3 - 5) * 2") == 4


@pytest.mark.kernel
def test_feature_numbers_match_the_tree(kernel: Kernel) -> None:
    header = kernel.build.cpufeatures_h
    table = load_cpufeatures(header)
    gcc64 = gcc_feature_numbers(header)
    gcc32 = gcc_feature_numbers(header, "-DCONFIG_X86_32")
    assert len(gcc64) > 300
    for name, number in gcc64.items():
        assert table.number(name) == number, name
    # names only a 32-bit configuration defines may appear, with their numbers
    for name in set(table.numbers) - set(gcc64):
        assert gcc32.get(name) == table.numbers[name], name
    assert table.number("pti") == gcc64["pti"]
    assert dict(kernel.loaded.features.numbers) == dict(table.numbers)


@pytest.mark.kernel
def test_builtin_feature_table_agrees_with_both_trees(both: dict[str, Kernel]) -> None:
    builtin = builtin_table()
    for k in both.values():
        numbers = gcc_feature_numbers(k.build.cpufeatures_h)
        for name, number in builtin.numbers.items():
            assert numbers[name] == number, (k.series, name)


@pytest.mark.kernel
def test_unknown_feature_is_input_error(kernel: Kernel) -> None:
    for table in (kernel.loaded.features, builtin_table()):
        with pytest.raises(InputError) as info:
            FeatureSet.parse("pti,no_such_feature").validate(table)
        assert "\n" not in str(info.value) and "no_such_feature" in str(info.value)
    with pytest.raises(InputError) as info:
        kernel.loaded.image(FeatureSet.parse("pcid,no_such_feature"))
    assert "\n" not in str(info.value) and "no_such_feature" in str(info.value)


# --------------------------------------------------------------------------- relocation recipes

RECIPE_TYPES = {
    "R_X86_64_64": relocs.R_X86_64_64,
    "R_X86_64_32": relocs.R_X86_64_32,
    "R_X86_64_32S": relocs.R_X86_64_32S,
    "R_X86_64_PC32": relocs.R_X86_64_PC32,
    "R_X86_64_PLT32": relocs.R_X86_64_PLT32,
}


def expected_field(name: str, s: int, a: int, p: int) -> tuple[int, bool]:
    """(value, fits) as the x86-64 psABI defines the relocation, in 64-bit arithmetic."""
    value = (s + a - p if name in PC_RELATIVE else s + a) & MASK64
    if name == "R_X86_64_64":
        return value, True
    if name == "R_X86_64_32":
        return value, value < 1 << 32
    signed = value - (1 << 64) if value >> 63 else value
    return signed, -(1 << 31) <= signed < 1 << 31


def _near(point: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=-3, max_value=3).map(lambda d: point + d)


ADDRESSES = st.one_of(st.integers(0, MASK64), st.sampled_from([0, 0xFFFFFFFF81000000, 0x2000, 0xFFFFFFFF83000000]))
VALUES = st.one_of(
    st.integers(-(1 << 64), 1 << 64),
    *(_near(b) for b in (0, 1 << 31, -(1 << 31), 1 << 32, -(1 << 32), 1 << 63, -(1 << 63), 1 << 64)),
)


@pytest.mark.parametrize("name", sorted(RECIPE_TYPES))
@settings(max_examples=150, deadline=None)
@given(s=ADDRESSES, value=VALUES, p=ADDRESSES)
def test_recipe_round_trip_or_truncation(name: str, s: int, value: int, p: int) -> None:
    # choose A so that the value to store is ``value`` (plus a multiple of 2^64): this
    # reaches both sides of every range boundary
    a = value - s + (p if name in PC_RELATIVE else 0)
    rtype = RECIPE_TYPES[name]
    want, fits = expected_field(name, s, a, p)
    if fits:
        field = relocs.encode(rtype, s, a, p, symbol="sym", where="obj.o: .entry.text+0x10")
        assert len(field) == FIELD_WIDTH[name]
        assert relocs.decode(rtype, field) == want
        assert relocs.recipe(rtype).name == name
    else:
        with pytest.raises(InputError) as info:
            relocs.encode(rtype, s, a, p, symbol="sym", where="obj.o: .entry.text+0x10")
        msg = str(info.value)
        assert "relocation truncated to fit" in msg and name in msg and "`sym'" in msg
        assert msg.startswith("obj.o: .entry.text+0x10") and "\n" not in msg


@given(field=st.binary(min_size=8, max_size=8))
@example(field=b"\xff" * 8)
def test_recipe_decode_then_encode(field: bytes) -> None:
    for name, rtype in RECIPE_TYPES.items():
        width = FIELD_WIDTH[name]
        value = relocs.decode(rtype, field)
        p = 0xFFFFFFFF81001234 if name in PC_RELATIVE else 0
        assert relocs.encode(rtype, value + p, 0, p, symbol="s", where="w") == field[:width]


def test_unsupported_relocation_type() -> None:
    with pytest.raises(InputError) as info:
        relocs.encode(42, 0, 0, 0, symbol="s", where="w")
    assert "unsupported relocation type 42" in str(info.value)


# --------------------------------------------------------------------------- disasm


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrycheck.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.kernel
def test_disasm_listing(kernel612: KernelBuild) -> None:
    obj = str(kernel612.object_path)
    text = run_cli("disasm", obj, "paranoid_exit", "--features", "pti,pcid")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any("[alt +pti]" in ln for ln in lines)
    assert any("cpu_tlbstate" in ln for ln in lines)
    assert any("<restore_regs_and_return_to_kernel>" in ln for ln in lines)
    assert any(re.search(r"<paranoid_exit\+0x[0-9a-f]+>", ln) for ln in lines)
    start = [s for s in dump_symbols(kernel612.object_path) if s.name == "paranoid_exit"][0]
    mask = [r for r in dump_relocs(kernel612.object_path) if r.section == ".entry.text"
            and r.symbol == "cpu_tlbstate" and start.value <= r.offset < start.value + start.size]
    assert mask
    for r in mask:
        assert any(ln.split() == [r.type, f"cpu_tlbstate+{r.addend:#x}"] for ln in lines)

    js = run_cli("disasm", obj, "paranoid_exit", "--features", "pti,pcid", "--json", "-")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    insns = doc["instructions"]
    assert doc["symbol"] == "paranoid_exit" and doc["features"] == ["pti", "pcid"]
    assert any(i["alternative"] == "+pti" for i in insns)
    assert any(i["relocation"] and "cpu_tlbstate" in i["relocation"] for i in insns)
    assert any("<restore_regs_and_return_to_kernel>" in i["text"] for i in insns)
    # the listing covers paranoid_exit exactly, as objdump's symbol table sizes it
    sym = [s for s in dump_symbols(kernel612.object_path) if s.name == "paranoid_exit"][0]
    first, last = int(insns[0]["address"], 16), int(insns[-1]["address"], 16)
    assert last + len(bytes.fromhex(insns[-1]["bytes"])) - first == sym.size
    assert insns[0]["at"] == "paranoid_exit"


@pytest.mark.kernel
def test_disasm_unknown_symbol(kernel612: KernelBuild) -> None:
    res = run_cli("disasm", str(kernel612.object_path), "no_such_function")
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "no_such_function" in res.stderr
    assert "Traceback" not in res.stderr
