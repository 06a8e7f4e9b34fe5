"""Source lines from DWARF line info (report/srclines.py) on the Debian debug builds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from entrycheck.explore.check import CheckConfig
from entrycheck.session import ObjectRef, run_check
from entrycheck.explore.replay import trace
from entrycheck.explore.scenarios import scenario
from entrycheck.image import load_build
from entrycheck.image.decode import sweep
from entrycheck.image.features import FeatureSet
from entrycheck.kernel.targets import KernelBuild
from entrycheck.kernelabi.stubs import Effect
from entrycheck.kernelabi.world import build_world
from entrycheck.machine.events import Cr3Written
from entrycheck.report.srclines import SourceLines

pytestmark = pytest.mark.kernel
ENTRY_S = "arch/x86/entry/entry_64.S"


def invocation_line(build: KernelBuild, function: str, macro: str) -> int:
    """The line number of the first ``macro`` invocation inside ``function`` in entry_64.S (grepped)."""
    assert build.source_tree is not None
    lines = (build.source_tree / ENTRY_S).read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"SYM_CODE_START(_LOCAL)?\({function}\)", ln))
    for i in range(start, len(lines)):
        if re.match(rf"\s*{macro}\b", lines[i]):
            return i + 1
        assert not lines[i].startswith("SYM_CODE_END"), f"no {macro} in {function}"
    raise AssertionError(f"no {macro} in {function}")


INS = re.compile(r"^\s*([0-9a-f]+):\t[0-9a-f ]+\t")
LOC = re.compile(r"^(/\S+):(\d+)(?: \(discriminator \d+\))?$")


def objdump_lines(obj: Path) -> list[tuple[str, int, str, int]]:
    """(section, offset, file, line) of every instruction, as binutils' objdump -dl reads the object."""
    out = subprocess.run(["objdump", "-dl", "-w", str(obj)], capture_output=True, text=True, check=True).stdout
    section, where, rows = None, None, []
    for line in out.splitlines():
        if line.startswith("Disassembly of section "):
            section, where = line[len("Disassembly of section "):].rstrip(":"), None
            continue
        m = LOC.match(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = INS.match(line)
        if m and where and section:
            rows.append((section, int(m.group(1), 16), *where))
    return rows


def test_objects_without_line_info_have_no_lines(kernel61) -> None:
    loaded = load_build(kernel61)
    lines = SourceLines.from_build(kernel61, loaded)
    assert not lines
    entry = loaded.section(".entry.text")
    assert lines.line(entry.address) is None and lines.text(entry.address) is None


def _owner(build, section: str, offset: int) -> str | None:
    """Which object's part of the linked ``section`` holds ``offset`` (None: fill ld put between
    parts); ld -r places each object's section at the next multiple of its alignment, in link order."""
    from entrycheck.image.objfile import load_object

    cursor = 0
    for part in build.parts:
        sec = load_object(part, entry_text=False).section(section)
        if sec is None:
            continue
        cursor = -(-cursor // sec.align) * sec.align
        if cursor <= offset < cursor + sec.size:
            return part.name
        cursor += sec.size
    return None


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_every_instruction_maps_to_the_line_objdump_gives(which, kernel61_debug, kernel612_debug) -> None:
    """Independent oracle: binutils applies .rela.debug_line itself; our addresses are the section's
    address in our layout plus the offset objdump shows, in .entry.text, .text and .altinstr_replacement."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed")
    build = {"6.1": kernel61_debug, "6.12": kernel612_debug}[which]
    assert build.debug_info
    loaded = load_build(build)
    lines = SourceLines.from_build(build, loaded)
    assert lines
    rows = objdump_lines(build.object_path)
    sections = {r[0] for r in rows}
    assert {".entry.text", ".text", ".altinstr_replacement"} <= sections
    wrong = []
    for section, offset, path, number in rows:
        address = loaded.section(section).address + offset
        got = lines.line(address)
        if got is None and _owner(build, section, offset) != Path(path).name.replace(".S", ".o"):
            # objdump gives the last line of a sequence to the bytes after it: the linker's fill, or
            # the next object's part when that object has no line rows there.
            continue
        if got is None or not path.endswith("/" + got[0]) or got[1] != number:
            wrong.append((section, hex(offset), path, number, got))
    assert not wrong, wrong[:10]
    assert len(rows) > 1000
    assert ENTRY_S in lines.files


def test_cr3_write_site_in_paranoid_exit_is_the_restore_cr3_line_6_1(kernel61_debug) -> None:
    """6.1: the CR3 write of a paranoid return maps to the RESTORE_CR3 invocation in paranoid_exit,
    and the source text shown is that line."""
    loaded = load_build(kernel61_debug)
    lines = SourceLines.from_build(kernel61_debug, loaded)
    world = build_world(loaded.image(FeatureSet.parse("pti,pcid")))
    t = trace(world, scenario("mc-from-kernel"), ())
    writes = [e for e in t.events if isinstance(e, Cr3Written)
              and world.image.symbolize(e.pc).startswith("paranoid_exit")]
    assert writes, "no CR3 write in paranoid_exit"
    expected = invocation_line(kernel61_debug, "paranoid_exit", "RESTORE_CR3")
    for e in writes:
        assert lines.line(e.pc) == (ENTRY_S, expected)
        assert lines.location(e.pc) == f"{ENTRY_S}:{expected}"
        assert lines.text(e.pc).startswith("RESTORE_CR3 ")
        assert "save_reg=%r14" in lines.text(e.pc)


def test_a_finding_trace_shows_the_paranoid_restore_cr3_line_6_12(kernel612_debug) -> None:
    """6.12 (PARANOID_RESTORE_CR3 skips the write for a kernel CR3): the mc-from-kernel finding with a
    handler that switches the kernel ASID runs paranoid_exit; its replayed trace attributes the
    PARANOID_RESTORE_CR3 expansion (bt, jnc) to the invocation line, as grepped from the source."""
    from entrycheck.report.htmlviews import _Side

    loaded = load_build(kernel612_debug)
    result = run_check(ObjectRef(kernel612_debug.object_path, kernel612_debug.cpufeatures_h,
                                 kernel612_debug.asm_offsets_h),
                       CheckConfig(scenarios=("mc-from-kernel",), feature_sets=(FeatureSet.parse("pti,pcid"),),
                                   depth=0, effects=(Effect.SWITCH_KERNEL_ASID,)))
    finding = next(f for f in result.findings if f.invariant == "context-not-restored")
    view = _Side(kernel612_debug, loaded, "debian:6.12+debug").replay(finding)
    assert view.matched
    expected = invocation_line(kernel612_debug, "paranoid_exit", "PARANOID_RESTORE_CR3")
    restore = [r for r in view.rows if r.location.startswith("paranoid_exit") and r.instruction.startswith("bt")]
    assert restore, [r.location for r in view.rows]
    for r in restore:
        assert r.source == f"{ENTRY_S}:{expected}"
        assert r.source_text.startswith("PARANOID_RESTORE_CR3 ")
    # every row in entry code has a line; the C stubs have none
    for r in view.rows:
        assert (r.source is None) == r.instruction.startswith("(C)"), r


def test_text_trace_shows_source_lines_on_a_debug_build(kernel61_debug) -> None:
    from entrycheck.report.text import trace_text

    loaded = load_build(kernel61_debug)
    image = loaded.image(FeatureSet.parse("pti,pcid"))
    t = trace(build_world(image), scenario("mc-from-kernel"), ())
    text = trace_text(t, image, target="debian:6.1+debug", features="pti,pcid")
    expected = invocation_line(kernel61_debug, "paranoid_exit", "RESTORE_CR3")
    assert f"# {ENTRY_S}:{expected}  RESTORE_CR3 scratch_reg=%rax" in text
    assert max(len(line.rstrip()) for line in text.splitlines() if line.lstrip().startswith("#")) <= 80


def test_paranoid_exit_instructions_stay_inside_paranoid_exit(kernel612_debug) -> None:
    """Every instruction of paranoid_exit maps to a line between its SYM_CODE_START and SYM_CODE_END."""
    loaded = load_build(kernel612_debug)
    lines = SourceLines.from_build(kernel612_debug, loaded)
    image = loaded.image(FeatureSet.parse("pti,pcid"))
    src = (kernel612_debug.source_tree / ENTRY_S).read_text().splitlines()
    start = next(i + 1 for i, ln in enumerate(src) if ln.startswith("SYM_CODE_START_LOCAL(paranoid_exit)"))
    end = next(i + 1 for i, ln in enumerate(src) if ln.startswith("SYM_CODE_END(paranoid_exit)"))
    lo, hi = image.symbol_range("paranoid_exit")
    for ins in sweep(image.read(lo, hi - lo), lo):
        file, number = lines.line(ins.address)
        assert file == ENTRY_S and start < number < end, (image.symbolize(ins.address), number)
