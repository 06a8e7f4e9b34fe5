"""What a review checked of the patch it was given: per hunk, whether it changes the image's code
and whether the explored paths ran what it changed.

The patch's effect on the image is the instructions the two builds do not share (diff's
``SiteMap``: an instruction without a counterpart in the other build).  DWARF line tables
(``debian:X.Y+debug``, or a tree built with line info) attribute each such instruction to the
hunk whose added (new build) or removed (old build) lines it comes from; what no line row names
(the expansion of a changed macro, a changed header) goes to the hunks of the files the entry
objects include.  A hunk in a file the image's objects do not depend on changes nothing that
ran: it is listed as not checked, as is one whose instructions no explored path executed --
unless the checks read facts from that file (kernel/guards.py ``tree_facts``: the data a
breakpoint may not watch, who may set one): then it is checked when those facts differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from entrycheck.kernel.patch import ADDED, REMOVED, PatchSet

# What the review says of one hunk.
OUTSIDE = "outside the image"          # its file is not a source of the image's objects
NO_CODE = "no instruction changed"     # in a source of the image, but the compiled code is the same
RAN = "ran"                            # some instruction it changed was executed
NOT_RUN = "not run"                    # it changed instructions, none of which any path executed
FACTS = "facts read"                   # not compiled into the image; what the checks read from it changed
SAME_FACTS = "facts unchanged"         # not compiled into the image; what the checks read from it did not change


@dataclass(frozen=True)
class HunkLines:
    """One hunk's changed lines: removed ones in the old file, added ones in the new file."""

    file: str
    patch: str
    hunk: int
    removed: frozenset[int]
    added: frozenset[int]


def hunk_lines(patches: list[PatchSet], placements) -> list[HunkLines]:
    """The changed lines of every hunk, where the applier placed it: ``placements`` are the
    ``HunkPlacement``s in the order the hunks were applied (a deleted file has none); without
    them a hunk is where its header says."""
    queue = list(placements or ())
    out = []
    for ps in patches:
        for fp in ps.files:
            path, delta = fp.display_path, 0
            for h in fp.hunks:
                start = h.old_start
                if fp.new_path is not None and queue and queue[0].hunk == h.number:
                    placed = queue.pop(0)
                    path, start = placed.file, placed.placed_line
                old, new = start, start + delta
                removed, added = set(), set()
                for line in h.lines:
                    if line.kind == REMOVED:
                        removed.add(old)
                        old += 1
                    elif line.kind == ADDED:
                        added.add(new)
                        new += 1
                    else:
                        old += 1
                        new += 1
                delta += h.new_count - h.old_count
                out.append(HunkLines(path, ps.name, h.number, frozenset(removed), frozenset(added)))
    return out


@dataclass
class HunkCover:
    """What the review did with one hunk."""

    file: str
    patch: str
    hunk: int
    verdict: str                               # OUTSIDE, NO_CODE, RAN, NOT_RUN, FACTS or SAME_FACTS
    instructions: tuple[str, ...] = ()         # the changed instructions attributed to it (sym+off)
    executed: tuple[str, ...] = ()             # those a path executed
    feature_sets: tuple[str, ...] = ()         # the feature sets under which one of them ran
    by_line: bool = True                       # attributed by its lines (else: as a macro or header hunk)
    facts: str = ""                            # FACTS, SAME_FACTS: what the checks read from the file

    def to_json(self) -> dict:
        return {"file": self.file, "patch": self.patch, "hunk": self.hunk, "verdict": self.verdict,
                "instructions": list(self.instructions), "executed": list(self.executed),
                "feature_sets": list(self.feature_sets), "attributed_by_line": self.by_line,
                **({"facts": self.facts} if self.facts else {})}


@dataclass
class PatchCover:
    hunks: list[HunkCover] = field(default_factory=list)
    changed: int = 0                           # instructions the two builds do not share
    unattributed: tuple[str, ...] = ()         # changed instructions no hunk of the image's sources explains
    line_info: bool = False                    # both builds had DWARF line tables

    @property
    def checked(self) -> bool:
        """Whether any instruction the patch changed was executed by an explored path, or a
        fact the checks read from the tree changed."""
        return any(h.verdict in (RAN, FACTS) for h in self.hunks)

    def to_json(self) -> dict:
        return {"checked": self.checked, "changed_instructions": self.changed, "line_info": self.line_info,
                "unattributed": list(self.unattributed), "hunks": [h.to_json() for h in self.hunks]}


