"""Kernel trees: recognising them, what a build stages, and whether a built object is stale.

The results of a build (make.py: the object, the tree's cpufeatures.h, the build's
asm-offsets.h and meta.json) are staged in a directory that the caller publishes into the
cache (see ``cache.Cache``); the names below are that directory's layout.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile


ENTRY_OBJECT = "arch/x86/entry/entry_64.o"
ENTRY_SOURCE = "arch/x86/entry/entry_64.S"
OTHER_ENTRY_SOURCES = ("arch/x86/entry/entry_64_compat.S", "arch/x86/entry/entry_64_fred.S")
CALLING_H = "arch/x86/entry/calling.h"
CPUFEATURES_H = "arch/x86/include/asm/cpufeatures.h"
ASM_OFFSETS_H = "include/generated/asm-offsets.h"
ENTRY_CMD = "arch/x86/entry/.entry_64.o.cmd"
ASM_OFFSETS_CMD = "arch/x86/kernel/.asm-offsets.s.cmd"

META_JSON = "meta.json"
STAGED_OBJECT = "entry.o"          # every entry object of the build, linked with ld -r
STAGED_PARTS = "objects"           # the entry objects themselves
STAGED_CPUFEATURES = "cpufeatures.h"
STAGED_ASM_OFFSETS = "asm-offsets.h"
STAGED_CONFIG = "kernel.config"
# What a cache entry of a build holds changes with this (entries of another format are built again).
BUILD_FORMAT = "c3"               # c1: the noinstr C objects too; c2: their static keys; c3: the C the asm calls
STAGED_NOINSTR = "noinstr.o"       # the entry objects and the noinstr C they reach, linked with ld -r
STAGED_NOINSTR_PARTS = "noinstr"   # the C objects, under their paths in the build
STAGED_NOINSTR_JSON = "noinstr.json"   # what the search for them found (kernel/noinstr.py)

ALWAYS_FINGERPRINTED = (ENTRY_SOURCE, CALLING_H, *OTHER_ENTRY_SOURCES)
"""Files whose mtime and size always take part in a tree's build fingerprint."""

_GENERATED_PREFIXES = ("include/generated/", "include/config/", "arch/x86/include/generated/")
_IN_TREE_MARKERS = (".config", "include/config", "arch/x86/include/generated")
# --------------------------------------------------------------------------- trees


class TreeKind(Enum):
    """What kind of directory a kernel target is."""

    SOURCE_CLEAN = "clean source tree"  # no configuration: buildable with O=
    SOURCE_CONFIGURED = "source tree configured in-tree"  # must be copied to build
    BUILD_DIR = "O= build directory"


@dataclass(frozen=True)
class KernelTree:
    """A kernel source tree or build directory, by real path."""

    kind: TreeKind
    path: Path  # the directory as given (resolved)
    source: Path  # the source tree
    build: Path | None  # where make puts this tree's objects (None: never configured)

    @property
    def config(self) -> Path | None:
        """The tree's .config, if it has one."""
        if self.build is None or not (self.build / ".config").is_file():
            return None
        return self.build / ".config"

    @property
    def object(self) -> Path | None:
        """The tree's own entry_64.o, if it has been built."""
        if self.build is None or not (self.build / ENTRY_OBJECT).is_file():
            return None
        return self.build / ENTRY_OBJECT


def is_source_tree(path: Path) -> bool:
    """Whether ``path`` looks like a Linux source tree with the x86-64 entry code."""
    return (path / "Makefile").is_file() and (path / ENTRY_SOURCE).is_file()


def _build_dir_source(path: Path) -> Path | None:
    """The source tree of O= build directory ``path`` (its ``source`` link or Makefile)."""
    link = path / "source"
    if link.is_symlink() or link.is_dir():
        return link.resolve()
    makefile = path / "Makefile"
    if makefile.is_file():
        text = makefile.read_text(errors="replace")
        match = re.search(r"^\s*include\s+(\S+)/Makefile\s*$", text, re.MULTILINE) or re.search(
            r"-C\s+(\S+)", text
        )
        if match:
            return (path / match.group(1)).resolve()
    return None


def inspect_tree(path: Path) -> KernelTree | None:
    """Classify directory ``path``; None when it is no kernel tree or build directory."""
    path = path.resolve()
    if is_source_tree(path):
        configured = any((path / marker).exists() for marker in _IN_TREE_MARKERS)
        if configured:
            return KernelTree(TreeKind.SOURCE_CONFIGURED, path, path, path)
        return KernelTree(TreeKind.SOURCE_CLEAN, path, path, None)
    if (path / ".config").is_file():
        source = _build_dir_source(path)
        if source is not None and is_source_tree(source):
            return KernelTree(TreeKind.BUILD_DIR, path, source, path)
    return None


