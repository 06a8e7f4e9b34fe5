"""Read an x86-64 relocatable ELF object (entry_64.o) into plain frozen data.

Parsing is kept apart from layout and presentation: this module only turns the
file into sections, symbols and relocations, with pyelftools doing the ELF work.
Every way a file can be unusable (missing, not ELF, not x86-64, not relocatable,
truncated, corrupt) becomes one ``InputError`` line.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from entrycheck.errors import InputError

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHN_UNDEF = 0
SHN_ABS = 0xFFF1


class SymbolBinding(enum.Enum):
    LOCAL = "STB_LOCAL"
    GLOBAL = "STB_GLOBAL"
    WEAK = "STB_WEAK"


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    kind: str          # "PROGBITS", "NOBITS", "RELA", ...
    flags: int
    align: int
    size: int
    data: bytes        # empty for NOBITS

    @property
    def alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def writable(self) -> bool:
        return bool(self.flags & SHF_WRITE)


@dataclass(frozen=True)
class Symbol:
    index: int
    name: str
    value: int
    size: int
    kind: str          # "STT_FUNC", "STT_NOTYPE", "STT_SECTION", ...
    binding: SymbolBinding
    section: int       # section index; SHN_UNDEF for undefined, SHN_ABS for absolute

    @property
    def undefined(self) -> bool:
        return self.section == SHN_UNDEF


@dataclass(frozen=True)
class Relocation:
    offset: int        # within the section it applies to
    type: int          # R_X86_64_* number
    symbol: int        # index into ObjectFile.symbols
    addend: int


@dataclass(frozen=True)
class ObjectFile:
    path: Path
    sections: tuple[Section, ...]
    symbols: tuple[Symbol, ...]
    relocations: Mapping[int, tuple[Relocation, ...]]   # target section index -> relocations

    def section(self, name: str) -> Section | None:
        for sec in self.sections:
            if sec.name == name:
                return sec
        return None

    def symbol_name(self, rel: Relocation) -> str:
        sym = self.symbols[rel.symbol]
        if sym.kind == "STT_SECTION":
            return self.sections[sym.section].name
        return sym.name


MAX_FILE = 256 << 20        # entry_64.o with DWARF is about 1 MiB
MAX_SECTION = 64 << 20      # memory a section may ask for (its pages are mapped and snapshotted)
SHF_ALLOC = 0x2


def load_object(path: Path, *, entry_text: bool = True) -> ObjectFile:
    """Parse ``path`` as an x86-64 relocatable object; InputError if it is not one (or, with
    ``entry_text``, if it has no .entry.text: entry_64_fred.o keeps its code in .noinstr.text)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (expected an entry_64.o)")
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise InputError(f"{path}: {size:,} bytes, larger than any entry object ({MAX_FILE >> 20} MiB at most)")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if raw[:4] != b"\x7fELF":
        raise InputError(f"{path}: not an ELF object (expected an entry_64.o built for x86-64)")
    try:
        return _parse(path, raw, entry_text)
    except InputError:
        raise
    except (ELFError, ValueError, KeyError, IndexError, AssertionError, OSError, EOFError, OverflowError,
            zlib.error) as exc:
        raise InputError(f"{path}: corrupt or truncated ELF object ({_reason(exc)}); rebuild it") from exc
    except Exception as exc:  # pyelftools raises construct/struct errors on truncation
        if type(exc).__module__.split(".")[0] in {"construct", "struct", "elftools"} or isinstance(exc, EOFError):
            raise InputError(f"{path}: corrupt or truncated ELF object ({_reason(exc)}); rebuild it") from exc
        raise


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]


