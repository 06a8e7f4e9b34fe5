"""Assemble the bundled entry fixture in each variant and check every variant.

The fixture (``mini_entry.S``) is assembled with GNU as at run time into a
temporary directory (or a directory the caller keeps), then goes through the
same pipeline as a kernel's entry_64.o: ``image.load``, ``build_world``,
``run_check``.  Nothing is written into the package or the current directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager

from entrycheck.errors import InputError, InternalError
from entrycheck.explore.check import CheckConfig, CheckResult
from entrycheck.session import ObjectRef, ordered_map, run_check
from entrycheck.explore.paths import Finding
from entrycheck.image.features import FeatureSet
from entrycheck.machine.model import Vector
from entrycheck.progress import Progress

FIXTURE = "mini_entry.S"
ASSEMBLERS = ("as", "x86_64-linux-gnu-as")
INSTALL_HINT = "install binutils (e.g. apt-get install binutils)"


@dataclass(frozen=True)
class Variant:
    """One way of writing the paranoid return, selected with --defsym VARIANT=n."""

    number: int
    name: str
    description: str
    expect_safe: bool
    designed_to_trip: tuple[str, ...] = ()      # invariants a broken variant must trip


CR3_CHANGE = '"x86/entry: Avoid redundant CR3 write on paranoid returns"'

VARIANTS: tuple[Variant, ...] = (
    Variant(0, "restore always",
            "The paranoid return always writes the saved CR3 back (NOFLUSH unless a flush is pending), "
            f"as before {CR3_CHANGE}.", True),
    Variant(1, "restore only a user CR3",
            "The paranoid return writes CR3 only when the interrupted code ran with a user CR3, "
            f"as after {CR3_CHANGE}.", True),
    Variant(2, "restore never",
            "Broken: the paranoid return never writes CR3 (\"it returns to kernel code, so the kernel "
            "CR3 is right\"), which is wrong in the windows around the CR3 switches.", False,
            ("user-mode-kernel-cr3",)),
    Variant(3, "forget SWAPGS",
            "Broken: CR3 is restored as in variant 1, but the user GSBASE is never swapped back in "
            "when the interrupted code had it.", False,
            ("user-mode-kernel-gs",)),
)

# What the demo explores: every scenario the fixture has an entry for.
SCENARIOS: tuple[str, ...] = ("syscall", "syscall-iret", "nmi-from-user", "nmi-from-kernel", "mc-from-user",
                              "mc-from-kernel", "db-from-user", "db-from-kernel")
FEATURE_SETS: tuple[FeatureSet, ...] = tuple(FeatureSet.parse(s) for s in ("none", "pti", "pcid", "pti,pcid"))
VECTORS: tuple[Vector, ...] = (Vector.NMI, Vector.MC, Vector.DB)
# Depth 1: the fixture has no nested-NMI protection, so deeper chains (an NMI latched
# inside the NMI handler, released by the IRET of a nested #MC/#DB) are out of its scope.
DEPTH = 1

# The paranoid returns whose CR3 cost the demo reports: an exception that interrupted
# kernel code running with the kernel CR3 (the scenario's base path, no injection).
COST_SCENARIOS: tuple[str, ...] = ("nmi-from-kernel", "mc-from-kernel", "db-from-kernel")
COST_FEATURES: tuple[str, ...] = ("pti,pcid", "pti")


def demo_config() -> CheckConfig:
    # The fixture is about where the paranoid return writes CR3; the per-cpu data Linux's own
    # C functions read on an IST stack (a #DB inside sync_regs) is a finding about Linux, not
    # about the fixture, so the demo leaves it out.  So are hostile user values: the fixture has
    # no #GP entry for a faulting IRET to land in.
    return CheckConfig(scenarios=SCENARIOS, feature_sets=FEATURE_SETS, vectors=VECTORS, depth=DEPTH,
                       c_footprints=False, user_values=False)


# ---- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReturnCost:
    """CR3 writes of one paranoid return from kernel context (a base path)."""

    scenario: str
    features: str
    writes: int
    redundant: int
    flushing: int
    noflush: int
    sites: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    object_path: Path | None          # kept object, or None (assembled into a temporary directory)
    runs: int
    converged: int
    stopped_because: str
    findings: tuple[Finding, ...]
    costs: tuple[ReturnCost, ...]

    @property
    def safe(self) -> bool:
        return not self.findings

    def invariants(self) -> tuple[str, ...]:
        """Invariants with findings: the designed ones first, then by name."""
        found = {f.invariant for f in self.findings}
        first = [n for n in self.variant.designed_to_trip if n in found]
        return tuple(first + sorted(found - set(first)))

    def count(self, invariant: str) -> int:
        return sum(1 for f in self.findings if f.invariant == invariant)

    def shortest(self, invariant: str) -> Finding:
        """The finding of ``invariant`` with the shortest injection chain (first in check order)."""
        candidates = [f for f in self.findings if f.invariant == invariant]
        return min(candidates, key=lambda f: len(f.injections))

    def problems(self) -> tuple[str, ...]:
        """How the outcome differs from what the variant was built to show."""
        label = f"variant {self.variant.number} ({self.variant.name})"
        if self.stopped_because != "done":
            return (f"{label}: exploration stopped early ({self.stopped_because})",)
        if self.variant.expect_safe:
            if self.findings:
                return (f"{label} should be safe but shows {', '.join(self.invariants())}",)
            return ()
        if not self.findings:
            return (f"{label} is broken but the check found nothing",)
        missing = [n for n in self.variant.designed_to_trip if n not in self.invariants()]
        if missing:
            return (f"{label} did not trip {', '.join(missing)}",)
        return ()


@dataclass(frozen=True)
class DemoResult:
    assembler: str                    # `as --version`, first line
    config: CheckConfig
    variants: tuple[VariantResult, ...]
    kept_in: Path | None

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for v in self.variants for p in v.problems())

    @property
    def as_expected(self) -> bool:
        return not self.problems


# ---- assembling -------------------------------------------------------------------------
@dataclass(frozen=True)
class Assembler:
    path: str
    version: str


def find_assembler() -> Assembler:
    """A GNU as that assembles x86-64, or an InputError that says to install binutils."""
    tried = []
    for name in ASSEMBLERS:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--64", "--version"], capture_output=True, text=True, timeout=30,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{path}: {exc}")
            continue
        first = (out.stdout.splitlines() or [""])[0].strip()
        if out.returncode == 0 and "GNU assembler" in first:
            return Assembler(path, first)
        tried.append(f"{path} is not an x86-64 GNU as")
    why = "; ".join(tried) if tried else "GNU as not found"
    raise InputError(f"the demo assembles its fixture with GNU as for x86-64: {why}; {INSTALL_HINT}")


def object_name(variant: Variant) -> str:
    return f"mini_entry-{variant.number}.o"


def assemble(assembler: Assembler, variant: Variant, dest: Path) -> Path:
    """Assemble the fixture for ``variant`` into ``dest``/mini_entry-N.o."""
    out = dest / object_name(variant)
    with resources.as_file(resources.files(__package__) / FIXTURE) as source:
        proc = subprocess.run([assembler.path, "--64", "--defsym", f"VARIANT={variant.number}", "-o", str(out),
                               str(source)], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 or not out.is_file():
        detail = " / ".join(line.strip() for line in proc.stderr.splitlines()[:3]) or f"exit {proc.returncode}"
        raise InternalError(f"{assembler.version} could not assemble {FIXTURE} (variant {variant.number}): "
                            f"{detail}")
    return out


def fixture_source() -> str:
    return (resources.files(__package__) / FIXTURE).read_text()


# ---- running ----------------------------------------------------------------------------
def run_demo(*, workers: int = 1, keep: Path | None = None, progress: Progress | None = None) -> DemoResult:
    """Assemble and check every variant; ``keep`` keeps the objects (and the source) there."""
    assembler = find_assembler()
    cfg = demo_config()
    with _workdir(keep) as where:
        paths = []
        for k, variant in enumerate(VARIANTS):
            if progress:
                progress("assembling the fixture", k, len(VARIANTS))
            paths.append(assemble(assembler, variant, where))
        if keep is not None:
            (where / FIXTURE).write_text(fixture_source())
        checks = _check_all([ObjectRef(p, None, None) for p in paths], cfg, workers, progress)
    kept_in = where if keep is not None else None
    variants = tuple(_variant_result(v, path if kept_in else None, check)
                     for v, path, check in zip(VARIANTS, paths, checks, strict=True))
    return DemoResult(assembler.version, cfg, variants, kept_in)


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    """The directory the objects go to: ``keep`` (created), or a temporary one removed after."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="entrycheck-demo-") as tmp:
            yield Path(tmp)
        return
    try:
        keep.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {keep}: {exc.strerror}") from exc
    yield keep.resolve()


