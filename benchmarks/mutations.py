"""A regression check of the tests themselves: each mutation of the product below once passed the
whole suite (or the tests aimed at it).  Applied to a scratch copy of this tree, one at a time,
each must make at least one of the tests named beside it fail; a test loosened later shows up here.

    python benchmarks/mutations.py [--kernels] [--only NAME ...]
        prints one JSON object per mutation: whether its tests failed (caught), how long they ran.
        The tests pass on the unmutated copy first (else the check means nothing).  --kernels
        includes the mutations whose tests need the Debian kernels (built on first use, cached).
        Exit status 1 when a mutation is not caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str                     # under src/entrycheck/
    old: str                      # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]        # pytest arguments
    kernel: bool = False          # its tests need the Debian kernels
    why: str = ""


MUTATIONS = (
    Mutation("fred-lower-level-resets-the-stack", "machine/fred.py",
             "    if user or new_csl > old_csl:\n", "    if user or new_csl > old_csl or level < old_csl:\n",
             ("tests/test_fred_model.py",),
             why="an event of a lower stack level than the current one takes that level's stack top, "
                 "overwriting the outer frame"),
    Mutation("root-causes-listed-last", "report/text.py",
             "key=lambda inv: (inv != ROOT_CAUSE,", "key=lambda inv: (inv == ROOT_CAUSE,",
             ("tests/test_text_report.py",)),
    Mutation("finding-index-ignored", "cli/commands.py",
             'v = doc["violations"][int(index or 0)]', 'v = doc["violations"][0]',
             ("tests/test_demo.py", "-k", "finding"),
             why="trace --finding F:N replays finding 0 whatever N is"),
    Mutation("irqs-never-delivered", "explore/delivery.py",
             "if vector is Vector.IRQ and not self.irq_window(log, i):", "if vector is Vector.IRQ:",
             ("tests/test_user_state.py", "-m", "not kernel")),
    Mutation("speculative-c-call-with-user-gs-not-reported", "machine/speculation.py",
             "if ctx.cpu.cpl == 0 and ctx.cpu.gs_base in self.config.user_gs_values:", "if False:",
             ("tests/test_mutants.py", "-k", "test_mutant_is_caught and error-entry-user-gs-unfenced"), kernel=True),
    Mutation("no-injection-on-the-user-cr3", "explore/delivery.py",
             "        if vector is Vector.NMI:\n            return not cpu.nmi_pending\n",
             "        if cpu.cpl == 0 and cpu.cr3 & 0x1000:\n            return False\n"
             "        if vector is Vector.NMI:\n            return not cpu.nmi_pending\n",
             ("tests/test_review.py", "-k", "user_cr3_window"), kernel=True),
    Mutation("unknown-section-type-taken-by-name", "image/objfile.py",
             'if not isinstance(sh_type, str) and (sec["sh_flags"] & SHF_ALLOC or sec.name.startswith(".rel")):',
             "if False:", ("tests/test_objfile_errors.py", "-k", "unknown_type"), kernel=True),
    Mutation("blocked-nmi-delivered-at-once", "machine/delivery.py",
             "        if vector is Vector.NMI and cpu.nmi_blocked:\n",
             "        if False:\n",
             ("tests/test_machine.py", "-k", "nmi_inside_a_db"), kernel=True),
    Mutation("cpu-entry-area-watchable", "explore/delivery.py",
             'if name == "cpu_entry_area":', 'if name == "no such area":',
             ("tests/test_explore.py", "-k", "pristine_kernels_depth_1"), kernel=True,
             why="breakpoints allowed on the entry stacks: ist-reentered findings a whitelist of the kind "
                 "would accept"),
)


def _copy(dest: Path) -> None:
    for part in ("src", "tests", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / part)


def _pytest(tree: Path, args: tuple[str, ...]) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args], cwd=tree,
                       env=env, capture_output=True, text=True)
    return p.returncode, round(time.perf_counter() - t0, 1), (p.stdout + p.stderr).strip().splitlines()[-1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if (args.kernels or not m.kernel) and (not args.only or m.name in args.only)]
    escaped = 0
    with tempfile.TemporaryDirectory(prefix="entrycheck-mutations-") as tmp:
        for m in chosen:
            tree = Path(tmp) / m.name
            _copy(tree)
            control = _pytest(tree, m.tests)
            path = tree / "src" / "entrycheck" / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                print(json.dumps({"mutation": m.name, "error": f"the text to mutate occurs {text.count(m.old)} "
                                                               f"times in {m.file}"}), flush=True)
                escaped += 1
                continue
            path.write_text(text.replace(m.old, m.new))
            rc, wall, tail = _pytest(tree, m.tests)
            caught = control[0] == 0 and rc == 1
            escaped += not caught
            print(json.dumps({"mutation": m.name, "caught": caught, "control_passed": control[0] == 0,
                              "tests": " ".join(m.tests), "wall_s": wall, "last_line": tail}), flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    sys.exit(1 if escaped else 0)


if __name__ == "__main__":
    main()
