"""The engine without a Debian kernel: the machine boundary, the dataflow the memo relies on,
and pruned exploration against brute force on the demo's entry-code fixture (GNU as at test time)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from entrycheck.demo import VARIANTS, assemble, find_assembler
from entrycheck.demo.run import demo_config
from entrycheck.session import ObjectRef, run_check
from entrycheck.image.features import FeatureSet
from entrycheck.machine import insnclass
from entrycheck.machine.state import REG_INDEX

SRC = Path(__file__).resolve().parents[1] / "src" / "entrycheck"
needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as (binutils) is not installed")


def test_only_the_machine_adapter_imports_unicorn() -> None:
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "unicorn" or n.startswith("unicorn.") for n in names):
                importers.append(path.relative_to(SRC).as_posix())
    assert sorted(set(importers)) == ["machine/uc.py"]


# ---- dataflow: how each instruction is classed ---------------------------------------------

CLASSED = """
    .text
    mov %rax, %rbx            # 0 plain 64-bit copy
    mov 8(%rsp), %rcx         # 1 load: the address registers are used, the value copied
    mov %rdx, 16(%rdi)        # 2 store
    mov %gs:0x10, %rax        # 3 per-cpu load: a copy (the GS base in its address is model state)
    mov %eax, %ebx            # 4 32-bit move: zero-extends, not a copy of the whole register
    push %r12                 # 5
    pop %r13                  # 6
    xor %eax, %eax            # 7 zeroing idiom: no input used
    add %rsi, %rdi            # 8 arithmetic: uses both
    cmpq $5, 24(%rsp)         # 9 compare of memory with an immediate
    je 1f                     # 10
1:  lea 8(%rsp,%rcx,8), %rax  # 11
    pushfq                    # 12
    swapgs                    # 13 privileged: generic
