"""Alternatives: parsing .altinstructions and patching sites, on a hand-written object and
on every site of the Debian 6.1 and 6.12 entry_64.o for all 16 model feature sets."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import capstone

from decoding import decode_exact
import pytest
from capstone import x86_const as X
from elftools.elf.elffile import ELFFile

from entrycheck.image import FeatureSet, LoadedObject, load, load_build
from entrycheck.image.features import all_model_feature_sets
from entrycheck.kernel.targets import KernelBuild

ASM = Path(__file__).parent / "asm"
MASK64 = (1 << 64) - 1
SERIES = ("6.1", "6.12")
ENTRY_SIZE = {"6.1": 12, "6.12": 14}      # .altinstructions entry layout of each series
ALT_NOT_61 = 0x8000                       # 6.1: inverted entries have bit 15 of cpuid set
ALT_FLAG_NOT_612 = 1                      # 6.12: ft_flags = cpuid | flags << 16




def is_nop(ins: capstone.CsInsn) -> bool:
    return ins.mnemonic.startswith("nop") or (ins.mnemonic.startswith("xchg") and ins.op_str == "%ax, %ax")


def branch_target(ins: capstone.CsInsn) -> int | None:
    if not (ins.group(capstone.CS_GRP_JUMP) or ins.group(capstone.CS_GRP_CALL)):
        return None
    imms = [op.imm for op in ins.operands if op.type == X.X86_OP_IMM]
    return imms[0] & MASK64 if imms else None


def rip_target(ins: capstone.CsInsn) -> int | None:
    for op in ins.operands:
        if op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP:
            return (ins.address + ins.size + op.mem.disp) & MASK64
    return None


def as64(source: Path, out: Path) -> Path:
    subprocess.run(["as", "--64", "-o", str(out), str(source)], check=True, capture_output=True)
    return out


def site_text(insns: list[capstone.CsInsn]) -> list[str]:
    return [f"{i.mnemonic} {i.op_str}".strip() for i in insns]


# --------------------------------------------------------------------------- shared properties


@dataclass(frozen=True)
class RawEntry:
    """One .altinstructions entry read with pyelftools and objdump, not with entrycheck."""

    site: int
    repl: int
    feature: int
    inverted: bool
    sitelen: int
    repllen: int


def raw_entries(lo: LoadedObject, stride: int) -> list[RawEntry]:
    path = lo.path
    with path.open("rb") as f:
        data = ELFFile(f).get_section_by_name(".altinstructions").data()
    dump = subprocess.run(["objdump", "-r", "-w", "-j", ".altinstructions", str(path)],
                          capture_output=True, text=True, check=True).stdout
    fields: dict[int, int] = {}
    for line in dump.splitlines():
        m = re.match(r"^([0-9a-f]{16})\s+R_X86_64_PC32\s+([^+\s-]+)([+-]0x[0-9a-f]+)?$", line)
        if m:
            # a PC32 field "target - ." resolves to S + A wherever the section lands
            fields[int(m.group(1), 16)] = lo.section(m.group(2)).address + (int(m.group(3), 16) if m.group(3) else 0)
    assert len(data) % stride == 0
    out = []
    for off in range(0, len(data), stride):
        ft = int.from_bytes(data[off + 8:off + stride - 2], "little")
        if stride == 12:
            feature, inverted = ft & ~ALT_NOT_61, bool(ft & ALT_NOT_61)
        else:
            feature, inverted = ft & 0xFFFF, bool((ft >> 16) & ALT_FLAG_NOT_612)
        out.append(RawEntry(fields[off], fields[off + 4], feature, inverted, data[off + stride - 2],
                            data[off + stride - 1]))
    assert len(fields) == 2 * len(out)
    return out


def replacement_fields(lo: LoadedObject) -> frozenset[int]:
    """Addresses of the relocated fields in .altinstr_replacement, as objdump lists them."""
    dump = subprocess.run(["objdump", "-r", "-w", "-j", ".altinstr_replacement", str(lo.path)],
                          capture_output=True, text=True, check=True).stdout
    base = lo.section(".altinstr_replacement").address
    return frozenset(base + int(m.group(1), 16) for m in re.finditer(r"^([0-9a-f]{16}) ", dump, re.MULTILINE))


def check_image(lo: LoadedObject, entries: list[RawEntry], repl_fields: frozenset[int],
                features: FeatureSet) -> None:
    """Every site of ``lo`` patched for ``features`` is what the kernel's apply_alternatives makes."""
    image = lo.image(features)
    enabled = {lo.features.number(n) for n in features.names} | {lo.features.number("always")}
    repl_sec = lo.section(".altinstr_replacement")
    replacement = lo.contents[".altinstr_replacement"]

    # consecutive entries for one address form one site
    groups: list[list[int]] = []
    for k, e in enumerate(entries):
        if groups and entries[groups[-1][0]].site == e.site:
            groups[-1].append(k)
        else:
            groups.append([k])
    assert [s.entries for s in image.alt_sites] == [tuple(g) for g in groups]

    covered: set[int] = set()
    for site, group in zip(image.alt_sites, groups):
        assert site.address == entries[group[0]].site
        assert site.length == max(entries[k].sitelen for k in group)
        # the last entry whose condition holds wins
        want = None
        for k in group:
            if (entries[k].feature in enabled) != entries[k].inverted:
                want = k
        assert site.applied == want, site

        patched = decode_exact(image.read(site.address, site.length), site.address)
        assert patched[-1].address + patched[-1].size == site.address + site.length
        sec = image.code_section(site.address)
        covered.update(range(site.address, site.address + site.length))
        if want is None:
            original = lo.contents[sec.name][site.address - sec.address:site.address - sec.address + site.length]
            now = image.read(site.address, site.length)
            kept = decode_exact(original, site.address)
            assert site.decided_by == ",".join(("+" if entries[k].inverted else "-") + lo.features.name_of(
                entries[k].feature) for k in group)
            for ins in kept:
                span = slice(ins.address - site.address, ins.address - site.address + ins.size)
                if not is_nop(ins):
                    assert now[span] == original[span], (site, ins.mnemonic)
            for ins in patched:
                span = slice(ins.address - site.address, ins.address - site.address + ins.size)
                if now[span] != original[span]:
                    assert is_nop(ins), (site, ins.mnemonic)
            continue

        e = entries[want]
        assert site.decided_by == ("!" if e.inverted else "+") + lo.features.name_of(e.feature)
        r0 = e.repl - repl_sec.address
        before = decode_exact(replacement[r0:r0 + e.repllen], e.repl) if e.repllen else []
        at = {i.address - site.address: i for i in patched}
        for ins in before:
            new = at.get(ins.address - e.repl)
            assert new is not None and new.size == ins.size, (site, ins.mnemonic)
            relocated = any(ins.address <= a < ins.address + ins.size for a in repl_fields)
            if not relocated or (branch_target(ins) is None and rip_target(ins) is None):
                # resolved by the assembler (moves with the replacement) or absolute: copied as is
                assert bytes(new.bytes) == bytes(ins.bytes), (site, ins.mnemonic, ins.op_str)
            elif branch_target(ins) is not None:
                # re-targeted: the same absolute target as in .altinstr_replacement
                assert new.mnemonic == ins.mnemonic
                assert branch_target(new) == branch_target(ins), (site, ins.mnemonic, ins.op_str)
            else:
                assert new.mnemonic == ins.mnemonic
                assert rip_target(new) == rip_target(ins), (site, ins.mnemonic, ins.op_str)
        for ins in patched:
            if ins.address - site.address >= e.repllen:
                assert is_nop(ins), (site, ins.mnemonic)

    # nothing outside the sites changes
    for s in lo.sections:
        if s.name in (".text", ".entry.text"):
            now = image.contents[s.name]
            orig = lo.contents[s.name]
            diff = {s.address + k for k in range(len(orig)) if now[k] != orig[k]}
            assert diff <= covered, sorted(hex(a) for a in diff - covered)[:5]


