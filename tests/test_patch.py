"""Tests of the patch applier: real Debian kernel trees, git and diff output, properties."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from entrycheck.errors import InputError
from entrycheck.kernel.patch import parse_patch
from entrycheck.kernel.patchapply import apply_patches
from entrycheck.kernel.patchmatch import normalise

DATA = Path(__file__).parent / "data" / "patches"
ARCHIVED_PATCH = DATA / "x86-entry-paranoid-restore-cr3.archive.txt"
ENTRY_FILES = ("arch/x86/entry/calling.h", "arch/x86/entry/entry_64.S")


# --------------------------------------------------------------------------- fixtures


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def debian_61(kernel61) -> Path:
    """The source of Debian's linux-source-6.1 (fetched and cached by the kernel targets)."""
    return kernel61.source_tree


@pytest.fixture(scope="session")
def debian_612(kernel612) -> Path:
    return kernel612.source_tree


def _snapshot(tree: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file of a tree: content, inode and mode."""
    out = {}
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            st_ = path.stat()
            out[str(path.relative_to(tree))] = (path.read_bytes(), st_.st_ino, st_.st_mode)
    return out


def _make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _hardlink_copy(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-al", str(src), str(dest)], check=True)
    return dest


def _paranoid_macros(text: str) -> list[str]:
    return re.findall(r"^\.macro PARANOID_RESTORE_CR3 .*?^\.endm$", text, re.S | re.M)


# --------------------------------------------------------------------------- (a) the archived patch


def test_archived_patch_restores_the_tree_whitespace(
    tmp_path: Path, debian_61: Path, debian_612: Path
) -> None:
    src = tmp_path / "src"
    for name in ENTRY_FILES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(debian_61 / name, src / name)
    dest = _hardlink_copy(src, tmp_path / "dest")
    before = _snapshot(src)
    assert all(_snapshot(dest)[n][1] == before[n][1] for n in ENTRY_FILES)  # really hardlinked

    result = apply_patches(src, [("paranoid-cr3", ARCHIVED_PATCH.read_text())], dest)

    assert result.files == ENTRY_FILES
    calling = (dest / "arch/x86/entry/calling.h").read_text()
    expected = _paranoid_macros((debian_612 / "arch/x86/entry/calling.h").read_text())
    assert len(expected) == 2  # the PTI macro and the empty one
    assert _paranoid_macros(calling) == expected
    assert "\n/* Restore CR3 from a kernel context. May restore a user CR3 value. */\n" in calling
    assert "RESTORE_CR3 scratch_reg" not in calling.replace("PARANOID_RESTORE_CR3", "")

    old_entry = (src / "arch/x86/entry/entry_64.S").read_text()
    new_entry = (dest / "arch/x86/entry/entry_64.S").read_text()
    old_sites = re.findall(r"^\tRESTORE_CR3\s+scratch_reg=%r..\s+save_reg=%r14$", old_entry, re.M)
    assert len(old_sites) == 2
    for site in old_sites:
        assert site.replace("RESTORE_CR3", "PARANOID_RESTORE_CR3") in new_entry.split("\n")
    assert "\tPARANOID_RESTORE_CR3\tscratch_reg=%rax save_reg=%r14\n" in new_entry
    assert "\t * The order of operations is important. PARANOID_RESTORE_CR3 requires\n" in new_entry
    assert "/* Always restore stashed CR3 value (see paranoid_entry) */" not in new_entry
    assert "exceptions go through error_exit instead." in new_entry  # the tree's context stays

    by_hunk = {(p.file, p.hunk): p for p in result.placements}
    assert sorted(by_hunk) == [(ENTRY_FILES[0], 1), (ENTRY_FILES[0], 2), (ENTRY_FILES[0], 3),
                               (ENTRY_FILES[1], 1), (ENTRY_FILES[1], 2)]
    drifted = by_hunk[(ENTRY_FILES[1], 1)]
    assert drifted.context_mismatches == 1  # error_return (patch) vs error_exit (6.1)
    assert drifted.header_line == 957 and drifted.placed_line != 957
    assert old_entry.split("\n")[drifted.placed_line - 1] == "\tIBRS_EXIT save_reg=%r15"
    assert sum(p.context_mismatches for p in result.placements) == 1
    assert by_hunk[(ENTRY_FILES[0], 1)].whitespace_repaired

    after_src = _snapshot(src)
    assert after_src == before  # source untouched: bytes, inodes, modes
    for name in ENTRY_FILES:
        assert (src / name).read_bytes() == (debian_61 / name).read_bytes()
        assert (dest / name).stat().st_ino != before[name][1]  # new file, not written in place
        assert (dest / name).stat().st_mode == before[name][2]
    assert sorted(p.name for p in (dest / "arch/x86/entry").iterdir()) == ["calling.h", "entry_64.S"]


def test_archived_patch_is_recognised_as_mangled() -> None:
    patch = parse_patch(ARCHIVED_PATCH.read_text(), "paranoid-cr3")
    assert patch.mangled
    assert [f.display_path for f in patch.files] == list(ENTRY_FILES)
    assert [len(f.hunks) for f in patch.files] == [3, 2]
    first = patch.files[0].hunks[0]
    assert (first.old_start, first.old_count, first.new_start, first.new_count) == (233, 17, 233, 19)
    assert sum(1 for line in first.lines if line.kind != "+") == 17
    assert sum(1 for line in first.lines if line.kind != "-") == 19
    last = patch.files[1].hunks[1]
    assert last.lines[-1].text == "* The above invocation of paranoid_entry stored the GSBASE"


# --------------------------------------------------------------------------- (b) git format-patch


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "A U Thor", "GIT_AUTHOR_EMAIL": "a@example.org",
           "GIT_COMMITTER_NAME": "A U Thor", "GIT_COMMITTER_EMAIL": "a@example.org",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout


ORIGINAL_S = (
    "#include <linux/linkage.h>\n\n.macro SAVE_X reg:req\n\tpushq\t\\reg\n\tmovq\t%rsp, %rbp\n"
    ".endm\n\nSYM_CODE_START(foo)\n\tSAVE_X %rax\n\tret\nSYM_CODE_END(foo)\n"
)
CHANGED_S = (
    "#include <linux/linkage.h>\n\n.macro SAVE_X reg:req\n\tpushq\t\\reg\n"
    "\t/* keep the frame:  two spaces */\n\tmovq\t%rsp,   %rbp\n.endm\n\n"
    "SYM_CODE_START(foo)\n\tSAVE_X %rbx\n\tret\nSYM_CODE_END(foo)\n"
)


def test_git_format_patch_applies_exactly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _make_tree(repo, {"arch/foo.S": ORIGINAL_S, "old.txt": "gone\n", "keep.txt": "k\n"})
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    src = _make_tree(tmp_path / "src", {"arch/foo.S": ORIGINAL_S, "old.txt": "gone\n",
                                        "keep.txt": "k\n"})
    (repo / "arch/foo.S").write_text(CHANGED_S)
    (repo / "old.txt").unlink()
    (repo / "tools").mkdir()
    (repo / "tools/new.sh").write_text("#!/bin/sh\necho\tnew\n")
    (repo / "tools/new.sh").chmod(0o755)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "x86/foo: change\n\nA message.\n--\nnot a signature")
    mail = _git(repo, "format-patch", "-1", "--stdout")
    assert mail.startswith("From ") and "\n---\n" in mail and "\n-- \n" in mail

    dest = _hardlink_copy(src, tmp_path / "dest")
    result = apply_patches(src, [("0001-change.patch", mail)], dest)

    assert result.files == ("arch/foo.S", "old.txt", "tools/new.sh")
    assert (dest / "arch/foo.S").read_text() == CHANGED_S
    assert not (dest / "old.txt").exists()
    assert (dest / "tools/new.sh").read_text() == "#!/bin/sh\necho\tnew\n"
    assert (dest / "tools/new.sh").stat().st_mode & 0o777 == 0o755
    assert (src / "arch/foo.S").read_text() == ORIGINAL_S and (src / "old.txt").exists()
    foo = [p for p in result.placements if p.file == "arch/foo.S"]
    assert len(foo) == 1 and foo[0].placed_line == foo[0].header_line == 2
    assert not foo[0].whitespace_repaired and foo[0].context_mismatches == 0


def test_tabs_turned_to_spaces_are_restored(tmp_path: Path) -> None:
    """Markers intact but every tab became spaces: the tree's tabs come back."""
    changed = MACROS.replace("\tpopq\t%rbx\n\taddq\t$1, %rax\n.endm\n\n.macro M11",
                             "\tpopq\t%rbx\n\tlfence\n\taddq\t$2, %rax\n.endm\n\n.macro M11")
    patch = _diff("a.S", MACROS, changed).replace("\t", "        ")
    src = _make_tree(tmp_path / "src", {"a.S": MACROS})
    dest = _hardlink_copy(src, tmp_path / "dest")
    result = apply_patches(src, [("spaces", patch)], dest)
    assert (dest / "a.S").read_text() == changed
    assert [p.whitespace_repaired for p in result.placements] == [True]


# --------------------------------------------------------------------------- (c) does not apply

MACROS = "".join(
    f".macro M{k}\n\tmovq\t%r{k}, %rax\n\tpushq\t%rbx\n\tpopq\t%rbx\n\taddq\t$1, %rax\n.endm\n\n"
    for k in range(8, 16)
)


def _diff(path: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}")
    return f"diff --git a/{path} b/{path}\n" + "".join(lines)


def test_missing_removed_line_fails_and_writes_nothing(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src", {"a.S": MACROS, "b/c.S": MACROS})
    dest = _hardlink_copy(src, tmp_path / "dest")
    before = _snapshot(dest)
    good = _diff("a.S", MACROS, MACROS.replace("%r9, %rax", "%r9, %rcx"))
    bad_target = MACROS.replace("%r10, %rax", "%r10, %rdx").replace("%r14, %rax", "%r14, %rdx")
    bad = _diff("b/c.S", MACROS, bad_target).replace("-\tmovq\t%r14, %rax", "-\tmovq\t%r14, %rsi")

    with pytest.raises(InputError) as caught:
        apply_patches(src, [("0001-good.patch", good), ("0002-bad.patch", bad)], dest)

    message = str(caught.value)
    assert "\n" not in message
    assert "0002-bad.patch" in message and "b/c.S hunk 2" in message
    assert "removed line" in message and "does not match" in message
    assert "%r14, %rsi" in message
    assert _snapshot(dest) == before  # neither the good patch nor hunk 1 was written


def test_unknown_context_fails(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src", {"a.S": MACROS})
    dest = _hardlink_copy(src, tmp_path / "dest")
    patch = (
        "--- a/a.S\n+++ b/a.S\n@@ -10,5 +10,5 @@\n\tpushfq\n\tpopfq\n"
        "-\taddq\t$1, %rax\n+\taddq\t$2, %rax\n\tstc\n\tclc\n"
    )
    with pytest.raises(InputError) as caught:
        apply_patches(src, [("p", patch)], dest)
    assert "a.S hunk 1: context not found: the nearest fit, at line" in str(caught.value)
    assert "differs in 4 of 4 context lines (at most 1 tolerated)" in str(caught.value)
    with pytest.raises(InputError, match=r"does not exist in the tree"):
        apply_patches(src, [("p", _diff("nope.S", "a\n", "b\n"))], dest)
    assert (dest / "a.S").read_text() == MACROS


def test_hunk_line_counts_are_checked() -> None:
    text = "--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n one\n-two\n+deux\n"
    with pytest.raises(InputError, match=r"x hunk 1: header @@ -1,3 \+1,3 @@ announces 3 old"):
        parse_patch(text, "short")
    with pytest.raises(InputError, match="no unified diff found"):
        parse_patch("just a mail\n", "empty")


# --------------------------------------------------------------------------- (d) ambiguous


def test_repeated_macro_body_is_ambiguous(tmp_path: Path) -> None:
    body = "\tmovq\t%rax, %rbx\n\tpushq\t%rcx\n\tpopq\t%rcx\n"
    text = f".macro A\n{body}.endm\n\n.macro B\n{body}.endm\n"
    src = _make_tree(tmp_path / "src", {"m.S": text})
    dest = _hardlink_copy(src, tmp_path / "dest")
    patch = "--- a/m.S\n+++ b/m.S\n@@ -2,3 +2,3 @@\n movq %rax, %rbx\n-pushq %rcx\n+pushq %rdx\n popq %rcx\n"
    with pytest.raises(InputError) as caught:
        apply_patches(src, [("amb", patch)], dest)
    message = str(caught.value)
    assert "m.S hunk 1: ambiguous: fits at lines 2 and 8" in message and "\n" not in message
    assert (dest / "m.S").read_text() == text


# --------------------------------------------------------------------------- (e) series


def test_series_applies_each_patch_on_the_previous_result(tmp_path: Path) -> None:
    v0 = MACROS
    v1 = v0.replace("\tpopq\t%rbx\n\taddq\t$1, %rax\n.endm\n\n.macro M11",
                    "\tpopq\t%rbx\n\tnop\n\taddq\t$1, %rax\n.endm\n\n.macro M11")
    v2 = v1.replace("\tnop\n", "\tlfence\n")
    src = _make_tree(tmp_path / "src", {"e.S": v0})
    series = [("0001-nop.patch", _diff("e.S", v0, v1)), ("0002-lfence.patch", _diff("e.S", v1, v2))]

    dest = _hardlink_copy(src, tmp_path / "dest")
    result = apply_patches(src, series, dest)
    assert (dest / "e.S").read_text() == v2
    assert [p.placed_line for p in result.placements] == [p.header_line for p in result.placements]
    assert len(result.placements) == 2

    alone = _hardlink_copy(src, tmp_path / "alone")
    with pytest.raises(InputError, match=r"0002-lfence\.patch: e\.S hunk 1"):
        apply_patches(src, series[1:], alone)
    assert (alone / "e.S").read_text() == v0


# --------------------------------------------------------------------------- (f) diff -u


def test_plain_diff_u(tmp_path: Path) -> None:
    old_c = "int f(void)\n{\n\treturn 1;\n}\n\nint g(void)\n{\n\treturn 2;\n}\n"
    new_c = "int f(void)\n{\n\treturn 1;\n}\n\nint g(int x)\n{\n\tif (x)\n\t\treturn 3;\n\treturn 2;\n}\n"
    _make_tree(tmp_path / "old", {"drivers/x.c": old_c})
    _make_tree(tmp_path / "new", {"drivers/x.c": new_c})
    done = subprocess.run(["diff", "-u", "old/drivers/x.c", "new/drivers/x.c"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout.startswith("--- old/drivers/x.c\t")
    # the tree has moved on: the function is further down than the diff says
    src = _make_tree(tmp_path / "src", {"drivers/x.c": "/* header */\n\n" + old_c})
    dest = _hardlink_copy(src, tmp_path / "dest")
    result = apply_patches(src, [("x.diff", done.stdout)], dest)
    assert (dest / "drivers/x.c").read_text() == "/* header */\n\n" + new_c
    assert result.files == ("drivers/x.c",)
    (placement,) = result.placements
    assert placement.placed_line == placement.header_line + 2


# --------------------------------------------------------------------------- (g) property


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.,;:()*/#=%$", min_size=1, max_size=6)
_SEP = st.sampled_from([" ", "\t", "  ", " \t"])
_LEAD = st.sampled_from(["", "\t", "\t\t", "    ", " "])


@st.composite
def _source_line(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(_TOKEN, min_size=1, max_size=4))
    out = draw(_LEAD) + tokens[0]
    for token in tokens[1:]:
        out += draw(_SEP) + token
    return out


def _mangle(diff: list[str]) -> str:
    """What a web archive does: no leading whitespace, no tabs, no context marker."""
    out = []
    for line in diff:
        if line.startswith(("--- ", "+++ ", "@@ ")):
            out.append(line)
        elif line[:1] in ("+", "-"):
            out.append(line[0] + line[1:].lstrip().replace("\t", " "))
        else:
            out.append(line[1:].lstrip().replace("\t", " "))
    return "\n".join(out) + "\n"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(_source_line(), min_size=4, max_size=40, unique_by=normalise),
    data=st.data(),
)
def test_mangled_difflib_diffs_apply_back(pool: list[str], data: st.DataObject) -> None:
    size = data.draw(st.integers(min_value=1, max_value=len(pool) - 1))
    original, spare = pool[:size], pool[size:]
    edited: list[str] = []
    for line in original:
        op = data.draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace", "insert"]))
        if op in ("replace", "insert") and spare:
            edited.append(spare.pop())
        if op in ("keep", "insert") or (op == "replace" and not spare):
            edited.append(line)
    assume(edited != original)
    diff = list(difflib.unified_diff(original, edited, "a/f.S", "b/f.S", lineterm=""))
    with tempfile.TemporaryDirectory() as scratch:
        src = _make_tree(Path(scratch) / "src", {"f.S": "\n".join(original) + "\n"})
        dest = Path(scratch) / "dest"
        shutil.copytree(src, dest)
        result = apply_patches(src, [("mangled", _mangle(diff))], dest)
        got = (dest / "f.S").read_text().split("\n")
    assert got[-1] == ""
    got = got[:-1]
    assert [normalise(line) for line in got] == [normalise(line) for line in edited]
    matcher = difflib.SequenceMatcher(None, original, edited, autojunk=False)
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            assert got[j1:j2] == edited[j1:j2]  # untouched lines keep their exact bytes
    assert all(p.context_mismatches == 0 for p in result.placements)
    assert all(p.placed_line == p.header_line for p in result.placements)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(_source_line(), min_size=4, max_size=30, unique_by=normalise),
    data=st.data(),
)
def test_clean_difflib_diffs_apply_exactly(pool: list[str], data: st.DataObject) -> None:
    size = data.draw(st.integers(min_value=1, max_value=len(pool) - 1))
    original = pool[:size]
    edited = data.draw(st.permutations(pool)).copy()[: data.draw(st.integers(1, len(pool)))]
    assume(edited != original)
    diff = "".join(
        difflib.unified_diff([f"{line}\n" for line in original], [f"{line}\n" for line in edited],
                             "a/f.c", "b/f.c")
    )
    with tempfile.TemporaryDirectory() as scratch:
        src = _make_tree(Path(scratch) / "src", {"f.c": "\n".join(original) + "\n"})
        dest = Path(scratch) / "dest"
        shutil.copytree(src, dest)
        apply_patches(src, [("clean", diff)], dest)
        assert (dest / "f.c").read_text() == "\n".join(edited) + "\n"
