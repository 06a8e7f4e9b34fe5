"""Apply parsed patches (patch.py) to a source tree, all or nothing.

Every hunk of every patch is placed in memory first, each patch on the result of the ones
before it (patchmatch.py fits a hunk whose context drifted or lost its whitespace).  Only when
all of them fit is anything written, and then each changed file is written as a new file
renamed over the old one: the destination may share inodes with the source tree (``cp -al``),
which must not change.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from collections.abc import Sequence

from entrycheck.errors import InputError
from entrycheck.kernel.patch import (ApplyResult, FilePatch, Hunk, HunkPlacement, PatchSet, _Content, _fail,
                                     _strip_ab, parse_patch)
from entrycheck.kernel.patchmatch import (
    REMOVED,
    Fit,
    HunkMismatch,
    already_applied,
    new_side_as_given,
    normalise,
    place_hunk,
    restore_new_side,
)

__all__ = ["apply_patches"]


# --------------------------------------------------------------------------- applying


def _split(data: bytes, mode: int | None) -> _Content:
    text = data.decode("utf-8", errors="surrogateescape")
    if not text:
        return _Content((), False, mode)
    final_newline = text.endswith("\n")
    body = text[:-1] if final_newline else text
    return _Content(tuple(body.split("\n")), final_newline, mode)


def _join(content: _Content) -> bytes:
    text = "\n".join(content.lines)
    if content.lines and content.final_newline:
        text += "\n"
    return text.encode("utf-8", errors="surrogateescape")


def _safe_relative(path: str, name: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise InputError(
            f"patch {name}: path {path!r} leaves the tree; give a patch with relative paths"
        )
    return str(pure)


class _Tree:
    """The series' view of the tree: files read from ``src`` on demand, edits in memory."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.original: dict[str, _Content | None] = {}
        self.current: dict[str, _Content | None] = {}

    def get(self, path: str) -> _Content | None:
        if path not in self.current:
            full = self.src / path
            try:
                content = _split(full.read_bytes(), None) if full.is_file() else None
            except OSError as exc:
                shown = path if len(path) <= 120 else path[:117] + "..."
                raise InputError(f"the patch names {shown}, which cannot be read in the tree: "
                                 f"{exc.strerror or exc}") from exc
            self.original[path] = content
            self.current[path] = content
        return self.current[path]

    def exists(self, path: str) -> bool:
        return self.get(path) is not None

    def dir_exists(self, path: str) -> bool:
        parent = str(PurePosixPath(path).parent)
        if parent == "." or (self.src / parent).is_dir():
            return True
        prefix = parent + "/"
        return any(p.startswith(prefix) and c is not None for p, c in self.current.items())

    def changed(self) -> list[str]:
        return sorted(p for p in self.current if self.current[p] != self.original[p])


def _strip_levels(path: str) -> list[str]:
    parts = PurePosixPath(path).parts
    return [str(PurePosixPath(*parts[k:])) for k in range(len(parts))]


def _resolve(fp: FilePatch, tree: _Tree, name: str) -> str:
    """The tree path a file diff applies to (strips a/, b/ or other leading components)."""
    if fp.old_path is None:
        assert fp.new_path is not None
        default = _strip_ab(fp.new_path)
        deeper = [p for p in _strip_levels(default)[1:] if "/" in p and tree.dir_exists(p)]
        found = default if tree.dir_exists(default) or not deeper else deeper[0]
        return _safe_relative(found, name)
    candidates = [fp.old_path] if fp.new_path is None else [fp.new_path, fp.old_path]
    level_lists = [_strip_levels(c) for c in candidates]
    for k in range(max(len(levels) for levels in level_lists)):
        for levels in level_lists:
            if k < len(levels) and tree.exists(_safe_relative(levels[k], name)):
                return _safe_relative(levels[k], name)
    raise InputError(
        f"patch {name}: {fp.display_path} does not exist in the tree;"
        " check that the patch is meant for this tree"
    )


