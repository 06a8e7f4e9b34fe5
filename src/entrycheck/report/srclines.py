"""Addresses -> source lines (``arch/x86/entry/entry_64.S:LINE``) from DWARF line info.

entry_64.o is a relocatable object: the addresses in its line program are
offsets into .entry.text, .text or .altinstr_replacement, made absolute by
relocations in .rela.debug_line (``R_X86_64_64 .entry.text + 0``).  pyelftools
could apply those, but it would resolve each section symbol to 0 and every
sequence would start at 0, whatever its section.  So the relocations are applied
here, against the sections' addresses in our layout (``LoadedObject.section``),
to a private copy of the file's bytes, and pyelftools reads that copy unrelocated.

The assembler attributes a macro's expansion to the line that invokes it
(``RESTORE_CR3 scratch_reg=%rax save_reg=%r14``), which is what a reader of a
trace wants.  Objects without DWARF line info simply have no lines.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from entrycheck.image.image import LoadedObject
    from entrycheck.kernel.targets import KernelBuild

R_X86_64_64 = 1
R_X86_64_32 = 10
R_X86_64_32S = 11
_SIZES = {R_X86_64_64: 8, R_X86_64_32: 4, R_X86_64_32S: 4}
_TOP_DIRS = ("arch", "include")


@dataclass(frozen=True)
class _Sequence:
    start: int
    end: int                  # first address past the sequence
    addresses: tuple[int, ...]
    rows: tuple[tuple[int, int], ...]   # (file index into SourceLines.files, line)


class SourceLines:
    """Where each address of the loaded object comes from in the source."""

    def __init__(self, sequences: list[_Sequence], files: list[str], paths: list[Path | None]) -> None:
        self._seqs = sorted(sequences, key=lambda s: s.start)
        self._starts = [s.start for s in self._seqs]
        self.files = files            # display names, relative to the source tree where possible
        self._paths = paths           # where each file's text can be read (None: not at hand)
        self._texts: dict[int, list[str] | None] = {}

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def empty(cls) -> SourceLines:
        return cls([], [], [])

    @classmethod
    def from_build(cls, build: KernelBuild, loaded: LoadedObject, cache: dict | None = None) -> SourceLines:
        """The lines of ``loaded`` (the object of ``build``); texts from ``build.source_tree``."""
        return cls.from_object(loaded, build.source_tree, cache)

    @classmethod
    def from_object(cls, loaded: LoadedObject, source_tree: Path | None = None,
                    cache: dict | None = None) -> SourceLines:
        """The lines of ``loaded``; ``cache`` (the caller's, keyed by the file's identity) keeps
        them for the next call."""
        path = Path(loaded.path)
        try:
            st = path.stat()
        except OSError:
            return cls.empty()
        key = (str(path), st.st_size, st.st_mtime_ns, str(source_tree) if source_tree else None,
               tuple((s.name, s.address) for s in loaded.sections))
        got = cache.get(key) if cache is not None else None
        if got is None:
            try:
                got = _parse(loaded, path.read_bytes(), source_tree)
            except Exception:  # noqa: BLE001 - line info is a nicety: a malformed table means no lines
                got = cls.empty()
            if cache is not None:
                if len(cache) > 16:
                    cache.clear()
                cache[key] = got
        return got

    # ---- queries --------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self._seqs)

    def line(self, address: int) -> tuple[str, int] | None:
        """(file, line) of the instruction at ``address``, or None."""
        for k in range(bisect.bisect_right(self._starts, address) - 1, -1, -1):
            seq = self._seqs[k]
            if seq.start <= address < seq.end:
                j = bisect.bisect_right(seq.addresses, address) - 1
                f, ln = seq.rows[j]
                return (self.files[f], ln) if ln > 0 else None
        return None

    def location(self, address: int) -> str | None:
        """'arch/x86/entry/entry_64.S:1234', or None."""
        got = self.line(address)
        return f"{got[0]}:{got[1]}" if got else None

    def text(self, address: int) -> str | None:
        """The source line's text (whitespace collapsed), when the source is at hand."""
        got = self.line(address)
        if got is None:
            return None
        index = self.files.index(got[0])
        lines = self._file_lines(index)
        if lines is None or not 0 < got[1] <= len(lines):
            return None
        return " ".join(lines[got[1] - 1].split())

    def _file_lines(self, index: int) -> list[str] | None:
        if index not in self._texts:
            path = self._paths[index]
            try:
                self._texts[index] = path.read_text(errors="replace").splitlines() if path else None
            except OSError:
                self._texts[index] = None
        return self._texts[index]


def _display_name(full: PurePosixPath, source_tree: Path | None) -> str:
    if source_tree is not None:
        for root in {str(source_tree), str(Path(source_tree).resolve())}:
            try:
                return str(full.relative_to(root))
            except ValueError:
                pass
    parts = full.parts
    for i, part in enumerate(parts):
        if i and part in _TOP_DIRS:
            return str(PurePosixPath(*parts[i:]))
    return str(full)


