"""Handler runs shared between boundaries (explore/memo.py) with the kernel's own C running.

One recorded handler run stands for every boundary whose start state agrees with it on what
the run used (its dataflow, machine/flow.py).  The checks: what it uses is what the handler's
course depends on, not what it only copies (the interrupted RIP an NMI handler saves, compares
and stores); and the check with sharing finds, path for path, what running every handler finds
(`--no-share`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from entrycheck.explore.check import CheckConfig
from entrycheck.image.features import FeatureSet
from entrycheck.machine.model import Vector
from entrycheck.machine.state import REG_INDEX
from entrycheck.session import STATE, object_ref, run_check

pytestmark = pytest.mark.kernel

CASES = [
    ("6.12", "pti,pcid", ("nmi-from-kernel", "syscall", "irq-from-kernel")),
    ("6.1", "pti,pcid,kernel_ibrs", ("db-from-user", "nmi-from-kernel", "syscall")),
]


def _paths(result) -> dict:
    return {(p.scenario, p.effects, p.injections): (p.outcome, p.cost, p.end_state, p.cr3_trace)
            for p in result.paths}


@pytest.mark.parametrize("series, features, scenarios", CASES, ids=[c[0] for c in CASES])
def test_shared_runs_find_what_running_every_handler_finds(built_kernels, series, features, scenarios) -> None:
    ref = object_ref(built_kernels[series])
    cfg = CheckConfig(scenarios=scenarios, depth=1, feature_sets=(FeatureSet.parse(features),))
    shared = run_check(ref, cfg)
    each = run_check(ref, replace(cfg, share=False))
    assert each.shared == 0 and shared.shared > shared.runs // 2      # most leaves stand on a shared run
    assert shared.executed * 4 < each.executed
    assert _paths(shared) == _paths(each)
    assert [(f.key(), f.paths) for f in shared.findings] == [(f.key(), f.paths) for f in each.findings]
    # Each finding says how many paths showed it; together they are every path that broke an invariant.
    assert sum(f.paths for f in shared.findings) == shared.all_findings


def test_handler_runs_do_not_use_what_they_only_copy(built_kernels) -> None:
    """An NMI handler saves the interrupted RIP and RSP, compares them (asm_exc_nmi's nested-NMI
    tests, default_do_nmi's back-to-back test against last_nmi_rip), stores them (%gs:last_nmi_rip)
    and IRETs to itself (DEBUG_ENTRY's first_nmi): none of that is a use, so one run stands for
    every boundary of a stretch.  An interrupt's frame goes where the interrupted RSP points (a
    use), but its RIP is only copied."""
    ref = object_ref(built_kernels["6.12"])
    fs = FeatureSet.parse("pti,pcid")
    cfg = CheckConfig(scenarios=("nmi-from-kernel", "syscall", "irq-from-kernel"), depth=1, feature_sets=(fs,),
                      user_values=False)
    STATE.explorers.clear()
    run_check(ref, cfg, workers=1)
    ex = next(e for (r, f, _), e in STATE.explorers.items() if r == ref and f == fs)
    rip, rsp = REG_INDEX["rip"], REG_INDEX["rsp"]
    nmi, irq = ex.memo.uses(Vector.NMI), ex.memo.uses(Vector.IRQ)
    assert nmi and irq
    assert not any(rip in u or rsp in u for u in nmi), nmi
    assert not any(rip in u for u in irq), irq
