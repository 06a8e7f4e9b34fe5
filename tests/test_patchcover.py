"""What a review says it checked of a hunk the image does not compile (explore/patchcover.py)."""

from __future__ import annotations

from entrycheck.explore.patchcover import FACTS, OUTSIDE, SAME_FACTS, HunkLines, cover

BP = "arch/x86/kernel/hw_breakpoint.c"
SOURCES = frozenset({"arch/x86/entry/entry_64.S"})


class NoChange:
    """A SiteMap of two builds whose code is the same."""

    def unshared(self):
        return [], []


def _review(file: str, old_facts: dict, new_facts: dict):
    hunk = HunkLines(file, "p.patch", 1, frozenset(), frozenset({12}))
    return cover([hunk], SOURCES, NoChange(), None, None, {}, {}, (old_facts, new_facts))


def test_a_hunk_in_a_file_the_checks_read_is_checked_when_its_facts_change() -> None:
    what = "the data within_cpu_entry() refuses breakpoints on"
    got = _review(BP, {BP: (what, ("cpu_dr7",))}, {BP: (what, ("cpu_dr7", "x86_spec_ctrl_current"))})
    assert [h.verdict for h in got.hunks] == [FACTS] and got.checked
    assert got.to_json()["hunks"][0]["facts"] == what


def test_the_same_facts_leave_the_hunk_unchecked() -> None:
    facts = {BP: ("who may set a kernel data breakpoint", "CAP_SYS_ADMIN")}
    got = _review(BP, facts, dict(facts))
    assert [h.verdict for h in got.hunks] == [SAME_FACTS] and not got.checked


def test_a_file_neither_compiled_nor_read_is_outside() -> None:
    got = _review("mm/memory.c", {BP: ("x", 1)}, {BP: ("x", 2)})
    assert [h.verdict for h in got.hunks] == [OUTSIDE] and not got.checked