def _readable(full: PurePosixPath, name: str, source_tree: Path | None) -> Path | None:
    candidates = []
    if source_tree is not None and not PurePosixPath(name).is_absolute():
        candidates.append(Path(source_tree) / name)
    candidates.append(Path(str(full)))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _relocated_elf(loaded: LoadedObject, raw: bytes):
    """An ELFFile over a copy of ``raw`` whose .debug_* relocations are applied for our layout."""
    from elftools.elf.elffile import ELFFile

    obj = loaded.obj
    placed = {s.index: s.address for s in loaded.sections}
    elf = ELFFile(io.BytesIO(raw))
    data = bytearray(raw)
    for index, rels in obj.relocations.items():
        sec = obj.sections[index]
        if not sec.name.startswith(".debug"):
            continue
        base = elf.get_section(index)["sh_offset"]
        for rel in rels:
            size = _SIZES.get(rel.type)
            if size is None or rel.offset + size > sec.size:
                continue
            sym = obj.symbols[rel.symbol]
            value = placed.get(sym.section, 0) + (0 if sym.undefined else sym.value)
            value = (value + rel.addend) & ((1 << (8 * size)) - 1)
            data[base + rel.offset:base + rel.offset + size] = value.to_bytes(size, "little")
    return ELFFile(io.BytesIO(bytes(data)))


class _Files:
    """The file table of one line program, mapped to SourceLines' shared file list."""

    def __init__(self, lp, cu, source_tree: Path | None, files: list[str], paths: list[Path | None],
                 ids: dict[str, int]) -> None:
        self.lp, self.version = lp, lp.header["version"]
        self.dirs = [_decode(d) for d in lp["include_directory"]]
        comp = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
        self.comp_dir = self.dirs[0] if self.version >= 5 and self.dirs else (_decode(comp.value) if comp else "")
        self.source_tree, self.files, self.paths, self.ids = source_tree, files, paths, ids
        self.local: dict[int, int | None] = {}

    def id(self, number: int) -> int | None:
        if number not in self.local:
            self.local[number] = self._resolve(number)
        return self.local[number]

    def _resolve(self, number: int) -> int | None:
        entries = self.lp["file_entry"]
        k = number if self.version >= 5 else number - 1
        if not 0 <= k < len(entries):
            return None
        name, d = _decode(entries[k].name), entries[k].dir_index
        if self.version >= 5:
            directory = self.dirs[d] if 0 <= d < len(self.dirs) else self.comp_dir
        else:
            directory = self.comp_dir if d == 0 else (self.dirs[d - 1] if 0 < d <= len(self.dirs) else self.comp_dir)
        full = PurePosixPath(name) if name.startswith("/") else PurePosixPath(directory or "/", name)
        if not full.is_absolute() and self.comp_dir:
            full = PurePosixPath(self.comp_dir, full)
        shown = _display_name(full, self.source_tree)
        if shown not in self.ids:
            self.ids[shown] = len(self.files)
            self.files.append(shown)
            self.paths.append(_readable(full, shown, self.source_tree))
        return self.ids[shown]


def _parse(loaded: LoadedObject, raw: bytes, source_tree: Path | None) -> SourceLines:
    if loaded.obj.section(".debug_line") is None:
        return SourceLines.empty()
    elf = _relocated_elf(loaded, raw)
    if not elf.has_dwarf_info():
        return SourceLines.empty()
    dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
    files: list[str] = []
    paths: list[Path | None] = []
    ids: dict[str, int] = {}
    sequences: list[_Sequence] = []
    for cu in dwarf.iter_CUs():
        lp = dwarf.line_program_for_CU(cu)
        if lp is None:
            continue
        table = _Files(lp, cu, source_tree, files, paths, ids)
        addrs: list[int] = []
        rows: list[tuple[int, int]] = []
        for entry in lp.get_entries():
            st = entry.state
            if st is None:
                continue
            if st.end_sequence:
                if addrs:
                    _add_sequence(sequences, addrs, rows, st.address)
                addrs, rows = [], []
                continue
            fid = table.id(st.file)
            if fid is None:
                continue
            if addrs and addrs[-1] == st.address:
                rows[-1] = (fid, st.line)        # the last row at an address wins
                continue
            addrs.append(st.address)
            rows.append((fid, st.line))
    return SourceLines(sequences, files, paths)


def _add_sequence(out: list[_Sequence], addrs: list[int], rows: list[tuple[int, int]], end: int) -> None:
    order = sorted(range(len(addrs)), key=lambda i: addrs[i])
    out.append(_Sequence(min(addrs), max(end, max(addrs) + 1), tuple(addrs[i] for i in order),
                         tuple(rows[i] for i in order)))


def _decode(value) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


__all__ = ["SourceLines"]