# --------------------------------------------------------------------------- hand-written object


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedObject:
    obj = as64(ASM / "alternatives.S", tmp_path_factory.mktemp("alt") / "alternatives.o")
    return load(obj)


def demo_site(demo: LoadedObject, features: str, label: str):
    image = demo.image(FeatureSet.parse(features))
    sym = subprocess.run(["objdump", "-t", str(demo.path)], capture_output=True, text=True, check=True).stdout
    value = int(re.search(rf"^([0-9a-f]{{16}}) .*\.entry\.text\t[0-9a-f]+ {label}$", sym, re.MULTILINE).group(1), 16)
    address = demo.section(".entry.text").address + value
    (site,) = [s for s in image.alt_sites if s.address == address]
    return image, site, decode_exact(image.read(site.address, site.length), site.address)


def test_demo_entries_parse(demo: LoadedObject) -> None:
    raw = raw_entries(demo, 12)
    assert len(demo.alternatives) == len(raw) == 4
    for e, r in zip(demo.alternatives, raw):
        assert (e.instr, e.repl, e.feature, e.inverted, e.instrlen, e.replen) == (
            r.site, r.repl, r.feature, r.inverted, r.sitelen, r.repllen)


@pytest.mark.parametrize("features", ["none", "pti", "pcid", "pti,pcid", "xenpv", "pti,xenpv"])
def test_demo_patching_properties(demo: LoadedObject, features: str) -> None:
    check_image(demo, raw_entries(demo, 12), replacement_fields(demo), FeatureSet.parse(features))


