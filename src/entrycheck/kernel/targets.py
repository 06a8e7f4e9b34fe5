"""TARGET strings -> ``KernelBuild``: which entry_64.o to load, and what belongs with it.

Accepted forms:

* ``debian:X.Y`` / ``debian:X.Y+debug``: Debian's linux-source-X.Y package, fetched
  with apt, built with defconfig (``+debug``: plus DWARF line info) and cached;
* a kernel source tree, or an O= build directory (``DIR+debug`` asks for DWARF line
  info): its own entry_64.o when that is current, else a build into the cache;
* a path to an entry_64.o (any relocatable x86-64 ELF object), optionally paired with
  a kernel tree that supplies cpufeatures.h.

User trees and build directories are never written to: builds happen in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..progress import Progress, silent
from .cache import Cache, safe_name
from .debian import SERIES, distro_config, resolve_debian
from .kconfig import ConfigRequest, entry_objects
from .kbuild import (
    BUILD_FORMAT,
    STAGED_NOINSTR,
    STAGED_NOINSTR_JSON,
    ASM_OFFSETS_H,
    CPUFEATURES_H,
    ENTRY_SOURCE,
    STAGED_ASM_OFFSETS,
    STAGED_CPUFEATURES,
    STAGED_CONFIG,
    STAGED_OBJECT,
    STAGED_PARTS,
    KernelTree,
    TreeKind,
    fingerprint,
    has_debug_line,
    inspect_tree,
    is_clean_source,
    kernel_version,
    newest_mtime_ns,
    object_is_current,
)
from .make import (
    build_entry,
    link_objects,
    read_meta,
)

TARGET_FORMS = (
    "debian:X.Y or debian:X.Y+debug (e.g. debian:6.1, debian:6.12), "
    "a kernel source tree or O= build directory, or a path to an entry_64.o"
)
DEBUG_SUFFIX = "+debug"


@dataclass(frozen=True)
class KernelBuild:
    """One kernel entry object and the files that describe it."""

    label: str  # human-readable: "debian:6.1 (linux-source-6.1 6.1.192-2)" or the path given
    object_path: Path  # the entry_64.o to load
    cpufeatures_h: Path | None  # the tree's arch/x86/include/asm/cpufeatures.h
    asm_offsets_h: Path | None  # include/generated/asm-offsets.h of the build
    source_tree: Path | None  # the source it was built from (read-only use)
    kernel_version: str | None  # VERSION.PATCHLEVEL.SUBLEVEL from the tree's Makefile
    package_version: str | None  # Debian package version, when from Debian
    debug_info: bool  # the object carries DWARF line info (.debug_line)
    parts: tuple[Path, ...] = ()  # the entry objects linked into object_path (entry_64.o first)
    config_file: Path | None = None  # the .config it was built with, when known
    sources: tuple[str, ...] = ()  # the source files its objects were built from (relative; empty: unknown)
    noinstr_object: Path | None = None  # the entry objects linked with the noinstr C they reach
    noinstr_info: Path | None = None    # what the search for that C found (kernel/noinstr.py, as JSON)
    c_note: str = ""                    # why the noinstr C does not run although the build has it


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.exists() else None


def _from_entry(entry: Path, label: str, source: Path | None = None) -> KernelBuild:
    """The KernelBuild of a published cache entry."""
    meta = read_meta(entry)
    if source is None and meta.get("source_tree"):
        source = Path(str(meta["source_tree"]))
    version = meta.get("package_version")
    names = meta.get("objects") or []
    return KernelBuild(
        label=label,
        object_path=entry / STAGED_OBJECT,
        cpufeatures_h=_existing(entry / STAGED_CPUFEATURES),
        asm_offsets_h=_existing(entry / STAGED_ASM_OFFSETS),
        source_tree=source if source is not None and source.is_dir() else None,
        kernel_version=str(meta["kernel_version"]) if meta.get("kernel_version") else None,
        package_version=str(version) if version else None,
        debug_info=bool(meta.get("debug_info")),
        parts=tuple(entry / STAGED_PARTS / str(n) for n in names) if isinstance(names, list) else (),
        config_file=_existing(entry / STAGED_CONFIG),
        sources=tuple(str(d) for d in meta.get("deps") or ()),
        noinstr_object=_existing(entry / STAGED_NOINSTR),
        noinstr_info=_existing(entry / STAGED_NOINSTR_JSON),
    )


def _in_place(tree: KernelTree, label: str, objects: tuple[Path, ...]) -> KernelBuild:
    """The tree's own, current objects, used where they are (linked into one in the cache)."""
    assert tree.object is not None and tree.build is not None
    return KernelBuild(
        label=label,
        object_path=linked(objects),
        parts=objects,
        config_file=tree.config,
        cpufeatures_h=_existing(tree.source / CPUFEATURES_H),
        asm_offsets_h=_existing(tree.build / ASM_OFFSETS_H),
        source_tree=tree.source,
        kernel_version=kernel_version(tree.source),
        package_version=None,
        debug_info=has_debug_line(tree.object),
    )


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def linked(objects: tuple[Path, ...]) -> Path:
    """``objects`` linked into one (``ld -r``) in the cache, keyed by their contents; one object is itself."""
    if len(objects) == 1:
        return objects[0]
    digest = hashlib.sha256()
    for path in objects:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = Cache.open()
    final = cache.builds / f"linked-{digest.hexdigest()[:16]}"

    def create(work: Path, staged: Path) -> None:
        staged.mkdir()
        link_objects(objects, staged / STAGED_OBJECT)

    return cache.ensure("link", final, create) / STAGED_OBJECT


