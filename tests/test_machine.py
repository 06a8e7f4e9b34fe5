"""The kernels' own entry code on the model CPU: every scenario, CR3 costs, nested NMIs."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache

import pytest

from entrycheck.explore.replay import parse_injection, trace
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario
from entrycheck.image.features import FeatureSet, all_model_feature_sets
from entrycheck.kernelabi.world import build_world
from entrycheck.machine import model
from entrycheck.machine.model import Vector
from entrycheck.machine.events import Cr3Written, Delivered, Fault, GsChange, Iret, Outcome, Resumed, StubCall

pytestmark = pytest.mark.kernel


@lru_cache(maxsize=None)
def _loaded(path: str, cpufeatures: str, offsets: str):
    from pathlib import Path

    from entrycheck.image.image import load

    return load(Path(path), cpufeatures=Path(cpufeatures), asm_offsets=Path(offsets))


def world_of(build, features: str):
    loaded = _loaded(str(build.object_path), str(build.cpufeatures_h), str(build.asm_offsets_h))
    return build_world(loaded.image(FeatureSet.parse(features)))


def run(build, features: str, name: str, *injections: str, effects=frozenset()):
    w = world_of(build, features)
    inj = tuple(parse_injection(i, w.image) for i in injections)
    return w, trace(w, scenario(name), inj, effects)


def cr3_writes(t) -> list[Cr3Written]:
    return [e for e in t.events if isinstance(e, Cr3Written)]


@pytest.mark.parametrize("features", [str(fs) for fs in all_model_feature_sets()])
def test_every_scenario_returns_where_it_started(debian_kernel, features: str) -> None:
    for name in DEFAULT_SCENARIOS:
        w, t = run(debian_kernel, features, name)
        faults = [e.message for e in t.events if isinstance(e, Fault)]
        assert t.outcome is Outcome.RETURNED, (name, t.reason, faults)
        assert not faults
        sc = scenario(name)
        if sc.from_user:
            assert t.final_cpu.cpl == 3
            assert t.final_cpu.gs_base == w.config.user_gs_poison
            if w.pti:
                assert t.final_cpu.cr3 & model.PTI_USER_PGTABLE
        else:
            # back in the interrupted kernel code with its context
            resumed = [e for e in t.events if isinstance(e, Resumed)]
            assert resumed and resumed[-1].regs == resumed[-1].injection.regs
            assert t.final_cpu == resumed[-1].injection.cpu
        assert not t.violations, (name, t.violations)


@pytest.mark.parametrize("name", ["nmi-from-kernel", "mc-from-kernel"])
@pytest.mark.parametrize("features", ["pti,pcid", "pti", "pti,pcid,fsgsbase,kernel_ibrs", "pti,fsgsbase"])
def test_paranoid_return_from_kernel_cr3_writes(kernel61, kernel612, name: str, features: str) -> None:
    _, old = run(kernel61, features, name)
    _, new = run(kernel612, features, name)
    writes = cr3_writes(old)
    assert len(writes) == 1, [w.write for w in writes]
    w = writes[0].write
    assert w.new == w.old                      # the value it already had
    assert w.redundant                         # nothing stale needed flushing
    assert w.noflush == ("pcid" in features)   # NOFLUSH with PCID, a flushing write without
    assert cr3_writes(new) == []


@pytest.mark.parametrize("name", ["nmi-from-kernel", "mc-from-kernel", "db-from-kernel"])
@pytest.mark.parametrize("features", ["none", "pcid", "pcid,fsgsbase,kernel_ibrs"])
def test_no_cr3_write_without_pti(kernel61, kernel612, name: str, features: str) -> None:
    for build in (kernel61, kernel612):
        _, t = run(build, features, name)
        assert cr3_writes(t) == []


def _after_switch_to_user_cr3(w) -> str:
    """The boundary right after SWITCH_TO_USER_CR3's write in the SYSRET path (found, not typed)."""
    from entrycheck.image.decode import sweep

    start, end = w.image.symbol_range("entry_SYSCALL_64")
    sysret_at = w.image.address_of("entry_SYSRETQ_unsafe_stack")
    insns = list(sweep(w.image.read(start, end - start), start))
    writes = [i for i in insns if i.mnemonic.startswith("mov") and i.op_str.endswith("%cr3") and i.address < sysret_at]
    last = writes[-1]
    return w.image.symbolize(last.end)


