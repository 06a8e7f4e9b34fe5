"""entrycheck's speed figures, measured on the real Debian kernels.

    python benchmarks/bench.py machine            # one scenario run, one restore
    python benchmarks/bench.py depth1 [--kernel debian:6.1] [--workers 2]
    python benchmarks/bench.py depth2 [--kernel debian:6.12] [--features pti,pcid] [--workers 2]
    python benchmarks/bench.py all

Goals: a depth-1 check of one kernel over all 16 feature sets in <= 60 s on a
2-core machine.  Figures are printed as one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from entrycheck.explore.check import CheckConfig, ObjectRef, run_check
from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, prepare, scenario
from entrycheck.image import load_build
from entrycheck.image.features import FeatureSet, all_model_feature_sets
from entrycheck.kernel.targets import resolve_target
from entrycheck.kernelabi.stubs import StubOptions, Stubs
from entrycheck.kernelabi.world import build_world
from entrycheck.machine.emulator import Emulator, Mode


def _ref(build) -> ObjectRef:
    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)


def bench_machine(target: str) -> dict:
    build = resolve_target(target)
    world = build_world(load_build(build).image(FeatureSet.parse("pti,pcid")))
    out: dict = {"measure": "machine", "target": build.label, "features": "pti,pcid"}
    for mode in (Mode.RECORD, Mode.FAST):
        emu = Emulator(world.image, world.config, Stubs(world), mode=mode)
        emu.set_cpu(world.kernel_cpu())
        start = emu.snapshot()
        per = {}
        for name in DEFAULT_SCENARIOS:
            emu.stub_handler.options = StubOptions(sysret=scenario(name).sysret)
            times = []
            for _ in range(30):
                emu.restore(start)
                t = time.perf_counter()
                prepare(emu, world, scenario(name))
                emu.go()
                times.append(time.perf_counter() - t)
            per[name] = round(statistics.median(times) * 1e6, 1)
        out[f"scenario_run_us_{mode.value}"] = per
        t = time.perf_counter()
        n = 2000
        for _ in range(n):
            emu.restore(start)
        out[f"restore_us_{mode.value}"] = round((time.perf_counter() - t) / n * 1e6, 2)
    return out


def bench_check(target: str, depth: int, feature_sets, workers: int) -> dict:
    build = resolve_target(target)
    cfg = CheckConfig(feature_sets=tuple(feature_sets), depth=depth)
    t0, c0 = time.perf_counter(), os.times()
    result = run_check(_ref(build), cfg, workers=workers)
    wall = time.perf_counter() - t0
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.children_user - c0.children_user) + (c1.system - c0.system) + \
        (c1.children_system - c0.children_system)
    return {"measure": f"depth{depth}", "target": build.label, "feature_sets": len(cfg.feature_sets),
            "scenarios": len(cfg.scenarios), "workers": workers, "runs": result.runs,
            "converged": result.converged, "findings": len(result.findings), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "runs_per_s_per_core": round(result.runs / cpu, 1) if cpu else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["machine", "depth1", "depth2", "all"])
    ap.add_argument("--kernel", action="append", default=None)
    ap.add_argument("--features", action="append", default=None)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    kernels = args.kernel or ["debian:6.1", "debian:6.12"]
    if args.what in ("machine", "all"):
        print(json.dumps(bench_machine(kernels[0])), flush=True)
    if args.what in ("depth1", "all"):
        for k in kernels:
            print(json.dumps(bench_check(k, 1, all_model_feature_sets(), args.workers)), flush=True)
    if args.what in ("depth2", "all"):
        sets = [FeatureSet.parse(f) for f in (args.features or ["pti,pcid", "pti,pcid,fsgsbase,kernel_ibrs"])]
        for k in kernels:
            print(json.dumps(bench_check(k, 2, sets, args.workers)), flush=True)


if __name__ == "__main__":
    main()
