"""The mutant suite: real 6.1/6.12 entry code, edited in a scratch copy and rebuilt.

Each mutant (tests/mutants.py) re-introduces a known class of entry-code bug.  It must
be caught by the invariant it targets, under a configuration where the pristine
kernel is clean for that invariant; the last test prints which mutant was caught by
what and checks that every invariant except no-return catches at least one mutant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from entrycheck.kernel.kconfig import parse_request
from entrycheck.kernel.targets import resolve_target
from mutants import (C_MUTANTS, COMPAT_MUTANTS, FRED_MUTANTS, MUTANTS, USER_MUTANTS, Edit, Mutant, MutantDoesNotApply, build_mutant,
                     explained_on_stock, object_ref)

from entrycheck.explore.check import STOPPED_DONE, CheckConfig, CheckResult
from entrycheck.session import run_check
from entrycheck.explore.paths import Finding
from entrycheck.explore.scenarios import SCENARIOS
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.targets import KernelBuild
from entrycheck.props.invariants import INVARIANTS

OPTIONAL = {"no-return"}      # a mutant may hang the CPU, but none has to


class Suite:
    """Builds and check results, each computed once per test session."""

    def __init__(self, kernels: dict[str, KernelBuild], copy: Callable[[Path, Path], Path]) -> None:
        self.kernels = kernels
        self.copy = copy
        self.builds: dict[str, KernelBuild] = {}
        self.results: dict[str, CheckResult] = {}
        self.pristine: dict[tuple[str, CheckConfig], CheckResult] = {}

    def kernel(self, mutant: Mutant) -> KernelBuild:
        """The pristine build a mutant is an edit of: the Debian kernel, in the mutant's configuration."""
        if not mutant.kconfig:
            return self.kernels[mutant.kernel]
        key = f"{mutant.kernel}:{','.join(mutant.kconfig)}"
        if key not in self.builds:
            self.builds[key] = resolve_target(f"debian:{mutant.kernel}", request=parse_request(None, mutant.kconfig))
        return self.builds[key]

    def build(self, mutant: Mutant) -> KernelBuild:
        if mutant.name not in self.builds:
            try:
                self.builds[mutant.name] = build_mutant(mutant, self.kernel(mutant), self.copy)
            except MutantDoesNotApply as exc:
                pytest.fail(f"mutant {mutant.name} no longer applies to {self.kernel(mutant).label}: {exc}",
                            pytrace=False)
        return self.builds[mutant.name]

    def result(self, mutant: Mutant) -> CheckResult:
        if mutant.name not in self.results:
            self.results[mutant.name] = run_check(object_ref(self.build(mutant)), mutant.config(), workers=1)
        return self.results[mutant.name]

    def caught(self, mutant: Mutant) -> list[Finding]:
        """The mutant's findings of its invariant that the pristine kernel lacks: matched as
        `entrycheck diff` matches them (scenario, feature set, chain and site mapped by
        instruction from one build to the other), explained stock findings left out as well."""
        from entrycheck.explore.diff import SiteMap, diff_results
        from entrycheck.image import load_build

        pristine, result = self.pristine_result(mutant), self.result(mutant)
        fs = mutant.config().feature_sets[0]
        sites = SiteMap(load_build(self.kernel(mutant)).image(fs), load_build(self.build(mutant)).image(fs))
        return [f for f in diff_results(pristine, result, sites).new_violations
                if f.invariant == mutant.invariant and not explained_on_stock(f)]

    def pristine_result(self, mutant: Mutant) -> CheckResult:
        key = (mutant.kernel, mutant.kconfig, mutant.config())
        if key not in self.pristine:
            self.pristine[key] = run_check(object_ref(self.kernel(mutant)), mutant.config(), workers=1)
        return self.pristine[key]


@pytest.fixture(scope="module")
def suite(built_kernels: dict[str, KernelBuild], copy_tree: Callable[[Path, Path], Path]) -> Suite:
    return Suite(built_kernels, copy_tree)


def findings_of(result: CheckResult, invariant: str) -> list[Finding]:
    return [f for f in result.findings if f.invariant == invariant]


