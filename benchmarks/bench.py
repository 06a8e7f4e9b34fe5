"""entrycheck's speed figures, measured on the real Debian kernels (one JSON object per line).

    python benchmarks/bench.py compare REF [--target T] [--features F] [--depth D]
                                           [--scenarios S] [--workers N] [--kernel-c]
        installs entrycheck at git ref REF into a scratch venv, runs the same workload
        (benchmarks/workload.py) with it and with this tree, and prints both and the ratios
        (runs/s, wall, CPU) and whether runs and findings are equal.
        Default workload: debian:6.1, pti,pcid, depth 2, all scenarios, 1 worker.
    python benchmarks/bench.py goals [--only NAME ...]
        the engine's goals: default check of each kernel with the C (2 workers: <= 60 s, peak
        RSS <= 1 GiB per worker), Debian's distro config (<= 2 min), depth 1 over 16 sets with
        the stubs (<= 5 s), depth 3 on three scenarios with the C (<= 10 min), the seed review
        with a warm cache (<= 2 min), Dask scaling (2 workers >= 1.85x one), and instruction
        throughput against raw runs (within 5x).
    python benchmarks/bench.py dims [--target T] [--features F] [--depth D ...] [--workers N]
        the cost of what user space controls (derived user values, injected IRQs, the
        tlb-shootdown branch of interrupt scenarios): the same check without and with them
        (default: every feature set, depth 1 and 2, 2 workers).
    python benchmarks/bench.py speculation [--target T] [--depth D ...] [--workers N]
        the cost of following mispredicted branches (swapgs-unfenced): every --cpu preset with
        --spec-window 0 and with the default window (default: depth 1 and 2, 2 workers).
    python benchmarks/bench.py kernel-c [--target T] [--features F] [--depth D ...] [--workers N]
        the cost of running the kernel's noinstr C: the same check with the contract stubs
        (--c-stubs) and with the C (default: debian:6.1, pti,pcid, depth 1 and 2, 1 worker).
    python benchmarks/bench.py share [--target T ...] [--features F] [--depth D] [--scenarios S] [--workers N]
        shared handler runs against running every one (--no-share): the same check with the
        kernel's C both ways, their runs, findings (equal or not) and times
        (default: debian:6.1 and debian:6.12, pti,pcid, depth 2, syscall,mc-from-kernel, 2 workers).
    python benchmarks/bench.py throughput [--target T]

Speed is never asserted by a test: these figures are read by people.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOAD = HERE / "workload.py"
CACHE = Path(os.environ.get("ENTRYCHECK_CACHE", Path.home() / ".cache" / "entrycheck"))


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _workload(python: str, args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([python, str(WORKLOAD), *args], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"workload failed ({python}):\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _checkout(ref: str) -> Path:
    """The source of entrycheck at git ref ``ref``, extracted once into the cache (no install:
    it runs from its ``src`` with this interpreter's libraries, in a virtualenv or not)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode:
        sys.exit(f"not a git ref here: {ref}")
    sha = sha.stdout.strip()
    tree = CACHE / "bench" / f"tree-{sha[:12]}"
    if (tree / ".extracted").exists():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        (Path(tmp) / ".extracted").write_text(sha + "\n")
        try:
            os.rename(tmp, tree)
        except OSError:              # another run extracted it meanwhile
            pass
    return tree


def _env_of(tree: Path) -> dict:
    """The environment that makes this interpreter import entrycheck from ``tree``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


_SNAPSHOT: list[Path] = []


def _this_tree() -> Path:
    """This tree's entrycheck as it is when the measurement starts: its src/ copied aside, so
    that edits made while a long measurement runs do not reach the commands it starts."""
    if not _SNAPSHOT:
        import shutil

        snap = CACHE / "bench" / "run" / f"this-tree-{os.getpid()}"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(ROOT / "src", snap / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        import atexit

        atexit.register(shutil.rmtree, snap, True)
        _SNAPSHOT.append(snap)
    return _SNAPSHOT[0]


def _this_tree_env() -> dict:
    return _env_of(_this_tree())


def both(ref: str, work: list[str]) -> tuple[dict, dict]:
    """The workload run by entrycheck at git ref ``ref``, then by this tree."""
    old = _workload(sys.executable, work, env=_env_of(_checkout(ref)))
    new = _workload(sys.executable, work, env=_this_tree_env())
    return old, new


def compare(args) -> None:
    if args.workload == "review":
        review_compare(args)
        return
    work = [args.target, args.features, str(args.depth), args.scenarios, str(args.workers)] + \
        (["--kernel-c"] if args.kernel_c else [])
    old, new = both(args.ref, work)
    ratio = {
        "runs_per_s": round(new["runs_per_s"] / old["runs_per_s"], 2) if old["runs_per_s"] else None,
        "wall_speedup": round(old["wall_s"] / new["wall_s"], 2) if new["wall_s"] else None,
        "cpu_speedup": round(old["cpu_s"] / new["cpu_s"], 2) if new["cpu_s"] else None,
    }
    equal = old.pop("findings_keys") == new.pop("findings_keys")
    raw_equal = old.pop("raw_findings_keys") == new.pop("raw_findings_keys")
    _emit({"measure": "compare", "ref": args.ref, "workload": work, "old": old, "new": new, "ratio": ratio,
           "runs_equal": old["runs"] == new["runs"], "findings_equal": equal, "raw_findings_equal": raw_equal})


SEED_PATCH = ROOT / "tests" / "data" / "patches" / "x86-entry-paranoid-restore-cr3.archive.txt"
CLI = ["-c", "from entrycheck.cli import main; main()"]


MAX_ADDRESS_SPACE = 12 << 30      # per process of a measured command: it fails alone, not the machine


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MAX_ADDRESS_SPACE, MAX_ADDRESS_SPACE))


def _command(args: list[str], env: dict, cwd: Path, timeout: float | None = None) -> dict:
    """One entrycheck command line: its exit status, wall time and peak RSS (the largest of its
    processes: os.wait4 reports the command's own and its waited-for workers')."""
    t0 = time.perf_counter()
    with open(cwd / "stdout.txt", "wb") as out, open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, *CLI, *args], stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_limit_memory)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - t0 > timeout and not timed_out:
            timed_out = True
            os.killpg(proc.pid, 9)
        time.sleep(0.05)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    got = {"exit": code, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if timed_out:
        got["timed_out"] = True
    if code not in (0, 1):
        got["stderr"] = (cwd / "stderr.txt").read_text(errors="replace").strip()[-300:]
    return got


def _scratch(name: str) -> Path:
    """A fresh working directory for commands (their --json/--html files land there), in which
    the repository's tests/ is at hand (the README's patch example names a file under it)."""
    import shutil

    d = CACHE / "bench" / "run" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "tests").symlink_to(ROOT / "tests")
    return d


def readme_examples(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The command lines of the README's Examples section, as a user pastes them (comments off)."""
    import shlex

    text = readme.read_text()
    section = text.split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in section.splitlines():
        if line.startswith("    entrycheck "):
            out.append(shlex.split(line.strip(), comments=True)[1:])
    return out


