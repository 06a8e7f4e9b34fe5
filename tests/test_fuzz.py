"""The command line holds up under bad input: a small fuzzing budget on every run of the tests.

Mutated objects (the demo fixture and tests/asm, assembled here), argument vectors, patch
texts and --finding files, each case made from a fixed seed (see tests/fuzzing/).  Every
case must end with exit code 0, 1 or 2, without a traceback, with one line on standard error
for 2, within the timeout, and leave no file behind.  benchmarks/fuzz.py runs the same
generators with a large budget (and the Debian kernels' objects).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import click
import pytest

from entrycheck.cli import cli
from fuzzing import KINDS, Case, Fuzzer, Runner, have_assembler, problems, report
from fuzzing.commandline import EXCLUDED, VALUE_KINDS, command_spec

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


# --------------------------------------------------------------------------- the argument fuzzer


def _spellings(params) -> set[str]:
    return {n for p in params if isinstance(p, click.Option) for n in (*p.opts, *p.secondary_opts)} - set(EXCLUDED)


def test_every_command_and_option_of_the_command_line_is_generated(fuzzer: Fuzzer) -> None:
    """The argument fuzzer reads the commands and their options from click's definitions: every
    command, and every spelling of every option of each, turns up within a few thousand seeds.
    An option added to the command line is fuzzed without a change to the fuzzer; one it could
    not produce fails here."""
    wanted = {name: _spellings(command.params) for name, command in cli.commands.items()}
    top = _spellings(cli.params)
    seen: dict[str, set[str]] = {}
    seen_top: set[str] = set()
    for seed in range(3000):
        argv = fuzzer.gen.case("args", seed).argv
        if argv and argv[0] in wanted:
            seen.setdefault(argv[0], set()).update(t.split("=", 1)[0] for t in argv[1:] if t.startswith("-"))
        else:
            seen_top.update(argv)
    assert set(seen) == set(cli.commands)
    missing = {name: sorted(options - seen[name]) for name, options in wanted.items() if options - seen[name]}
    assert not missing, f"options the argument fuzzer never generated: {missing}"
    assert top <= seen_top, f"options of the group never generated: {sorted(top - seen_top)}"
    # what the fuzzer knows of values names options that exist (a renamed option is not left to its type)
    every = set().union(*wanted.values(), top)
    assert not set(VALUE_KINDS) - every, f"VALUE_KINDS names no option: {sorted(set(VALUE_KINDS) - every)}"


def test_an_option_the_fuzzer_does_not_know_takes_values_from_its_click_type(fuzzer: Fuzzer) -> None:
    @click.command()
    @click.argument("thing")
    @click.option("--mode", type=click.Choice(["fast", "slow"]))
    @click.option("--level", type=click.IntRange(1, 9))
    @click.option("--ratio", type=click.FloatRange(0, 1))
    @click.option("--color/--no-color", default=True)
    @click.option("--label")
    def new(**kwargs) -> None:
        pass

    spec = command_spec("new", new)
    by_name = {o.names[0]: o for o in spec.options}
    assert [a.kind for a in spec.arguments] == ["text"]
    assert {n: (o.kind, o.known) for n, o in by_name.items()} == {
        "--mode": ("choice", False), "--level": ("int", False), "--ratio": ("float", False),
        "--color": (None, False), "--label": ("text", False)}
    assert by_name["--color"].names == ("--color", "--no-color")
    values = fuzzer.gen.arguments.values
    made = {n: {values.of(random.Random(k), o) for k in range(300)} for n, o in by_name.items() if o.kind}
    assert {"fast", "slow"} <= made["--mode"] and {"FAST", "fas", "fastx"} & made["--mode"]
    assert {"1", "9", "0", "10"} <= made["--level"]
    assert any(by_name["--level"].rejects(v) for v in made["--level"])
    assert not by_name["--level"].rejects("9") and by_name["--level"].rejects("10")
    assert {"0", "1", "-1", "2"} <= made["--ratio"]


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