def shortest(findings: list[Finding]) -> Finding:
    return min(findings, key=lambda f: (len(f.injections), f.scenario, f.features, f.effects, f.injections))


def reproducer(f: Finding) -> str:
    """The arguments of 'entrycheck trace' that replay finding ``f``."""
    parts = [f"--scenario {f.scenario}", f"--features {f.features}"]
    if f.effects:
        parts.append(f"--handler-effects {','.join(f.effects)}")
    parts += [f"--inject {i.spec()}" for i in f.injections]
    return " ".join(parts)


def entry_text(obj: Path) -> bytes:
    """The entry code of a (linked) object: .entry.text, and entry_64_fred.o's .noinstr.text,
    with the alternatives that patch it (which site each replacement goes to is in the
    relocations of .altinstructions: two ALTERNATIVEs swapped change only those)."""
    with obj.open("rb") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(".entry.text")
        assert section is not None, f"{obj} has no .entry.text"
        fred = elf.get_section_by_name(".noinstr.text")
        alts = elf.get_section_by_name(".rela.altinstructions")
        sites = b"".join(f"{r['r_offset']}:{r['r_info_sym']}:{r['r_addend']};".encode()
                         for r in (alts.iter_relocations() if alts is not None else ()))
        return section.data() + (fred.data() if fred is not None else b"") + sites


def assert_complete(result: CheckResult, what: str) -> None:
    assert not result.errors, f"{what}: {result.errors}"
    assert result.stopped_because == STOPPED_DONE, f"{what} stopped early ({result.stopped_because})"
    assert result.runs > 0, f"{what}: nothing was explored"


# --------------------------------------------------------------------------- the table itself


def test_edit_applies_exactly_once() -> None:
    text = "\tswapgs\n\tsysretq\n\tswapgs\n\tiretq\n"
    assert Edit("\tswapgs\n\tiretq\n", "\tiretq\n").apply(text, "t") == "\tswapgs\n\tsysretq\n\tiretq\n"
    assert Edit(r"(\tsysretq\n)\tswapgs\n", "\\1", regex=True).apply(text, "t") == "\tswapgs\n\tsysretq\n\tiretq\n"
    with pytest.raises(MutantDoesNotApply, match=r"f\.S: the text to replace occurs 2 times"):
        Edit("\tswapgs\n", "").apply(text, "f.S")
    with pytest.raises(MutantDoesNotApply, match="occurs 0 times"):
        Edit("\tsysretl\n", "").apply(text, "f.S")
    with pytest.raises(MutantDoesNotApply, match="occurs 2 times"):
        Edit(r"^\tswapgs$", "", regex=True).apply(text, "f.S")


