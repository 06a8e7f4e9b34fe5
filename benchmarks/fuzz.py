"""Fuzz the command line with a large budget (the tests run the same generators with a small one).

    python benchmarks/fuzz.py [--elf N] [--args N] [--patches N] [--findings N] [--seed S]
                              [--kernels] [--timeout SECONDS] [--keep-workspace]
        N mutated ELF objects (default 10000), argument vectors (2000), patch texts (1000) and
        --finding files (200), made from seeds S, S+1, ... (default 0); every case runs in this
        process (one CPU).  --kernels adds the Debian kernels' entry_64.o (debian:6.1 and
        debian:6.12, built on first use, then cached) to the objects mutated.  Prints progress
        every few hundred cases and a summary: cases and exit codes per kind, the distinct
        problems (where each is raised, and how to reproduce it).  Exit status 1 on any problem.
    python benchmarks/fuzz.py --replay KIND:SEED [--kernels] [--keep DIR]
        writes the inputs of one case to DIR and reruns it in a new process with --debug
        (pass --kernels when the run that found it had it: the objects mutated differ).
    python benchmarks/fuzz.py --sigint N [--target T] [--workers W]
        N times: `entrycheck check T --depth 2 --workers W` (T: the demo object, W 2 by default) in a
        session of its own, SIGINT to its process group after 0.5-5 s; counts how many ended
        with 130 within 2 s, stderr exactly "entrycheck: error: interrupted", no output file
        and no process left.

A case holds up when it exits with 0, 1 or 2, prints no traceback, prints exactly one line
"entrycheck: error: ..." for 2, ends within the timeout (default 60 s) and leaves no file.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing  # noqa: E402  (tests/fuzzing/)

PROGRESS_EVERY = 250
LOCATE_AT_MOST = 60          # distinct problems whose raising place is looked up


def _kernel_objects() -> list[Path]:
    from entrycheck.kernel.targets import resolve_target

    out = []
    for spec in ("debian:6.1", "debian:6.12"):
        build = resolve_target(spec)
        print(f"kernel object: {spec} -> {build.object_path}", flush=True)
        out.append(build.object_path)
    return out


# --------------------------------------------------------------------------- the fuzzing run


def fuzz(args: argparse.Namespace) -> int:
    if not fuzzing.have_assembler():
        sys.exit("GNU as (binutils) is needed: the objects mutated are assembled here")
    kernels = _kernel_objects() if args.kernels else []
    root = Path(tempfile.mkdtemp(prefix="entrycheck-fuzz-"))
    started = time.monotonic()
    try:
        fz = fuzzing.Fuzzer(root, kernel_objects=kernels, timeout=args.timeout)
        print(f"workspace {root}; patch tree from {fz.ws.patch_tree_from}; "
              f"{len(fz.ws.elf_seeds)} objects to mutate", flush=True)
        budget = {"elf": args.elf, "args": args.args, "patch": args.patches, "finding": args.findings}
        results: dict[str, list[fuzzing.CaseResult]] = {}
        took: dict[str, float] = {}
        for kind in fuzzing.KINDS:
            n = budget[kind]
            if n <= 0:
                continue
            t0 = time.monotonic()
            codes: collections.Counter = collections.Counter()
            bad = 0

            def progress(res: fuzzing.CaseResult, kind=kind, n=n, t0=t0, codes=codes) -> None:
                nonlocal bad
                codes[res.exit_code] += 1
                if res.problem:
                    bad += 1
                    print(f"  problem: {res.describe(300)}", flush=True)
                done = sum(codes.values())
                if done % PROGRESS_EVERY == 0 or done == n:
                    print(f"[{kind} {done}/{n}] {time.monotonic() - t0:.0f} s; exit codes {_hist(codes)}; "
                          f"problems {bad}", flush=True)

            results[kind] = fz.run(kind, range(args.seed, args.seed + n), progress)
            took[kind] = time.monotonic() - t0
        return summary(fz, results, took, time.monotonic() - started, args)
    finally:
        if args.keep_workspace:
            print(f"workspace kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _hist(counter: collections.Counter) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: (kv[0] is None,
                                                                                           kv[0] or 0))) + "}"


def summary(fz: fuzzing.Fuzzer, results: dict[str, list[fuzzing.CaseResult]], took: dict[str, float],
            wall: float, args: argparse.Namespace) -> int:
    print("\n==== summary")
    total_bad = 0
    for kind, res in results.items():
        codes = collections.Counter(r.exit_code for r in res)
        probs = collections.Counter(r.problem.split(":")[0] for r in res if r.problem)
        slowest = max(res, key=lambda r: r.seconds)
        total_bad += sum(probs.values())
        print(f"{kind:8s} {len(res):6d} cases in {took[kind]:7.1f} s; exit codes {_hist(codes)}; "
              f"slowest {slowest.seconds:.2f} s (seed {slowest.seed}); problems {dict(probs) or 0}")
    print(f"total: {sum(len(r) for r in results.values())} cases in {wall:.0f} s; {total_bad} problem cases")
    groups: dict[str, list[fuzzing.CaseResult]] = {}
    for res in results.values():
        for r in fuzzing.problems(res):
            groups.setdefault(fuzzing.signature(r), []).append(r)
    if not groups:
        print("no problems")
        return 0
    # one place per cause: look up where the first case of each group raises, then regroup
    located: dict[str, list[fuzzing.CaseResult]] = {}
    for k, (sig, members) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        first = members[0]
        if k < LOCATE_AT_MOST and not first.where and (first.problem or "").startswith(("exit 3", "traceback")):
            first.where = fz.locate(first)
        key = f"{first.kind}: {first.problem.split(':')[0]}: " + (_place(first.where) or sig)
        located.setdefault(key, []).extend(members)
    print(f"\n==== {len(located)} distinct problems ({total_bad} cases)")
    for n, (key, members) in enumerate(sorted(located.items(), key=lambda kv: -len(kv[1])), 1):
        first = min(members, key=lambda r: (len(" ".join(r.argv)), r.seed))
        rep = next((m for m in members if m.where), first)
        print(f"\n[{n}] {key}\n    {len(members)} case(s); seeds {', '.join(str(m.seed) for m in members[:12])}"
              f"{' ...' if len(members) > 12 else ''}")
        if rep.where:
            print(f"    raised: {rep.where}")
        print("    " + first.describe(400).replace("\n", "\n    "))
        flag = " --kernels" if args.kernels else ""
        print(f"    reproduce: python benchmarks/fuzz.py --replay {first.kind}:{first.seed}{flag}")
    return 1


def _place(where: str) -> str:
    """'Type: message at file:line in f' -> 'Type at file:line in f' (the message varies by case)."""
    if " at " not in where:
        return where
    head, _, place = where.rpartition(" at ")
    return f"{head.split(':')[0]} at {place}"


# --------------------------------------------------------------------------- one case again


def replay(args: argparse.Namespace) -> int:
    kind, _, seed_text = args.replay.partition(":")
    if kind not in fuzzing.KINDS or not seed_text.lstrip("-").isdigit():
        sys.exit(f"--replay KIND:SEED, KIND one of {', '.join(fuzzing.KINDS)}")
    seed = int(seed_text)
    kernels = _kernel_objects() if args.kernels else []
    root = Path(tempfile.mkdtemp(prefix="entrycheck-fuzz-"))
    try:
        fz = fuzzing.Fuzzer(root, kernel_objects=kernels, timeout=args.timeout)
        keep = Path(args.keep or tempfile.mkdtemp(prefix=f"entrycheck-{kind}-{seed}-")).resolve()
        case = fz.gen.case(kind, seed)
        print(f"input: {case.note}")
        if isinstance(case, fuzzing.PatchCase):
            fz.materialize(kind, seed, keep)
            res = fz.runner.run_patch(case)
            print(res.describe(100000))
            print(f"patches and the tree written to {keep}")
            return 1 if res.problem else 0
        argv = fz.materialize(kind, seed, keep)
        if kind == "args":          # the vector names the workspace's files: keep them
            shutil.copytree(root, keep / "workspace", dirs_exist_ok=True, symlinks=True)
            argv = [a.replace(str(root), str(keep / "workspace")) for a in argv]
        print("inputs in", keep)
        print("argv: entrycheck --debug " + " ".join(fuzzing._shell_quote(a) for a in argv))
        cwd = keep / "workspace" / "run" if kind == "args" else keep
        cwd.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "entrycheck.cli", "--debug", *argv], cwd=cwd,
                              capture_output=True, text=True, timeout=args.timeout + 30, check=False,
                              env={k: v for k, v in os.environ.items() if k != "ENTRYCHECK_DEBUG"})
        print(f"exit {done.returncode}")
        print("stdout:\n" + done.stdout[-4000:])
        print("stderr:\n" + done.stderr[-8000:])
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- interrupts


def sigint(args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="entrycheck-sigint-"))
    try:
        if args.target:
            target = args.target
        else:
            from entrycheck.demo import VARIANTS, assemble, find_assembler

            target = str(assemble(find_assembler(), VARIANTS[0], scratch))
        tally = collections.Counter()
        failures = []
        for k in range(args.sigint):
            out = scratch / f"out-{k}"
            out.mkdir()
            mark = uuid.uuid4().hex
            env = {**os.environ, fuzzing.MARK: mark}
            env.pop("ENTRYCHECK_DEBUG", None)
            proc = subprocess.Popen([sys.executable, "-m", "entrycheck.cli", "check", target, "--depth", "2",
                                     "--workers", str(args.workers), "--json", str(out / "r.json"), "--html", str(out / "r.html")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
            delay = rnd.uniform(0.5, 5.0)
            time.sleep(delay)
            if proc.poll() is not None:
                proc.communicate()
                tally["ended before the signal"] += 1
                print(f"[{k + 1}/{args.sigint}] ended (exit {proc.returncode}) before the signal at {delay:.1f} s")
                continue
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, stderr = proc.communicate()
            took = time.monotonic() - sent
            deadline = time.monotonic() + 2
            while fuzzing.marked(mark) and time.monotonic() < deadline:
                time.sleep(0.05)
            survivors = fuzzing.marked(mark)
            for pid in survivors:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            left = sorted(os.listdir(out))
            text = stderr.decode(errors="replace")
            ok_code = proc.returncode == 130
            ok_time = took < 2.0
            ok_text = text == "entrycheck: error: interrupted\n"
            tally["signalled"] += 1
            tally["exit 130 within 2 s"] += ok_code and ok_time
            tally["stderr exactly the one line"] += ok_text
            tally["left output files"] += bool(left)
            tally["left processes"] += bool(survivors)
            good = ok_code and ok_time and ok_text and not left and not survivors
            print(f"[{k + 1}/{args.sigint}] SIGINT at {delay:.1f} s: exit {proc.returncode} after {took:.2f} s"
                  f"{'' if ok_text else f'; stderr {text[-300:]!r}'}{f'; left {left}' if left else ''}"
                  f"{f'; processes left {survivors}' if survivors else ''}", flush=True)
            if not good:
                failures.append(k)
        print("\n==== summary:", dict(tally))
        print(f"failures: {failures or 'none'}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elf", type=int, default=10000, help="mutated ELF objects (default 10000)")
    ap.add_argument("--args", type=int, default=2000, help="argument vectors (default 2000)")
    ap.add_argument("--patches", type=int, default=1000, help="patch texts (default 1000)")
    ap.add_argument("--findings", type=int, default=200, help="--finding files (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="first seed of every kind (default 0)")
    ap.add_argument("--kernels", action="store_true", help="also mutate the Debian kernels' entry_64.o")
    ap.add_argument("--timeout", type=float, default=fuzzing.DEFAULT_TIMEOUT,
                    help="seconds before a case counts as a hang (default 60)")
    ap.add_argument("--keep-workspace", action="store_true", help="keep the scratch directory")
    ap.add_argument("--replay", metavar="KIND:SEED", help="rerun one case in a new process with --debug")
    ap.add_argument("--keep", metavar="DIR", help="with --replay: where to write the case's inputs")
    ap.add_argument("--sigint", type=int, metavar="N", help="interrupt N checks instead of fuzzing")
    ap.add_argument("--target", help="with --sigint: the TARGET to check (default: the demo object)")
    ap.add_argument("--workers", type=int, default=2, help="with --sigint: worker processes (default 2)")
    args = ap.parse_args()
    if args.replay:
        return replay(args)
    if args.sigint:
        return sigint(args)
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