def _check_all(refs: list[ObjectRef], cfg: CheckConfig, workers: int,
               progress: Progress | None) -> list[CheckResult]:
    """One check per variant; variants run side by side in worker processes."""
    total = len(refs)
    count = [0]

    def done(k: int, _) -> None:
        count[0] += 1
        if progress:
            progress("checking the variants", count[0], total)

    if progress:
        progress("checking the variants", 0, total)
    return ordered_map(run_check, [(ref, cfg) for ref in refs], workers=min(workers, total), done=done)


def _variant_result(variant: Variant, kept: Path | None, check: CheckResult) -> VariantResult:
    return VariantResult(variant, kept, check.runs, check.converged, check.stopped_because,
                         tuple(check.findings), tuple(_return_costs(check)))


def _return_costs(check: CheckResult) -> Iterator[ReturnCost]:
    base = {(p.scenario, str(p.features)): p for p in check.base_paths()}
    for features in COST_FEATURES:
        for name in COST_SCENARIOS:
            path = base.get((name, features))
            if path is None:
                raise InternalError(f"the check has no base path for {name} with {features}")
            c = path.cost
            yield ReturnCost(name, features, c.cr3_writes, c.cr3_redundant, c.cr3_flushing, c.cr3_noflush,
                             c.cr3_sites)


def invariant_counts(result: VariantResult) -> dict[str, int]:
    return dict(sorted(Counter(f.invariant for f in result.findings).items()))
