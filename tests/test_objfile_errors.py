"""Unusable objects: every way a file can fail to be an entry_64.o is one InputError line that
names the path, and on the command line exit code 2 with one line on stderr."""

from __future__ import annotations

import re

import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from entrycheck.errors import InputError
from entrycheck.image import LoadedObject, load
from entrycheck.kernel.targets import KernelBuild

ASM = Path(__file__).parent / "asm"
ELF_CLASS = 4                 # e_ident[EI_CLASS]
ELF_MACHINE = 18              # e_machine (u16)
ELF_TYPE = 16                 # e_type (u16)
EM_ARM = 0x28
ET_EXEC = 2
R_X86_64_REX_GOTPCRELX = 42   # a real x86-64 relocation entrycheck does not apply


def assemble(source: Path, out: Path, *flags: str) -> Path:
    subprocess.run(["as", *flags, "-o", str(out), str(source)], check=True, capture_output=True)
    return out


# --------------------------------------------------------------------------- a small ELF reader


def section_headers(raw: bytes) -> dict[str, int]:
    """Section name -> file offset of its header (ELF64 little-endian)."""
    shoff, = struct.unpack_from("<Q", raw, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)
    strtab, = struct.unpack_from("<Q", raw, shoff + shstrndx * shentsize + 0x18)
    out = {}
    for i in range(shnum):
        header = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", raw, header)
        start = strtab + name_off
        out[raw[start:raw.index(b"\0", start)].decode()] = header
    return out


