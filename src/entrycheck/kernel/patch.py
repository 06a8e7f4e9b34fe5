"""Read a series of kernel patches (patchapply.py applies them to a tree, all or nothing).

Accepted inputs: ``git format-patch`` mail (headers, message, diffstat, signature
around the diff), plain unified diffs (``diff -u``, ``git diff``), and patches
copied out of a web mail archive, whose whitespace and context markers are gone
and whose context may have drifted from the tree (see ``patchmatch``).

The file headers are read with ``whatthepatch``.  Hunk bodies are read here,
driven by the line counts of each ``@@`` header: in an archived patch a context
line has no marker, so only the counts say where a hunk ends, and they let the
reconstruction of each line's kind be checked.

Every hunk of every patch is placed in memory first, each patch on the result of
the ones before it.  Only when all of them fit is anything written, and then
each changed file is written as a new file renamed over the old one: the
destination may share inodes with the source tree (``cp -al``), which must not
change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Sequence

from whatthepatch.patch import parse_header

from entrycheck.errors import InputError
from entrycheck.kernel.patchmatch import ADDED, CONTEXT, REMOVED

__all__ = [
    "ApplyResult",
    "FilePatch",
    "Hunk",
    "HunkLine",
    "HunkPlacement",
    "PatchSet",
    "parse_patch",
]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_GIT_DIFF = re.compile(r"^diff --git (?:a/)?(\S+) (?:b/)?(\S+)")
_GIT_EXTENDED = re.compile(
    r"^(index |new file mode |deleted file mode |old mode |new mode |similarity index "
    r"|dissimilarity index |rename from |rename to |copy from |copy to )"
)
_UNSUPPORTED = re.compile(r"^(rename from |copy from |old mode |GIT binary patch|Binary files )")
_DEV_NULL = "/dev/null"


@dataclass(frozen=True)
class HunkLine:
    """One line of a hunk: kind is ' ' (context), '-' (removed) or '+' (added)."""

    kind: str
    text: str
    marked: bool  # False for a context line that lost its ' ' marker


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` hunk; ``number`` is 1-based within its file's diff."""

    number: int
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[HunkLine, ...]
    old_no_newline: bool = False
    new_no_newline: bool = False

    @property
    def old_side(self) -> tuple[HunkLine, ...]:
        return tuple(line for line in self.lines if line.kind != ADDED)

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_count} +{self.new_start},{self.new_count} @@"


@dataclass(frozen=True)
class FilePatch:
    """The diff of one file: ``old_path``/``new_path`` as written, None for /dev/null."""

    old_path: str | None
    new_path: str | None
    hunks: tuple[Hunk, ...]
    new_mode: int | None = None

    @property
    def display_path(self) -> str:
        return _strip_ab(self.new_path or self.old_path or "?")


@dataclass(frozen=True)
class PatchSet:
    """A parsed patch.

    ``mangled``: some context line lost its marker, so whitespace is not the tree's.
    ``indent_hints``: in a mangled patch, +/- lines keep one space where the line
    was indented (some do, some do not), so column-0 lines can be told apart.
    """

    name: str
    files: tuple[FilePatch, ...]
    mangled: bool
    indent_hints: bool


@dataclass(frozen=True)
class HunkPlacement:
    """How one hunk was placed."""

    file: str
    hunk: int  # 1-based hunk number within that file's diff
    header_line: int  # old-file line the header claimed (1-based)
    placed_line: int  # old-file line where it was applied (1-based)
    context_mismatches: int  # drifted context lines tolerated
    whitespace_repaired: bool  # matched only after whitespace normalisation


@dataclass(frozen=True)
class ApplyResult:
    files: tuple[str, ...]  # relative paths written (or deleted)
    placements: tuple[HunkPlacement, ...]


@dataclass(frozen=True)
class _Content:
    lines: tuple[str, ...]
    final_newline: bool
    mode: int | None = None  # permission bits to give the file, None to keep