def _depth(args: list[str]) -> int | None:
    """The nesting depth an exploring command runs at (None: it explores nothing)."""
    if not args or args[0] not in ("check", "diff", "review") or "--explain" in args:
        return None
    return int(args[args.index("--depth") + 1]) if "--depth" in args else 1     # the command line's CLI_DEPTH


SLOW_S = 120         # an example at depth <= 1 slower than this is a bug


def readme(args) -> None:
    """Every README example at the flags it prints, one after another (this tree; with --ref,
    the same with that git ref first), each one's wall time, peak RSS and exit status."""
    trees = ([("ref", _checkout(args.ref))] if args.ref else []) + [("tree", _this_tree())]
    examples = readme_examples()
    for side, tree in trees:
        cwd = _scratch(f"readme-{side}")
        env = _env_of(tree)
        env["COLUMNS"] = "80"
        for k, ex in enumerate(examples):
            if args.only and not any(o in " ".join(ex) for o in args.only):
                continue
            got = _command(ex, env, cwd, timeout=args.timeout)
            depth = _depth(ex)
            _emit({"measure": "readme", "side": side, "ref": args.ref if side == "ref" else "this tree",
                   "example": k, "command": "entrycheck " + " ".join(ex), "depth": depth, **got,
                   "slow": depth is not None and depth <= 1 and got["wall_s"] > SLOW_S,
                   "failed": got["exit"] not in (0, 1)})