"""


@pytest.fixture(scope="module")
def classed(tmp_path_factory) -> list[tuple[int, insnclass.Insn]]:
    """(address, how the dataflow classes it) of each instruction of CLASSED."""
    if shutil.which("as") is None:
        pytest.skip("GNU as (binutils) is not installed")
    d = tmp_path_factory.mktemp("flow")
    (d / "c.S").write_text(CLASSED)
    subprocess.run(["as", "--64", "-o", str(d / "c.o"), str(d / "c.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "c.o"), str(d / "c.bin")], check=True)
    code = (d / "c.bin").read_bytes()
    from entrycheck.image.decode import sweep

    return [(ins.address, insnclass.describe(ins)) for ins in sweep(code, 0x1000)]


def test_copies_are_told_from_uses(classed) -> None:
    r = REG_INDEX
    starts = [a for a, _ in classed]
    classed = [i for _, i in classed]
    assert (classed[0].kind, classed[0].dst, classed[0].src) == ("mov_rr", r["rbx"], r["rax"])
    assert (classed[1].kind, classed[1].dst, classed[1].reads) == ("load", r["rcx"], (r["rsp"],))
    assert (classed[2].kind, classed[2].src, classed[2].reads) == ("store", r["rdx"], (r["rdi"],))
    assert (classed[3].kind, classed[3].dst, classed[3].reads) == ("load", r["rax"], ())
    assert classed[4].kind == "generic" and r["rax"] in classed[4].reads
    assert (classed[5].kind, classed[5].src) == ("push_r", r["r12"])
    assert (classed[6].kind, classed[6].dst) == ("pop_r", r["r13"])
    assert (classed[7].kind, classed[7].dst) == ("zero", r["rax"])
    assert classed[8].kind == "generic" and {r["rsi"], r["rdi"]} <= set(classed[8].reads)
    assert dict(classed[8].writes)[r["rdi"]] is True and classed[8].flags_written
    assert classed[9].kind == "cmp" and classed[9].operands == (("m", 8), ("i", 5)) \
        and classed[9].addr == (r["rsp"],)
    assert classed[10].kind == "jcc" and classed[10].cond == "je" and classed[10].target == starts[11]
    assert classed[11].kind == "generic" and set(classed[11].reads) == {r["rsp"], r["rcx"]}
    assert classed[12].kind == "pushf"
    assert classed[13].kind == "generic"


_JCC = sorted(insnclass._CONDITIONS)


@needs_as
@settings(max_examples=300, deadline=None)
@given(cond=st.sampled_from(_JCC), kind=st.sampled_from(["cmp", "test"]), width=st.sampled_from([1, 2, 4, 8]),
       a=st.integers(0, 2**64 - 1), b=st.integers(0, 2**64 - 1))
def test_branch_conditions_agree_with_the_cpu(cond, kind, width, a, b) -> None:
    """insnclass.condition decides a branch on copied values without running it; the CPU decides
    it by flags.  Both must agree for every condition, width and operand pair."""
    mask = (1 << 8 * width) - 1
    assert insnclass.condition(cond, kind, width, a & mask, b & mask) == _cpu_takes(cond, kind, width, a & mask, b & mask)


_CPU: dict = {}


def _cpu_takes(cond: str, kind: str, width: int, a: int, b: int) -> bool:
    """Run `kind b, a` (AT&T: flags of a - b / a & b) then `cond` on real x86 semantics (Unicorn)."""
    import unicorn
    from unicorn import x86_const as U

    key = (cond, kind, width)
    code = _CPU.get(key)
    if code is None:
        reg = {1: ("%sil", "%dil"), 2: ("%si", "%di"), 4: ("%esi", "%edi"), 8: ("%rsi", "%rdi")}[width]
        src = f".text\n {kind} {reg[0]}, {reg[1]}\n {cond} 1f\n mov $0, %eax\n jmp 2f\n1: mov $1, %eax\n2: nop\n"
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            Path(d, "j.S").write_text(src)
            subprocess.run(["as", "--64", "-o", f"{d}/j.o", f"{d}/j.S"], check=True)
            subprocess.run(["objcopy", "-O", "binary", "-j", ".text", f"{d}/j.o", f"{d}/j.bin"], check=True)
            code = _CPU[key] = Path(d, "j.bin").read_bytes()
    mu = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    mu.mem_map(0x1000, 0x1000)
    mu.mem_write(0x1000, code)
    mu.reg_write(U.UC_X86_REG_RDI, a)
    mu.reg_write(U.UC_X86_REG_RSI, b)
    mu.emu_start(0x1000, 0x1000 + len(code) - 1)
    return mu.reg_read(U.UC_X86_REG_RAX) == 1


# ---- memo and convergence against brute force, on the demo fixture ---------------------------

@needs_as
@pytest.mark.parametrize("number", [0, 2])
def test_shared_handler_runs_stand_for_what_brute_force_finds(number, tmp_path) -> None:
    """Depth 2: a nested exception's handler run is shared between boundaries whose used
    inputs agree (memo) and runs stop where they rejoin a recorded run (convergence).
    Every path, finding and CR3 cost must be what running each injection to its end gives."""
    obj = assemble(find_assembler(), VARIANTS[number], tmp_path)
    cfg = replace(demo_config(), depth=2, feature_sets=(FeatureSet.parse("pti,pcid"),),
                  scenarios=("syscall", "mc-from-user", "mc-from-kernel", "db-from-kernel"))
    ref = ObjectRef(obj, None, None)
    pruned = run_check(ref, cfg)
    brute = run_check(ref, replace(cfg, prune=False))
    assert pruned.shared > 0 and pruned.converged > 0          # both prunings were exercised
    assert brute.shared == 0 and brute.converged == 0
    assert pruned.executed < brute.executed / 5
    assert {f.key() for f in pruned.findings} == {f.key() for f in brute.findings}
    # Pruning drops only latched-NMI points (they reach the state of the first one); every
    # path it keeps ends where, and costs what, the same path run to its end does.
    def summary(paths) -> dict:
        return {(p.scenario, p.injections): (p.outcome, p.cost.cr3_json(), p.cr3_trace, p.end_state) for p in paths}

    full, kept = summary(brute.paths), summary(pruned.paths)
    assert len(kept) == len(pruned.paths) and kept.keys() <= full.keys()
    assert {k: full[k] for k in kept} == kept
    assert pruned.skipped == len(full) - len(kept) > 0


@needs_as
def test_a_recorded_runs_rest_is_summarised_as_its_events_from_there(tmp_path) -> None:
    """Node.suffix (one pass from the end) against Summaries.of over the events left, at every
    boundary of the demo's paths and of an NMI's run injected into each."""
    from entrycheck.explore.node import Node
    from entrycheck.explore.scenarios import SCENARIOS, delivery, start_state, stub_options
    from entrycheck.machine.api import Level, Request
    from entrycheck.machine.model import Vector
    from entrycheck.session import explorer

    obj = assemble(find_assembler(), VARIANTS[2], tmp_path)
    fs = FeatureSet.parse("pti,pcid")
    cfg = replace(demo_config(), feature_sets=(fs,))
    ex = explorer(ObjectRef(obj, None, None), cfg, fs)
    checked = 0
    for name in ("syscall", "mc-from-kernel"):
        sc = SCENARIOS[name]
        options = stub_options(sc, frozenset(), ex.config.pt_regs_contract)
        rec = ex.run(Request(start_state(ex.world, sc, ex.pristine), deliver=delivery(ex.world, sc),
                             level=Level.STEPS, options=options))
        root = Node(ex.summaries, ex.world, ex.wbase, rec, None, 0, (), -1)
        nodes = [root]
        log = root.log
        for k in range(log.start, log.start + len(log.pcs), 7):
            got = ex.run(Request(log.state(k, _memory_at(log, k)), deliver=Vector.NMI, level=Level.STEPS,
                              options=options))
            nodes.append(Node(ex.summaries, ex.world, ex.wbase, got, root, k, (), -1))
        for node in nodes:
            first, last = node.log.start, node.log.start + len(node.log.pcs)
            for k in range(first, last):
                assert node.suffix(k) == ex.summaries.of(node.events, node.index(k))
                checked += 1
    assert checked > 100


def _memory_at(log, k: int):
    cursor = log.cursor()
    cursor.advance(k)
    return cursor.frozen()


def test_batches_keep_a_feature_set_on_one_worker_when_there_are_enough_sets() -> None:
    from entrycheck.explore.check import CheckConfig, make_batches, make_units
    from entrycheck.image.features import FeatureSet

    sets = tuple(FeatureSet.parse(f) for f in ("pti", "pti,pcid,fsgsbase", "pti,pcid", "kernel_ibrs"))
    cfg = CheckConfig(scenarios=("syscall", "db-from-user", "nmi-from-kernel"), depth=2, feature_sets=sets)
    units = make_units(cfg)
    batches = make_batches(units, 2)
    # One batch per feature set, every unit in exactly one batch, in exploration order inside.
    assert sorted(k for b in batches for k in b) == list(range(len(units)))
    assert [{units[k].features for k in b} for b in batches] == [{sets[1]}, {sets[2]}, {sets[0]}, {sets[3]}]
    assert all(list(b) == sorted(b) for b in batches)
    # Too few sets to keep two workers busy: every unit (part) is its own batch.
    assert make_batches(make_units(CheckConfig(scenarios=("syscall",), depth=2, feature_sets=sets[:1]), 4), 2) == \
        [(0,), (1,), (2,), (3,)]
    assert make_batches(units, 1) == [(k,) for k in range(len(units))]


def test_guards_name_the_option_an_iretq_is_compiled_in_by() -> None:
    from entrycheck.kernel.guards import parse

    text = """SYM_CODE_START(asm_exc_nmi)