# --------------------------------------------------------------------------- parsing


def _strip_ab(path: str) -> str:
    return path[2:] if path.startswith(("a/", "b/")) else path


def _header_paths(block: Sequence[str]) -> tuple[str | None, str | None]:
    header = parse_header(list(block))
    if header is not None and header.old_path and header.new_path:
        old, new = header.old_path, header.new_path
    else:
        old = next(line[4:] for line in block if line.startswith("--- "))
        new = next(line[4:] for line in block if line.startswith("+++ "))
        old, new = old.split("\t")[0].strip(), new.split("\t")[0].strip()
    return (None if old == _DEV_NULL else old), (None if new == _DEV_NULL else new)


def _mode(block: Sequence[str]) -> int | None:
    for line in block:
        match = re.match(r"^(?:new file mode|new mode) ([0-7]{6})$", line)
        if match:
            return int(match.group(1), 8) & 0o7777
    return None


def _fail(name: str, where: str, what: str, todo: str) -> InputError:
    return InputError(f"patch {name}: {where}: {what}; {todo}")


def _read_hunk(
    lines: Sequence[str], i: int, number: int, name: str, path: str
) -> tuple[Hunk, int]:
    """Read the hunk whose header is ``lines[i]``; return it and the next index."""
    match = _HUNK.match(lines[i])
    assert match is not None
    old_start, new_start = int(match.group(1)), int(match.group(3))
    old_count = int(match.group(2)) if match.group(2) is not None else 1
    new_count = int(match.group(4)) if match.group(4) is not None else 1
    old_left, new_left = old_count, new_count
    body: list[HunkLine] = []
    no_newline = {"old": False, "new": False}
    where = f"{path} hunk {number}"
    todo = "the patch is truncated or its lines were re-wrapped; take it from another source"
    i += 1

    def mark_no_newline() -> None:
        if body and body[-1].kind != ADDED:
            no_newline["old"] = True
        if body and body[-1].kind != REMOVED:
            no_newline["new"] = True

    while old_left > 0 or new_left > 0:
        if i >= len(lines) or _HUNK.match(lines[i]) or lines[i].startswith("diff --git "):
            raise _fail(
                name, where,
                f"header {match.group(0)} announces {old_count} old and {new_count} new lines"
                f" but the hunk ends after {old_count - old_left} and {new_count - new_left}",
                todo,
            )
        line = lines[i]
        i += 1
        if line.startswith("\\ "):  # "\ No newline at end of file"
            mark_no_newline()
            continue
        marker = line[:1]
        if marker == REMOVED:
            body.append(HunkLine(REMOVED, line[1:], True))
            old_left -= 1
        elif marker == ADDED:
            body.append(HunkLine(ADDED, line[1:], True))
            new_left -= 1
        elif marker == CONTEXT:
            body.append(HunkLine(CONTEXT, line[1:], True))
            old_left, new_left = old_left - 1, new_left - 1
        else:
            body.append(HunkLine(CONTEXT, line, False))
            old_left, new_left = old_left - 1, new_left - 1
        if old_left < 0 or new_left < 0:
            raise _fail(
                name, where,
                f"more lines than its header {match.group(0)} announces"
                " (a context line that starts with '-' or '+' lost its marker?)",
                todo,
            )
    if i < len(lines) and lines[i].startswith("\\ "):
        mark_no_newline()
        i += 1
    hunk = Hunk(
        number, old_start, old_count, new_start, new_count, tuple(body),
        no_newline["old"], no_newline["new"],
    )
    return hunk, i


def _is_file_header(lines: Sequence[str], i: int) -> bool:
    return (
        lines[i].startswith("--- ")
        and i + 2 < len(lines)
        and lines[i + 1].startswith("+++ ")
        and _HUNK.match(lines[i + 2]) is not None
    )


