"""Mutating ELF objects: a real object read once while intact (ElfSeed), and one to three
mutations of its headers, symbols, relocations, alternatives or code (mutate_elf)."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
SHT_RELA = 4
# section header fields: (offset, struct format)
SH_FIELDS = {"sh_name": (0, "<I"), "sh_type": (4, "<I"), "sh_flags": (8, "<Q"), "sh_addr": (16, "<Q"),
             "sh_offset": (24, "<Q"), "sh_size": (32, "<Q"), "sh_link": (40, "<I"), "sh_info": (44, "<I"),
             "sh_addralign": (48, "<Q"), "sh_entsize": (56, "<Q")}
ST_FIELDS = {"st_name": (0, "<I"), "st_info": (4, "<B"), "st_other": (5, "<B"), "st_shndx": (6, "<H"),
             "st_value": (8, "<Q"), "st_size": (16, "<Q")}
R_FIELDS = {"r_offset": (0, "<Q"), "r_info": (8, "<Q"), "r_addend": (16, "<Q")}
EH_FIELDS = {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_version": (20, "<I"), "e_entry": (24, "<Q"),
             "e_phoff": (32, "<Q"), "e_shoff": (40, "<Q"), "e_flags": (48, "<I"), "e_ehsize": (52, "<H"),
             "e_phentsize": (54, "<H"), "e_phnum": (56, "<H"), "e_shentsize": (58, "<H"), "e_shnum": (60, "<H"),
             "e_shstrndx": (62, "<H")}


@dataclass(frozen=True)
class ElfSection:
    index: int
    name: str
    header: int          # file offset of its section header
    type: int
    offset: int
    size: int
    entsize: int


@dataclass(frozen=True)
class ElfSymbol:
    index: int
    name: str
    at: int              # file offset of its symbol table entry
    kind: int            # STT_*
    shndx: int
    value: int
    size: int


@dataclass(frozen=True)
class ElfSeed:
    """A real object to mutate, read once while it is intact (ELF64 little-endian)."""

    name: str
    path: Path
    raw: bytes
    sections: tuple[ElfSection, ...]
    symbols: tuple[ElfSymbol, ...]
    weight: float = 1.0

    @cached_property
    def functions(self) -> list[str]:
        return [s.name for s in self.symbols if s.name and s.kind in (0, 2) and s.shndx not in (SHN_UNDEF, SHN_ABS)
                and self.section(s.shndx) is not None and self.section(s.shndx).name.endswith("text")]

    @cached_property
    def data_symbols(self) -> list[str]:
        functions = set(self.functions)
        return [s.name for s in self.symbols if s.name and s.name not in functions and s.kind != 4]

    def section(self, index: int) -> ElfSection | None:
        return self.sections[index] if 0 <= index < len(self.sections) else None

    def by_name(self, name: str) -> ElfSection | None:
        return next((s for s in self.sections if s.name == name), None)

    @property
    def has_syscall(self) -> bool:
        return "entry_SYSCALL_64" in self.functions

    @classmethod
    def read(cls, name: str, path: Path, weight: float = 1.0) -> "ElfSeed":
        raw = path.read_bytes()
        shoff, = struct.unpack_from("<Q", raw, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)

        def header(i: int) -> tuple:
            return struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize)

        strtab_off = header(shstrndx)[4]

        def cstr(at: int) -> str:
            return raw[at:raw.index(b"\0", at)].decode("utf-8", "replace")

        sections = []
        for i in range(shnum):
            h = header(i)
            sections.append(ElfSection(i, cstr(strtab_off + h[0]), shoff + i * shentsize, h[1], h[4], h[5], h[9]))
        symbols: list[ElfSymbol] = []
        symtab = next((s for s in sections if s.type == 2), None)
        if symtab is not None:
            names_off = sections[header(symtab.index)[6]].offset
            for k in range(symtab.size // 24):
                at = symtab.offset + 24 * k
                st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", raw, at)
                symbols.append(ElfSymbol(k, cstr(names_off + st_name), at, st_info & 0xF, st_shndx, st_value,
                                         st_size))
        return cls(name, path, raw, tuple(sections), tuple(symbols), weight)


def _interesting(rnd: random.Random, fmt: str, original: int, file_size: int) -> int:
    bits = struct.calcsize(fmt) * 8
    mask = (1 << bits) - 1
    choices = [0, 1, 2, 7, 8, 16, 24, 64, 0x1000, original + 1, original - 1, original * 2, original + 8,
               original ^ (1 << rnd.randrange(bits)), file_size, file_size - 1, file_size + 1,
               1 << 40, 1 << 62, mask, 1 << (bits - 1), (1 << (bits - 1)) - 1, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0xFFFF, 0xFF00, rnd.getrandbits(bits), rnd.randrange(max(2, file_size))]
    return rnd.choice(choices) & mask


def _put(data: bytearray, at: int, fmt: str, value: int) -> bool:
    size = struct.calcsize(fmt)
    if at < 0 or at + size > len(data):
        return False
    struct.pack_into(fmt, data, at, value & ((1 << (8 * size)) - 1))
    return True


def _get(data: bytes, at: int, fmt: str) -> int:
    if at < 0 or at + struct.calcsize(fmt) > len(data):
        return 0
    return struct.unpack_from(fmt, data, at)[0]


def _rela_sections(seed: ElfSeed) -> list[ElfSection]:
    return [s for s in seed.sections if s.type == SHT_RELA and s.size >= 24]


def _weighted_section(rnd: random.Random, seed: ElfSeed) -> ElfSection:
    hot = [s for s in seed.sections if s.name in (".entry.text", ".symtab", ".strtab", ".shstrtab",
                                                   ".altinstructions", ".altinstr_replacement")
           or s.name.startswith(".rela.entry") or s.name.startswith(".rela.altinstr")]
    return rnd.choice(hot) if hot and rnd.random() < 0.7 else rnd.choice(seed.sections)


def mutate_elf(rnd: random.Random, seed: ElfSeed) -> tuple[bytes, list[str], str | None]:
    """One to three mutations of ``seed``: the bytes, what was done, and the name of a symbol
    an edit touched (None if no symbol was edited)."""
    data = bytearray(seed.raw)
    size = len(data)
    notes: list[str] = []
    touched: str | None = None
    ops = ["sh_field"] * 5 + ["symbol"] * 4 + ["reloc"] * 4 + ["alt"] * 3 + ["ehdr_field"] * 2 + \
          ["ehdr_flip"] * 2 + ["truncate"] * 3 + ["code"] + ["anywhere"]
    chosen = [rnd.choice(ops) for _ in range(rnd.choice((1, 1, 1, 2, 2, 3)))]
    truncate = "truncate" in chosen
    for op in [c for c in chosen if c != "truncate"]:
        if op == "sh_field":
            sec = _weighted_section(rnd, seed)
            fname = rnd.choice(list(SH_FIELDS))
            off, fmt = SH_FIELDS[fname]
            old = _get(data, sec.header + off, fmt)
            if fname == "sh_type":
                value = rnd.choice([0, 1, 2, 3, 4, 8, 9, 11, 0x6FFF4321, 0x70000001, 0xFFFFFFFF, rnd.getrandbits(32)])
            elif fname in ("sh_link", "sh_info"):
                value = rnd.choice([0, 1, len(seed.sections) - 1, len(seed.sections), len(seed.sections) + 1,
                                    old + 1, 0xFFFF, 0xFFFFFFFF, rnd.getrandbits(32)])
            elif fname == "sh_entsize":
                value = rnd.choice([0, 1, 12, 23, 25, 48, 1 << 40, 0xFFFFFFFFFFFFFFFF, rnd.getrandbits(64)])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, sec.header + off, fmt, value)
            notes.append(f"{sec.name or '#' + str(sec.index)}.{fname}={value:#x}")
        elif op == "symbol" and seed.symbols:
            sym = rnd.choice(seed.symbols[1:] or seed.symbols)
            fname = rnd.choice(list(ST_FIELDS))
            off, fmt = ST_FIELDS[fname]
            old = _get(data, sym.at + off, fmt)
            if fname == "st_shndx":
                value = rnd.choice([SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX, 0xFF00, len(seed.sections),
                                    len(seed.sections) + 3, rnd.randrange(len(seed.sections)), rnd.getrandbits(16)])
            elif fname == "st_info":
                value = rnd.choice([(b << 4) | t for b in (0, 1, 2, 10, 15) for t in (0, 1, 2, 3, 4, 6, 10, 15)]
                                   + [rnd.getrandbits(8)])
            elif fname == "st_value":
                sec = seed.section(sym.shndx)
                ssize = sec.size if sec else 0
                value = rnd.choice([0, ssize, ssize + 1, ssize - 1, old + 1, old + 0x10000, 1 << 40,
                                    (1 << 64) - 1, 1 << 63, -old, rnd.getrandbits(64), rnd.getrandbits(20)])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, sym.at + off, fmt, value)
            touched = sym.name or touched
            notes.append(f"symbol {sym.name or '#' + str(sym.index)}.{fname}={value & 0xFFFFFFFFFFFFFFFF:#x}")
        elif op == "reloc" and _rela_sections(seed):
            sec = rnd.choice(_rela_sections(seed))
            target = seed.section(_get(seed.raw, sec.header + 44, "<I"))
            k = rnd.randrange(sec.size // 24)
            at = sec.offset + 24 * k
            fname = rnd.choice(list(R_FIELDS))
            off, fmt = R_FIELDS[fname]
            old = _get(data, at + off, fmt)
            if fname == "r_offset":
                tsize = target.size if target else 0
                value = rnd.choice([tsize, tsize - 1, tsize - 2, tsize - 3, tsize + 100, 1 << 40, (1 << 64) - 1,
                                    old + 1, rnd.randrange(max(1, tsize))])
            elif fname == "r_info":
                sym, rtype = old >> 32, old & 0xFFFFFFFF
                nsyms = len(seed.symbols)
                if rnd.random() < 0.5:
                    sym = rnd.choice([0, nsyms - 1, nsyms, nsyms + 1, 0xFFFFFFFF, rnd.randrange(max(1, nsyms))])
                else:
                    rtype = rnd.choice([0, 1, 2, 3, 4, 9, 10, 11, 24, 41, 42, 43, 50, 0xFF, 0xFFFFFFFF,
                                        rnd.getrandbits(32)])
                value = (sym << 32) | rtype
            else:
                value = rnd.choice([0, 1, -1, -4, 1 << 31, -(1 << 31) - 1, 1 << 40, -(1 << 63), (1 << 63) - 1,
                                    old + 1, old - 1, rnd.getrandbits(64)])
            _put(data, at + off, fmt, value)
            notes.append(f"{sec.name}[{k}].{fname}={value & 0xFFFFFFFFFFFFFFFF:#x}")
        elif op == "alt":
            secs = [s for s in seed.sections if s.name in (".altinstructions", ".altinstr_replacement") and s.size]
            if not secs:
                continue
            sec = rnd.choice(secs)
            for _ in range(rnd.randint(1, 4)):
                at = sec.offset + rnd.randrange(sec.size)
                value = rnd.choice([0, 0xFF, 0x7F, 0x80, 1, 2, 5, 0x90, 0xCC, 0xE8, 0xE9, 0xEB, 0x0F,
                                    rnd.getrandbits(8)])
                if at < size:
                    data[at] = value
                    notes.append(f"{sec.name}+{at - sec.offset:#x}={value:#04x}")
        elif op == "ehdr_field":
            fname = rnd.choice(["e_shoff", "e_shnum", "e_shstrndx", "e_shentsize", "e_shnum", "e_shstrndx",
                                "e_shoff", "e_ehsize", "e_phoff", "e_phnum", "e_type", "e_machine"])
            off, fmt = EH_FIELDS[fname]
            old = _get(data, off, fmt)
            if fname == "e_shnum":
                value = rnd.choice([0, 1, old - 1, old + 1, old * 2, 0xFF00, 0xFFFF])
            elif fname == "e_shstrndx":
                value = rnd.choice([0, 1, old - 1, old + 1, len(seed.sections), SHN_XINDEX, 0xFF00,
                                    rnd.randrange(len(seed.sections))])
            elif fname == "e_shentsize":
                value = rnd.choice([0, 1, 32, 63, 65, 128, 0xFFFF])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, off, fmt, value)
            notes.append(f"{fname}={value:#x}")
        elif op == "ehdr_flip":
            for _ in range(rnd.randint(1, 4)):
                at = rnd.randrange(64)
                data[at] = rnd.getrandbits(8)
                notes.append(f"ehdr[{at}]={data[at]:#04x}")
        elif op == "code":
            sec = seed.by_name(".entry.text")
            if sec is None or not sec.size:
                continue
            for _ in range(rnd.randint(1, 6)):
                at = sec.offset + rnd.randrange(sec.size)
                data[at] = rnd.choice([0x0F, 0xCC, 0xC3, 0xE8, 0xE9, 0xEB, 0xFF, 0x00, 0x90, 0xCF, 0x48, 0x65,
                                       rnd.getrandbits(8)])
                notes.append(f".entry.text+{at - sec.offset:#x}={data[at]:#04x}")
        elif op == "anywhere":
            for _ in range(rnd.randint(1, 8)):
                at = rnd.randrange(size)
                data[at] = rnd.getrandbits(8)
            notes.append("random bytes")
    if truncate:
        length = rnd.choice([rnd.randrange(size), rnd.randrange(min(size, 128)), size - rnd.randint(1, 64),
                             rnd.randrange(size // 2, size)])
        length = max(0, min(size - 1, length))
        del data[length:]
        notes.append(f"truncated to {length} of {size} bytes")
    return bytes(data), notes, touched
