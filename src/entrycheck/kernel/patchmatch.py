"""Fuzzy hunk placement and whitespace repair for patches copied from mail archives.

A patch read in a web mail archive has lost its whitespace: leading whitespace is
gone, tabs became spaces, runs of spaces were collapsed, and the single ``' '``
marker of context lines vanished with the rest.  It was also often written
against a newer tree than the one it has to apply to, so a few context lines
have drifted.  ``patch``, ``git apply`` and the diff libraries either refuse such
a hunk or apply it with the archive's whitespace, which breaks assembly macros
and produces a kernel nobody wrote.  This module does the missing repair:

* lines are compared after normalising whitespace (ends stripped, internal runs
  collapsed to one space);
* every removed line must match; up to a third of the context lines (at least
  one) may differ, and the whole file is searched: the placement with the
  fewest differing context lines wins, and a tie is an error, never a guess;
* added lines get the tree's whitespace back: an added line that replaces a
  removed line takes that line's leading and internal whitespace, and one
  without a counterpart takes the indentation of the tree lines of the same
  shape around it (assembly instructions ``\\t<mnemonic>\\t<operands>``, labels
  and directives where the tree has them, block comments aligned on their
  ``/*``).

Everything here is pure: functions of line sequences, no file access.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from entrycheck.errors import InputError

CONTEXT = " "
REMOVED = "-"
ADDED = "+"

_WS_RUN = re.compile(r"(\s+)")
_LOWER_WORD = re.compile(r"[a-z][a-z0-9]*\Z")
_UPPER_WORD = re.compile(r"[A-Z_][A-Z0-9_]*\Z")
_SIMILAR = 0.5
_CODE_SHAPES = frozenset({"code", "label", "directive"})


class HunkMismatch(InputError):
    """A hunk that cannot be placed; ``reason`` and ``advice`` are short phrases."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice


@dataclass(frozen=True)
class Fit:
    """Where a hunk's old side was found in a file (``start`` is 0-based)."""

    start: int
    context_mismatches: int
    whitespace_repaired: bool


def normalise(line: str) -> str:
    """Whitespace-insensitive form of a line: ends stripped, inner runs -> one space."""
    return " ".join(line.split())


def line_shape(norm: str) -> str:
    """Coarse kind of a normalised source line, used to pair and indent lines."""
    if not norm:
        return "blank"
    if norm.startswith("/*"):
        return "comment_start"
    if norm.startswith("*"):
        return "comment_cont"
    first = norm.split(" ", 1)[0]
    if first.endswith(":") and not first.startswith("//"):
        return "label"
    if first.startswith(("#", ".")):
        return "directive"
    return "code"


