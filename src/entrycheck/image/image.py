"""ELF relocatable -> Image: sections at kernel addresses, symbols, relocations, alternatives.

``load()`` does the feature-independent work once (layout, symbol resolution,
relocation); ``LoadedObject.image(features)`` patches alternatives for one feature
set and returns an ``Image``, which is what the machine runs and disasm prints.
The loader's output does not depend on the emulator.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from entrycheck.errors import InputError
from entrycheck.image import layout, relocs
from entrycheck.image.alternatives import AltEntry, AltSite, PcRelField, parse_entries, patch
from entrycheck.image.features import FeatureSet, FeatureTable, builtin_table, load_cpufeatures
from entrycheck.image.jumplabels import JumpLabel, apply as set_jump_labels
from entrycheck.image.layout import Perm, Region
from entrycheck.image.noinstr import NoinstrLink, Plan, plan
from entrycheck.image.objfile import SHN_ABS, ObjectFile, load_object
from entrycheck.image.symbols import PTI_USER_PERCPU, PERCPU_FIXED, Resolution, SymbolClass, resolve

CODE_SECTIONS = (".text", ".entry.text", ".noinstr.text")   # .noinstr.text: entry_64_fred.o
REPLACEMENT = ".altinstr_replacement"


@dataclass(frozen=True)
class PlacedSection:
    index: int
    name: str
    address: int
    size: int
    perm: Perm

    @property
    def executable(self) -> bool:
        return Perm.X in self.perm


@dataclass(frozen=True)
class RelocSite:
    """One applied relocation: where its field is and what it resolved to."""

    section: str
    address: int          # address of the field
    offset: int           # offset of the field within its section
    rtype: int
    symbol: str           # the symbol named (section name for section symbols)
    addend: int
    target: int           # S + A

    @property
    def type_name(self) -> str:
        return relocs.recipe(self.rtype).name


@dataclass(frozen=True)
class LoadedObject:
    """A relocated object: everything that does not depend on the feature set."""

    obj: ObjectFile
    features: FeatureTable
    sections: tuple[PlacedSection, ...]
    contents: Mapping[str, bytes]            # section name -> relocated bytes
    symbols: Mapping[str, int]               # defined symbols -> address
    symbol_sizes: Mapping[str, int]
    resolution: Resolution                   # undefined symbols
    relocations: tuple[RelocSite, ...]
    alternatives: tuple[AltEntry, ...]
    offsets: Mapping[str, int] = field(default_factory=dict)   # asm-offsets (may be empty)
    code_sections: tuple[str, ...] = CODE_SECTIONS   # the sections that run
    percpu_data: tuple[tuple[int, bytes], ...] = ()  # the object's own per-cpu data: (per-cpu offset, bytes)
    noinstr: NoinstrLink | None = None               # linked with the noinstr C it reaches (image/noinstr.py)
    jump_labels: tuple[JumpLabel, ...] = ()          # the C's static branches, as a booted kernel set them

    @property
    def noinstr_c(self) -> bool:
        return self.noinstr is not None

    @property
    def path(self) -> Path:
        return self.obj.path

    def section(self, name: str) -> PlacedSection | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def image(self, features: FeatureSet) -> "Image":
        features.validate(self.features)
        enabled = frozenset([self.features.number(n) for n in features.names]
                            + ([self.features.numbers["always"]] if "always" in self.features.numbers else []))
        code = {}
        for s in self.sections:
            if s.name in self.code_sections or (self.obj.sections[s.index].executable and s.name != REPLACEMENT):
                code[s.name] = (s.address, self.contents[s.name])
        repl = self.section(REPLACEMENT)
        replacement = (repl.address, self.contents[REPLACEMENT]) if repl else (0, b"")
        pcrel = tuple(PcRelField(r.address, r.rtype, r.target, r.symbol) for r in self.relocations
                      if r.section == REPLACEMENT and relocs.recipe(r.rtype).pc_relative)
        patched, sites = patch(code, replacement, self.alternatives, pcrel, enabled,
                               self.features.name_of, str(self.path))
        contents = dict(self.contents)
        contents.update({k: bytes(v) for k, v in patched.items()})
        return Image(self, features, MappingProxyType(contents), sites)


@dataclass(frozen=True)
class Image:
    """The code that really runs for one feature set, with its address maps."""

    loaded: LoadedObject
    features: FeatureSet
    contents: Mapping[str, bytes]
    alt_sites: tuple[AltSite, ...]

    # ---- memory -------------------------------------------------------------------
    def regions(self) -> tuple[Region, ...]:
        """The object's allocatable sections as memory regions (page-rounded)."""
        out = []
        for s in self.loaded.sections:
            out.append(Region(s.name, s.address, layout.page_up(max(s.size, 1)), s.perm,
                              user_mapped=s.name == ".entry.text", data=self.contents[s.name]))
        return tuple(out)

    def read(self, address: int, size: int) -> bytes:
        for s in self.loaded.sections:
            if s.address <= address < s.address + s.size:
                off = address - s.address
                return self.contents[s.name][off:off + size]
        raise KeyError(f"{address:#x} is not in the image")

    def bug_at(self, address: int) -> str | None:
        """What the kernel's BUG()/WARN() table (``__bug_table``: struct bug_entry with relative
        pointers, 12 bytes with CONFIG_DEBUG_BUGVERBOSE's file and line) says of the ``ud2`` at
        ``address``: "BUG at FILE:LINE" or "WARN at FILE:LINE", or None."""
        table = self.__dict__.get("_bugs")
        if table is None:
            table = self.__dict__["_bugs"] = {}
            sec = self.loaded.section("__bug_table")
            data = self.contents.get("__bug_table", b"") if sec is not None else b""
            if sec is not None and data and len(data) % 12 == 0:
                for off in range(0, len(data), 12):
                    at = sec.address + off
                    disp, file_disp = (int.from_bytes(data[off + k:off + k + 4], "little", signed=True) for k in (0, 4))
                    line, flags = (int.from_bytes(data[off + k:off + k + 2], "little") for k in (8, 10))
                    try:
                        raw = self.read(at + 4 + file_disp, 256)
                    except KeyError:
                        continue
                    name = raw.split(b"\0", 1)[0].decode(errors="replace")
                    table[at + disp] = f"{'WARN' if flags & 1 else 'BUG'} at {name}:{line}"
        return table.get(address)

    def code_section(self, address: int) -> PlacedSection | None:
        for s in self.loaded.sections:
            if s.name in self.loaded.code_sections and s.address <= address < s.address + s.size:
                return s
        return None

    def pti_user_ranges(self) -> tuple[tuple[int, int, str], ...]:
        """Virtual ranges the PTI user page tables map: (start, end, why)."""
        out = []
        entry = self.loaded.section(".entry.text")
        if entry:
            out.append((entry.address, entry.address + layout.page_up(entry.size), ".entry.text"))
        res = self.loaded.resolution
        sizes = {n: size for n, _, size in PERCPU_FIXED}
        for name in PTI_USER_PERCPU:
            if name in res.percpu:
                start = layout.PERCPU_BASE + layout.page_down(res.percpu[name])
                end = layout.PERCPU_BASE + layout.page_up(res.percpu[name] + sizes.get(name, 8))
                out.append((start, end, f"per-cpu {name}"))
        for name, cls in sorted(res.classes.items()):
            if cls is SymbolClass.ENTRY_DATA:
                addr = res.data[name]
                out.append((layout.page_down(addr), layout.page_up(addr + res.data_sizes[name]),
                            f"{name} (kept in .entry.text)"))
        return tuple(out)

    # ---- symbols ------------------------------------------------------------------
    @cached_property
    def _sorted_symbols(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        items = sorted(self._symbol_map.items(), key=lambda kv: (kv[1], kv[0]))
        return tuple(a for _, a in items), tuple(n for n, _ in items)

    def all_symbols(self) -> dict[str, int]:
        """Every named address: object symbols, stubs, model data, per-cpu (at the per-cpu base)."""
        out = dict(self.loaded.symbols)
        out["kernel_code"] = layout.KERNEL_TEXT_BASE     # the code exceptions interrupt (not in the object)
        res = self.loaded.resolution
        out.update(res.functions)
        out.update(res.data)
        out.update({n: layout.PERCPU_BASE + off for n, off in res.percpu.items()})
        return out

    @cached_property
    def _symbol_map(self) -> dict[str, int]:
        return self.all_symbols()

    def address_of(self, name: str) -> int:
        sym = self._symbol_map
        if name in sym:
            return sym[name]
        raise InputError(f"unknown symbol {name!r} in {self.loaded.path}")

    @cached_property
    def _symbolized(self) -> dict[int, str]:
        return {}

    def symbolize(self, address: int) -> str:
        """'sym+0xoff' for the nearest preceding symbol, or a hex address."""
        got = self._symbolized.get(address)
        if got is None:
            got = self._symbolized[address] = self._symbolize(address)
        return got

    def _symbolize(self, address: int) -> str:
        addrs, names = self._sorted_symbols
        k = bisect.bisect_right(addrs, address) - 1
        if k < 0 or address - addrs[k] > 0x100000:
            return f"{address:#x}"
        # Prefer, among symbols at the same address, a global (non-dot) name.
        base = addrs[k]
        same = [names[j] for j in range(k, -1, -1) if addrs[j] == base]
        name = sorted(same, key=lambda n: (n.startswith("."), n.startswith("__"), n))[0]
        off = address - base
        return f"{name}+{off:#x}" if off else name

    def symbolize_percpu(self, offset: int) -> str:
        """'cpu_tlbstate+0x16 (per-cpu)' for a zero-based per-cpu offset."""
        best = None
        for name, off in self.loaded.resolution.percpu.items():
            if off <= offset and (best is None or off > best[1]):
                best = (name, off)
        if best is None:
            return f"per-cpu {offset:#x}"
        delta = offset - best[1]
        return f"{best[0]}+{delta:#x} (per-cpu)" if delta else f"{best[0]} (per-cpu)"

    @cached_property
    def instructions(self):
        """This image's instructions, decoded once (image/insns.py)."""
        from entrycheck.image.insns import Instructions

        return Instructions(self)

    def instruction_text(self, address: int) -> str:
        """One instruction's AT&T text, '(C) name' for a C function's stub, '?' elsewhere."""
        for name, addr in self.loaded.resolution.functions.items():
            if addr == address:
                return f"(C) {name}"
        return self.instructions.text(address) or "?"

    def parse_location(self, text: str) -> int:
        """'sym+0x12' / 'sym' / '0xffff...' -> address."""
        text = text.strip()
        if text.lower().startswith("0x"):
            try:
                return int(text, 16)
            except ValueError:
                raise InputError(f"bad address {text!r}") from None
        name, _, off = text.partition("+")
        try:
            offset = int(off, 0) if off else 0
        except ValueError:
            raise InputError(f"bad offset in {text!r}: expected SYM+0xOFF") from None
        return self.address_of(name) + offset

    def symbol_range(self, name: str) -> tuple[int, int]:
        """[start, end) of a code symbol: its size, else up to the next symbol."""
        start = self.address_of(name)
        size = self.loaded.symbol_sizes.get(name, 0)
        if size:
            return start, start + size
        addrs, _ = self._sorted_symbols
        k = bisect.bisect_right(addrs, start)
        sec = self.code_section(start)
        limit = sec.address + sec.size if sec else start + 0x40
        while k < len(addrs) and addrs[k] <= start:
            k += 1
        end = min(addrs[k], limit) if k < len(addrs) else limit
        return start, max(end, start + 1)

    def relocation_in(self, address: int, size: int) -> RelocSite | None:
        """The relocation whose field lies inside the running code's [address, address+size)."""
        for a in range(address, address + size):
            r = self._running_relocs.get(a)
            if r is not None:
                return r
        return None

    @cached_property
    def _running_relocs(self) -> dict[int, RelocSite]:
        """Field address -> relocation, for the code as patched (replacement fields moved)."""
        entries = {e.index: e for e in self.loaded.alternatives}
        out = {}
        covered = []
        for site in self.alt_sites:
            if site.applied is not None:
                covered.append((site.address, site.address + site.length, entries[site.applied]))
        for r in self.loaded.relocations:
            if r.section in CODE_SECTIONS and not any(a <= r.address < b for a, b, _ in covered):
                out[r.address] = r
        for a, _, e in covered:
            for r in self.loaded.relocations:
                if r.section == REPLACEMENT and e.repl <= r.address < e.repl + e.replen:
                    moved = a + (r.address - e.repl)
                    out[moved] = RelocSite(r.section, moved, r.offset, r.rtype, r.symbol, r.addend, r.target)
        return out


# ---------------------------------------------------------------------------------------
def load(path: Path, *, cpufeatures: Path | None = None, asm_offsets: Path | None = None,
         noinstr: NoinstrLink | None = None) -> LoadedObject:
    """Load, lay out and relocate an entry_64.o (with ``noinstr``: linked with the noinstr C it
    reaches, image/noinstr.py); feature numbers from ``cpufeatures``."""
    obj = load_object(path)
    table = load_cpufeatures(cpufeatures) if cpufeatures else builtin_table()
    offsets = parse_asm_offsets(asm_offsets) if asm_offsets else {}
    return relocate(obj, table, offsets, noinstr)


def parse_asm_offsets(path: Path) -> dict[str, int]:
    """``#define NAME VALUE`` lines of include/generated/asm-offsets.h."""
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read asm-offsets.h ({exc.strerror})") from exc
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define":
            try:
                out[parts[1]] = int(parts[2], 0)
            except ValueError:
                continue
    return out


def _layout(obj: ObjectFile, c: Plan | None = None) -> tuple[PlacedSection, ...]:
    """Where each allocatable section goes: code first, then read-only, then writable data.  With
    noinstr C (``c``), its per-cpu sections are left out (they are per-cpu data) and the code that
    does not run is mapped without execute permission."""
    alloc = [s for s in obj.sections if s.alloc and s.size and (c is None or s.index not in c.percpu)]

    def rank(s) -> int:
        if s.executable:
            return 0
        return 2 if s.writable else 1

    placed = []
    cursor = layout.IMAGE_BASE
    for s in sorted(alloc, key=lambda s: (rank(s), s.index)):
        cursor = layout.page_up(cursor)
        runs = s.executable and (c is None or s.index not in c.boundary_sections)
        perm = Perm.R | (Perm.X if runs else Perm(0)) | (Perm.W if s.writable else Perm(0))
        placed.append(PlacedSection(s.index, s.name, cursor, s.size, perm))
        cursor += s.size
    if cursor > layout.KERNEL_TEXT_BASE:
        raise InputError(f"{obj.path}: its sections take {cursor - layout.IMAGE_BASE:,} bytes of memory, more than "
                         f"the {(layout.KERNEL_TEXT_BASE - layout.IMAGE_BASE) >> 20} MiB an entry object is given")
    return tuple(placed)


def relocate(obj: ObjectFile, table: FeatureTable, offsets: Mapping[str, int],
             noinstr: NoinstrLink | None = None) -> LoadedObject:
    where = str(obj.path)
    c = plan(obj, noinstr.stubbed) if noinstr is not None else None
    placed = _layout(obj, c)
    by_index = {p.index: p for p in placed}
    percpu_defined: dict[str, int] = {}
    if c is not None:
        for sym in obj.symbols:
            if sym.name and not sym.undefined and sym.section in c.percpu and sym.kind != "STT_SECTION":
                percpu_defined.setdefault(sym.name, c.percpu[sym.section] + sym.value)
        resolution = resolve(obj, c.boundary_functions, noinstr.percpu_names, percpu_defined, noinstr.aliases,
                             data_stride=layout.PAGE)
    else:
        resolution = resolve(obj)
    boundary_starts = _boundary_starts(obj, c) if c is not None else {}

    symbols: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for sym in obj.symbols:
        if not sym.name or sym.undefined or sym.kind in ("STT_SECTION", "STT_FILE"):
            continue
        if sym.section == SHN_ABS:
            continue
        p = by_index.get(sym.section)
        if p is None:
            continue
        symbols.setdefault(sym.name, p.address + sym.value)
        sizes.setdefault(sym.name, sym.size)

    def sym_address(index: int, addend: int = 0, pc_relative: bool = False) -> int:
        sym = obj.symbols[index]
        if sym.undefined:
            if not sym.name:
                return 0
            return resolution.address(sym.name)
        if sym.section == SHN_ABS:
            return sym.value
        if c is not None:
            if sym.section in c.percpu:
                return c.percpu[sym.section] + sym.value
            if sym.section in c.boundary_sections:
                if sym.kind == "STT_SECTION" and pc_relative:
                    # A call into instrumented code through its section symbol (a static function):
                    # the stub of the function that starts where the call goes (target = S + A + 4).
                    name = boundary_starts.get((sym.section, sym.value + addend + 4))
                    if name is not None:
                        return resolution.functions[name] - addend - 4
                elif sym.name in c.boundary_functions:
                    return resolution.functions[sym.name]
            elif sym.name in noinstr.stubbed and sym.name in c.boundary_functions:
                return resolution.functions[sym.name]
        p = by_index.get(sym.section)
        if p is None:
            raise InputError(f"{where}: relocation against {sym.name or 'a section'} in a section "
                             "that is not loaded")
        return p.address + sym.value

    contents: dict[str, bytes] = {}
    sites: list[RelocSite] = []
    percpu_data: list[tuple[int, bytes]] = []
    targets = [(p.index, p.name, p.address) for p in placed]
    if c is not None:
        targets += [(k, obj.sections[k].name, off) for k, off in sorted(c.percpu.items())]
    for index, name_, base in targets:
        sec = obj.sections[index]
        data = bytearray(sec.data if sec.kind != "NOBITS" else bytes(sec.size))
        for rel in obj.relocations.get(index, ()):
            if rel.type == relocs.R_X86_64_NONE:      # objtool's: a jump label it made a NOP
                continue
            try:
                rec = relocs.recipe(rel.type)
            except InputError as exc:
                raise InputError(f"{where}: {sec.name}+{rel.offset:#x}: {exc}") from None
            if rel.offset + rec.size > len(data):
                raise InputError(f"{where}: relocation at {sec.name}+{rel.offset:#x} runs past the section end")
            s_ = sym_address(rel.symbol, rel.addend, rec.pc_relative)
            field_addr = base + rel.offset
            name = obj.symbol_name(rel)
            data[rel.offset:rel.offset + rec.size] = relocs.encode(
                rel.type, s_, rel.addend, field_addr, symbol=name, where=f"{where}: {sec.name}+{rel.offset:#x}")
            sites.append(RelocSite(sec.name, field_addr, rel.offset, rel.type, name, rel.addend, s_ + rel.addend))
        if c is not None and index in c.percpu:
            percpu_data.append((base, bytes(data)))
        else:
            contents[name_] = bytes(data)

    labels: tuple[JumpLabel, ...] = ()
    if c is not None:
        code = {k: bytearray(v) for k, v in contents.items()}
        labels = set_jump_labels(code, placed, sites, dict(noinstr.keys), where)
        contents = {k: bytes(v) for k, v in code.items()}
    alt = next((p for p in placed if p.name == ".altinstructions"), None)
    alternatives: tuple[AltEntry, ...] = ()
    if alt is not None:
        alt_offsets = [r.offset for r in obj.relocations.get(alt.index, ())]
        alternatives = parse_entries(contents[".altinstructions"], alt.address, alt_offsets, where)
    return LoadedObject(obj, table, placed, MappingProxyType(contents), MappingProxyType(symbols),
                        MappingProxyType(sizes), resolution, tuple(sites), alternatives,
                        MappingProxyType(dict(offsets)), c.runnable if c is not None else CODE_SECTIONS,
                        tuple(percpu_data), noinstr, labels)


def _boundary_starts(obj: ObjectFile, c: Plan) -> dict[tuple[int, int], str]:
    """(section, offset) -> the function of instrumented code that starts there."""
    return {(s.section, s.value): s.name for s in obj.symbols
            if s.name in c.boundary_functions and s.section in c.boundary_sections and s.kind == "STT_FUNC"}
