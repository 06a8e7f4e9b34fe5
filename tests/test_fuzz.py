"""The command line holds up under bad input: a small fuzzing budget on every run of the tests.

Mutated objects (the demo fixture and tests/asm, assembled here), argument vectors, patch
texts and --finding files, each case made from a fixed seed (see tests/fuzzing/).  Every
case must end with exit code 0, 1 or 2, without a traceback, with one line on standard error
for 2, within the timeout, and leave no file behind.  benchmarks/fuzz.py runs the same
generators with a large budget (and the Debian kernels' objects).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fuzzing import KINDS, Case, Fuzzer, Runner, have_assembler, problems, report

pytestmark = pytest.mark.skipif(not have_assembler(), reason="GNU as (binutils) is not installed")

BUDGET = {"elf": 150, "args": 150, "patch": 100, "finding": 50}
FIRST_SEED = 20240601


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Fuzzer:
    return Fuzzer(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", KINDS)
def test_command_line_holds_up(fuzzer: Fuzzer, kind: str) -> None:
    results = fuzzer.run(kind, range(FIRST_SEED, FIRST_SEED + BUDGET[kind]))
    assert len(results) == BUDGET[kind]
    assert not problems(results), report(results)


# --------------------------------------------------------------------------- the harness itself


def test_cases_are_made_from_their_seed_alone(fuzzer: Fuzzer) -> None:
    for kind in KINDS:
        a, b = fuzzer.gen.case(kind, 7), fuzzer.gen.case(kind, 7)
        assert a == b
        assert fuzzer.gen.case(kind, 7) != fuzzer.gen.case(kind, 8)


def test_a_clean_run_keeps_its_output_and_a_rejected_one_leaves_nothing(fuzzer: Fuzzer) -> None:
    ws = fuzzer.ws
    ok = fuzzer.runner.run(Case("check", 0, ["check", str(ws.demo), "--depth", "0", "--scenarios", "syscall",
                                             "--features", "pti", "--workers", "1", "--json", "out.json"],
                                outputs=("out.json",)))
    assert ok.problem is None and ok.exit_code == 0, ok.describe()
    bad = fuzzer.runner.run(Case("check", 1, ["disasm", str(ws.fixed / "text.txt"), "entry_SYSCALL_64",
                                              "--json", "out.json"], outputs=("out.json",)))
    assert bad.problem is None and bad.exit_code == 2, bad.describe()
    assert bad.stderr.startswith("entrycheck: error: ") and bad.stderr.count("\n") == 1
    assert not (ws.run / "out.json").exists()           # the runner cleans up after each case


def test_a_case_past_its_timeout_is_a_hang_and_the_signals_are_restored(fuzzer: Fuzzer) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM)}
    slow = Runner(fuzzer.ws, timeout=0.05)
    res = slow.run(Case("check", 0, ["check", str(fuzzer.ws.demo), "--depth", "1", "--workers", "1"]))
    assert res.problem == "hang", res.describe()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_leftover_file_is_reported(fuzzer: Fuzzer, tmp_path: Path) -> None:
    """A case that fails while naming an output that then exists is caught (the output is
    made here by hand: the command itself never leaves one)."""
    runner = fuzzer.runner
    ws = fuzzer.ws
    stray = ws.run / "stray.json"
    orig = runner._invoke

    def leaving(argv):
        got = orig(argv)
        stray.write_text("{}")
        return got

    runner._invoke = leaving
    try:
        res = runner.run(Case("check", 0, ["disasm", str(ws.fixed / "text.txt"), "x", "--json", "stray.json"],
                              outputs=("stray.json",)))
    finally:
        runner._invoke = orig
    assert res.problem == "leftover files: run/stray.json", res.describe()
    assert not stray.exists()