def _find_current(cache: Cache, prefix: str, source: Path) -> Path | None:
    """A published build ``<prefix>-<fingerprint>`` whose recorded deps are unchanged."""
    for entry in sorted(cache.builds.glob(f"{prefix}-*")):
        try:
            meta = read_meta(entry)
            deps = [*meta.get("deps", []), *meta.get("c_deps", [])]
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(deps, list) and entry.name == f"{prefix}-{fingerprint(source, map(str, deps))}":
            return entry
    return None


def _build_tree(
    tree: KernelTree,
    label: str,
    *,
    debug: bool,
    config: Path | None,
    key_extra: str,
    progress: Progress,
    request: ConfigRequest = ConfigRequest(),
    kernel_c: bool = True,
) -> KernelBuild:
    """Build ``tree``'s entry objects into the cache (or find that build there)."""
    if config is not None and not config.is_file():
        raise InputError(f"kernel config {config}: no such file")
    if request.base == "distro":
        series = ".".join((kernel_version(tree.source) or "").split(".")[:2])
        if not series:
            raise InputError(f"{label}: cannot tell the kernel version from its Makefile, so not which distro config")
        config = distro_config(Cache.open(), series, None, progress)
    if config is None and tree.kind is TreeKind.BUILD_DIR and request.base is None:
        config = tree.config
    # kbuild refuses O= builds of a source tree configured in-tree: build in a copy.
    copy = tree.kind is TreeKind.SOURCE_CONFIGURED or not is_clean_source(tree.source)
    if config is not None:
        config_id = "config:" + _digest(config.read_bytes())
    elif tree.config is not None:
        config_id = "own:" + _digest(tree.config.read_bytes())
    else:
        config_id = "defconfig"
    if request.base == "defconfig":
        config_id = "defconfig"
    key = [str(tree.path), str(tree.source), tree.kind.name, config_id, debug, key_extra, request.key(), STAGED_OBJECT,
           BUILD_FORMAT] + ([] if kernel_c else ["no-c"])
    if not request.default:
        label = f"{label} ({request.describe()})"
    prefix = f"{safe_name('tree-' + tree.path.name)[:48]}-{_digest(json.dumps(key))}"

    cache = Cache.open()
    hit = _find_current(cache, prefix, tree.source)
    if hit is not None:
        return _from_entry(hit, label)
    kept_log = cache.log_path(prefix)
    with cache.locked("build", prefix, progress):
        hit = _find_current(cache, prefix, tree.source)
        if hit is not None:
            return _from_entry(hit, label)
        with cache.workspace("build", prefix) as work:
            staged, log = work / "entry", work / "build.log"
            meta = {
                "kind": "tree",
                "label": label,
                "tree": str(tree.path),
                "tree_kind": tree.kind.value,
                "source_tree": str(tree.source),
                "config": str(config) if config is not None else (
                    "own .config" if copy and request.base is None else "defconfig"),
                "options": [f"{k}={v}" for k, v in request.options],
                "debug": debug,
                "key_extra": key_extra,
                "package_version": None,
            }
            started = time.time_ns()
            try:
                output = build_entry(
                    tree.source, work=work, staged=staged, log=log, log_shown=kept_log,
                    what=label, meta=meta, config=config, copy_tree=copy, debug=debug,
                    options=request.options, own_config=request.base is None, progress=progress,
                    kernel_c=kernel_c,
                )
            finally:
                if log.exists():
                    os.replace(log, kept_log)
            if newest_mtime_ns(tree.source, output.deps) > started:
                raise InputError(f"{label} changed while it was being built; run entrycheck again")
            final = cache.builds / f"{prefix}-{fingerprint(tree.source, output.deps)}"
            cache.publish(staged, final)
    return _from_entry(final, label)