def _parse(path: Path, raw: bytes, entry_text: bool = True) -> ObjectFile:
    import io

    elf = ELFFile(io.BytesIO(raw))
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
        raise InputError(f"{path}: not an x86-64 object (machine {elf['e_machine']}, ELF{elf.elfclass})")
    if elf["e_type"] != "ET_REL":
        raise InputError(f"{path}: not a relocatable object ({elf['e_type']}); pass arch/x86/entry/entry_64.o")

    sections: list[Section] = []
    for idx, sec in enumerate(elf.iter_sections()):
        sh_type = sec["sh_type"]
        kind = sh_type.replace("SHT_", "") if isinstance(sh_type, str) else f"{sh_type:#x}"
        if not isinstance(sh_type, str) and (sec["sh_flags"] & SHF_ALLOC or sec.name.startswith(".rel")):
            # Its contents would be taken for code, data or relocations by its name alone (a
            # relocation section of another type is not read as one: its relocations would be lost).
            raise InputError(f"{path}: section {sec.name} has a type this loader does not know ({sh_type:#x})")
        size = sec["sh_size"]
        if size > MAX_SECTION and sec["sh_flags"] & SHF_ALLOC:
            raise InputError(f"{path}: section {sec.name} claims {size:,} bytes of memory; an entry object's "
                             f"sections are far smaller ({MAX_SECTION >> 20} MiB at most)")
        if kind == "NOBITS":
            data = b""
        else:
            if sec["sh_offset"] + size > len(raw):
                raise InputError(f"{path}: section {sec.name} runs past the end of the file "
                                 f"({sec['sh_offset'] + size:#x} > {len(raw):#x} bytes)")
            data = sec.data()
            if len(data) != size:
                raise InputError(f"{path}: section {sec.name} is truncated ({len(data)} of {size} bytes)")
        sections.append(Section(idx, sec.name, kind, sec["sh_flags"], max(1, sec["sh_addralign"]), size, data))

    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise InputError(f"{path}: object has no symbol table")
    symbols: list[Symbol] = []
    for idx, sym in enumerate(symtab.iter_symbols()):
        shndx = sym["st_shndx"]
        if shndx == "SHN_UNDEF":
            shndx = SHN_UNDEF
        elif shndx == "SHN_ABS":
            shndx = SHN_ABS
        elif not isinstance(shndx, int):
            shndx = SHN_ABS
        elif shndx >= len(sections):
            raise InputError(f"{path}: symbol {sym.name!r} refers to section {shndx}, which does not exist")
        if sym["st_info"]["type"] == "STT_SECTION" and shndx in (SHN_UNDEF, SHN_ABS):
            raise InputError(f"{path}: section symbol #{idx} names no section")
        binding = SymbolBinding(sym["st_info"]["bind"]) if sym["st_info"]["bind"] in {
            b.value for b in SymbolBinding} else SymbolBinding.LOCAL
        symbols.append(Symbol(idx, sym.name, sym["st_value"], sym["st_size"], sym["st_info"]["type"],
                              binding, shndx))

    relocations: dict[int, tuple[Relocation, ...]] = {}
    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection):
            continue
        if not sec.is_RELA():
            raise InputError(f"{path}: {sec.name} uses REL relocations; x86-64 objects use RELA")
        target = sec["sh_info"]
        if target >= len(sections):
            raise InputError(f"{path}: {sec.name} applies to a section that does not exist")
        rels = []
        for rel in sec.iter_relocations():
            sym_index = rel["r_info_sym"]
            if sym_index >= len(symbols):
                raise InputError(f"{path}: {sec.name} names symbol {sym_index}, which does not exist")
            offset = rel["r_offset"]
            if offset > sections[target].size:
                raise InputError(f"{path}: {sec.name} has a relocation outside its section")
            rels.append(Relocation(offset, rel["r_info_type"], sym_index, rel["r_addend"]))
        relocations[target] = tuple(rels)

    obj = ObjectFile(path, tuple(sections), tuple(symbols), MappingProxyType(relocations))
    entry = obj.section(".entry.text")
    if entry_text and (entry is None or entry.size == 0):
        raise InputError(f"{path}: has no .entry.text section; it is not the kernel's entry_64.o")
    return obj