def patched(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


# --------------------------------------------------------------------------- the cases

Maker = Callable[[bytes, Path], bytes | Path]


def _unknown_reloc(raw: bytes, _: Path) -> bytes:
    rela = section_headers(raw)[".rela.entry.text"]
    first, = struct.unpack_from("<Q", raw, rela + 0x18)            # sh_offset
    info, = struct.unpack_from("<Q", raw, first + 8)                # r_info = sym << 32 | type
    return patched(raw, first + 8, "<Q", (info & ~0xFFFFFFFF) | R_X86_64_REX_GOTPCRELX)


def _section_past_eof(raw: bytes, _: Path) -> bytes:
    return patched(raw, section_headers(raw)[".entry.text"] + 0x18, "<Q", 1 << 62)


def _symtab_not_a_symtab(raw: bytes, _: Path) -> bytes:
    return patched(raw, section_headers(raw)[".symtab"] + 4, "<I", 1)          # SHT_PROGBITS


def _huge_name_offset(raw: bytes, _: Path) -> bytes:
    return patched(raw, section_headers(raw)[".entry.text"], "<I", 0xFFFFFFF0)


def _no_section_headers(raw: bytes, _: Path) -> bytes:
    return patched(raw, 0x28, "<Q", len(raw) + 0x1000)


# name -> maker(bytes of the real 6.1 object, scratch directory): new bytes or a path
REAL_CASES: dict[str, Maker] = {
    **{f"truncated-{n}": (lambda n: lambda raw, _: raw[:n])(n) for n in (0, 3, 4, 16, 63, 64, 65, 1000)},
    "truncated-half": lambda raw, _: raw[:len(raw) // 2],
    "truncated-minus-64": lambda raw, _: raw[:-64],
    "truncated-minus-1": lambda raw, _: raw[:-1],
    "class-32": lambda raw, _: patched(raw, ELF_CLASS, "<B", 1),
    "class-invalid": lambda raw, _: patched(raw, ELF_CLASS, "<B", 3),
    "machine-arm": lambda raw, _: patched(raw, ELF_MACHINE, "<H", EM_ARM),
    "type-exec": lambda raw, _: patched(raw, ELF_TYPE, "<H", ET_EXEC),
    "big-endian": lambda raw, _: patched(raw, 5, "<B", 2),
    "unsupported-relocation": _unknown_reloc,
    "section-past-eof": _section_past_eof,
    "symtab-not-a-symtab": _symtab_not_a_symtab,
    "huge-section-name-offset": _huge_name_offset,
    "no-section-headers": _no_section_headers,
}

def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


TINY_CASES: dict[str, Maker] = {
    "not-elf-text": lambda _, d: _file(d / "text.o", b"this is not an object\n"),
    "not-elf-zeros": lambda _, d: _file(d / "zeros.o", bytes(4096)),
    "elf-magic-only": lambda _, d: _file(d / "magic.o", b"\x7fELF"),
    "object-32bit": lambda _, d: assemble(ASM / "tiny_entry.S", d / "tiny32.o", "--32"),
    "no-entry-text": lambda _, d: assemble(ASM / "no_entry_text.S", d / "no_entry.o", "--64"),
    "directory": lambda _, d: _directory(d / "a-directory"),
    "missing": lambda _, d: d / "does-not-exist.o",
    "truncated-tiny": lambda _, d: _file(
        d / "tt.o", assemble(ASM / "tiny_entry.S", d / "full.o", "--64").read_bytes()[:300]),
}


def materialize(name: str, maker: Maker, raw: bytes, directory: Path) -> Path:
    scratch = directory / name
    scratch.mkdir(parents=True, exist_ok=True)
    made = maker(raw, scratch)
    if isinstance(made, Path):
        return made
    path = scratch / "entry_64.o"
    path.write_bytes(made)
    return path


@pytest.fixture(scope="module")
def real_cases(kernel61: KernelBuild, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    raw = kernel61.object_path.read_bytes()
    directory = tmp_path_factory.mktemp("corrupt-61")
    return {name: materialize(name, maker, raw, directory) for name, maker in REAL_CASES.items()}


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("corrupt-tiny")
    return {name: materialize(name, maker, b"", directory) for name, maker in TINY_CASES.items()}


def assert_one_line_naming(exc: InputError, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message and message.strip() == message and message
    assert str(path) in message, message


# --------------------------------------------------------------------------- load()


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_load_rejects_corrupt_kernel_object(real_cases: dict[str, Path], name: str) -> None:
    path = real_cases[name]
    with pytest.raises(InputError) as info:
        load(path)
    assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_load_rejects_unusable_file(tiny_cases: dict[str, Path], name: str) -> None:
    path = tiny_cases[name]
    with pytest.raises(InputError) as info:
        load(path)
    assert_one_line_naming(info.value, path)


def test_specific_reasons(tiny_cases: dict[str, Path]) -> None:
    reasons = {
        "missing": "no such file",
        "directory": "not a regular file",
        "not-elf-text": "not an ELF object",
        "object-32bit": "not an x86-64 object",
        "no-entry-text": "no .entry.text",
    }
    for name, words in reasons.items():
        with pytest.raises(InputError, match=words):
            load(tiny_cases[name])


@pytest.mark.kernel
def test_specific_kernel_reasons(real_cases: dict[str, Path]) -> None:
    reasons = {
        "machine-arm": "not an x86-64 object",
        "class-32": "not an x86-64 object",
        "type-exec": "not a relocatable object",
        "unsupported-relocation": f"unsupported relocation type {R_X86_64_REX_GOTPCRELX}",
        "symtab-not-a-symtab": "no symbol table",
        "section-past-eof": "past the end of the file",
    }
    for name, words in reasons.items():
        with pytest.raises(InputError, match=words):
            load(real_cases[name])


@pytest.mark.kernel
def test_a_section_of_an_unknown_type_is_refused_not_taken_by_its_name(kernel61: KernelBuild, tmp_path: Path) -> None:
    """Code, data or relocations of a type the loader does not know are refused with one line:
    taken by name, a relocation section of another type would lose its relocations (the code
    would run unrelocated) and code or data would be read with unknown semantics."""
    raw = kernel61.object_path.read_bytes()
    headers = section_headers(raw)
    for name in (".data", ".entry.text", ".rela.entry.text"):
        path = tmp_path / f"{name.strip('.')}.o"
        with pytest.raises(InputError, match=rf"section {re.escape(name)} has a type this loader does not know "
                                             r"\(0x6fff4321\)"):
            load_path(patched(raw, headers[name] + 4, "<I", 0x6FFF4321), path)
    # A section nothing reads (not allocated, not relocations) may be of any type.
    other = tmp_path / "discard.o"
    assert _load_or_input_error(patched(raw, headers[".discard.unwind_hints"] + 4, "<I", 0x6FFF4321), other) == "loaded"


def load_path(data: bytes, path: Path):
    path.write_bytes(data)
    return load(path)


def test_tiny_object_loads(tmp_path: Path) -> None:
    """The control: the same source assembled for x86-64 is accepted."""
    obj = assemble(ASM / "tiny_entry.S", tmp_path / "tiny.o", "--64")
    lo = load(obj)
    assert isinstance(lo, LoadedObject)
    assert lo.section(".entry.text").size > 0
    assert "tiny_helper" in lo.resolution.functions


def _mutations(raw: bytes, count: int, seed: int) -> list[bytes]:
    """Random byte changes in the ELF header, the section headers and the relocations."""
    rnd = random.Random(seed)
    headers = section_headers(raw)
    shoff, = struct.unpack_from("<Q", raw, 0x28)
    hot = [range(0, 64), range(shoff, len(raw))]
    for name, at in headers.items():
        if name.startswith((".rela", ".symtab")):
            off, size = struct.unpack_from("<QQ", raw, at + 0x18)
            hot.append(range(off, min(off + size, len(raw))))
    out = []
    for _ in range(count):
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            data[rnd.choice(rnd.choice(hot))] = rnd.randrange(256)
        out.append(bytes(data))
    return out


def _load_or_input_error(data: bytes, path: Path) -> str:
    path.write_bytes(data)
    try:
        load(path)
    except InputError as exc:
        assert_one_line_naming(exc, path)
        return "rejected"
    return "loaded"


def test_random_corruption_of_tiny_object(tmp_path: Path) -> None:
    raw = assemble(ASM / "tiny_entry.S", tmp_path / "tiny.o", "--64").read_bytes()
    outcomes = {_load_or_input_error(data, tmp_path / "mutant.o") for data in _mutations(raw, 400, 2024)}
    assert "rejected" in outcomes


@pytest.mark.kernel
def test_random_corruption_of_kernel_object(kernel61: KernelBuild, tmp_path: Path) -> None:
    raw = kernel61.object_path.read_bytes()
    outcomes = {_load_or_input_error(data, tmp_path / "entry_64.o") for data in _mutations(raw, 30, 61)}
    assert "rejected" in outcomes


# --------------------------------------------------------------------------- relocation overflow


@pytest.mark.parametrize("value", [0x7FFFFFFF, 0x80000000, -0x80000000, -0x80000001, 0x90000000, 0x1000])
def test_32s_relocation_that_cannot_fit(tmp_path: Path, value: int) -> None:
    obj = assemble(ASM / "reloc_overflow.S", tmp_path / "overflow.o", "--64", "--defsym", f"FAR_VALUE={value}")
    # the linker is the oracle for what fits
    linked = subprocess.run(["ld", "-o", str(tmp_path / "linked"), "-e", "tiny_entry", str(obj)],
                            capture_output=True, text=True, check=False)
    ld_says_truncated = "relocation truncated to fit" in linked.stderr
    assert ld_says_truncated == (not -(1 << 31) <= value < (1 << 31))
    if ld_says_truncated:
        with pytest.raises(InputError) as info:
            load(obj)
        assert_one_line_naming(info.value, obj)
        assert "relocation truncated to fit" in str(info.value) and "R_X86_64_32S" in str(info.value)
        assert "far_away" in str(info.value)
    else:
        lo = load(obj)
        (site,) = [r for r in lo.relocations if r.symbol == "far_away"]
        field = lo.contents[".entry.text"][site.offset:site.offset + 4]
        assert int.from_bytes(field, "little", signed=True) == value


# --------------------------------------------------------------------------- the command line


def run_disasm(path: Path, *, script: bool = False) -> subprocess.CompletedProcess[str]:
    if script and shutil.which("entrycheck"):
        cmd = ["entrycheck", "disasm", str(path), "paranoid_exit"]
    else:
        cmd = [sys.executable, "-m", "entrycheck.cli", "disasm", str(path), "paranoid_exit"]
    env = {k: v for k, v in os.environ.items() if k != "ENTRYCHECK_DEBUG"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)


def run_all(cases: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    names = sorted(cases)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = pool.map(lambda n: run_disasm(cases[n], script=n.startswith("truncated-1")), names)
        return dict(zip(names, results))


def assert_cli_rejects(name: str, path: Path, res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 2, (name, res.returncode, res.stderr)
    assert res.stdout == "", name
    lines = res.stderr.splitlines()
    assert len(lines) == 1, (name, res.stderr)
    assert "Traceback" not in res.stderr
    assert str(path) in lines[0], (name, lines[0])


# the command line sees a representative subset (each run starts a Python)
REAL_CLI_CASES = ("truncated-0", "truncated-16", "truncated-64", "truncated-half", "truncated-minus-1", "class-32",
                  "class-invalid", "machine-arm", "type-exec", "unsupported-relocation", "section-past-eof")


@pytest.fixture(scope="module")
def real_cli(real_cases: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_all({name: real_cases[name] for name in REAL_CLI_CASES})


@pytest.fixture(scope="module")
def tiny_cli(tiny_cases: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_all(tiny_cases)


@pytest.mark.kernel
@pytest.mark.parametrize("name", REAL_CLI_CASES)
def test_cli_rejects_corrupt_kernel_object(real_cases: dict[str, Path], real_cli, name: str) -> None:
    assert_cli_rejects(name, real_cases[name], real_cli[name])


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_cli_rejects_unusable_file(tiny_cases: dict[str, Path], tiny_cli, name: str) -> None:
    assert_cli_rejects(name, tiny_cases[name], tiny_cli[name])


def test_cli_relocation_overflow(tmp_path: Path) -> None:
    obj = assemble(ASM / "reloc_overflow.S", tmp_path / "overflow.o", "--64", "--defsym", "FAR_VALUE=0x90000000")
    res = run_disasm(obj, script=True)
    assert_cli_rejects("overflow", obj, res)
    assert "relocation truncated to fit" in res.stderr