def _inspect(path: Path, what: str) -> KernelTree:
    tree = inspect_tree(path)
    if tree is None:
        raise InputError(
            f"{what} is neither a kernel source tree (a Makefile and {ENTRY_SOURCE}) "
            "nor an O= build directory (a .config and a source link); "
            f"expected {TARGET_FORMS}"
        )
    return tree


def build_tree_object(
    src_tree: Path,
    *,
    debug: bool = False,
    config: Path | None = None,
    key_extra: str = "",
    progress: Progress = silent,
    request: ConfigRequest = ConfigRequest(),
    kernel_c: bool = True,
) -> KernelBuild:
    """Build the entry objects of ``src_tree`` (source tree or O= build dir) into the cache.

    Never writes into ``src_tree``.  ``config`` replaces the tree's configuration
    (default: its own .config, else defconfig); ``debug`` adds DWARF line info;
    ``key_extra`` distinguishes builds of the same tree that the tree's files do not
    (e.g. a patch applied to a copy).  The cache key is the tree's real path, the
    configuration, ``debug``, ``key_extra`` and the mtimes and sizes of entry_64.S,
    calling.h and every source file the object was built from, so an edited tree
    is rebuilt.  A failed build raises InputError and publishes nothing.  ``kernel_c`` False leaves
    out the noinstr C the entry objects call (a build for the contract stubs alone: faster).
    """
    tree = _inspect(src_tree.expanduser(), str(src_tree))
    return _build_tree(tree, str(src_tree), debug=debug, config=config, key_extra=key_extra, progress=progress,
                       request=request, kernel_c=kernel_c)


def _tree_target(spec: str, path: Path, debug: bool, progress: Progress, request: ConfigRequest) -> KernelBuild:
    tree = _inspect(path, spec)
    obj = tree.object
    if (
        request.default
        and obj is not None
        and tree.build is not None
        and tree.config is not None
        and all(object_is_current(tree.build, rel) for rel in entry_objects(tree.config))
        and (not debug or has_debug_line(obj))
    ):
        objects = tuple(tree.build / rel for rel in entry_objects(tree.config))
        progress(f"using the current {', '.join(o.name for o in objects)} of {spec}")
        return _in_place(tree, spec, objects)
    return _build_tree(tree, spec, debug=debug, config=None, key_extra="", progress=progress, request=request)


def _object_list(spec: str) -> tuple[Path, ...]:
    """Several objects named together, ``entry_64.o,entry_64_compat.o``: each must exist."""
    if "," not in spec or Path(spec).expanduser().exists():
        return ()
    paths = tuple(Path(p).expanduser() for p in spec.split(","))
    for p in paths:
        if not p.is_file():
            raise InputError(f"{spec}: {p} is not a file (several objects are joined with commas: "
                             "entry_64.o,entry_64_compat.o)")
    return paths