def _lead(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _clip(text: str, width: int = 60) -> str:
    text = normalise(text)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _line_list(numbers: Sequence[int]) -> str:
    shown = [str(n) for n in numbers]
    if len(shown) == 2:
        return f"{shown[0]} and {shown[1]}"
    return ", ".join(shown[:-1]) + f" and {shown[-1]}"


# --------------------------------------------------------------------------- placement


def context_tolerance(context_lines: int) -> int:
    """How many context lines of a hunk may differ from the tree."""
    return max(1, context_lines // 3)


def place_hunk(
    file_lines: Sequence[str],
    file_norm: Sequence[str],
    old_side: Sequence[tuple[str, str]],
    header_start: int,
) -> Fit:
    """Find the one placement of a hunk's old side (context and removed lines).

    ``old_side`` holds (kind, text) pairs; ``header_start`` is the 1-based old-file
    line of the hunk header.  Raises ``HunkMismatch`` when no placement or more
    than one best placement exists.
    """
    if not old_side:
        start = min(max(header_start, 0), len(file_lines))
        return Fit(start, 0, False)
    kinds = [kind for kind, _ in old_side]
    wanted = [normalise(text) for _, text in old_side]
    n_context = kinds.count(CONTEXT)
    tolerance = context_tolerance(n_context)
    size = len(old_side)
    fits: list[tuple[int, int]] = []
    for start in range(len(file_norm) - size + 1):
        mismatches = 0
        for k in range(size):
            if file_norm[start + k] != wanted[k]:
                if kinds[k] == REMOVED:
                    break
                mismatches += 1
                if mismatches > tolerance:
                    break
        else:
            fits.append((start, mismatches))
    if not fits:
        raise _diagnose(file_norm, kinds, wanted, [t for _, t in old_side], header_start, tolerance)
    best = min(m for _, m in fits)
    winners = [s for s, m in fits if m == best]
    if len(winners) > 1:
        raise HunkMismatch(
            f"ambiguous: fits at lines {_line_list([s + 1 for s in winners])}"
            f" ({best} context line(s) differing at each)",
            "add context lines to the hunk so that it matches one place only",
        )
    start = winners[0]
    exact = all(file_lines[start + k] == text for k, (_, text) in enumerate(old_side))
    return Fit(start, best, not exact)


def _diagnose(
    file_norm: Sequence[str],
    kinds: Sequence[str],
    wanted: Sequence[str],
    raw: Sequence[str],
    header_start: int,
    tolerance: int,
) -> HunkMismatch:
    """Explain why a hunk has no placement, from its nearest near-miss."""
    advice = "check that the patch is meant for this tree, or rebase it onto it"
    size = len(wanted)
    if len(file_norm) < size:
        return HunkMismatch(
            f"context not found: the file has {len(file_norm)} lines, the hunk needs {size}", advice
        )
    best_key: tuple[int, int] | None = None
    best_start = 0
    for start in range(len(file_norm) - size + 1):
        score = sum(1 for k in range(size) if file_norm[start + k] == wanted[k])
        key = (score, -abs(start - (header_start - 1)))
        if best_key is None or key > best_key:
            best_key, best_start = key, start
    if best_key is None or best_key[0] == 0:
        return HunkMismatch("context not found: no line of the hunk is in the file", advice)
    for k in range(size):
        if kinds[k] == REMOVED and file_norm[best_start + k] != wanted[k]:
            return HunkMismatch(
                f"removed line {header_start + k} does not match: the patch removes {_clip(raw[k])}"
                f" where the tree has {_clip(file_norm[best_start + k])}"
                f" (nearest fit at line {best_start + 1})",
                advice,
            )
    differing = sum(
        1 for k in range(size) if kinds[k] == CONTEXT and file_norm[best_start + k] != wanted[k]
    )
    return HunkMismatch(
        f"context not found: the nearest fit, at line {best_start + 1}, differs in {differing}"
        f" of {kinds.count(CONTEXT)} context lines (at most {tolerance} tolerated)",
        advice,
    )


def already_applied(
    file_lines: Sequence[str],
    file_norm: Sequence[str],
    hunk: Sequence[tuple[str, str]],
    new_start: int,
) -> bool:
    """Whether a hunk's new side (context and added lines) is in the file already."""
    new_side = [(REMOVED if kind == ADDED else CONTEXT, text) for kind, text in hunk if kind != REMOVED]
    if not any(kind == REMOVED for kind, _ in new_side):
        return False
    try:
        place_hunk(file_lines, file_norm, new_side, new_start)
    except HunkMismatch:
        return False
    return True


# --------------------------------------------------------------------------- whitespace repair


def new_side_as_given(hunk: Sequence[tuple[str, str]], tree_old: Sequence[str]) -> list[str]:
    """New-side lines of a clean hunk: the tree's context lines, added lines verbatim."""
    out: list[str] = []
    old_index = 0
    for kind, text in hunk:
        if kind == ADDED:
            out.append(text)
            continue
        if kind == CONTEXT:
            out.append(tree_old[old_index])
        old_index += 1
    return out


@dataclass(frozen=True)
class _Slot:
    """One line of a hunk's new side: resolved text, or an added line to repair."""

    text: str | None  # tree text or repaired text; None while unresolved
    norm: str
    hint: str | None  # "col0" / "indented" from the archive's leftover space, if trusted


def _first_separator(
    token: str, template: str | None, file_lines: Sequence[str], near: int
) -> str:
    """Whitespace after a line's first token, as the tree writes it."""
    if template is not None:
        parts = _WS_RUN.split(template.strip())
        if len(parts) >= 3 and (parts[0] == token or _word_class(parts[0]) == _word_class(token)):
            return parts[1]
    split = [(i, _WS_RUN.split(line.strip(), maxsplit=1)) for i, line in enumerate(file_lines)]
    same = [(abs(i - near), parts[1]) for i, parts in split if len(parts) == 3 and parts[0] == token]
    if same:
        return min(same)[1]
    if _word_class(token) == "lower":
        styles = Counter(
            parts[1] for _, parts in split if len(parts) == 3 and _word_class(parts[0]) == "lower"
        )
        if styles:
            return styles.most_common(1)[0][0]
    return " "


def _word_class(token: str) -> str:
    if _LOWER_WORD.match(token):
        return "lower"
    if _UPPER_WORD.match(token):
        return "upper"
    return "other"


def _transplant(
    template: str, norm: str, file_lines: Sequence[str], near: int
) -> str:
    """Write ``norm`` with the leading and internal whitespace of ``template``."""
    t_parts = _WS_RUN.split(template.strip())
    t_tokens, t_seps = t_parts[0::2], t_parts[1::2]
    tokens = norm.split(" ")
    seps = list(t_seps) if len(tokens) == len(t_tokens) else [" "] * (len(tokens) - 1)
    if seps and line_shape(norm) in _CODE_SHAPES:
        seps[0] = _first_separator(tokens[0], template, file_lines, near)
    out = [_lead(template), tokens[0]]
    for sep, token in zip(seps, tokens[1:], strict=True):
        out += [sep, token]
    return "".join(out)


def _nearest(
    candidates: Sequence[tuple[int, str]], near: int, pick: Callable[[str], bool]
) -> str | None:
    """Text of the candidate line nearest to ``near`` that satisfies ``pick``."""
    best: tuple[int, str] | None = None
    for index, line in candidates:
        if pick(line) and (best is None or abs(index - near) < best[0]):
            best = (abs(index - near), line)
    return None if best is None else best[1]


def restore_new_side(
    hunk: Sequence[tuple[str, str]],
    tree_old: Sequence[str],
    file_lines: Sequence[str],
    start: int,
    indent_hints: bool,
) -> list[str]:
    """New-side lines of a placed, mangled hunk, with the tree's whitespace.

    ``hunk`` holds (kind, text) pairs in hunk order, ``tree_old`` the tree lines the
    old side was matched to, ``file_lines`` the whole file and ``start`` where the
    hunk sits.  Context lines are the tree's own; added lines are repaired.  When
    ``indent_hints`` is set, an added line whose text starts with whitespace was
    indented and one that does not was at column 0 (archives keep that much).
    """
    slots: list[_Slot] = []
    blocks: list[tuple[list[str], list[int]]] = []  # (removed tree lines, added slot indices)
    all_removed: list[str] = []
    old_index = 0
    in_block = False
    for kind, text in hunk:
        if kind == CONTEXT:
            slots.append(_Slot(tree_old[old_index], normalise(tree_old[old_index]), None))
            old_index += 1
            in_block = False
            continue
        if not in_block:
            blocks.append(([], []))
            in_block = True
        if kind == REMOVED:
            blocks[-1][0].append(tree_old[old_index])
            all_removed.append(tree_old[old_index])
            old_index += 1
        else:
            hint = None
            if indent_hints:
                hint = "indented" if text[:1].isspace() else "col0"
            blocks[-1][1].append(len(slots))
            slots.append(_Slot(None, normalise(text), hint))

    tree_index = list(enumerate(file_lines))
    resolved: list[str | None] = [s.text for s in slots]
    for removed, added in blocks:
        for position, slot_index in enumerate(added):
            resolved[slot_index] = _pair(
                slots[slot_index], position, removed, all_removed, tree_index, file_lines, start
            )
    _infer_code(slots, resolved, tree_index, file_lines, start)
    _infer_comments(slots, resolved, tree_index, start)
    return [line if line is not None else slots[i].norm for i, line in enumerate(resolved)]


def _pair(
    slot: _Slot,
    position: int,
    removed: Sequence[str],
    all_removed: Sequence[str],
    tree_index: Sequence[tuple[int, str]],
    file_lines: Sequence[str],
    start: int,
) -> str | None:
    """Repair an added line from its removed counterpart, or None if it has none."""
    norm = slot.norm
    if not norm:
        return ""
    for pool in (removed, all_removed):
        for line in pool:
            if normalise(line) == norm:
                return line
    shape = line_shape(norm)
    same_shape = [line for line in removed if line_shape(normalise(line)) == shape]
    if same_shape:
        ratio, best = max(
            (difflib.SequenceMatcher(None, normalise(line), norm).ratio(), line)
            for line in same_shape
        )
        if ratio >= _SIMILAR:
            return _transplant(best, norm, file_lines, start)
    if position < len(removed) and line_shape(normalise(removed[position])) == shape:
        return _transplant(removed[position], norm, file_lines, start)
    twin = _nearest(tree_index, start, lambda line: normalise(line) == norm)
    if twin is not None and (slot.hint is None or (slot.hint == "col0") == (_lead(twin) == "")):
        return twin
    return None


def _neighbour(
    resolved: Sequence[str | None], index: int, step: int, pick: Callable[[str], bool]
) -> str | None:
    i = index + step
    while 0 <= i < len(resolved):
        line = resolved[i]
        if line is not None and pick(line):
            return line
        i += step
    return None


def _infer_code(
    slots: Sequence[_Slot],
    resolved: list[str | None],
    tree_index: Sequence[tuple[int, str]],
    file_lines: Sequence[str],
    start: int,
) -> None:
    """Indent unpaired instructions, labels and directives like their neighbours."""
    for i, slot in enumerate(slots):
        shape = line_shape(slot.norm)
        if resolved[i] is not None or shape not in _CODE_SHAPES:
            continue
        tokens = slot.norm.split(" ")

        def same_shape(line: str, shape: str = shape) -> bool:
            return line_shape(normalise(line)) == shape

        def same_token(line: str, first: str = tokens[0]) -> bool:
            return normalise(line).split(" ", 1)[0] == first

        if slot.hint == "col0":
            lead = ""
        else:
            model = None
            if shape != "code":
                model = _nearest(tree_index, start, same_token)
            if model is None:
                model = _neighbour(resolved, i, -1, same_shape) or _neighbour(resolved, i, 1, same_shape)
            if model is None:
                model = _nearest(tree_index, start, same_shape)
            lead = _lead(model) if model is not None else ""
            if slot.hint == "indented" and not lead:
                lead = "\t" if any(line.startswith("\t") for line in file_lines) else "    "
        text = lead + tokens[0]
        if len(tokens) > 1:
            text += _first_separator(tokens[0], None, file_lines, start) + " ".join(tokens[1:])
        resolved[i] = text


def _infer_comments(
    slots: Sequence[_Slot],
    resolved: list[str | None],
    tree_index: Sequence[tuple[int, str]],
    start: int,
) -> None:
    """Align unpaired block-comment lines: ``/*`` on the code it describes, `` *`` on ``/*``."""

    def is_comment(line: str) -> bool:
        return line_shape(normalise(line)) in ("comment_start", "comment_cont")

    for i in reversed(range(len(slots))):
        if resolved[i] is not None or line_shape(slots[i].norm) != "comment_start":
            continue
        lead = "" if slots[i].hint == "col0" else None
        j = i + 1
        while lead is None and j < len(slots):
            line, norm = resolved[j], slots[j].norm
            if line is None or not norm:
                j += 1
                continue
            if line_shape(norm) == "comment_cont":
                lead = _lead(line)[:-1] if _lead(line).endswith(" ") else _lead(line)
            elif line_shape(norm) != "comment_start":
                lead = _lead(line)
            j += 1
        if lead is None:
            above = _neighbour(resolved, i, -1, lambda s: bool(s.strip()) and not is_comment(s))
            lead = _lead(above) if above is not None else ""
        resolved[i] = lead + slots[i].norm
    for i, slot in enumerate(slots):
        if resolved[i] is not None or line_shape(slot.norm) != "comment_cont":
            continue
        above = _neighbour(resolved, i, -1, lambda s: bool(s.strip()))
        below = _neighbour(resolved, i, 1, lambda s: bool(s.strip()))
        if above is not None and line_shape(normalise(above)) == "comment_start":
            lead = _lead(above) + " "
        elif above is not None and line_shape(normalise(above)) == "comment_cont":
            lead = _lead(above)
        elif below is not None and line_shape(normalise(below)) == "comment_cont":
            lead = _lead(below)
        else:
            model = _nearest(
                tree_index, start, lambda s: line_shape(normalise(s)) == "comment_cont"
            )
            lead = _lead(model) if model is not None else " "
        resolved[i] = lead + slot.norm