def test_mutant_table_is_well_formed() -> None:
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)) >= 10
    assert {m.kernel for m in MUTANTS} == {"6.1", "6.12"}
    assert len({m.edit_hash() for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        assert m.invariant in INVARIANTS, m.name
        assert m.kernel in ("6.1", "6.12") and m.file.startswith("arch/x86/entry/"), m.name
        assert m.edit.old != m.edit.new and m.description, m.name
        assert set(m.scenarios) <= set(SCENARIOS), m.name
        cfg = m.config()
        assert cfg.depth in (0, 1, 2) and 1 <= len(cfg.feature_sets) <= 2, m.name
        assert all(isinstance(fs, FeatureSet) for fs in cfg.feature_sets)
    targeted = {m.invariant for m in MUTANTS + C_MUTANTS}     # C_MUTANTS: tests/test_c_mode.py
    assert set(INVARIANTS) - OPTIONAL <= targeted, f"no mutant targets {sorted(set(INVARIANTS) - OPTIONAL - targeted)}"


# --------------------------------------------------------------------------- the mutants


@pytest.mark.kernel
def test_a_mutant_that_no_longer_applies_fails_loudly(kernel61: KernelBuild,
                                                      copy_tree: Callable[[Path, Path], Path]) -> None:
    gone = Mutant("gone", "6.1", MUTANTS[0].file, Edit("\tsysretl_from_a_future_kernel\n", ""),
                  "an edit whose text is not in the source", "no-return", ("syscall",), ("none",))
    with pytest.raises(MutantDoesNotApply, match=r"mutant gone: arch/x86/entry/\S+ of linux-source-6\.1\S*: "
                                                 r"the text to replace occurs 0 times"):
        build_mutant(gone, kernel61, copy_tree)


@pytest.mark.kernel
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(suite: Suite, mutant: Mutant) -> None:
    build = suite.build(mutant)
    pristine_build = suite.kernel(mutant)
    assert build.source_tree is not None and pristine_build.source_tree is not None
    edited, original = build.source_tree / mutant.file, pristine_build.source_tree / mutant.file
    assert edited.stat().st_ino != original.stat().st_ino, "the edited file is a hard link into the pristine tree"
    assert edited.read_text() != original.read_text()
    assert entry_text(build.object_path) != entry_text(pristine_build.object_path), \
        f"the edit of {mutant.name} did not change the entry code"

    result = suite.result(mutant)
    assert_complete(result, f"the check of mutant {mutant.name}")
    pristine = suite.pristine_result(mutant)
    assert_complete(pristine, f"the check of pristine {mutant.kernel} for {mutant.name}")
    hits = suite.caught(mutant)
    found = sorted({f.invariant for f in result.findings})
    assert hits, (f"mutant {mutant.name} ({mutant.description}) escaped {mutant.invariant}: no finding the pristine "
                  f"kernel lacks; found {found or 'nothing'}")
    false = [f for f in findings_of(pristine, mutant.invariant) if not explained_on_stock(f)]
    assert not false, (f"pristine {mutant.kernel} already trips {mutant.invariant} under the config of "
                       f"{mutant.name}: {reproducer(shortest(false))} ({false[0].message})")


@pytest.mark.kernel
@pytest.mark.parametrize("mutant", USER_MUTANTS, ids=[m.name for m in USER_MUTANTS])
def test_a_user_controlled_bug_is_found_by_diff(suite: Suite, mutant: Mutant, tmp_path: Path) -> None:
    """`entrycheck diff PRISTINE MUTANT --depth 1` reports the mutant's new violations (exit 1), and
    the shortest of them is reached from what user space controls: a user value the explorer
    derived (named in the scenario), a faulting IRET, or a maskable interrupt."""
    out = tmp_path / "diff.json"
    args = ["--depth", "1", "--scenarios", ",".join(mutant.scenarios), "--features", ",".join(mutant.features),
            "--vectors", ",".join(mutant.vectors), "--json", str(out)]
    cli = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    p = subprocess.run(cli + ["diff", str(suite.kernel(mutant).object_path),
                              str(suite.build(mutant).object_path), *args], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr
    new = [v for v in json.loads(out.read_text())["new_violations"] if v["invariant"] == mutant.invariant]
    assert new, f"{mutant.name}: no new {mutant.invariant} in {p.stdout[-2000:]}"
    first = min(new, key=lambda v: len(v["injections"]))
    user_value = "[" in first["scenario"]
    irq = any(j["vector"] == "irq" for j in first["injections"])
    assert user_value or irq, first


@pytest.mark.kernel
@pytest.mark.parametrize("mutant", COMPAT_MUTANTS + FRED_MUTANTS, ids=[m.name for m in COMPAT_MUTANTS + FRED_MUTANTS])
def test_a_compat_or_fred_entry_bug_is_found_by_diff(suite: Suite, mutant: Mutant, tmp_path: Path) -> None:
    """`entrycheck diff PRISTINE MUTANT` over the mutant's object's scenarios (default vectors,
    user values derived) reports the mutant's new violations in entry_64_compat.S's or
    entry_64_fred.S's code, which runs linked with entry_64.o."""
    out = tmp_path / "diff.json"
    scenarios = "sysenter,syscall32,int80" if mutant in COMPAT_MUTANTS else "all"
    args = ["--depth", "1", "--scenarios", scenarios, "--features", ",".join(mutant.features), "--json", str(out),
            "--tree", str(suite.kernel(mutant).source_tree)]       # its cpufeatures.h numbers fred (6.9+)
    cli = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    p = subprocess.run(cli + ["diff", str(suite.kernel(mutant).object_path),
                              str(suite.build(mutant).object_path), *args], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr
    doc = json.loads(out.read_text())
    new = [v for v in doc["new_violations"] if v["invariant"] == mutant.invariant]
    assert new, f"{mutant.name}: no new {mutant.invariant} in {p.stdout[-2000:]}"
    if mutant in COMPAT_MUTANTS:
        assert {v["scenario"].split("[")[0] for v in new} <= set(mutant.scenarios) | {"sysenter", "syscall32"}


@pytest.mark.kernel
def test_a_nested_nmi_after_a_debug_exceptions_iret_is_explored(suite: Suite, tmp_path: Path) -> None:
    """The nested-NMI history (CVE-2015-3290/5157): an NMI, a #DB inside its handler whose IRET
    unblocks NMIs, then a second NMI in the rest of the outer handler.  With the nested-NMI
    branch sent straight to nested_nmi_out, an NMI that arrives after exc_nmi returned is never
    processed.  `diff` finds it from an NMI's own path at depth 2 (the #DB's run goes on into the
    outer handler with NMIs unblocked: those boundaries are explored for NMIs) and from a system
    call at depth 3 (NMI, #DB, NMI)."""
    mutant = next(m for m in MUTANTS if m.name == "nested-nmi-dropped-after-mc")
    cli = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    for depth, scenario, chain in ((2, "nmi-from-kernel", ("db", "nmi")), (3, "syscall", ("nmi", "db", "nmi"))):
        out = tmp_path / f"diff{depth}.json"
        p = subprocess.run(cli + ["diff", str(suite.kernel(mutant).object_path), str(suite.build(mutant).object_path),
                                  "--depth", str(depth), "--scenarios", scenario, "--features", "none",
                                  "--vectors", "db,nmi", "--json", str(out)], capture_output=True, text=True)
        assert p.returncode == 1, p.stdout[-2000:] + p.stderr
        new = json.loads(out.read_text())["new_violations"]
        lost = [v for v in new if v["invariant"] == "nmi-lost-or-corrupted"]
        assert {v["invariant"] for v in new} == {"nmi-lost-or-corrupted"}, new[:2]
        chains = {tuple(i["vector"] for i in v["injections"]) for v in lost}
        assert chains == {chain}, chains
        assert all(v["message"].startswith("an NMI was never processed") for v in lost)
        assert any(v["site"].startswith("end_repeat_nmi") for v in lost)     # after exc_nmi returned


@pytest.mark.kernel
def test_stale_tlb_is_checked_by_default_through_interrupts(suite: Suite, tmp_path: Path) -> None:
    """Without --handler-effects: an interrupt may be a TLB-flush IPI, so the lost user-ASID flush
    of user-cr3-ignores-flush-mask is found on the interrupt's own return."""
    mutant = next(m for m in MUTANTS if m.name == "user-cr3-ignores-flush-mask")
    out = tmp_path / "diff.json"
    cli = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    p = subprocess.run(cli + ["diff", str(suite.kernel(mutant).object_path), str(suite.build(mutant).object_path),
                              "--depth", "0", "--scenarios", "irq-from-user", "--features", "pti,pcid",
                              "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr
    new = json.loads(out.read_text())["new_violations"]
    assert {v["invariant"] for v in new} == {"stale-tlb"}
    assert all(v["effects"] == ["tlb-shootdown"] and v["injections"] == [] for v in new), new


@pytest.mark.kernel
def test_every_invariant_catches_a_mutant(suite: Suite, record_property: Callable[[str, object], None],
                                          tmp_path: Path) -> None:
    rows = []
    caught_by: dict[str, list[str]] = {}
    for m in MUTANTS:
        result = suite.result(m)
        found = sorted({f.invariant for f in result.findings})
        hits = suite.caught(m)
        if hits:
            caught_by.setdefault(m.invariant, []).append(m.name)
        pristine = "clean" if not [f for f in findings_of(suite.pristine_result(m), m.invariant)
                                   if not explained_on_stock(f)] else "TRIPS"
        rows.append((m.name, m.kernel, m.invariant, "yes" if hits else "NO", pristine, ", ".join(found) or "-",
                     reproducer(shortest(hits)) if hits else "-"))

    header = ("mutant", "kernel", "targets", "caught", "pristine", "invariants found",
              "shortest reproducer of the target")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in [header] + rows]
    trees = [f"{m.name}: {suite.build(m).source_tree}" for m in MUTANTS]
    table = "\n".join(lines + ["", "trees (entrycheck trace TREE ...):"] + trees) + "\n"
    (tmp_path / "mutant-table.txt").write_text(table)
    record_property("mutant_table", table)
    print("\n" + table)

    escaped = [r[0] for r in rows if r[3] != "yes"]
    assert not escaped, f"mutants not caught by their invariant: {escaped}"
    unclean = [r[0] for r in rows if r[4] != "clean"]
    assert not unclean, f"the pristine kernel already trips the invariant these mutants target: {unclean}"
    # An invariant only the kernel's C can break (cr2-clobbered) is caught in tests/test_c_mode.py.
    uncovered = sorted(set(INVARIANTS) - OPTIONAL - set(caught_by) - {m.invariant for m in C_MUTANTS})
    assert not uncovered, f"no mutant is caught by {uncovered}"


@pytest.mark.kernel
def test_a_baseline_passes_known_findings_and_fails_new_ones(suite: Suite, tmp_path: Path) -> None:
    """`check --baseline B` exits 0 when B is the tree's own result and 1 when a mutant adds
    a violation; the mutant's edit moves the code after it, so known findings must be
    matched by instruction, not by address."""
    mutant = next(m for m in MUTANTS if m.name == "paranoid-entry-reads-percpu-on-ist")
    cli = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
    # Under kernel_ibrs the stock kernel has the same root cause at IBRS_ENTER's read: known.
    args = ["--features", "kernel_ibrs", "--depth", "1", "--scenarios", "db-from-user,db-from-kernel",
            "--vectors", "db,nmi"]
    base = tmp_path / "pristine.json"
    pristine = suite.kernel(mutant).object_path
    first = subprocess.run(cli + ["check", str(pristine), *args, "--json", str(base)], capture_output=True, text=True)
    assert first.returncode == 1, first.stderr
    known = json.loads(base.read_text())["violations"]
    assert known and all("match" in v for v in known)

    again = subprocess.run(cli + ["check", str(pristine), *args, "--baseline", str(base)],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(known)} known findings" in again.stdout and "No violations." in again.stdout

    out = tmp_path / "mutant.json"
    mutated = subprocess.run(cli + ["check", str(suite.build(mutant).object_path), *args, "--baseline", str(base),
                                    "--json", str(out)], capture_output=True, text=True)
    assert mutated.returncode == 1, mutated.stdout + mutated.stderr
    doc = json.loads(out.read_text())
    new = [v for v in doc["violations"] if not v["known"]]
    assert new and {v["invariant"] for v in new} == {"ist-reentered"}, new
    assert doc["baseline"]["known"] == len(known)       # every stock finding is still recognised

    # diff takes a baseline of the new build's known findings too.
    mutant_obj = str(suite.build(mutant).object_path)
    differ = subprocess.run(cli + ["diff", str(pristine), mutant_obj, *args], capture_output=True, text=True)
    assert differ.returncode == 1, differ.stdout[-2000:] + differ.stderr
    mutant_base = tmp_path / "mutant-known.json"
    subprocess.run(cli + ["check", mutant_obj, *args, "--json", str(mutant_base)], capture_output=True)
    known_diff = subprocess.run(cli + ["diff", str(pristine), mutant_obj, *args, "--baseline", str(mutant_base)],
                                capture_output=True, text=True)
    assert known_diff.returncode == 0, known_diff.stdout[-2000:] + known_diff.stderr
    assert "new violations are known" in known_diff.stdout

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run(cli + ["check", str(pristine), *args, "--baseline", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
