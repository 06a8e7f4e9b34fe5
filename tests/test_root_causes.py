"""Root causes and preconditions on the stock kernels: what a maintainer reads first."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from entrycheck.explore.check import CheckConfig
from entrycheck.session import ObjectRef, run_check
from entrycheck.explore.preconditions import Reach
from entrycheck.image.features import FeatureSet

pytestmark = pytest.mark.kernel

CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]


def ref(build) -> ObjectRef:
    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)


def chains(findings) -> set:
    return {(f.scenario, f.injections) for f in findings}


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_the_kernel_ibrs_db_class_is_one_ist_reentered_root_cause(built_kernels, series: str) -> None:
    """A user-mode #DB runs error_entry on the #DB IST stack; IBRS_ENTER reads
    x86_spec_ctrl_current there, which hw_breakpoint.c does not protect: a data breakpoint
    on it nests a second #DB on the live frame.  That is reported once, at the second
    delivery, with what it needs; its symptoms are folded under it."""
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("kernel_ibrs"),), depth=1)
    folded = run_check(ref(built_kernels[series]), cfg)
    roots = [f for f in folded.findings if f.invariant == "ist-reentered"]
    assert roots, [(f.invariant, f.site) for f in folded.findings]
    root = next(f for f in roots if f.scenario == "db-from-user" and "x86_spec_ctrl_current" in f.message)
    assert [i.vector.label for i in root.injections] == ["db"]
    assert root.site.startswith("error_entry+") and "x86_spec_ctrl_current" in root.message
    db = [p for p in root.preconditions if p.kind == "db"]
    assert len(db) == 1 and "x86_spec_ctrl_current" in db[0].text and db[0].reach is Reach.ROOT
    assert root.reach is Reach.ROOT
    doc = root.to_json()
    assert doc["reach"] == "needs root"
    assert any("x86_spec_ctrl_current" in p["text"] for p in doc["preconditions"])
    # Nothing else is reported for that path: what went wrong after the nested #DB is folded.
    same = [f for f in folded.findings if (f.scenario, f.injections) == (root.scenario, root.injections)]
    assert same == [root]
    assert root.folded

    # Unfolded, the symptoms come back as findings of their own on the same path.
    unfolded = run_check(ref(built_kernels[series]), replace(cfg, fold=False))
    symptoms = {f.invariant for f in unfolded.findings
                if (f.scenario, f.injections) == (root.scenario, root.injections) and f.invariant != "ist-reentered"}
    assert symptoms and symptoms <= set(root.folded)
    assert symptoms & {"percpu-with-user-gs", "emulation-fault"}


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_a_db_inside_sync_regs_on_the_db_stack_is_found_on_every_feature_set(built_kernels, series: str) -> None:
    """sync_regs (C) reads the per-cpu top of stack while still on the IST stack of a
    user-mode #DB, and hw_breakpoint.c does not protect it: a breakpoint there nests a #DB
    on the live frame whatever the mitigations.  Without C footprints it is not seen."""
    cfg = CheckConfig(scenarios=("db-from-user",), feature_sets=(FeatureSet.parse("pti,pcid"),), depth=1)
    result = run_check(ref(built_kernels[series]), cfg)
    assert [(f.invariant, f.site) for f in result.findings] == [("ist-reentered", "sync_regs")]
    f = result.findings[0]
    top = "pcpu_hot" if series == "6.12" else "cpu_current_top_of_stack"
    assert f"sync_regs, which reads {top}" in f.message
    assert any(p.kind == "db" and top in p.text for p in f.preconditions)
    assert not run_check(ref(built_kernels[series]), replace(cfg, c_footprints=False)).findings


def test_a_nested_nmi_is_a_reentry_only_before_the_frame_is_copied(kernel612) -> None:
    """asm_exc_nmi is built for nested NMIs once it has copied its frame: a nested NMI
    there is the designed path, not ist-reentered.  An NMI that an early #MC's IRET
    lets in before the copy lands on the live frame (traps.c: 'nested NMI will corrupt
    the NMI stack') and is reported, with the machine check it needs."""
    cfg = CheckConfig(scenarios=("nmi-from-kernel",), feature_sets=(FeatureSet.parse("pti,pcid"),), depth=2)
    result = run_check(ref(kernel612), cfg)
    roots = [f for f in result.findings if f.invariant == "ist-reentered"]
    assert roots
    for f in roots:
        # let in by the #MC's IRET: latched meanwhile, or arriving in the rest of the NMI handler
        assert f.reach is Reach.MACHINE_CHECK, f.message
        labels = [i.vector.label for i in f.injections]
        assert "latched" in f.message and "mc" in labels or labels[-2:] == ["mc", "nmi"], (labels, f.message)
    # The frame is copied by the end of first_nmi's copy loop; nothing after it re-enters.
    copied = [f for f in roots if f.site.startswith(("repeat_nmi", "end_repeat_nmi", "nested_nmi"))]
    assert not copied, [(f.site, f.message) for f in copied]
    # `trace` finds each of them again on its own (recording the path without that NMI once more).
    from entrycheck.explore.replay import trace
    from entrycheck.explore.scenarios import scenario
    from entrycheck.kernelabi.world import build_world

    world = build_world(ref(kernel612).load().image(FeatureSet.parse("pti,pcid")))
    for f in roots[::max(1, len(roots) // 6)]:
        t = trace(world, scenario(f.scenario), f.injections)
        assert [(v.invariant, world.image.symbolize(v.pc)) for v in t.violations][:1] == [("ist-reentered", f.site)]
    # Paths that do not re-enter still report their own violations, preconditions first.
    others = [f for f in result.findings if f.invariant != "ist-reentered"]
    assert others and all(f.preconditions for f in others)
    assert all(f.preconditions[0].kind == "entry" for f in result.findings)


def test_check_json_and_text_lead_with_the_root_cause(kernel61, tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(CLI + ["check", str(kernel61.object_path), "--features", "kernel_ibrs", "--depth", "1",
                                 "--scenarios", "db-from-user", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(out.read_text())
    # IBRS_ENTER's read in error_entry, and sync_regs' read of the top of stack.
    assert [v["invariant"] for v in doc["violations"]] == ["ist-reentered", "ist-reentered"]
    assert {v["site"].partition("+")[0] for v in doc["violations"]} == {"error_entry", "sync_regs"}
    v = doc["violations"][0]
    assert v["reach"] == "needs root" and v["folded"]
    # the path's links, then what the machine must be: kernel_ibrs alone is an Intel CPU booted
    # with spectre_v2=ibrs and its other mitigations off (image/cpus.py names one)
    assert [p["kind"] for p in v["preconditions"]] == ["entry", "db", "machine"]
    assert "spectre_v2=ibrs" in v["preconditions"][-1]["text"]
    text = proc.stdout
    assert text.index("ist-reentered") < text.index("reproduce:")
    assert "needs: a #DB in user mode" in text and "x86_spec_ctrl_current" in text
    assert "symptoms folded under it" in text


def test_the_repeat_nmi_findings_are_those_of_config_debug_entry(kernel612, tmp_path) -> None:
    """x86_64_defconfig sets CONFIG_DEBUG_ENTRY, whose IRET in first_nmi unmasks NMIs early.
    Built from the same tree without it, the kernel has no repeat_nmi findings; with it,
    the findings that carry the CONFIG_DEBUG_ENTRY precondition are exactly the ones the
    build without it does not have."""
    from collections import Counter

    from entrycheck.kernel.guards import iret_guards
    from entrycheck.kernel.targets import build_tree_object

    tree = kernel612.source_tree
    config = tmp_path / "no-debug-entry.config"
    config.write_bytes((kernel612.object_path.parent / "kernel.config").read_bytes())
    subprocess.run(["bash", str(tree / "scripts" / "config"), "--file", str(config), "-d", "DEBUG_ENTRY"], check=True)
    without = build_tree_object(tree, config=config)
    assert "CONFIG_DEBUG_ENTRY=y" in (kernel612.object_path.parent / "kernel.config").read_text()
    guards = iret_guards(tree)
    assert [(label, option) for label, option, _ in guards] == [("first_nmi", "CONFIG_DEBUG_ENTRY")]

    cfg = CheckConfig(scenarios=("nmi-from-kernel", "nmi-from-user"), feature_sets=(FeatureSet.parse("pti,pcid"),),
                      depth=2)
    built = {name: run_check(ObjectRef(b.object_path, b.cpufeatures_h, b.asm_offsets_h, guards=guards), cfg)
             for name, b in (("with", kernel612), ("without", without))}

    def needs_option(f) -> bool:
        return any(p.kind == "config" and "CONFIG_DEBUG_ENTRY=y" in p.text for p in f.preconditions)

    with_it, without_it = built["with"].findings, built["without"].findings
    assert not [f for f in without_it if f.site.startswith("repeat_nmi")]
    assert not [f for f in without_it if needs_option(f)]
    at_repeat = [f for f in with_it if f.site.startswith("repeat_nmi")]
    assert at_repeat and all(needs_option(f) for f in at_repeat)
    assert all(f.reach is Reach.BUILD for f in with_it if needs_option(f))

    def key(f) -> tuple:
        return (f.invariant, f.scenario, tuple(i.vector for i in f.injections))

    assert Counter(key(f) for f in with_it if not needs_option(f)) == Counter(key(f) for f in without_it)


def test_a_patch_to_hw_breakpoint_c_is_reviewed_like_entry_code(kernel61, tmp_path) -> None:
    """The breakpoint exclusions come from the tree's own hw_breakpoint.c: a patch adding
    x86_spec_ctrl_current and cpu_current_top_of_stack to within_cpu_entry() fixes the
    ist-reentered findings of kernel_ibrs, and review says so and exits 0."""
    import difflib

    from entrycheck.kernel.guards import BUILTIN_REFUSALS, breakpoint_refusals

    assert breakpoint_refusals(kernel61.source_tree) == BUILTIN_REFUSALS
    path = "arch/x86/kernel/hw_breakpoint.c"
    old = (kernel61.source_tree / path).read_text()
    anchor = ("\t\tif (within_area(addr, end, (unsigned long)&per_cpu(cpu_dr7, cpu),\n"
              "\t\t\t\tsizeof(cpu_dr7)))\n\t\t\treturn true;\n")
    assert old.count(anchor) == 1
    add = "".join(f"\n\t\tif (within_area(addr, end,\n\t\t\t\t(unsigned long)&per_cpu({name}, cpu),\n"
                  f"\t\t\t\tsizeof(u64)))\n\t\t\treturn true;\n"
                  for name in ("x86_spec_ctrl_current", "cpu_current_top_of_stack"))
    new = old.replace(anchor, anchor + add)
    patch = tmp_path / "hw-breakpoint.patch"
    patch.write_text("Subject: [PATCH] x86/hw_breakpoint: refuse data read on IST stacks\n\n---\n" + "".join(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}")))

    out = tmp_path / "review.json"
    proc = subprocess.run(CLI + ["review", "debian:6.1", "--patch", str(patch), "--depth", "1", "--features",
                                 "kernel_ibrs", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    doc = json.loads(out.read_text())
    fixed = doc["fixed_violations"]
    assert fixed and {v["invariant"] for v in fixed} == {"ist-reentered"}
    assert any("x86_spec_ctrl_current" in p["text"] for v in fixed for p in v["preconditions"])
    assert doc["new_violations"] == []
    # hw_breakpoint.c is not compiled into the image: the review checked it through what the
    # checks read from it; no instruction of the image changed (the C's .altinstr_aux matched).
    assert doc["patch"]["checked"] and doc["patch"]["changed_instructions"] == 0
    assert [h["verdict"] for h in doc["patch"]["hunks"]] == ["facts read"]
    # Paths only one build has: the old one's #DBs on the data the patch now refuses, nothing else.
    assert all(u["side"] == "old" for u in doc["unmatched"]), doc["unmatched"]


def test_format_mail_writes_up_the_ist_class_with_its_fix(kernel61, tmp_path) -> None:
    from entrycheck.kernel.guards import BREAKPOINT_SOURCE, parse_refusals

    proc = subprocess.run(CLI + ["check", "debian:6.1", "--features", "kernel_ibrs", "--depth", "1", "--format",
                                 "mail"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    mail = proc.stdout
    # a verified fix: a patch subject with hw_breakpoint.c's prefix; where the class comes from as
    # far as a cited change says (the top of stack), the rest named unknown, so no Fixes: tag
    assert mail.startswith("Subject: [PATCH] x86/hw_breakpoint: ")
    flat = " ".join(mail.split())
    assert "Introduced by for cpu_current_top_of_stack: 1591584e2e76 moved the top of stack" in flat, mail
    assert "\nFixes: " not in mail and "Reach: needs root; a machine configured as " in flat
    assert all(len(line.expandtabs(8)) <= 72 for line in mail.splitlines()), \
        [line for line in mail.splitlines() if len(line.expandtabs(8)) > 72]
    for part in ("What happens", "What it needs (needs root)", "x86_spec_ctrl_current", "Reproduce",
                 "entrycheck trace debian:6.1 \\", "--inject db@error_entry+", "Suggested fix", "within_cpu_entry()"):
        assert part in mail, part
    # The fix was checked: the class's findings are gone with it (the refusals read from the patched file).
    verified = re.search(r"Verified by entrycheck with the change applied: (\d+) of the (\d+) findings fixed, "
                         r"(\d+) new", " ".join(mail.split()))
    assert verified and int(verified.group(1)) > 0, mail
    # The suggested diff applies to the tree and makes within_cpu_entry() refuse the variable.
    diff = mail[mail.index("--- a/"):mail.index("\n-- \n") + 1]
    work = tmp_path / "tree"
    (work / BREAKPOINT_SOURCE).parent.mkdir(parents=True)
    (work / BREAKPOINT_SOURCE).write_text((kernel61.source_tree / BREAKPOINT_SOURCE).read_text())
    (tmp_path / "fix.diff").write_text(diff)
    applied = subprocess.run(["git", "apply", str(tmp_path / "fix.diff")], cwd=work, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    assert "x86_spec_ctrl_current" in parse_refusals((work / BREAKPOINT_SOURCE).read_text())

    bad = subprocess.run(CLI + ["check", "debian:6.1", "--depth", "0", "--class", "no-such"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_every_depth_2_finding_on_the_stock_kernels_says_what_it_needs(built_kernels, series: str) -> None:
    from entrycheck.kernel.guards import breakpoint_refusals, iret_guards

    build = built_kernels[series]
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("pti,pcid,fsgsbase,kernel_ibrs"),), depth=2)
    result = run_check(ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h,
                                 guards=iret_guards(build.source_tree),
                                 refusals=breakpoint_refusals(build.source_tree)), cfg, workers=2)
    assert result.findings and result.stopped_because == "done"
    for f in result.raw_findings:
        kinds = [p.kind for p in f.preconditions]
        assert kinds[0] == "entry" and len(kinds) >= 1 + len(f.injections), (f.invariant, f.site, kinds)
        # After the entry: the user values it starts from and the handler effects, then one per link.
        head = 1 + sum(1 for k in kinds[1:] if k in ("user", "effect"))
        assert all(k in ("user", "effect") for k in kinds[1:head]), kinds
        assert kinds[head:head + len(f.injections)] == [i.vector.label for i in f.injections], kinds
    # Root causes lead, and every other finding is reachable only with a machine check, root,
    # or a debug build option: nothing on a stock kernel is open to an unprivileged user.
    assert result.findings[0].invariant == "ist-reentered" or any(f.invariant == "ist-reentered"
                                                                   for f in result.findings)
    assert all(f.reach > Reach.UNPRIVILEGED for f in result.raw_findings)