def kernel_version(source: Path) -> str | None:
    """VERSION.PATCHLEVEL.SUBLEVEL from the top Makefile of ``source`` (None if unreadable)."""
    try:
        text = (source / "Makefile").read_text(errors="replace")
    except OSError:
        return None
    fields = {}
    for name in ("VERSION", "PATCHLEVEL", "SUBLEVEL"):
        match = re.search(rf"^{name}\s*=\s*(\d+)\s*$", text, re.MULTILINE)
        if not match:
            return None
        fields[name] = match.group(1)
    return "{VERSION}.{PATCHLEVEL}.{SUBLEVEL}".format(**fields)


def is_clean_source(source: Path) -> bool:
    """Whether ``source`` can be built with O= (kbuild refuses configured trees)."""
    return not any((source / marker).exists() for marker in _IN_TREE_MARKERS)


# --------------------------------------------------------------------------- staleness


@dataclass(frozen=True)
class Dependency:
    """One prerequisite of an object, as listed by kbuild's fixdep in a .cmd file."""

    path: str  # absolute, or relative to the directory make ran in
    optional: bool  # $(wildcard ...): only counts when the file exists


_DEP_TOKEN = re.compile(r"\$\(wildcard\s+([^)\s]+)\s*\)|([^\s\\]+)")


def parse_cmd_deps(cmd_file: Path) -> tuple[Dependency, ...]:
    """The source file and the ``deps_...`` list of a kbuild ``.<object>.cmd`` file."""
    deps: list[Dependency] = []
    in_deps = False
    for line in cmd_file.read_text(errors="replace").splitlines():
        if line.startswith("source_") and ":=" in line:
            deps.append(Dependency(line.split(":=", 1)[1].strip(), optional=False))
            continue
        if line.startswith("deps_") and ":=" in line:
            in_deps = True
            line = line.split(":=", 1)[1]
        elif not in_deps:
            continue
        for match in _DEP_TOKEN.finditer(line):
            if match.group(1):
                deps.append(Dependency(match.group(1), optional=True))
            else:
                deps.append(Dependency(match.group(2), optional=False))
        in_deps = line.rstrip().endswith("\\")
    return tuple(deps)


def object_is_current(build: Path, rel: str = ENTRY_OBJECT) -> bool:
    """Whether ``build``'s object ``rel`` (default entry_64.o) is newer than .config and all it was made from."""
    obj = build / rel
    cmd = build / cmd_file(rel)
    config = build / ".config"
    try:
        built = obj.stat().st_mtime_ns
        if not cmd.is_file() or config.stat().st_mtime_ns > built:
            return False
        deps = parse_cmd_deps(cmd)
    except OSError:
        return False
    for dep in deps:
        path = Path(dep.path)
        try:
            changed = (path if path.is_absolute() else build / path).stat().st_mtime_ns
        except OSError:
            if dep.optional:
                continue
            return False
        if changed > built:
            return False
    return True


def source_relative_deps(deps: Iterable[Dependency], ran_in: Path, source: Path) -> tuple[str, ...]:
    """The non-generated dependencies that live in ``source``, relative to it.

    ``ran_in`` is the directory make ran in (relative paths are relative to it).
    """
    source = source.resolve()
    found: set[str] = set()
    for dep in deps:
        if dep.optional:
            continue  # $(wildcard include/config/...): derived from .config
        path = Path(dep.path)
        if not path.is_absolute():
            path = ran_in / path
        try:
            rel = path.resolve().relative_to(source).as_posix()
        except ValueError:
            continue
        if not rel.startswith(_GENERATED_PREFIXES):
            found.add(rel)
    return tuple(sorted(found))


def fingerprint(source: Path, deps: Iterable[str]) -> str:
    """A short hash of the mtimes and sizes of ``deps`` (relative to ``source``).

    entry_64.S and calling.h always count, so that an edited tree gets a new key.
    """
    digest = hashlib.sha256()
    for rel in sorted(set(deps) | set(ALWAYS_FINGERPRINTED)):
        try:
            st = (source / rel).stat()
            digest.update(f"{rel}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
        except OSError:
            digest.update(f"{rel}\0missing\n".encode())
    return digest.hexdigest()[:16]


def newest_mtime_ns(source: Path, deps: Iterable[str]) -> int:
    """The newest mtime among ``deps`` (relative to ``source``); 0 if none exists."""
    newest = 0
    for rel in set(deps) | set(ALWAYS_FINGERPRINTED):
        try:
            newest = max(newest, (source / rel).stat().st_mtime_ns)
        except OSError:
            pass
    return newest


def has_debug_line(obj: Path) -> bool:
    """Whether ELF file ``obj`` has a .debug_line section (False if unreadable)."""
    try:
        with obj.open("rb") as f:
            return ELFFile(f).get_section_by_name(".debug_line") is not None
    except (OSError, ELFError, ValueError):
        return False


def cmd_file(obj: str) -> str:
    """kbuild's .cmd file of object ``obj`` (relative to the build directory)."""
    path = Path(obj)
    return str(path.parent / f".{path.name}.cmd")
