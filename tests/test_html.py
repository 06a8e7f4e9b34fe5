"""HTML reports (--html) opened in headless Chromium; 80-column text; silent progress in pipes.

Chromium is Debian's (``chromium``, ``chromium-driver``), driven by Playwright's Python API
with ``executable_path``: Playwright's own browsers are never downloaded.  When Chromium is
missing and we are root, the session installs it with apt-get.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from entrycheck.errors import InputError
from entrycheck.explore.check import CheckConfig, CheckResult
from entrycheck.explore.costmodel import CostModel
from entrycheck.explore.diff import ChangeGroup, DiffResult, PathDiff
from entrycheck.explore.paths import Cost, Finding, PathResult, PathTable
from entrycheck.machine.events import Injection
from entrycheck.machine.model import Vector
from entrycheck.image.features import FeatureSet
from entrycheck.report.html import check_html, diff_html
from entrycheck.report.outputs import Outputs

CLI = [sys.executable, "-c", "from entrycheck.cli import main; main()"]
SEED = Path(__file__).parent / "data" / "patches" / "x86-entry-paranoid-restore-cr3.archive.txt"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<script>alert(1)</script>"
ENTRY_S = "arch/x86/entry/entry_64.S"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, check=False)


# ---- Chromium ---------------------------------------------------------------------------------
def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing (as root)."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    install = ["apt-get", "install", "-y", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, check=False)
        done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not Path(CHROMIUM).exists():
        pytest.fail("cannot install chromium: " + (done.stderr or done.stdout)[-2000:])
    return CHROMIUM


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    path = ensure_chromium()
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


def open_report(browser, path: Path) -> SimpleNamespace:
    """Load ``path`` and record every request, dialog and console error on the way."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    seen = SimpleNamespace(page=page, requests=[], dialogs=[], errors=[])
    page.on("request", lambda r: seen.requests.append(r.url))
    page.on("dialog", lambda d: (seen.dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return seen


def self_contained(seen: SimpleNamespace, path: Path) -> None:
    assert seen.requests == [path.resolve().as_uri()], seen.requests      # nothing fetched but the file
    assert not seen.errors, seen.errors                                     # no CSP refusals, no JS errors
    assert not seen.dialogs


def screenshot(seen: SimpleNamespace, path: Path, record_property) -> None:
    seen.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    record_property("screenshot", str(path))
    print(f"\nscreenshot: {path}")


def bars(page, chart: str) -> list[dict]:
    return page.locator(f"#{chart} rect.bar").evaluate_all(
        "els => els.map(e => ({series: e.dataset.series, category: e.dataset.category,"
        " value: +e.dataset.value, height: +e.getAttribute('height'),"
        " drawn: e.getBoundingClientRect().height}))")


def check_bars(page, chart: str, expected: dict[tuple[str, str], int]) -> list[dict]:
    """The chart's bars are exactly ``expected`` ((category, series) -> value), drawn to scale."""
    scale = float(page.locator(f"#{chart}").get_attribute("data-scale"))
    got = bars(page, chart)
    assert {(b["category"], b["series"]): b["value"] for b in got} == expected
    for b in got:
        assert b["height"] == pytest.approx(b["value"] * scale, abs=0.01)
        assert b["drawn"] == pytest.approx(b["height"], abs=0.6)
    return got


def cells(page) -> list[dict]:
    return page.locator("#matrix td.cell").evaluate_all(
        "els => els.map(e => ({scenario: e.dataset.scenario, features: e.dataset.features,"
        " cls: e.className.split(' ').filter(c => c !== 'cell'), findings: +e.dataset.findings,"
        " changed: +e.dataset.changed, text: e.innerText.trim()}))")


# ---- real runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def review_report(kernel61, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("review-html")
    html, doc = out / "review.html", out / "review.json"
    proc = cli("review", "debian:6.1", "--patch", str(SEED), "--depth", "1",
               "--scenarios", "nmi-from-kernel,mc-from-kernel,syscall",
               "--features", "pti,pcid", "--features", "pti", "--features", "none",
               "--json", str(doc), "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(proc=proc, html=html, doc=json.loads(doc.read_text()))


@pytest.fixture(scope="module")
def check_report(kernel612_debug, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("check-html")
    html, doc = out / "check.html", out / "check.json"
    # The contract stubs: the finding's switch-kernel-asid write then falls in the replayed window
    # the page shows (with the kernel's C it comes hundreds of C instructions before the IRET).
    proc = cli("check", "debian:6.12+debug", "--handler-effects", "switch-kernel-asid",
               "--scenarios", "nmi-from-kernel,mc-from-kernel", "--features", "pti,pcid", "--depth", "0",
               "--c-stubs", "--json", str(doc), "--html", str(html))
    assert proc.returncode == 1, proc.stderr
    return SimpleNamespace(proc=proc, html=html, doc=json.loads(doc.read_text()), build=kernel612_debug)


@pytest.mark.kernel
def test_review_of_the_seed_patch_in_chromium(review_report, browser, tmp_path, record_property) -> None:
    doc = review_report.doc
    seen = open_report(browser, review_report.html)
    page = seen.page
    verdict = page.locator("#verdict")
    assert "no new violations" in verdict.inner_text() and "clean" in verdict.get_attribute("class")
    # matrix: one cell per scenario x feature set, "changed" exactly where the JSON has changed paths
    changed: Counter = Counter()          # a user-value variant counts in its scenario; an entry is a class
    for e in doc["scenarios"]:
        if e["cr3_writes_changed"]:
            changed[(e["scenario"].split("[")[0], e["features"])] += e["paths"]
    got = cells(page)
    assert len(got) == len(doc["scenario_names"]) * len(doc["feature_sets"]) == 9
    for c in got:
        n = changed.get((c["scenario"], c["features"]), 0)
        assert c["changed"] == n, c
        assert c["cls"] == (["changed"] if n else ["clean"]), c
        assert c["text"] == (f"{n}Δ" if n else "✓")
    assert any(c["changed"] for c in got) and any(not c["changed"] for c in got)
    assert all(c["changed"] == 0 for c in got if c["features"] == "none")     # no change without pti
    # plots: old vs new CR3 writes per scenario, and by kind, from the paths without injection
    base = [e for e in doc["scenarios"] if not e["injections"] and "[" not in e["scenario"]]
    per_scenario: dict[tuple[str, str], int] = defaultdict(int)
    kinds: dict[tuple[str, str], int] = defaultdict(int)
    for e in base:
        for side in ("old", "new"):
            per_scenario[(e["scenario"], side)] += e[side]["cr3"]["writes"]
            for kind, key in (("flushing", "flushing_writes"), ("NOFLUSH", "noflush_writes"),
                              ("redundant", "redundant_writes")):
                kinds[(kind, side)] += e[side]["cr3"][key]
    for s in doc["scenario_names"]:
        per_scenario.setdefault((s, "old"), 0)
        per_scenario.setdefault((s, "new"), 0)
    check_bars(page, "plot-cr3-scenarios", dict(per_scenario))
    check_bars(page, "plot-cr3-kinds", dict(kinds))
    for s in ("nmi-from-kernel", "mc-from-kernel"):              # the patch saves a write on each
        assert per_scenario[(s, "old")] > per_scenario[(s, "new")]
    # what changed: one expandable group per change, with commands to trace its example
    groups = page.locator("#changes details.change")
    assert groups.count() == len(doc["changes"]) > 0
    body = groups.first.locator(".body")
    assert not body.is_visible()
    groups.first.locator("summary").click()
    assert body.is_visible() and "entrycheck trace debian:6.1 --scenario" in body.inner_text()
    # the patch: its file name and text
    assert page.locator("#builds .patch-name").inner_text() == SEED.name
    assert "Avoid redundant CR3 write on paranoid returns" in page.locator("pre.patch").inner_text()
    self_contained(seen, review_report.html)
    screenshot(seen, tmp_path / "review.png", record_property)


@pytest.mark.kernel
def test_check_with_findings_in_chromium(check_report, browser, tmp_path, record_property) -> None:
    doc, build = check_report.doc, check_report.build
    assert len(doc["violations"]) == 2
    seen = open_report(browser, check_report.html)
    page = seen.page
    verdict = page.locator("#verdict")
    assert "VIOLATIONS FOUND" in verdict.inner_text() and "bad" in verdict.get_attribute("class")
    per_cell = Counter((v["scenario"], v["features"]) for v in doc["violations"])
    got = cells(page)
    assert len(got) == 2
    for c in got:
        n = per_cell[(c["scenario"], c["features"])]
        assert n and c["findings"] == n and c["cls"] == ["finding"] and c["text"] == f"{n}✗"
    # plot: CR3 writes per scenario by kind = the JSON's paths without injection
    kinds = {(s, k): 0 for s in doc["scenarios"] for k in ("flushing", "NOFLUSH", "redundant")}
    for p in doc["paths"]:
        kinds[(p["scenario"], "flushing")] += p["cr3"]["flushing_writes"]
        kinds[(p["scenario"], "NOFLUSH")] += p["cr3"]["noflush_writes"]
        kinds[(p["scenario"], "redundant")] += p["cr3"]["redundant_writes"]
    check_bars(page, "plot-cr3-kinds", kinds)
    # findings: collapsed; a click expands the replayed trace with source lines and CPU state
    findings = page.locator("#findings details.finding")
    assert findings.count() == len(doc["violations"])
    source = (build.source_tree / ENTRY_S).read_text().splitlines()
    for k, v in enumerate(doc["violations"]):
        f = findings.nth(k)
        assert f.get_attribute("data-scenario") == v["scenario"] and f.get_attribute("data-site") == v["site"]
        table = f.locator("table.trace")
        assert not table.is_visible()
        f.locator("summary").click()
        assert table.is_visible()
        rows = table.locator("tr.step")
        assert 0 < rows.count() <= 40
        assert table.locator("tr.violation").inner_text().startswith("✗ context-not-restored")
        # source: file:line and that line's text, as in the source tree
        locs = table.locator("tr.step td.src").evaluate_all(
            "els => els.map(e => [(e.querySelector('.loc') || {}).textContent || '',"
            " (e.querySelector('.srctext') || {}).textContent || ''])")
        shown = [(loc, text) for loc, text in locs if loc.startswith(ENTRY_S + ":")]
        assert len(shown) > rows.count() // 2
        for loc, text in shown:
            number = int(loc.rsplit(":", 1)[1])
            assert text == " ".join(source[number - 1].split())
        assert any(text.startswith("PARANOID_RESTORE_CR3") for _, text in shown)
        # CR3 decoded in every row; the last row's CR3 is the one the message complains about
        cr3 = table.locator("tr.step td.cr3 .dec").all_inner_texts()
        assert all(c.startswith("pgd=0x") for c in cr3)
        assert cr3[-1] in v["message"]
        assert table.locator("td.cr3.chg").count() >= 1        # the switch-kernel-asid write shows
        # the exact command reproduces it
        command = f.locator(".cmd code").inner_text()
        assert command.startswith("entrycheck trace debian:6.12+debug --c-stubs --scenario " + v["scenario"])
        if k == 0:
            replay = subprocess.run(CLI + shlex.split(command)[1:], capture_output=True, text=True, check=False)
            assert f"{v['invariant']} at {v['site']}" in replay.stdout, replay.stdout[-2000:]
    # a matrix cell links to its finding (the report's own script runs under its CSP)
    page.locator("button[data-expand=close]").click()
    link = page.locator("#matrix td.cell.finding a").first
    target = link.get_attribute("href")
    assert page.locator(target).evaluate("d => d.open") is False
    link.click()
    # a locator assertion: the page's CSP forbids the eval() behind wait_for_function(str)
    from playwright.sync_api import expect

    expect(page.locator(target)).to_have_js_property("open", True)
    self_contained(seen, check_report.html)
    screenshot(seen, tmp_path / "check.png", record_property)


# ---- untrusted strings ------------------------------------------------------------------------
def synthetic_check() -> CheckResult:
    fs = FeatureSet.parse("pti,pcid")
    cost = Cost(cr3_writes=3, cr3_flushing=2, cr3_noflush=1, cr3_redundant=1,
                cr3_sites=((f"exc_{XSS}+0x4", 3),), redundant_sites=((f"exc_{XSS}+0x4", 1),))
    table = PathTable("syscall", fs, ())
    table.add(-1, None, "returned", cost, (), ((f"sym_{XSS}", 0x1000, False),), False)
    finding = Finding("context-not-restored", "syscall", fs, (), (Injection(Vector.NMI, f"{XSS}+0x1"),),
                      site=f"{XSS}+0x10", message=f"CR3 {XSS} was wrong", trace=(f"{XSS}+0x8: movq %rax, %cr3",))
    return CheckResult((fs,), CheckConfig(scenarios=("syscall",), feature_sets=(fs,)), segments=[(table, 0, 1)],
                       findings=[finding], all_findings=1, runs=1)


def synthetic_diff() -> DiffResult:
    old, new = synthetic_check(), synthetic_check()
    p = old.paths[0]
    q = PathResult(p.scenario, p.features, (), (), "returned", Cost(cr3_writes=2, cr3_flushing=2,
                   cr3_sites=((f"exc_{XSS}+0x4", 2),)), (), ())
    d = PathDiff("syscall", p.features, (), (), p, q)
    sites = SimpleNamespace(_map={}, site=lambda s: s, link=lambda i: i)
    group = ChangeGroup((), f"CR3 written no more at {XSS}", 1, ("pti,pcid",), ("syscall",), d)
    cell = ("syscall", "pti,pcid")
    return DiffResult(old, new, sites, new_violations=list(new.findings), groups=[group], matched_count=1,
                      changed_count=1, matched_cells=Counter({cell: 1}), changed_cells=Counter({cell: 1}),
                      base=[d])


def test_untrusted_strings_are_shown_as_text(browser, tmp_path, record_property) -> None:
    build = SimpleNamespace(label=f"label {XSS}", kernel_version=XSS, source_tree=None)
    pages = {
        "check": check_html(synthetic_check(), build=build, loaded=None, target=f"/tmp/{XSS}/entry_64.o",
                            command=f"entrycheck check '/tmp/{XSS}/entry_64.o'"),
        "diff": diff_html(synthetic_diff(), old_build=build, old_loaded=None, new_build=build, new_loaded=None,
                          old_target=f"old{XSS}", new_target=f"new{XSS}", model=CostModel(),
                          patches=[(f"0001-{XSS}.patch", f"+\t{XSS}\n+<img src=x onerror=alert(2)>\n")]),
    }
    for name, text in pages.items():
        assert XSS not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        path = write_html(tmp_path / f"{name}.html", text)
        seen = open_report(browser, path)
        page = seen.page
        assert page.locator("script").count() == 1          # only the report's own
        page.locator("button[data-expand=open]").first.click()
        site = page.locator("details.finding code.site").first
        assert site.inner_text() == f"{XSS}+0x10" and site.is_visible()
        assert f"CR3 {XSS} was wrong" in page.locator("details.finding .msg").first.inner_text()
        header = page.locator("header").inner_text()
        assert (f"/tmp/{XSS}/entry_64.o" if name == "check" else f"label {XSS}") in header
        if name == "diff":
            assert page.locator("#builds .patch-name").inner_text() == f"0001-{XSS}.patch"
            assert "<img src=x onerror=alert(2)>" in page.locator("pre.patch").inner_text()
            assert page.locator("img").count() == 0
            assert XSS in page.locator("#changes summary").first.inner_text()
        page.wait_for_timeout(200)
        self_contained(seen, path)
        screenshot(seen, tmp_path / f"{name}.png", record_property)


# ---- writing ----------------------------------------------------------------------------------
def write_html(dest, text: str):
    out = Outputs()
    out.want("--html", str(dest))
    out.stage("--html", text)
    out.commit()
    return dest


@pytest.mark.parametrize("args", [
    ["check", "debian:6.1", "--depth", "0", "--html", "/nonexistent-dir/r.html"],
    ["diff", "debian:6.1", "debian:6.12", "--html", "/"],
    ["review", "debian:6.1", "--patch", str(SEED), "--html", "/nonexistent-dir/r.html"],
])
def test_bad_html_path_fails_before_any_work(args) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ---- text reports: 80 columns, no colour ------------------------------------------------------
@pytest.mark.kernel
def test_check_and_review_text_fit_80_columns(check_report, review_report) -> None:
    for proc in (check_report.proc, review_report.proc):
        lines = proc.stdout.splitlines()
        assert len(lines) > 10
        assert max(len(line) for line in lines) <= 80, max(lines, key=len)
        assert "\x1b[" not in proc.stdout


def test_text_wraps_long_names_and_labels() -> None:
    from entrycheck.report.difftext import diff_text
    from entrycheck.report.text import check_summary

    long_sym = "a_very_long_symbol_name_" * 6
    result = synthetic_check()
    f = result.findings[0]
    result.findings = [Finding(f.invariant, f.scenario, f.features, f.effects,
                               (Injection(Vector.NMI, long_sym + "+0x1"),) * 3, long_sym + "+0x10", "m " * 60)]
    table = PathTable("syscall", f.features, ())
    table.add(-1, None, "returned", Cost(cr3_writes=1, cr3_flushing=1, cr3_sites=((long_sym, 1),)), (), (), False)
    result.segments = [(table, 0, 1)]
    text = check_summary(result, target="/some/long/path/" + long_sym + "/entry_64.o", kernel_version="6.1.0")
    assert max(len(line) for line in text.splitlines()) <= 80, max(text.splitlines(), key=len)
    d = synthetic_diff()
    d.new_violations = result.findings
    d.groups = [ChangeGroup((), f"CR3 written no more at {long_sym}", 1, ("pti,pcid",), ("syscall",),
                            d.groups[0].example)]
    text = diff_text(d, old_label="debian:6.1 (linux-source-6.1 6.1.192-2) " + long_sym,
                     new_label="debian:6.1 (linux-source-6.1 6.1.192-2) + " + long_sym + ".patch",
                     model=CostModel(), nmi_rate=1000.0)
    assert max(len(line) for line in text.splitlines()) <= 80, max(text.splitlines(), key=len)


# ---- progress: counts and ETA on a TTY, nothing in a pipe -------------------------------------
@pytest.mark.kernel
def test_progress_is_silent_when_stderr_is_not_a_tty(kernel61) -> None:
    proc = cli("check", "debian:6.1", "--depth", "1", "--features", "pti,pcid",
               "--scenarios", "syscall,nmi-from-kernel")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Verdict: clean" in proc.stdout and "\x1b[" not in proc.stdout


@pytest.mark.kernel
def test_progress_shows_counts_and_eta_on_a_tty(kernel61) -> None:
    master, slave = os.openpty()
    # The terminal is read while the check runs: a pty holds a few KiB, and a writer it fills blocks.
    proc = subprocess.Popen(CLI + ["check", "debian:6.1", "--depth", "1", "--features", "pti,pcid", "--scenarios",
                                   "syscall,nmi-from-kernel", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "TERM": "xterm",
                                                                       "COLUMNS": "100"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    stdout = proc.stdout.read()
    proc.wait(timeout=600)
    assert proc.returncode == 0
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert re.search(r"finding user values\b.*\b[01]/1\b", plain), plain[-500:]   # one feature set
    # The two scenarios and the user values found for syscall, each a unit.
    assert re.search(r"exploring\b.*\b(\d+)/\1\b", plain) and not re.search(r"exploring\b.*\b2/2\b", plain)
    assert re.search(r"\d+:\d\d:\d\d", plain)                      # elapsed / remaining time
    assert "\x1b[" not in stdout.decode()                          # the report itself stays plain


# ---- the CPU state shown in traces ------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.parametrize("features", ["pti,pcid,fsgsbase,kernel_ibrs", "pti", "kernel_ibrs"])
def test_cpu_state_along_a_trace_is_the_machines(kernel612, features) -> None:
    """states_along() rebuilds CR3, GS bases, SPEC_CTRL and CPL from the events alone: it agrees
    with the machine wherever the machine recorded its state (each C call, the end of the run),
    on plain and nested paths."""
    from entrycheck.session import ObjectRef, run_check
    from entrycheck.explore.replay import parse_injection, trace
    from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario
    from entrycheck.image import load_build
    from entrycheck.kernelabi.stubs import Effect
    from entrycheck.kernelabi.world import build_world
    from entrycheck.machine.events import StubCall
    from entrycheck.report.htmlviews import states_along

    fields = ("cr3", "gs_base", "kernel_gs_base", "spec_ctrl", "cpl", "nmi_blocked", "mcg_status")
    world = build_world(load_build(kernel612).image(FeatureSet.parse(features)))
    cfg = CheckConfig(scenarios=("nmi-from-kernel", "mc-from-user", "syscall"), depth=1,
                      feature_sets=(FeatureSet.parse(features),), effects=(Effect.SWITCH_KERNEL_ASID,), max_runs=200)
    result = run_check(ObjectRef(kernel612.object_path, kernel612.cpufeatures_h, kernel612.asm_offsets_h), cfg)
    runs = [(name, (), ()) for name in DEFAULT_SCENARIOS]
    runs += [(p.scenario, p.injections, p.effects) for p in result.paths if p.injections][::7]
    compared = 0
    for name, injections, effects in runs:
        try:
            parsed = tuple(parse_injection(i.spec(), world.image) for i in injections)
        except InputError:      # an injection at a C stub (e.g. __x86_return_thunk) cannot be replayed
            continue
        t = trace(world, scenario(name), parsed, frozenset(Effect(e) for e in effects))
        states = states_along(t, world)
        assert len(states) == len(t.steps) + 1
        for e in t.events:
            if isinstance(e, StubCall):
                got = states[e.step - 1]
                assert [getattr(got, f) for f in fields] == [getattr(e.cpu, f) for f in fields], (name, e)
                compared += 1
        assert [getattr(states[-1], f) for f in fields[:5]] == [getattr(t.final_cpu, f) for f in fields[:5]], name
    assert compared > 20


def test_matrix_cells_count_findings_before_deduplication() -> None:
    """Findings are deduplicated across cells; the matrix counts every cell's own findings, so a
    cell whose finding was deduplicated into another cell still shows it."""
    from entrycheck.report.html import check_matrix

    sets = (FeatureSet.parse("pti"), FeatureSet.parse("pti,pcid"))
    f = Finding("context-not-restored", "nmi-from-kernel", sets[0], (), (), "kernel_code+0x123", "m")
    g = Finding("context-not-restored", "nmi-from-kernel", sets[1], (), (), "kernel_code+0x123", "m")
    result = CheckResult(sets, CheckConfig(scenarios=("nmi-from-kernel", "syscall"), feature_sets=sets),
                         findings=[f], raw_findings=[f], all_findings=1)
    classes = {(c.scenario, c.features): c.cls for row in check_matrix(result, []) for c in row}
    assert classes == {("nmi-from-kernel", "pti"): "finding", ("nmi-from-kernel", "pti,pcid"): "clean",
                       ("syscall", "pti"): "clean", ("syscall", "pti,pcid"): "clean"}
    result.raw_findings, result.all_findings = [f, g], 2      # g deduplicated into f's cell
    classes = {(c.scenario, c.features): c.cls for row in check_matrix(result, []) for c in row}
    assert classes == {("nmi-from-kernel", "pti"): "finding", ("nmi-from-kernel", "pti,pcid"): "finding",
                       ("syscall", "pti"): "clean", ("syscall", "pti,pcid"): "clean"}


def test_bar_chart_is_to_scale_and_escapes_labels() -> None:
    import xml.etree.ElementTree as ET

    from entrycheck.report.plots import Series, grouped_bars

    svg = grouped_bars(f"t {XSS}", ["a", XSS, "c"], [Series("old", (3, 0, 7)), Series(f"new{XSS}", (1, 2, 9))],
                       ylabel="CR3 writes", chart_id="p")
    assert XSS not in svg
    root = ET.fromstring(str(svg))
    ns = {"s": "http://www.w3.org/2000/svg"}
    scale = float(root.get("data-scale"))
    got = {(r.get("data-category"), r.get("data-series")): (float(r.get("data-value")), float(r.get("height")))
           for r in root.iterfind(".//s:rect[@class]", ns) if "bar" in r.get("class").split()}
    assert {k: v for k, (v, _) in got.items()} == {("a", "old"): 3, (XSS, "old"): 0, ("c", "old"): 7,
                                                   ("a", f"new{XSS}"): 1, (XSS, f"new{XSS}"): 2,
                                                   ("c", f"new{XSS}"): 9}
    for value, height in got.values():
        assert height == pytest.approx(value * scale, abs=0.01)
    assert float(root.get("data-ymax")) >= 9 and max(h for _, h in got.values()) <= 170