def _patch_file(
    patch: PatchSet, fp: FilePatch, path: str, content: _Content
) -> tuple[_Content, list[HunkPlacement]]:
    """Place every hunk of one file diff on ``content`` and return the new content."""
    file_norm = [normalise(line) for line in content.lines]
    tabless = not any("\t" in line.text for f in patch.files for h in f.hunks for line in h.lines)
    placed: list[tuple[Hunk, Fit]] = []
    for hunk in fp.hunks:
        old_side = [(line.kind, line.text) for line in hunk.old_side]
        try:
            fit = place_hunk(content.lines, file_norm, old_side, hunk.old_start)
        except HunkMismatch as error:
            advice = error.advice
            pairs = [(line.kind, line.text) for line in hunk.lines]
            if already_applied(content.lines, file_norm, pairs, hunk.new_start):
                advice = "the hunk's result is already in the tree: is the patch applied already?"
            raise _fail(patch.name, f"{path} hunk {hunk.number}", error.reason, advice) from None
        if placed:
            previous_hunk, previous = placed[-1]
            end = previous.start + len(previous_hunk.old_side)
            if fit.start < end:
                raise _fail(
                    patch.name, f"{path} hunk {hunk.number}",
                    f"fits at line {fit.start + 1}, before the end of hunk"
                    f" {previous_hunk.number} (line {end})",
                    "the hunks are out of order; fix the patch",
                )
        placed.append((hunk, fit))
    lines: list[str] = []
    final_newline = content.final_newline
    position = 0
    placements = []
    for hunk, fit in placed:
        size = len(hunk.old_side)
        tree_old = content.lines[fit.start : fit.start + size]
        lines.extend(content.lines[position : fit.start])
        pairs = [(line.kind, line.text) for line in hunk.lines]
        repair = patch.mangled or (
            fit.whitespace_repaired and tabless and any("\t" in line for line in tree_old)
        )
        if repair:
            lines.extend(restore_new_side(pairs, tree_old, content.lines, fit.start, patch.indent_hints))
        else:
            lines.extend(new_side_as_given(pairs, tree_old))
        position = fit.start + size
        if position == len(content.lines):
            if hunk.new_no_newline:
                final_newline = False
            elif hunk.old_no_newline or not content.lines:
                final_newline = True
        placements.append(
            HunkPlacement(
                path, hunk.number, hunk.old_start, fit.start + 1,
                fit.context_mismatches, fit.whitespace_repaired,
            )
        )
    lines.extend(content.lines[position:])
    mode = fp.new_mode if fp.new_mode is not None else content.mode
    return _Content(tuple(lines), final_newline, mode), placements


def _delete_file(patch: PatchSet, fp: FilePatch, path: str, content: _Content) -> None:
    """Check that a deletion removes exactly the file's lines."""
    removed = [normalise(line.text) for hunk in fp.hunks for line in hunk.lines if line.kind == REMOVED]
    if removed != [normalise(line) for line in content.lines]:
        raise _fail(
            patch.name, path, "the deletion does not match the file's content",
            "check that the patch is meant for this tree",
        )


def _compute(src_tree: Path, patches: Sequence[PatchSet]) -> tuple[_Tree, list[HunkPlacement]]:
    tree = _Tree(src_tree)
    placements: list[HunkPlacement] = []
    for patch in patches:
        for fp in patch.files:
            path = _resolve(fp, tree, patch.name)
            content = tree.get(path)
            if fp.old_path is None:
                if content is not None:
                    raise _fail(
                        patch.name, path, "the patch creates this file but it already exists",
                        "check that the patch is not already applied",
                    )
                content, placed = _patch_file(patch, fp, path, _Content((), True, 0o644))
                tree.current[path] = _Content(content.lines, content.final_newline, fp.new_mode or 0o644)
                placements.extend(placed)
                continue
            assert content is not None
            if fp.new_path is None:
                _delete_file(patch, fp, path, content)
                tree.current[path] = None
                continue
            tree.current[path], placed = _patch_file(patch, fp, path, content)
            placements.extend(placed)
    return tree, placements


def _write(dest_tree: Path, tree: _Tree, paths: Sequence[str]) -> None:
    """Stage every changed file as a temporary file, then rename them all into place."""
    staged: list[tuple[str, Path]] = []
    try:
        for path in paths:
            content = tree.current[path]
            if content is None:
                continue
            target = dest_tree / path
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = content.mode
            if mode is None:
                mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".new", dir=target.parent
            )
            staged.append((path, Path(temp_name)))
            with os.fdopen(fd, "wb") as handle:
                handle.write(_join(content))
            os.chmod(temp_name, mode)
        for path, staged_file in staged:
            os.replace(staged_file, dest_tree / path)
        for path in paths:
            if tree.current[path] is None and (dest_tree / path).exists():
                (dest_tree / path).unlink()
    except OSError as error:
        for _, staged_file in staged:
            staged_file.unlink(missing_ok=True)
        raise InputError(
            f"cannot write the patched tree in {dest_tree}: {error.strerror or error};"
            " check that the directory is writable and has free space"
        ) from None


def apply_patches(
    src_tree: Path, patches: Sequence[tuple[str, str]], dest_tree: Path
) -> ApplyResult:
    """Apply a series of (name, text) patches from ``src_tree`` into ``dest_tree``.

    ``dest_tree`` must be an existing copy of ``src_tree`` (a hardlink farm is fine).
    Nothing is written unless every hunk of every patch fits; a failure raises
    ``InputError`` naming the patch, the file and the hunk.
    """
    src_tree, dest_tree = Path(src_tree), Path(dest_tree)
    if not src_tree.is_dir():
        raise InputError(f"source tree {src_tree} is not a directory; give the kernel source tree")
    if not dest_tree.is_dir():
        raise InputError(f"destination {dest_tree} is not a directory; copy the source tree there first")
    parsed = [parse_patch(text, name) for name, text in patches]
    tree, placements = _compute(src_tree, parsed)
    changed = tree.changed()
    _write(dest_tree, tree, changed)
    return ApplyResult(tuple(changed), tuple(placements))