@pytest.mark.parametrize("features", ["pti,pcid", "pti", "pti,pcid,fsgsbase,kernel_ibrs"])
def test_nmi_in_the_sysret_window_returns_with_the_user_cr3(debian_kernel, features: str) -> None:
    w = world_of(debian_kernel, features)
    at = _after_switch_to_user_cr3(w)
    _, t = run(debian_kernel, features, "syscall", f"nmi@{at}")
    delivered = [e for e in t.events if isinstance(e, Delivered)]
    assert [d.vector for d in delivered] == [model.Vector.NMI]
    resumed = [e for e in t.events if isinstance(e, Resumed)]
    assert len(resumed) == 1
    r = resumed[0]
    assert r.injection.cpu.cr3 & model.PTI_USER_PGTABLE          # interrupted with the user CR3
    assert r.cpu.cr3 == r.injection.cpu.cr3                      # ... and got it back
    assert r.cpu.gs_base == r.injection.cpu.gs_base
    assert r.regs == r.injection.regs
    assert t.outcome is Outcome.RETURNED and "SYSRET" in t.reason
    assert t.final_cpu.cr3 & model.PTI_USER_PGTABLE and t.final_cpu.cpl == 3
    assert t.final_cpu.gs_base == w.config.user_gs_poison
    assert not t.violations


@pytest.mark.parametrize("features", ["pti,pcid", "pcid,fsgsbase", "none"])
def test_nmi_inside_a_db_inside_an_nmi_is_handled_by_the_nesting_logic(debian_kernel, features: str) -> None:
    # The outer NMI calls paranoid_entry; a #DB hits there; an NMI arrives in the #DB
    # handler.  While NMIs are blocked it is latched and delivered right after the
    # #DB's IRET, inside the outer NMI (6.12's CONFIG_DEBUG_ENTRY unmasks NMIs early
    # with an IRET of its own, so there it is delivered at once).  Either way
    # asm_exc_nmi must see it is nested, make the outer NMI repeat, and process both.
    _, t = run(debian_kernel, features, "nmi-from-kernel", "db@paranoid_entry", "nmi@asm_exc_debug")
    arrivals = [(type(e).__name__, e.vector) for e in t.events if type(e).__name__ in ("Delivered", "Latched")]
    assert arrivals[:2] == [("Delivered", model.Vector.NMI), ("Delivered", model.Vector.DB)]
    early_iret = "CONFIG_DEBUG_ENTRY=y" in debian_kernel.config_file.read_text().splitlines()
    assert (("Latched", model.Vector.NMI) in arrivals) is not early_iret     # the build says which
    if not early_iret:
        assert arrivals[2:] == [("Latched", model.Vector.NMI), ("Delivered", model.Vector.NMI)]
        at = next(k for k, e in enumerate(t.events) if isinstance(e, Delivered) and e.from_latch)
        db_iret = [e for e in t.events[:at] if isinstance(e, Iret)][-1]
        assert t.events[at].pc == db_iret.frame.rip        # delivered right after that IRET
    else:
        assert arrivals[2:] == [("Delivered", model.Vector.NMI)]
    handled = [e for e in t.events if isinstance(e, StubCall) and e.name == "exc_nmi"]
    assert len(handled) == 2                               # every NMI processed
    repeats = [e for e in t.events if isinstance(e, Iret) and t.events and
               e.frame.rip == _loaded_symbol(debian_kernel, "repeat_nmi")]
    assert repeats                                          # the outer NMI went round again
    assert t.outcome is Outcome.RETURNED and not t.violations


def test_the_latch_holds_an_nmi_while_nmis_are_blocked(kernel61) -> None:
    _, t = run(kernel61, "pti,pcid", "nmi-from-kernel", "db@paranoid_entry", "nmi@asm_exc_debug")
    assert [type(e).__name__ for e in t.events if type(e).__name__ == "Latched"] == ["Latched"]


def _loaded_symbol(build, name: str) -> int:
    return _loaded(str(build.object_path), str(build.cpufeatures_h), str(build.asm_offsets_h)).symbols[name]


# Hand counts from `objdump -d` of each object: the CR3 writes (`mov %rN,%cr3`) and SWAPGS
# instructions each path executes with pti,pcid.
#  syscall: SWITCH_TO_KERNEL_CR3 in entry_SYSCALL_64 and SWITCH_TO_USER_CR3_STACK before
#           SYSRET (2 writes, both NOFLUSH: no flush pending); swapgs at entry and before
#           sysretq (2).
#  nmi-from-kernel: SAVE_AND_SWITCH_TO_KERNEL_CR3 finds the kernel CR3 and skips its write;
#           6.1's RESTORE_CR3 writes it back (1, NOFLUSH, redundant); 6.12's
#           PARANOID_RESTORE_CR3 jumps over its write (0); no swapgs (kernel GS).
#  db-from-user: error_entry's SWITCH_TO_KERNEL_CR3 and the exit's SWITCH_TO_USER_CR3 (2);
#           swapgs in error_entry and before iretq (2).
HAND_COUNTS = {
    ("6.1", "syscall"): (2, 2, 0, 2), ("6.12", "syscall"): (2, 2, 0, 2),
    ("6.1", "nmi-from-kernel"): (1, 1, 1, 0), ("6.12", "nmi-from-kernel"): (0, 0, 0, 0),
    ("6.1", "db-from-user"): (2, 2, 0, 2), ("6.12", "db-from-user"): (2, 2, 0, 2),
}