def cover(hunks: list[HunkLines], sources: frozenset[str], sites, old_lines, new_lines, old_covered: dict,
          new_covered: dict, facts: tuple[dict, dict] = ({}, {})) -> PatchCover:
    """Attribute the instructions the builds do not share to ``hunks`` and judge each.

    ``facts``: per build, file -> (what, value) the checks read from that file of the tree;
    ``sources``: the files the image's objects are built from (the .cmd dependencies);
    ``sites``: explore/diff.py's SiteMap of the two images; ``*_lines``: their SourceLines;
    ``*_covered``: feature set -> the instructions the explored paths executed."""
    old_only, new_only = sites.unshared()
    line_info = bool(old_lines) and bool(new_lines)
    attributed: dict[int, list[tuple[str, int]]] = {id(h): [] for h in hunks}   # (side, address)
    by_line = {}
    for side, addrs, lines in (("old", old_only, old_lines), ("new", new_only, new_lines)):
        for a in addrs:
            where = lines.line(a) if lines else None
            if where is None:
                continue
            for h in hunks:
                if _same_file(h.file, where[0]) and where[1] in (h.removed if side == "old" else h.added):
                    attributed[id(h)].append((side, a))
                    by_line[(side, a)] = True
                    break
    rest = [("old", a) for a in old_only if ("old", a) not in by_line] + \
        [("new", a) for a in new_only if ("new", a) not in by_line]
    # What no changed line explains comes from a changed macro or header: the hunks in the image's
    # sources that no line row names share it.
    named = {_norm(f) for lines in (old_lines, new_lines) if lines for f in lines.files}
    indirect = [h for h in hunks if _in(h.file, sources) and _norm(h.file) not in named]
    if not line_info:
        indirect = [h for h in hunks if _in(h.file, sources)]
    for h in indirect:
        attributed[id(h)] += rest
    out = PatchCover(changed=len(old_only) + len(new_only), line_info=line_info,
                     unattributed=tuple(sorted(_name(sites, s, a) for s, a in rest)) if not indirect else ())
    for h in hunks:
        mine = sorted(set(attributed[id(h)]))
        if not _in(h.file, sources):
            key = _norm(h.file)
            read = facts[0].get(key) or facts[1].get(key)
            if read is None:
                out.hunks.append(HunkCover(h.file, h.patch, h.hunk, OUTSIDE))
                continue
            old_value, new_value = (side.get(key, (None, None))[1] for side in facts)
            out.hunks.append(HunkCover(h.file, h.patch, h.hunk, FACTS if old_value != new_value else SAME_FACTS,
                                       facts=read[0]))
            continue
        if not mine:
            out.hunks.append(HunkCover(h.file, h.patch, h.hunk, NO_CODE, by_line=h not in indirect))
            continue
        ran, sets = [], set()
        for side, a in mine:
            for fs, covered in (old_covered if side == "old" else new_covered).items():
                if a in covered:
                    ran.append((side, a))
                    sets.add(str(fs))
        out.hunks.append(HunkCover(h.file, h.patch, h.hunk, RAN if ran else NOT_RUN,
                                   tuple(_name(sites, s, a) for s, a in mine),
                                   tuple(dict.fromkeys(_name(sites, s, a) for s, a in ran)), tuple(sorted(sets)),
                                   by_line=h not in indirect))
    return out


def _name(sites, side: str, address: int) -> str:
    image = sites.old if side == "old" else sites.new
    return f"{image.symbolize(address)} ({side})"


def _norm(path: str) -> str:
    return str(PurePosixPath(path))


def _same_file(hunk_file: str, line_file: str) -> bool:
    return _norm(hunk_file) == _norm(line_file) or _norm(line_file).endswith("/" + _norm(hunk_file))


def _in(path: str, sources: frozenset[str]) -> bool:
    """Whether ``path`` is a source of the image (every file is, when the sources are unknown)."""
    return not sources or _norm(path) in sources


__all__ = ["HunkLines", "HunkCover", "PatchCover", "hunk_lines", "cover", "OUTSIDE", "NO_CODE", "RAN", "NOT_RUN",
           "FACTS", "SAME_FACTS"]
