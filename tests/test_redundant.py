"""Redundant privileged writes, the seed's own class, explained and reviewable."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]

# IBRS_ENTER skips its write when IBRS is already set; this skips IBRS_EXIT's write back then,
# as PARANOID_RESTORE_CR3 skips the CR3 write (the same hunk applies to 6.1 and 6.12).
SKIP_IBRS_EXIT = """Subject: [PATCH] x86/entry: Avoid redundant SPEC_CTRL write on paranoid returns

---
--- a/arch/x86/entry/calling.h
+++ b/arch/x86/entry/calling.h
@@ -335,3 +335,6 @@
 .ifnb \\save_reg
 \tmov\t\\save_reg, %rdx
+\t/* IBRS_ENTER did not write when IBRS was set: nothing to restore */
+\ttest\t$SPEC_CTRL_IBRS, %edx
+\tjnz\t.Lend_\\@
 .else
"""


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_the_spec_ctrl_write_back_is_explained(built_kernels, series: str, tmp_path) -> None:
    out = tmp_path / "c.json"
    proc = subprocess.run(CLI + ["check", f"debian:{series}", "--features", "kernel_ibrs", "--depth", "0",
                                 "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    writes = json.loads(out.read_text())["redundant_writes"]
    assert {w["site"].split("+")[0] for w in writes} == {"paranoid_exit", "end_repeat_nmi"}
    for w in writes:
        assert w["register"] == "SPEC_CTRL" and w["cycles_per_write"] > 0 and w["writes"] >= 1
        assert w["held_since"].startswith("read at paranoid_entry+")
        assert "read at paranoid_entry+" in w["skip_if"]
        assert {p["scenario"] for p in w["paths"]} <= {"nmi-from-kernel", "mc-from-kernel", "db-from-kernel"}
    assert "Redundant writes on the paths without injection, explained:" in proc.stdout
    assert "skip it when:" in proc.stdout

    mail = subprocess.run(CLI + ["check", f"debian:{series}", "--features", "kernel_ibrs", "--depth", "0",
                                 "--format", "mail", "--class", "redundant-write"], capture_output=True, text=True)
    assert mail.returncode == 0, mail.stderr
    # the fix was verified: the mail is a patch in the subsystem's style
    assert mail.stdout.startswith("Subject: [PATCH] x86/entry: Skip IBRS_EXIT's redundant SPEC_CTRL write")
    assert all(len(line.expandtabs(8)) <= 72 for line in mail.stdout.splitlines())
    assert "When it could be skipped" in mail.stdout and "cycles per write" in mail.stdout
    # The tool's own fix (skip IBRS_EXIT's write when the saved value has IBRS), built and checked.
    assert "+\ttestl\t$SPEC_CTRL_IBRS, %edx" in mail.stdout
    m = re.search(r"Verified by entrycheck with the change applied: SPEC_CTRL written redundantly (\d+) "
                  r"time\(s\) on these paths before, (\d+) after; 0 new findings", " ".join(mail.stdout.split()))
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", mail.stdout


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_a_patch_that_skips_the_write_back_removes_it_and_breaks_nothing(built_kernels, series: str,
                                                                         tmp_path) -> None:
    patch = tmp_path / "skip-ibrs-exit.patch"
    patch.write_text(SKIP_IBRS_EXIT)
    out = tmp_path / "review.json"
    proc = subprocess.run(CLI + ["review", f"debian:{series}", "--patch", str(patch), "--depth", "1", "--features",
                                 "kernel_ibrs", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["new_violations"] == []
    # Paths that loop until the run ends them count writes per turn of the loop: a #DB that
    # overwrites the live #DB frame on its IST stack makes the handler return into itself (the
    # known ist-reentered findings, in both builds) -- from sync_regs' per-cpu read, and on 6.1,
    # whose exc_debug reads its stack canary while DR7 is armed, from exc_debug.
    loops = [e for e in doc["scenarios"] if "no-return" in (e["old"]["outcome"], e["new"]["outcome"])]
    assert all(e["injections"] and e["injections"][0]["at"].startswith(("exc_debug+", "sync_regs+"))
               for e in loops), loops[:3]

    def total(side: str, what: str) -> int:          # every path but the loops
        return sum(s[side][what] for s in doc["summary"]) - sum(e[side][what] * e["paths"] for e in loops)

    old, new = total("old", "redundant_msr_writes"), total("new", "redundant_msr_writes")
    assert old > 0 and new == 0
    assert total("old", "msr_writes") - total("new", "msr_writes") == old
    assert all(s["behaviour_changed"] == 0 for s in doc["summary"])
