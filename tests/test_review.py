"""`entrycheck review` of the seed patch and `entrycheck diff` of the two Debian kernels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from entrycheck.explore.costmodel import CostModel, parse_cost
from entrycheck.errors import InputError

pytestmark = pytest.mark.kernel
CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
SEED = Path(__file__).parent / "data" / "patches" / "x86-entry-paranoid-restore-cr3.archive.txt"
PARANOID = ("nmi-from-kernel", "mc-from-kernel", "db-from-kernel")
SCENARIOS = "nmi-from-kernel,mc-from-kernel,db-from-kernel,syscall"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True)


@pytest.fixture(scope="module")
def seed_review(kernel61, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("review") / "review.json"
    proc = cli("review", "debian:6.1", "--patch", str(SEED), "--depth", "1", "--scenarios", SCENARIOS,
               "--workers", "2", "--json", str(out))
    return proc, json.loads(out.read_text())


def _has_pti(features: str) -> bool:
    return "pti" in features.split(",")


def test_review_applies_the_seed_as_published_and_exits_0(seed_review) -> None:
    proc, doc = seed_review
    assert proc.returncode == 0, proc.stderr
    assert doc["new"]["target"].endswith("+ " + SEED.name)
    assert doc["new_violations"] == []
    # The archive's context says error_return where 6.1 says error_exit: placed with drift.
    assert "context lines differ" in proc.stderr


def test_one_fewer_cr3_write_on_each_paranoid_return_from_kernel_with_pti(seed_review) -> None:
    _, doc = seed_review
    base = {(e["scenario"], e["features"]): e for e in doc["scenarios"] if not e["injections"]}
    feature_sets = doc["feature_sets"]
    # the 16 model sets, and the seven presets a default review adds at depth 0 (their paths alone)
    assert len(feature_sets) - len(doc["paths_only"]) == 16 and len(doc["paths_only"]) == 7
    for fs in feature_sets:
        for sc in PARANOID:
            e = base[(sc, fs)]
            delta = e["old"]["cr3"]["writes"] - e["new"]["cr3"]["writes"]
            if _has_pti(fs):
                assert delta == 1, (sc, fs, e)
                assert e["old"]["cr3"]["redundant_writes"] - e["new"]["cr3"]["redundant_writes"] == 1
            else:
                assert delta == 0 and e["old"]["cr3"]["writes"] == 0, (sc, fs, e)
            assert not e["behaviour_changed"]


def test_no_change_without_pti(seed_review) -> None:
    _, doc = seed_review
    changed = [e for e in doc["scenarios"] if e["cr3_writes_changed"] or e["behaviour_changed"]]
    assert changed
    assert all(_has_pti(e["features"]) for e in changed)
    seed_sites = r"\d+ redundant CR3 write\(s\) gone at (paranoid_exit|end_repeat_nmi)\+"
    assert all(re.match(seed_sites, c["description"]) for c in doc["changes"]), doc["changes"]
    # One or two per path (a nested paranoid return writes too) -- more only where the kernel's
    # exc_debug reads its stack canary under a data breakpoint on it: the nested #DB overwrites
    # the live #DB frame on the IST stack and the path loops through paranoid_exit until the
    # instruction budget ends it (the known ist-reentered finding, in both builds).
    for e in changed:
        if e["old"]["cr3"]["writes"] - e["new"]["cr3"]["writes"] > 2:
            assert e["scenario"] == "db-from-kernel" and e["old"]["outcome"] == "no-return", e
            assert e["injections"][0]["at"].startswith("exc_debug+"), e


def test_changed_paths_are_listed_by_class(seed_review) -> None:
    """The JSON lists the changed paths (and each path without injection) by class: one entry per
    scenario, feature set, effects, costs, outcomes and verdict, with how many paths it stands for."""
    _, doc = seed_review
    entries = doc["scenarios"]
    changed = [e for e in entries if e["cr3_writes_changed"]]
    assert sum(e["paths"] for e in changed) == doc["paths_changed"] > len(changed)
    assert all(e["paths"] == 1 for e in entries if not e["injections"])
    classes = [(e["scenario"], e["features"], tuple(e["effects"]), bool(e["injections"]),
                json.dumps(e["old"], sort_keys=True), json.dumps(e["new"], sort_keys=True), e["behaviour_changed"],
                e["cr3_writes_changed"]) for e in entries]
    assert len(classes) == len(set(classes))


def test_returns_into_the_user_cr3_window_are_unchanged(kernel61, seed_review) -> None:
    """An exception taken after SWITCH_TO_USER_CR3 in the SYSRET path returns with the user CR3:
    both kernels must still write CR3 there — the patch may not drop those writes."""
    from entrycheck.image import load_build
    from entrycheck.image.decode import sweep
    from entrycheck.image.features import FeatureSet

    from entrycheck.explore.check import CheckConfig
    from entrycheck.kernel.review import patched_build
    from entrycheck.session import diff, object_ref, run_check

    assert seed_review[0].returncode == 0, seed_review[0].stderr     # (it built the patched tree)
    fs = FeatureSet.parse("pti,pcid")
    loaded = load_build(kernel61)
    image = loaded.image(fs)
    start, end = image.symbol_range("entry_SYSCALL_64")
    sysret = image.address_of("entry_SYSRETQ_unsafe_stack")
    insns = list(sweep(image.read(start, end - start), start))
    last_write = [i for i in insns if i.op_str.endswith("%cr3") and i.address < sysret][-1]
    window = {image.symbolize(i.address) for i in insns if last_write.end <= i.address <= sysret + 0x10}
    # Every changed path (the JSON lists one per class of them)
    patched = patched_build(kernel61, [(SEED.name, SEED.read_text())]).build
    cfg = CheckConfig(scenarios=("syscall",), feature_sets=(fs,), depth=1, user_values=False)
    done = diff(kernel61, loaded, patched, load_build(patched), cfg, workers=1)
    changed = list(done.result.changed())
    assert [d.injections for d in changed if len(d.injections) == 1 and d.injections[0].at in window] == []
    # ... and the window was explored: an exception arrives at each of its boundaries up to the
    # SYSRET's unsafe stack (the kernel runs there on the user CR3).
    result = run_check(object_ref(kernel61), cfg)
    injected = {p.injections[0].at for p in result.paths if len(p.injections) == 1}
    must = {s for s in window if image.parse_location(s) <= sysret}
    assert must and must <= injected, sorted(must - injected)


def test_depth_2_findings_the_seed_keeps_are_neither_new_nor_fixed(kernel61, tmp_path) -> None:
    """Stock 6.1 has depth-2 findings the seed does not touch: a context check tripping in user
    space after the return, and a %gs access with the user GSBASE at RESTORE_CR3's first
    per-cpu instruction, which the seed turns from `bt`+`btr` into `btr` alone.  Both are the
    same findings in the patched build, so the review has nothing new or fixed and exits 0."""
    out = tmp_path / "review.json"
    # Depth 2 on the contract stubs: at depth 2 the kernel's C costs more than a test may take.
    proc = cli("review", "debian:6.1", "--patch", str(SEED), "--scenarios", "nmi-from-user,db-from-user",
               "--features", "none", "--features", "pti,pcid,kernel_ibrs", "--depth", "2", "--c-stubs",
               "--workers", "2", "--json", str(out))
    doc = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["new_violations"] == [] and doc["fixed_violations"] == []
    both = re.search(r"Violations: 0 new, 0 fixed, (\d+) in both", proc.stdout)
    assert both and int(both.group(1)) >= 4, proc.stdout[:2000]


def test_sites_of_dropped_instructions_move_to_the_next_kept_one(kernel61) -> None:
    from entrycheck.explore.diff import SiteMap, _listing
    from entrycheck.image import load_build
    from entrycheck.image.features import FeatureSet
    from entrycheck.kernel.review import patched_build, read_patches

    new = patched_build(kernel61, read_patches([SEED])).build
    fs = FeatureSet.parse("pti,pcid")
    old_image, new_image = load_build(kernel61).image(fs), load_build(new).image(fs)
    sites = SiteMap(old_image, new_image)
    # 6.1 tests the flush bit (bt %rax,%gs:X) before clearing it (btr); with the seed only the btr
    old_listing = _listing(old_image, "paranoid_exit", old_image.address_of("paranoid_exit"))
    bt = next(a for a, t in old_listing if t.startswith("btq %rax, %gs:"))
    btr = next(a for a, t in old_listing if t.startswith("btrq %rax, %gs:"))
    assert bt < btr
    assert sites.site(old_image.symbolize(bt)) is None                  # injections never move
    moved = sites.violation_site(old_image.symbolize(bt))
    assert moved == sites.site(old_image.symbolize(btr))
    assert new_image.instruction_text(new_image.parse_location(moved)).startswith("btr")
    assert sites.site("0x401a2c") == "0x401a2c"                       # user space is the same in both


def test_diff_of_the_debian_kernels_shows_the_same_class_of_change(kernel61, kernel612, tmp_path) -> None:
    out = tmp_path / "diff.json"
    proc = cli("diff", "debian:6.1", "debian:6.12", "--depth", "1", "--scenarios", SCENARIOS, "--features",
               "pti,pcid", "--features", "pti", "--features", "pcid", "--workers", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    descriptions = [c["description"] for c in doc["changes"]]
    assert any(d.startswith("1 redundant CR3 write(s) gone at paranoid_exit") for d in descriptions)
    assert any("end_repeat_nmi" in d for d in descriptions)
    # every other difference is explained: a change group or an unmatched-code group
    changed = [e for e in doc["scenarios"] if e["cr3_writes_changed"] or e["behaviour_changed"]]
    assert sum(c["paths"] for c in doc["changes"]) == sum(e["paths"] for e in changed)
    assert sum(u["paths"] for u in doc["unmatched"]) == doc["paths_only_in_old"] + doc["paths_only_in_new"]
    assert "What changed" in proc.stdout and max(len(line) for line in proc.stdout.splitlines()) <= 80


def test_switch_kernel_asid_shows_the_behaviour_change_the_seed_introduces(kernel61, tmp_path) -> None:
    out = tmp_path / "review.json"
    proc = cli("review", "debian:6.1", "--patch", str(SEED), "--depth", "0", "--scenarios",
               "nmi-from-kernel,mc-from-kernel", "--features", "pti,pcid", "--handler-effects",
               "switch-kernel-asid", "--json", str(out))
    assert proc.returncode == 1, proc.stderr        # NEW has violations OLD had not
    doc = json.loads(out.read_text())
    new = {(v["scenario"], v["invariant"]) for v in doc["new_violations"]}
    assert new == {("nmi-from-kernel", "context-not-restored"), ("mc-from-kernel", "context-not-restored")}
    assert all(v["effects"] == ["switch-kernel-asid"] for v in doc["new_violations"])
    changed = [e for e in doc["scenarios"] if e["effects"] == ["switch-kernel-asid"] and e["behaviour_changed"]]
    assert {e["scenario"] for e in changed} == {"nmi-from-kernel", "mc-from-kernel"}


def test_cost_model_and_nmi_rate(kernel61) -> None:
    assert parse_cost("cr3=150,wrmsr=90") == CostModel(cr3=150, cr3_flush=CostModel().cr3_flush, wrmsr=90)
    with pytest.raises(InputError):
        parse_cost("cr4=1")
    with pytest.raises(InputError):
        parse_cost("cr3=-5")
    proc = cli("review", "debian:6.1", "--patch", str(SEED), "--depth", "0", "--scenarios", "nmi-from-kernel",
               "--features", "pti,pcid", "--cost", "cr3=250", "--nmi-rate", "1000")
    assert proc.returncode == 0, proc.stderr
    # one NOFLUSH write saved per NMI return: 250 cycles x 1000/s
    assert "250,000 cycles/s per CPU saved" in proc.stdout
    bad = cli("review", "debian:6.1", "--patch", str(SEED), "--cost", "warp=1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_review_with_a_patch_that_does_not_apply(kernel61, tmp_path) -> None:
    from entrycheck.kernel.cache import Cache

    patch = tmp_path / "bad.patch"
    patch.write_text("--- a/arch/x86/entry/calling.h\n+++ b/arch/x86/entry/calling.h\n@@ -1,3 +1,3 @@\n"
                     " nothing\n-that is\n+in the tree\n context\n")
    before = sorted(p.name for p in Cache.open().src.iterdir())
    proc = cli("review", "debian:6.1", "--patch", str(patch), "--depth", "0")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "calling.h" in proc.stderr and "hunk 1" in proc.stderr
    assert sorted(p.name for p in Cache.open().src.iterdir()) == before      # nothing half-made published


# ---- what a review checked of the patch ---------------------------------------------------------
TRAPS_PATCH = """--- a/arch/x86/kernel/traps.c
+++ b/arch/x86/kernel/traps.c
@@ -860,6 +860,7 @@
 asmlinkage __visible noinstr struct pt_regs *sync_regs(struct pt_regs *eregs)
 {
 	struct pt_regs *regs = (struct pt_regs *)this_cpu_read(cpu_current_top_of_stack) - 1;
+	regs--;
 	if (regs != eregs)
 		*regs = *eregs;
 	return regs;
"""

GS_INDEX_PATCH = """--- a/arch/x86/entry/entry_64.S
+++ b/arch/x86/entry/entry_64.S
@@ -780,7 +780,7 @@
 	swapgs
 .Lgs_change:
 	ANNOTATE_NOENDBR // error_entry
-	movl	%edi, %gs
+	movl	%esi, %gs
 2:	ALTERNATIVE "", "mfence", X86_BUG_SWAPGS_FENCE
 	swapgs
 	FRAME_END
"""


def test_the_seed_review_says_each_hunk_ran(seed_review) -> None:
    """Every hunk of the seed changes code the explored paths ran: the calling.h ones through the
    macro's expansions (no line of the macro names an instruction), the entry_64.S ones by line."""
    _, doc = seed_review
    patch = doc["patch"]
    assert patch["checked"] and patch["changed_instructions"] > 0
    by_file = {}
    for h in patch["hunks"]:
        by_file.setdefault(h["file"], []).append(h)
    assert set(by_file) == {"arch/x86/entry/calling.h", "arch/x86/entry/entry_64.S"}
    ran = [h for h in patch["hunks"] if h["verdict"] == "ran"]
    assert ran and all(any(e.startswith("paranoid_exit") or "nmi" in e for e in h["executed"]) for h in ran), ran
    # Its ALTERNATIVE's jump runs without PTI too; the CR3 write it guards only with it.
    assert all(any(_has_pti(fs) for fs in h["feature_sets"]) for h in ran)
    # A build without line tables attributes the changed instructions to every hunk of the image's
    # sources, and says so.
    assert patch["line_info"] is False and not any(h["attributed_by_line"] for h in patch["hunks"])


def test_a_review_of_c_code_outside_the_image_says_nothing_was_checked(kernel61, tmp_path) -> None:
    """With the contract stubs, a patch to traps.c (sync_regs) is not code of the image's objects: the
    review lists its hunk as not checked, ends with that verdict instead of 'no new violations', and
    exits 4.  With the kernel's C running (the default) the same hunk is in the image, and ran."""
    patch = tmp_path / "sync-regs.patch"
    patch.write_text(TRAPS_PATCH)
    out = tmp_path / "review.json"
    args = ["review", "debian:6.1", "--patch", str(patch), "--depth", "0", "--features", "pti,pcid", "--json"]
    ran = cli(*args, str(out))
    assert ran.returncode in (0, 1), ran.stdout[-2000:] + ran.stderr
    assert [h["verdict"] for h in json.loads(out.read_text())["patch"]["hunks"]] == ["ran"]
    assert "NOT CHECKED" not in ran.stdout
    proc = cli(*args, str(out), "--c-stubs")
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["patch"]["checked"] is False
    assert [h["verdict"] for h in doc["patch"]["hunks"]] == ["outside the image"]
    assert "Verdict: NOT CHECKED" in proc.stdout and "no new violations" not in proc.stdout
    assert "arch/x86/kernel/traps.c hunk 1: not checked" in proc.stdout


def test_a_review_of_entry_code_no_path_runs_says_nothing_was_checked(kernel61, tmp_path) -> None:
    """A patch to asm_load_gs_index (entry_64.S, in the image, reached by no scenario) changes
    instructions no explored path runs: not checked, exit 4."""
    patch = tmp_path / "gs-index.patch"
    patch.write_text(GS_INDEX_PATCH)
    out = tmp_path / "review.json"
    proc = cli("review", "debian:6.1", "--patch", str(patch), "--depth", "1", "--features", "pti,pcid",
               "--json", str(out))
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr
    hunks = json.loads(out.read_text())["patch"]["hunks"]
    assert len(hunks) == 1 and hunks[0]["verdict"] == "not run" and hunks[0]["instructions"]
    assert all(i.startswith("asm_load_gs_index") for i in hunks[0]["instructions"]), hunks[0]