SAME_JSON = [
    ("check-6.1", ["check", "debian:6.1", "--depth", "1"]),
    ("check-6.12", ["check", "debian:6.12", "--depth", "1"]),
    ("diff", ["diff", "debian:6.1", "debian:6.12", "--depth", "1"]),
    ("review", ["review", "debian:6.1", "--patch", str(SEED_PATCH), "--depth", "1"]),
]


def same(args) -> None:
    """check, diff and review at depth 1 over the 16 default feature sets, on both kernels, with
    git ref REF and with this tree: whether each command's JSON is the same, byte for byte."""
    for name, cmd in SAME_JSON:
        if args.only and name not in args.only:
            continue
        docs, runs = {}, {}
        ref_tree = _checkout(args.ref)
        kept = ref_tree.parent / f"same-{ref_tree.name[5:]}-{name}.json"     # the ref's output, once
        for side, tree in (("ref", ref_tree), ("tree", _this_tree())):
            if side == "ref" and kept.exists() and not args.fresh:
                docs[side], runs[side] = kept.read_bytes(), {"kept": str(kept)}
                continue
            cwd = _scratch(f"same-{name}-{side}")
            runs[side] = _command(cmd + ["--json", "out.json"], _env_of(tree), cwd)
            path = cwd / "out.json"
            docs[side] = path.read_bytes() if path.exists() else b""
            if side == "ref" and docs[side] and runs[side]["exit"] in (0, 1):
                kept.write_bytes(docs[side])
        first = None
        if docs["ref"] != docs["tree"]:
            a, b = docs["ref"].splitlines(), docs["tree"].splitlines()
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        _emit({"measure": "same-json", "command": "entrycheck " + " ".join(cmd), "ref": args.ref,
               "identical": docs["ref"] == docs["tree"] and bool(docs["tree"]), "bytes": len(docs["tree"]),
               "first_different_line": first, "ref_run": runs["ref"], "tree_run": runs["tree"]})
        if args.keep and first is not None:
            print(f"  differs: see {CACHE / 'bench' / 'run'}/same-{name}-{{ref,tree}}/out.json", file=sys.stderr)


def review_compare(args) -> None:
    """The seed review on 6.1 (depth 1, then the defaults) with REF and with this tree."""
    for depth in ([] if d == "default" else ["--depth", d] for d in args.review_depths.split(",")):
        cmd = ["review", "debian:6.1", "--patch", str(SEED_PATCH), *depth, "--json", "out.json"]
        got = {}
        for side, tree in (("old", _checkout(args.ref)), ("new", _this_tree())):
            cwd = _scratch(f"review-{side}")
            got[side] = _command(cmd + (["--workers", str(args.workers)] if args.workers else []),
                                 _env_of(tree), cwd)
            path = cwd / "out.json"
            got[side]["json_bytes"] = path.read_bytes() if path.exists() else b""
        same_json = got["old"].pop("json_bytes") == got["new"].pop("json_bytes")
        _emit({"measure": "compare-review", "ref": args.ref, "command": "entrycheck " + " ".join(cmd),
               "old": got["old"], "new": got["new"], "json_identical": same_json,
               "wall_speedup": round(got["old"]["wall_s"] / got["new"]["wall_s"], 2) if got["new"]["wall_s"] else None})


PREVIOUS_ENGINE = "9261deb48206fdd85234655881f9dc2ecc1c343d"