@pytest.mark.parametrize("key", sorted(HAND_COUNTS))
def test_trace_totals_match_a_hand_count_from_objdump(kernel61, kernel612, key) -> None:
    series, name = key
    build = kernel61 if series == "6.1" else kernel612
    writes, noflush, redundant, swapgs = HAND_COUNTS[key]
    w, t = run(build, "pti,pcid", name)
    assert (t.cost.cr3_writes, t.cost.cr3_noflush, t.cost.cr3_redundant, t.cost.swapgs) == \
        (writes, noflush, redundant, swapgs)
    # Every CR3 write and SWAPGS the trace saw is an instruction objdump shows as such.
    dump = subprocess.run(["objdump", "-d", "-j", ".entry.text", "--no-show-raw-insn", str(build.object_path)], capture_output=True,
                          text=True, check=True).stdout
    listed = {}
    func = None
    for line in dump.splitlines():
        m = re.match(r"^[0-9a-f]+ <(\S+)>:", line)
        if m:
            func = m.group(1)
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
        if m and func:
            listed[int(m.group(1), 16)] = m.group(2)
    section = w.image.loaded.section(".entry.text")
    for e in t.events:
        if isinstance(e, (Cr3Written, GsChange)) and section.address <= e.pc < section.address + section.size:
            text = listed[e.pc - section.address]
            assert ("%cr3" in text) if isinstance(e, Cr3Written) else text.startswith("swapgs"), text


def test_a_fault_ends_the_run_as_an_emulation_fault(kernel612) -> None:
    # Returning with the stack a handler left makes IRET read garbage: the run must end
    # with a reported outcome, not crash the tool.
    w = world_of(kernel612, "pti,pcid")
    from dataclasses import replace

    from entrycheck.explore.scenarios import start_state
    from entrycheck.kernelabi.stubs import StubOptions, Stubs
    from entrycheck.machine.api import Level, Request
    from entrycheck.machine.machine import Machine

    machine = Machine(w.image, w.config, Stubs(w))
    memory = machine.layout.pristine
    for level in (Level.EVENTS, Level.STEPS):
        rec = machine.run(Request(start_state(w, scenario("nmi-from-kernel"), memory), deliver=Vector.NMI,
                                  level=level, options=StubOptions(), budget=50))
        assert rec.outcome is Outcome.NO_RETURN
        start = start_state(w, scenario("syscall"), memory)
        start = replace(start, cpu=model.swapgs(start.cpu))   # as if the entry's SWAPGS had already run
        rec = machine.run(Request(start, level=level, options=StubOptions()))
        assert rec.outcome is Outcome.EMULATION_FAULT
        fault = [e for e in rec.events if isinstance(e, Fault)][0]
        assert fault.kind.value == "percpu-with-user-gs"


@pytest.mark.parametrize("args, needle", [
    (["--scenario", "nope"], "unknown scenario"),
    (["--scenario", "syscall", "--inject", "xx@paranoid_exit"], "unknown vector"),
    (["--scenario", "syscall", "--inject", "nmi@no_such_symbol"], "unknown symbol"),
    (["--scenario", "syscall", "--inject", "nmi@paranoid_exit+0x1"], "not an instruction boundary"),
    (["--scenario", "syscall", "--features", "pti,warp_drive"], "unknown CPU feature"),
])
def test_trace_bad_input_is_one_line_and_exit_2(kernel612, args, needle) -> None:
    proc = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "trace",
                           str(kernel612.object_path), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_trace_json_totals_carry_the_cr3_object(kernel61) -> None:
    import json

    proc = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "trace",
                           str(kernel61.object_path), "--scenario", "nmi-from-kernel", "--features", "pti,pcid",
                           "--json", "-"], capture_output=True, text=True, check=True)
    doc = json.loads(proc.stdout)
    assert doc["totals"]["cr3"] == {"writes": 1, "flushing_writes": 0, "noflush_writes": 1, "redundant_writes": 1}
    assert doc["totals"]["outcome"] == doc["outcome"] == "returned"
    again = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "trace",
                            str(kernel61.object_path), "--scenario", "nmi-from-kernel", "--features", "pti,pcid",
                            "--json", "-"], capture_output=True, text=True, check=True)
    assert again.stdout == proc.stdout