def _read_file(
    lines: Sequence[str], i: int, first: int, name: str
) -> tuple[FilePatch, int]:
    """Read one file's diff whose ``---`` line is ``lines[i]``; ``first`` starts its header."""
    block = lines[first : i + 2]
    old, new = _header_paths(block)
    path = _strip_ab(new or old or "?")
    if any(line.startswith(("rename from ", "copy from ")) for line in block):
        raise _fail(
            name, path, "renames and copies are not supported",
            "give a patch that changes files in place",
        )
    hunks: list[Hunk] = []
    i += 2
    while i < len(lines) and _HUNK.match(lines[i]):
        hunk, i = _read_hunk(lines, i, len(hunks) + 1, name, path)
        hunks.append(hunk)
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j < len(lines) and _HUNK.match(lines[j]):
            i = j
            continue
        j = i
        while j < len(lines) and not (
            _HUNK.match(lines[j]) or lines[j].startswith(("diff ", "--- ", "Index: "))
        ):
            j += 1
        if j < len(lines) and _HUNK.match(lines[j]):
            raise _fail(
                name, f"{path} hunk {hunk.number}",
                f"more lines than its header {hunk.header} announces",
                "the patch was edited by hand or re-wrapped; fix the hunk's line counts",
            )
    return FilePatch(old, new, tuple(hunks), _mode(block)), i


def _header_start(lines: Sequence[str], i: int) -> int:
    """Index of the first line of the git extended header before ``lines[i]``."""
    first = i
    while first > 0 and _GIT_EXTENDED.match(lines[first - 1]):
        first -= 1
    if first > 0 and lines[first - 1].startswith("diff --git "):
        first -= 1
    return first


def _headerless_git_file(
    lines: Sequence[str], i: int, name: str
) -> tuple[FilePatch | None, int]:
    """A ``diff --git`` section without ``---``/``+++``: empty new/deleted file, or error."""
    j = i + 1
    block = [lines[i]]
    while j < len(lines) and (_GIT_EXTENDED.match(lines[j]) or _UNSUPPORTED.match(lines[j])):
        block.append(lines[j])
        j += 1
    if j < len(lines) and _is_file_header(lines, j):
        return None, i + 1
    match = _GIT_DIFF.match(lines[i])
    path = match.group(2) if match else lines[i][len("diff --git ") :]
    if any(_UNSUPPORTED.match(line) for line in block):
        raise _fail(
            name, path, "renames, copies, mode changes and binary diffs are not supported",
            "give a patch that only changes the text of files",
        )
    if any(line.startswith("new file mode ") for line in block):
        return FilePatch(None, path, (), _mode(block)), j
    if any(line.startswith("deleted file mode ") for line in block):
        return FilePatch(path, None, ()), j
    return None, i + 1


def parse_patch(text: str, name: str = "patch") -> PatchSet:
    """Parse a patch (mail, unified diff or archived copy) into its file diffs."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and not lines[-1]:
        lines.pop()  # what follows the final newline is not a line
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if _is_file_header(lines, i):
            fp, i = _read_file(lines, i, _header_start(lines, i), name)
            files.append(fp)
        elif lines[i].startswith("diff --git "):
            fp_or_none, i = _headerless_git_file(lines, i, name)
            if fp_or_none is not None:
                files.append(fp_or_none)
        else:
            i += 1
    if not files:
        raise InputError(
            f"patch {name}: no unified diff found; give a file made by git format-patch,"
            " git diff or diff -u"
        )
    hunk_lines = [line for fp in files for hunk in fp.hunks for line in hunk.lines]
    mangled = any(not line.marked and line.text.strip() for line in hunk_lines)
    changed = [line.text for line in hunk_lines if line.kind != CONTEXT and line.text.strip()]
    indented = [text[:1].isspace() for text in changed]
    hints = mangled and any(indented) and not all(indented)
    return PatchSet(name, tuple(files), mangled, hints)