def _object_target(spec: str, paths: tuple[Path, ...], tree: Path | None) -> KernelBuild:
    path = linked(tuple(p.absolute() for p in paths))
    kernel: KernelTree | None = None
    if tree is not None:
        try:
            tree = tree.expanduser()
        except RuntimeError as exc:              # ~user that does not exist
            raise InputError(f"--tree {tree}: {exc}") from exc
        if not tree.is_dir():
            raise InputError(f"--tree {tree}: no such directory")
        kernel = _inspect(tree, f"--tree {tree}")
    return KernelBuild(
        label=spec,
        object_path=path.absolute(),
        cpufeatures_h=_existing(kernel.source / CPUFEATURES_H) if kernel else None,
        asm_offsets_h=_existing(kernel.build / ASM_OFFSETS_H) if kernel and kernel.build else None,
        source_tree=kernel.source if kernel else None,
        kernel_version=kernel_version(kernel.source) if kernel else None,
        package_version=None,
        debug_info=has_debug_line(path),
        parts=tuple(p.absolute() for p in paths),
    )


def resolve_target(spec: str, *, tree: Path | None = None, progress: Progress = silent,
                   request: ConfigRequest = ConfigRequest()) -> KernelBuild:
    """Resolve TARGET ``spec`` to a KernelBuild, downloading and building as needed.

    ``tree`` (the --tree option) pairs a bare entry_64.o with the kernel tree it
    came from (for cpufeatures.h); it is ignored for the other forms, which carry
    their own tree.  Raises InputError for anything that is not a usable target.
    """
    if spec.startswith("debian:"):
        series = spec[len("debian:"):]
        debug = series.endswith(DEBUG_SUFFIX)
        series = series.removesuffix(DEBUG_SUFFIX)
        if not SERIES.fullmatch(series):
            raise InputError(f"bad target {spec!r}: expected debian:X.Y or debian:X.Y+debug, e.g. debian:6.1")
        built = resolve_debian(Cache.open(), series, debug=debug, request=request, progress=progress)
        return _from_entry(built.entry, built.package.label(debug, request), built.source)
    if not spec.strip():
        raise InputError(f"empty target: expected {TARGET_FORMS}")
    if "\0" in spec:
        raise InputError("the target contains a NUL byte")
    try:
        return _path_target(spec, tree, progress, request)
    except OSError as exc:                       # a name too long, a file that cannot be read, ...
        shown = spec if len(spec) <= 120 else spec[:117] + "..."
        raise InputError(f"cannot use {shown}: {exc.strerror or exc}") from exc


def _path_target(spec: str, tree: Path | None, progress: Progress, request: ConfigRequest) -> KernelBuild:
    try:
        path = Path(spec).expanduser()
    except RuntimeError as exc:                  # ~user that does not exist
        raise InputError(f"{spec}: {exc}") from exc
    debug = False
    if not path.exists() and spec.endswith(DEBUG_SUFFIX):
        plain = Path(spec.removesuffix(DEBUG_SUFFIX)).expanduser()
        if plain.is_dir():
            path, debug = plain, True
    if path.is_dir():
        return _tree_target(spec, path, debug, progress, request)
    objects = _object_list(spec)
    if path.is_file() or objects:
        if not request.default:
            raise InputError(f"{spec}: --config and --kconfig apply to what entrycheck builds (debian:X.Y or a "
                             "kernel tree); a built object already has its configuration")
        return _object_target(spec, objects or (path,), tree)
    if path.exists():
        raise InputError(f"{spec} is not a regular file or directory; expected {TARGET_FORMS}")
    if os.sep in spec or spec.startswith(("~", ".")) or spec.endswith((".o", DEBUG_SUFFIX)):
        raise InputError(f"{spec}: no such file or directory")
    raise InputError(f"unknown target {spec!r}: expected {TARGET_FORMS}")