def test_demo_original_kept_with_merged_nops(demo: LoadedObject) -> None:
    image, site, insns = demo_site(demo, "none", "site_a")
    assert site.applied is None and site.decided_by == "-pti,-pcid"
    assert insns[0].mnemonic.startswith("jmp")
    assert branch_target(insns[0]) == image.address_of("after_a")
    # 18 one-byte NOPs become the kernel's longest NOPs (at most 8 bytes each): 8 + 8 + 2
    assert [i.size for i in insns[1:]] == [8, 8, 2] and all(is_nop(i) for i in insns[1:])


def test_demo_replacement_is_retargeted(demo: LoadedObject) -> None:
    image, site, insns = demo_site(demo, "pti", "site_a")
    assert site.decided_by == "+pti" and site.applied == 0
    call, jmp, mov, *pad = insns
    assert call.mnemonic.startswith("call") and branch_target(call) == image.address_of("ext_function")
    assert jmp.mnemonic.startswith("jmp") and branch_target(jmp) == image.address_of("target_in_entry")
    assert mov.mnemonic.startswith("mov") and rip_target(mov) == image.address_of("ext_data")
    assert all(is_nop(i) for i in pad) and sum(i.size for i in pad) == 3
    # the running-code relocation map follows the moved fields
    assert image.relocation_in(call.address, call.size).symbol == "ext_function"
    assert image.relocation_in(mov.address, mov.size).symbol == "ext_data"


def test_demo_later_entry_wins(demo: LoadedObject) -> None:
    image, site, insns = demo_site(demo, "pti,pcid", "site_a")
    assert site.applied == 1 and site.decided_by == "+pcid"
    assert site_text(insns[:1]) == ["movl $1, %eax"]
    # the jump inside the replacement still lands just after itself
    assert branch_target(insns[1]) == insns[1].address + insns[1].size
    assert all(is_nop(i) for i in insns[2:])


def test_demo_inverted_entry(demo: LoadedObject) -> None:
    _, site, insns = demo_site(demo, "none", "site_c")
    assert site.applied == 2 and site.decided_by == "!xenpv"
    assert insns[0].mnemonic == "lfence" and all(is_nop(i) for i in insns[1:])
    _, site, insns = demo_site(demo, "xenpv", "site_c")
    assert site.applied is None and site.decided_by == "+xenpv"
    assert insns[0].mnemonic == "ud2" and all(is_nop(i) for i in insns[1:])


def test_demo_empty_replacement_nops_the_site(demo: LoadedObject) -> None:
    image, site, insns = demo_site(demo, "pti", "site_d")
    assert site.applied == 3 and all(is_nop(i) for i in insns)
    image, site, insns = demo_site(demo, "none", "site_d")
    assert site.applied is None
    assert site_text(insns)[0].startswith("jmp") and branch_target(insns[0]) == image.address_of("target_in_entry")


# --------------------------------------------------------------------------- the Debian kernels


@dataclass
class Kernel:
    series: str
    build: KernelBuild
    loaded: LoadedObject
    entries: list[RawEntry]
    repl_fields: frozenset[int]


@pytest.fixture(scope="module", params=SERIES, ids=[f"debian-{s}" for s in SERIES])
def kernel(request: pytest.FixtureRequest) -> Kernel:
    build = request.getfixturevalue({"6.1": "kernel61", "6.12": "kernel612"}[request.param])
    lo = load_build(build)
    return Kernel(request.param, build, lo, raw_entries(lo, ENTRY_SIZE[request.param]), replacement_fields(lo))


@pytest.mark.kernel
def test_entry_count_and_fields(kernel: Kernel) -> None:
    lo = kernel.loaded
    dump = subprocess.run(["objdump", "-h", "-w", str(kernel.build.object_path)], capture_output=True, text=True,
                          check=True).stdout
    size = int(re.search(r"^\s*\d+\s+\.altinstructions\s+([0-9a-f]+)\s", dump, re.MULTILINE).group(1), 16)
    assert size % ENTRY_SIZE[kernel.series] == 0
    assert len(lo.alternatives) == size // ENTRY_SIZE[kernel.series] == len(kernel.entries)
    for e, r in zip(lo.alternatives, kernel.entries):
        assert (e.instr, e.repl, e.feature, e.inverted, e.instrlen, e.replen) == (
            r.site, r.repl, r.feature, r.inverted, r.sitelen, r.repllen)


@pytest.mark.kernel
@pytest.mark.parametrize("features", all_model_feature_sets(), ids=str)
def test_every_site_for_every_feature_set(kernel: Kernel, features: FeatureSet) -> None:
    check_image(kernel.loaded, kernel.entries, kernel.repl_fields, features)


def test_all_model_feature_sets() -> None:
    sets = all_model_feature_sets()
    assert len(sets) == 16 == len(set(sets))
    assert {frozenset(s.names) for s in sets} == {
        frozenset(n for bit, n in enumerate(("pti", "pcid", "fsgsbase", "kernel_ibrs")) if mask >> bit & 1)
        for mask in range(16)}