def previous(args) -> None:
    """The explorer finds exactly what the previous engine (before shared handler runs, path
    tables and the closed machine) found, at depth 2 on both kernels, as that engine could
    report them (--as-before): every finding before deduplication, and the same runs."""
    for series in ("6.1", "6.12"):
        for features in ("pti,pcid", "pti,pcid,fsgsbase,kernel_ibrs"):
            old, new = both(PREVIOUS_ENGINE, [f"debian:{series}", features, "2", "all", "2", "--as-before"])
            _emit({"measure": "previous-engine", "target": f"debian:{series}", "features": features,
                   "findings": old["findings"],
                   "raw_findings_equal": new.pop("raw_findings_keys") == old.pop("raw_findings_keys"),
                   "findings_equal": new.pop("findings_keys") == old.pop("findings_keys"),
                   "runs_equal": new["runs"] == old["runs"], "old_wall_s": old["wall_s"],
                   "new_wall_s": new["wall_s"]})


def _with_and_without(measure: str, work: list[str], without_args: list[str]) -> None:
    """The same workload with this tree, without (``without_args``) and with a dimension; the
    findings only the second has."""
    env = _this_tree_env()
    without = _workload(sys.executable, work + without_args, env)
    with_ = _workload(sys.executable, work, env)
    before = {tuple(map(str, k)) for k in without.pop("findings_keys")}
    new_findings = sorted({tuple(map(str, k)) for k in with_.pop("findings_keys")} - before)
    without.pop("raw_findings_keys"), with_.pop("raw_findings_keys")
    _emit({"measure": measure, "workload": work, "without": without, "with": with_, "new_findings": new_findings,
           "runs_ratio": round(with_["runs"] / without["runs"], 2) if without["runs"] else None,
           "wall_ratio": round(with_["wall_s"] / without["wall_s"], 2) if without["wall_s"] else None})


def dims(args) -> None:
    """The cost of what user space controls (derived user values, injected IRQs, the
    tlb-shootdown branch): the same check with and without those dimensions, this tree."""
    for depth in args.depth or [1, 2]:
        _with_and_without("user-dims", [args.target, args.features, str(depth), "all", str(args.workers)],
                          ["--no-user-dims"])


def speculation(args) -> None:
    """Mispredicted branches followed: the same preset check without (--spec-window 0) and with them."""
    for depth in args.depth or [1, 2]:
        _with_and_without("speculation", [args.target, "cpus", str(depth), "all", str(args.workers)],
                          ["--spec-window", "0"])


def kernel_c(args) -> None:
    """The cost of running the kernel's noinstr C: the same check with the contract stubs and
    with the C (this tree)."""
    env = _this_tree_env()
    for depth in args.depth or [1, 2]:
        work = [args.target, args.features, str(depth), "all", str(args.workers)]
        stubs = _workload(sys.executable, work, env)
        c = _workload(sys.executable, work + ["--kernel-c"], env)
        for w in (stubs, c):
            w.pop("raw_findings_keys"), w.pop("findings_keys")
        _emit({"measure": "kernel-c", "workload": work, "stubs": stubs, "c": c,
               "runs_ratio": round(c["runs"] / stubs["runs"], 2) if stubs["runs"] else None,
               "wall_ratio": round(c["wall_s"] / stubs["wall_s"], 2) if stubs["wall_s"] else None})


def share(args) -> None:
    """The shared handler runs (the memo) against --no-share, with the kernel's C: the distinct
    findings of both must be equal; the runs each made and the time they took."""
    env = _this_tree_env()
    for target in args.target or ["debian:6.1", "debian:6.12"]:
        work = [target, args.features, str(args.depth), args.scenarios, str(args.workers), "--kernel-c"]
        shared = _workload(sys.executable, work, env)
        each = _workload(sys.executable, work + ["--no-share"], env)
        same_findings = shared["findings_keys"] == each["findings_keys"]
        same_raw = shared["raw_findings_keys"] == each["raw_findings_keys"]
        for w in (shared, each):
            w.pop("raw_findings_keys"), w.pop("findings_keys")
        _emit({"measure": "share", "workload": work, "shared": shared, "no_share": each,
               "findings_equal": same_findings, "raw_findings_equal": same_raw,
               "executed_ratio": round(each["executed"] / shared["executed"], 2) if shared["executed"] else None,
               "wall_ratio": round(each["wall_s"] / shared["wall_s"], 2) if shared["wall_s"] else None})


