"""One check as a measured workload; prints one JSON object.  Runs with whichever entrycheck
the interpreter imports, so `bench.py compare` can run it with an older version too.

    python benchmarks/workload.py TARGET FEATURES DEPTH SCENARIOS WORKERS [--scheduler ADDR] [--no-prune] [--no-share]
                                  [--as-before] [--no-user-dims] [--kernel-c]

--as-before: the findings the previous engine could report, on the scenarios it had (no
32-bit entries; symptoms not folded under an ist-reentered root cause, no #DB inside C
functions, C functions that do not check the pt_regs they are given, no hostile user values
and no injected interrupts, none of which it knew), to compare the two.  --no-user-dims: the last two left out alone (their cost).

FEATURES: feature sets separated by ';' ("all": every model feature set); SCENARIOS: comma
separated or "all".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("features")
    ap.add_argument("depth", type=int)
    ap.add_argument("scenarios")
    ap.add_argument("workers", type=int)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--no-share", action="store_true", help="run every injected handler (no shared handler runs)")
    ap.add_argument("--as-before", action="store_true")
    ap.add_argument("--no-user-dims", action="store_true",
                    help="leave out the dimensions of what user space controls (derived user values, "
                         "injected IRQs, the tlb-shootdown branch of interrupt scenarios): their cost")
    ap.add_argument("--kernel-c", action="store_true",
                    help="run the kernel's noinstr C past the entry code's calls (the default of the CLI; "
                         "without it: the contract stubs, as every entrycheck before it had)")
    ap.add_argument("--spec-window", type=int, default=None,
                    help="instructions a mispredicted branch runs ahead (0: follow none)")
    args = ap.parse_args()

    from entrycheck.explore.check import CheckConfig
    try:
        from entrycheck.session import ObjectRef, run_check
    except ImportError:          # an entrycheck from before its application layer (bench.py compare)
        from entrycheck.explore.check import ObjectRef, run_check
    from entrycheck.explore.scenarios import DEFAULT_SCENARIOS
    from entrycheck.image.features import FeatureSet, all_model_feature_sets
    from entrycheck.kernel.targets import resolve_target

    build = resolve_target(args.target)
    ref = ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)
    if args.kernel_c:
        from entrycheck.session import object_ref

        ref = object_ref(build)
    if args.features == "cpus":         # every --cpu preset
        from entrycheck.image.cpus import PRESETS

        sets = tuple(p.features for p in PRESETS.values())
    else:
        sets = all_model_feature_sets() if args.features == "all" else \
            tuple(FeatureSet.parse(f) for f in args.features.split(";"))
    scenarios = DEFAULT_SCENARIOS if args.scenarios == "all" else tuple(args.scenarios.split(","))
    cfg = CheckConfig(scenarios=scenarios, feature_sets=sets, depth=args.depth, prune=not args.no_prune)
    if args.spec_window is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, spec_window=args.spec_window)
    if args.no_share:
        import dataclasses

        cfg = dataclasses.replace(cfg, share=False)
    if args.as_before and "fold" in CheckConfig.__dataclass_fields__:
        import dataclasses

        cfg = dataclasses.replace(cfg, fold=False)
    if args.as_before and "c_footprints" in CheckConfig.__dataclass_fields__:
        import dataclasses

        cfg = dataclasses.replace(cfg, c_footprints=False)
    if args.as_before and "pt_regs_contract" in CheckConfig.__dataclass_fields__:
        import dataclasses

        cfg = dataclasses.replace(cfg, pt_regs_contract=False)
    if (args.as_before or args.no_user_dims) and "user_values" in CheckConfig.__dataclass_fields__:
        import dataclasses

        from entrycheck.machine.model import Vector

        cfg = dataclasses.replace(cfg, user_values=False, irq_flush=False,
                                  vectors=tuple(v for v in cfg.vectors if v is not Vector.IRQ))
    if args.as_before and "iret_faults" in CheckConfig.__dataclass_fields__:
        import dataclasses

        cfg = dataclasses.replace(cfg, iret_faults=False, mov_ss_db=False)
    if args.as_before and args.scenarios == "all":
        # The 32-bit entries (compat scenarios) came after that engine, which could not run them.
        import dataclasses

        from entrycheck.explore.scenarios import scenario

        cfg = dataclasses.replace(cfg, scenarios=tuple(s for s in cfg.scenarios
                                                       if not getattr(scenario(s), "compat", False)))
        scenarios = cfg.scenarios
    later = {"ist-reentered"} if args.as_before else set()
    kwargs = {"workers": args.workers}
    if args.scheduler:
        kwargs["scheduler"] = args.scheduler
    t0, c0 = time.perf_counter(), os.times()
    result = run_check(ref, cfg, **kwargs)
    wall = time.perf_counter() - t0
    c1 = os.times()
    cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))

    def label(v) -> str:
        return v if isinstance(v, str) else v.label

    def key(f) -> tuple:
        return (f.invariant, f.scenario, str(f.features),
                tuple(f"{label(i.vector)}@{i.at}#{i.hit}" for i in f.injections), f.site)

    findings = sorted({key(f) for f in result.findings if f.invariant not in later})
    raw = sorted({key(f) for f in result.raw_findings if f.invariant not in later})
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({
        "target": build.label, "feature_sets": len(sets), "scenarios": len(scenarios), "depth": args.depth,
        "workers": args.workers, "runs": result.runs, "executed": getattr(result, "executed", None),
        "mispredicted": getattr(result, "speculated", 0),
        "findings": len(findings), "findings_keys": findings, "raw_findings_keys": raw, "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2), "runs_per_s": round(result.runs / wall, 1) if wall else None,
        "peak_rss_mib": round(rss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