\tpushq\t%rdx
first_nmi:
\tmovq\t(%rsp), %rdx
#ifdef CONFIG_DEBUG_ENTRY
\t/*
\t * For ease of testing, unmask NMIs right away.
\t */
\tpushq\t$0\t\t/* SS */
\tpushfq
\tpushq\t$1f\t\t/* RIP */
\tiretq\t\t\t/* continues below */
\tUNWIND_HINT_IRET_REGS
1:
#endif
repeat_nmi:
#if defined(CONFIG_X86_ESPFIX64)
\tSWAPGS
\tiretq
#else
\tiretq
#endif
#ifndef CONFIG_FOO
\tiretq
#endif
nmi_restore:
\tiretq
"""
    assert parse(text) == (("first_nmi", "CONFIG_DEBUG_ENTRY", 3), ("repeat_nmi", "CONFIG_X86_ESPFIX64", -1))


def test_breakpoint_refusals_are_read_from_within_cpu_entry() -> None:
    from entrycheck.kernel.guards import parse_refusals

    text = """static int other(void) { within_area(a, b, (unsigned long)&per_cpu(not_this, cpu), 8); }
static inline bool within_cpu_entry(unsigned long addr, unsigned long end)
{
\tif (within_area(addr, end, CPU_ENTRY_AREA_BASE,
\t\t\tCPU_ENTRY_AREA_MAP_SIZE))
\t\treturn true;
#ifdef CONFIG_SMP
\tif (within_area(addr, end, (unsigned long)__per_cpu_offset,
\t\t\tsizeof(unsigned long) * nr_cpu_ids))
\t\treturn true;
#endif
\tfor_each_possible_cpu(cpu) {
\t\t/* within_area(addr, end, (unsigned long)&per_cpu(commented_out, cpu), 1) */
\t\tif (within_area(addr, end, (unsigned long)get_cpu_gdt_rw(cpu), GDT_SIZE))
\t\t\treturn true;
\t\tif (within_area(addr, end,
\t\t\t\t(unsigned long)&per_cpu(cpu_tss_rw, cpu),
\t\t\t\tsizeof(struct tss_struct)))
\t\t\treturn true;
\t}
\treturn false;
}
"""
    assert parse_refusals(text) == ("cpu_entry_area", "__per_cpu_offset", "gdt_page", "cpu_tss_rw")
    assert parse_refusals("int main(void) { return 0; }") is None


# ---- loops that never end ---------------------------------------------------------------

def _assemble_edited(tmp_path, old: str, new: str) -> Path:
    """The demo fixture (variant 1: safe) with one edit, assembled."""
    from importlib import resources

    from entrycheck.demo.run import FIXTURE

    source = (resources.files("entrycheck.demo") / FIXTURE).read_text()
    edited = source.replace(old, new, 1)
    assert edited != source
    (tmp_path / "edited.S").write_text(edited)
    obj = tmp_path / "edited.o"
    subprocess.run([find_assembler().path, "--64", "--defsym", "VARIANT=1", "-o", str(obj), str(tmp_path / "edited.S")],
                   check=True, capture_output=True)
    return obj


@needs_as
def test_a_c_function_given_a_bad_pt_regs_is_a_finding_not_an_internal_error(tmp_path) -> None:
    """Entry code that hands a C handler a pointer that is no pt_regs (here an unmapped one)
    breaks the C function's contract: an emulation-fault finding at the call, and the check
    is complete (no exploration error)."""
    obj = _assemble_edited(tmp_path, "\tmovq\t%rsp, %rdi\t\t\t/* pt_regs */\n\tmovq\t$-1, %rsi\n\tcall\t\\handler",
                           "\tmovl\t$0xdead0000, %edi\n\tmovq\t$-1, %rsi\n\tcall\t\\handler")
    cfg = replace(demo_config(), depth=0, feature_sets=(FeatureSet.parse("pti"),), scenarios=("mc-from-kernel",))
    result = run_check(ObjectRef(obj, None, None), cfg)
    assert not result.errors
    faults = [f for f in result.findings if f.invariant == "emulation-fault"]
    assert faults and "pt_regs at 0xdead0000" in faults[0].message


@needs_as
def test_a_loop_that_never_ends_is_cut_where_its_state_repeats(tmp_path) -> None:
    """`jmp .` in paranoid_exit: every path through it loops.  Each run ends as no-return at
    the loop once the whole state there repeats, not at the step budget, and the findings
    are those of running every path to its budget (--no-prune)."""
    obj = _assemble_edited(tmp_path, "paranoid_exit:\n", "paranoid_exit:\n\tjmp\t.\n")
    # A short budget keeps the brute force cheap; the cut comes long before it.
    cfg = replace(demo_config(), depth=1, feature_sets=(FeatureSet.parse("pti"),),
                  scenarios=("mc-from-kernel", "syscall"), budget=400)
    ref = ObjectRef(obj, None, None)
    cut = run_check(ref, cfg)
    full = run_check(ref, replace(cfg, prune=False))
    loops = [f for f in cut.findings if f.invariant == "no-return"]
    assert loops and all("state at paranoid_exit repeats" in f.message for f in loops)
    assert any(p.outcome == "no-return" for p in cut.paths)
    assert {f.key() for f in cut.findings if f.invariant == "no-return"} == \
        {f.key() for f in full.findings if f.invariant == "no-return"}
    assert all(f.site.startswith("paranoid_exit") for f in cut.findings if f.invariant == "no-return")