def goals(args) -> None:
    only = set(args.only or ())

    def want(name: str) -> bool:
        return not only or name in only

    env = _this_tree_env()
    workloads = [
        ("default-6.1", ["debian:6.1", "all", "1", "all", "2", "--kernel-c"],
         "wall <= 60 s, peak RSS <= 1024 MiB per worker"),
        ("default-6.12", ["debian:6.12", "all", "1", "all", "2", "--kernel-c"],
         "wall <= 60 s, peak RSS <= 1024 MiB per worker"),
        ("depth1", ["debian:6.1", "all", "1", "all", "2"], "wall <= 5 s (the contract stubs)"),
        ("depth3", ["debian:6.12", "pti,pcid", "3", "nmi-from-kernel,nmi-from-user,syscall", "2", "--kernel-c"],
         "wall <= 600 s"),
    ]
    for name, work, goal in workloads:
        if want(name):
            r = _workload(sys.executable, work, env)
            r.pop("findings_keys"), r.pop("raw_findings_keys")
            _emit({"measure": name, "goal": goal, **r})
    for name, args_, goal in (("review", ["review", "debian:6.1", "--patch", str(SEED_PATCH)],
                               "wall <= 120 s (warm cache)"),
                              ("distro", ["check", "debian:6.12", "--config", "distro"], "wall <= 120 s (warm cache)")):
        if want(name):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "entrycheck.cli", *args_], capture_output=True, text=True,
                                 env=env)
            _emit({"measure": name, "goal": goal, "exit": out.returncode, "wall_s": round(time.perf_counter() - t, 1)})
    if want("dask"):
        _emit(dask_scaling(env, ["debian:6.1", "pti,pcid", "2", "all"]))
        _emit(dask_scaling(env, ["debian:6.12", "all", "1", "all", "--kernel-c"]))
    if want("throughput"):
        _emit(throughput("debian:6.1"))


def dask_scaling(env: dict, work: list[str]) -> dict:
    """A workload (workload.py's arguments but the worker count) on a local Dask cluster of 1,
    then 2 workers: a depth-2 check of one feature set (the stubs), and a default check of 6.12
    (16 sets, depth 1, the C)."""
    from dask.distributed import LocalCluster
    out = {"measure": "dask-scaling", "goal": "2 workers >= 1.85x one", "workload": work}
    keys = {}
    # The cluster's scheduler runs here and its workers start with this process's environment:
    # give both the tree measured, not whatever entrycheck the interpreter has installed.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    src = env["PYTHONPATH"].split(os.pathsep)[0]
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        for n in (1, 2):
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                r = _workload(sys.executable, work[:4] + [str(n), "--scheduler", cluster.scheduler_address] + work[4:],
                              env)
            keys[n] = r.pop("findings_keys"), r.pop("raw_findings_keys")
            out[f"wall_s_{n}"] = r["wall_s"]
            out["runs"] = r["runs"]
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    out["speedup"] = round(out["wall_s_1"] / out["wall_s_2"], 2)
    out["findings_equal"] = keys[1] == keys[2]
    return out


def throughput(target: str) -> dict:
    """Instructions the exploration executed per CPU second, next to raw runs of the same
    requests (no convergence checks, no step log, hooks only at the privileged sites)."""
    import dataclasses

    from entrycheck.explore.check import CheckConfig, make_units
    from entrycheck.session import ObjectRef, run_unit
    from entrycheck.image.features import FeatureSet
    from entrycheck.kernel.targets import resolve_target
    from entrycheck.machine.api import Level
    from entrycheck.machine.machine import Machine

    build = resolve_target(target)
    ref = ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h)
    cfg = CheckConfig(feature_sets=(FeatureSet.parse("pti,pcid"),), depth=2)
    sample: list = []
    count = {"runs": 0, "insns": 0}
    original = Machine.run

    def recording(self, request):
        rec = original(self, request)
        count["runs"] += 1
        count["insns"] += rec.final.steps - request.start.steps
        if count["runs"] % 20 == 0:
            sample.append((self, request))
        return rec

    Machine.run = recording
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        for unit in make_units(cfg):
            run_unit(ref, cfg, unit)
        cpu = time.process_time() - c0
        wall = time.perf_counter() - t0
    finally:
        Machine.run = original
    raw_insns, c0 = 0, time.process_time()
    for machine, request in sample:
        raw = dataclasses.replace(request, level=Level.EVENTS, converge=(), cut_loops=False)
        rec = original(machine, raw)
        raw_insns += rec.final.steps - raw.start.steps
    raw_cpu = time.process_time() - c0
    explore_ips = count["insns"] / cpu
    raw_ips = raw_insns / raw_cpu if raw_cpu else 0.0
    return {"measure": "throughput", "target": build.label, "workload": "pti,pcid depth 2, all scenarios",
            "goal": "exploration within 5x of raw", "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "machine_runs": count["runs"], "instructions": count["insns"],
            "explore_insns_per_cpu_s": round(explore_ips), "raw_runs": len(sample),
            "raw_insns_per_cpu_s": round(raw_ips), "ratio": round(raw_ips / explore_ips, 2) if explore_ips else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("--target", default="debian:6.1")
    c.add_argument("--features", default="pti,pcid")
    c.add_argument("--depth", type=int, default=2)
    c.add_argument("--scenarios", default="all")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--kernel-c", action="store_true", help="with the kernel's C (the CLI's default), not the stubs")
    c.add_argument("--workload", choices=["check", "review"], default="check",
                   help="check: the workload above; review: the seed review on 6.1 at depth 1 and at defaults")
    c.add_argument("--review-depths", default="1,default", help="the review workload's depths (comma-separated)")
    r = sub.add_parser("readme")
    r.add_argument("--ref", default=None, help="also run the examples with this git ref, first")
    r.add_argument("--only", action="append", help="only the examples whose command line contains this")
    r.add_argument("--timeout", type=float, default=1800, help="seconds before an example is stopped")
    m = sub.add_parser("same")
    m.add_argument("ref")
    m.add_argument("--only", action="append", choices=[n for n, _ in SAME_JSON])
    m.add_argument("--keep", action="store_true", help="say where differing outputs are")
    m.add_argument("--fresh", action="store_true", help="run the ref again (its outputs are kept per commit)")
    sub.add_parser("previous")
    g = sub.add_parser("goals")
    g.add_argument("--only", action="append",
                   choices=["default-6.1", "default-6.12", "depth1", "depth3", "review", "distro", "dask",
                            "throughput"])
    d = sub.add_parser("dims")
    d.add_argument("--target", default="debian:6.1")
    d.add_argument("--features", default="all")
    d.add_argument("--depth", type=int, action="append")
    d.add_argument("--workers", type=int, default=2)
    s = sub.add_parser("speculation")
    s.add_argument("--target", default="debian:6.12")
    s.add_argument("--depth", type=int, action="append")
    s.add_argument("--workers", type=int, default=2)
    k = sub.add_parser("kernel-c")
    k.add_argument("--target", default="debian:6.1")
    k.add_argument("--features", default="pti,pcid")
    k.add_argument("--depth", type=int, action="append")
    k.add_argument("--workers", type=int, default=1)
    h = sub.add_parser("share")
    h.add_argument("--target", action="append")
    h.add_argument("--features", default="pti,pcid")
    h.add_argument("--depth", type=int, default=2)
    h.add_argument("--scenarios", default="syscall,mc-from-kernel")
    h.add_argument("--workers", type=int, default=2)
    t = sub.add_parser("throughput")
    t.add_argument("--target", default="debian:6.1")
    args = ap.parse_args()
    commands = {"compare": compare, "goals": goals, "dims": dims, "speculation": speculation,
                "readme": readme, "same": same, "previous": previous, "kernel-c": kernel_c,
                "share": share}
    if args.what in commands:
        commands[args.what](args)
    else:
        _emit(throughput(args.target))


if __name__ == "__main__":
    main()
