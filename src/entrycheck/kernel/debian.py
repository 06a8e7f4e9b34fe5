"""``debian:X.Y`` targets: Debian's linux-source-X.Y package, fetched with apt, built, cached.

The package version is whatever apt offers as candidate today; nothing here pins
a sublevel.  The pristine source of each package version is kept under
``src/`` and its builds (plain and ``+debug``) under ``builds/``, each with a
meta.json that records the kernel version (from the tree's Makefile) and the
package version (from the .deb).  Without network, the newest cached build of the
same series is used and the fact is reported through ``progress``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError, InternalError
from ..progress import Progress, silent
from .cache import Cache, safe_name
from .kconfig import ConfigRequest
from .kbuild import (
    BUILD_FORMAT,
    is_source_tree,
)
from .make import (
    build_entry,
    ensure_build_packages,
    last_apt_error,
    read_meta,
)

SERIES = re.compile(r"\d+\.\d+")
"""What may follow ``debian:`` (before an optional ``+debug``)."""

_EXTRACT_TOOLS = {"xz": "xz-utils"}


@dataclass(frozen=True)
class DebianPackage:
    """One version of Debian's linux-source-<series> package."""

    series: str  # "6.1"
    version: str  # "6.1.192-2"

    @property
    def name(self) -> str:
        """The Debian package name."""
        return f"linux-source-{self.series}"

    @property
    def source_name(self) -> str:
        """Directory name of its extracted source under the cache's src/."""
        return safe_name(f"{self.name}_{self.version}")

    def entry_name(self, debug: bool, request: ConfigRequest = ConfigRequest()) -> str:
        """Directory name of its build under the cache's builds/ (one per configuration request)."""
        return (safe_name(f"debian-{self.series}_{self.version}") + ("_debug" if debug else "")
                + f"_{_base(request).key()}_{BUILD_FORMAT}")

    def label(self, debug: bool, request: ConfigRequest = ConfigRequest()) -> str:
        """Human-readable name, e.g. 'debian:6.1 (linux-source-6.1 6.1.192-2; defconfig)'."""
        suffix = "+debug" if debug else ""
        return f"debian:{self.series}{suffix} ({self.name} {self.version}; {_base(request).describe()})"


def _base(request: ConfigRequest) -> ConfigRequest:
    """A Debian package has no config of its own: the default is defconfig."""
    return request if request.base is not None else replace(request, base="defconfig")


@dataclass(frozen=True)
class DebianBuild:
    """A published build of a Debian package."""

    package: DebianPackage
    entry: Path  # the cache entry (entry_64.o, cpufeatures.h, asm-offsets.h, meta.json)
    source: Path  # the pristine source it was built from
    debug: bool


class _DownloadFailed(Exception):
    """apt-get download did not deliver the .deb (usually: no network)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- versions


def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isdigit() or not char:
        return 0
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit runs (with ~ < '' < letters < others) and numbers."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        start_a, start_b = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        diff = int(a[start_a:i] or 0) - int(b[start_b:j] or 0)
        if diff:
            return diff
    return 0


def compare_versions(a: str, b: str) -> int:
    """Compare Debian versions like ``dpkg --compare-versions``: <0, 0 or >0."""

    def split(version: str) -> tuple[int, str, str]:
        epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def _newest(items: list[tuple[str, Path]]) -> tuple[str, Path] | None:
    best: tuple[str, Path] | None = None
    for item in items:
        if best is None or compare_versions(item[0], best[0]) > 0:
            best = item
    return best


# --------------------------------------------------------------------------- apt


def _apt_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_apt_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, check=False,
    )


def _require_apt() -> None:
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise InputError(
                f"debian: targets need {tool} (a Debian or Ubuntu host); "
                "pass a kernel tree or an entry_64.o instead"
            )


def candidate_version(package: str) -> str | None:
    """The version apt would install for ``package`` (None when apt does not know it)."""
    result = _apt(["apt-cache", "policy", package])
    match = re.search(r"^\s*Candidate:\s*(\S+)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def available_series() -> list[str]:
    """The X.Y of every linux-source-X.Y package apt knows, oldest first."""
    result = _apt(["apt-cache", "search", "--names-only", r"^linux-source-[0-9.]+$"])
    found = set(re.findall(r"^linux-source-(\d+\.\d+)\s", result.stdout, re.MULTILINE))
    return sorted(found, key=lambda series: tuple(int(part) for part in series.split(".")))


def _apt_update(progress: Progress) -> str | None:
    """Run apt-get update; None on success, else the reason it failed."""
    progress("apt-get update")
    result = _apt(["apt-get", "update"])
    output = result.stdout + result.stderr
    if result.returncode != 0 or re.search(r"^(E|W): (Failed to fetch|Some index files failed)", output, re.MULTILINE):
        return last_apt_error(output)
    return None


# --------------------------------------------------------------------------- fetch & extract


def _download(package: DebianPackage, work: Path, progress: Progress) -> Path:
    progress(f"download {package.name} {package.version}")
    result = _apt(["apt-get", "download", f"{package.name}={package.version}"], cwd=work)
    debs = sorted(work.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise _DownloadFailed(last_apt_error(result.stdout + result.stderr))
    return debs[0]


def _extract(package: DebianPackage, deb: Path, work: Path, progress: Progress) -> Path:
    """Unpack usr/src/linux-source-X.Y.tar.xz of ``deb`` into ``work``; return the tree."""
    found = _apt(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    if found != package.version:
        raise InternalError(f"apt-get download {package.name}={package.version} delivered version {found!r}")
    progress(f"extract {package.name} {package.version}")
    out = work / "extract"
    out.mkdir()
    errors = work / "extract.err"
    with errors.open("w") as err:
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=err)
        inner = subprocess.Popen(
            ["tar", "-xOf", "-", "--wildcards", f"*usr/src/{package.name}.tar.xz"],
            stdin=fsys.stdout, stdout=subprocess.PIPE, stderr=err,
        )
        assert fsys.stdout is not None and inner.stdout is not None
        fsys.stdout.close()
        unpack = subprocess.run(
            ["tar", "-xJf", "-", "-C", str(out), "--no-same-owner"],
            stdin=inner.stdout, stderr=err, check=False,
        )
        inner.stdout.close()
        codes = (fsys.wait(), inner.wait(), unpack.returncode)
    tops = [path for path in out.iterdir() if path.is_dir()]
    if any(codes) or len(tops) != 1 or not is_source_tree(tops[0]):
        reason = last_apt_error(errors.read_text(errors="replace"))
        raise InputError(f"cannot extract the kernel source from {package.name} {package.version}: {reason}")
    return tops[0]


def ensure_source(cache: Cache, package: DebianPackage, progress: Progress = silent) -> Path:
    """The pristine source of ``package`` in the cache, downloaded and extracted if needed.

    Raises ``_DownloadFailed`` when the .deb cannot be fetched.
    """

    def create(work: Path, staged: Path) -> None:
        ensure_build_packages(progress, extra_tools=_EXTRACT_TOOLS)
        deb = _download(package, work, progress)
        os.rename(_extract(package, deb, work, progress), staged)

    return cache.ensure("src", cache.src / package.source_name, create, progress)


# --------------------------------------------------------------------------- builds


def _build(cache: Cache, package: DebianPackage, source: Path, debug: bool, request: ConfigRequest,
           progress: Progress) -> Path:
    request = _base(request)
    name = package.entry_name(debug, request)
    kept_log = cache.log_path(name)

    def create(work: Path, staged: Path) -> None:
        log = work / "build.log"
        meta = {
            "kind": "debian",
            "label": package.label(debug, request),
            "series": package.series,
            "package": package.name,
            "package_version": package.version,
            "source_tree": str(source),
            "config": request.describe(),
            "request": request.key(),
            "debug": debug,
        }
        base = distro_config(cache, package.series, package.version, progress) if request.base == "distro" else None
        try:
            build_entry(
                source, work=work, staged=staged, log=log, log_shown=kept_log,
                what=f"{package.name} {package.version}", meta=meta, config=base, debug=debug,
                options=request.options, progress=progress,
            )
        finally:
            if log.exists():
                os.replace(log, kept_log)

    return cache.ensure("build", cache.builds / name, create, progress)


def _cached_build(cache: Cache, series: str, debug: bool, request: ConfigRequest) -> DebianBuild | None:
    """The newest published build of ``series`` (with the same debug flag and configuration)."""
    found: list[tuple[str, Path]] = []
    for entry in cache.builds.glob(f"{safe_name(f'debian-{series}')}_*"):
        try:
            meta = read_meta(entry)
        except (OSError, ValueError):
            continue
        if meta.get("series") == series and meta.get("debug") == debug and meta.get("request") == _base(
                request).key():
            found.append((str(meta["package_version"]), entry))
    newest = _newest(found)
    if newest is None:
        return None
    version, entry = newest
    return DebianBuild(DebianPackage(series, version), entry, Path(str(read_meta(entry)["source_tree"])), debug)


def _cached_source(cache: Cache, series: str) -> DebianPackage | None:
    """The newest extracted source of ``series`` in the cache."""
    prefix = f"linux-source-{series}_"
    found = [
        (path.name[len(prefix):], path)
        for path in cache.src.glob(f"{prefix}*")
        if is_source_tree(path)
    ]
    newest = _newest(found)
    return DebianPackage(series, newest[0]) if newest else None


def _offline(cache: Cache, series: str, debug: bool, request: ConfigRequest, reason: str,
             progress: Progress) -> DebianBuild | None:
    """What can be used from the cache when the archive cannot be reached."""
    cached = _cached_build(cache, series, debug, request)
    if cached is not None:
        progress(f"Debian archive unreachable ({reason}); using cached {cached.package.label(debug, request)}")
        return cached
    package = _cached_source(cache, series)
    if package is not None:
        progress(f"Debian archive unreachable ({reason}); building cached source {package.name} {package.version}")
        source = cache.src / package.source_name
        return DebianBuild(package, _build(cache, package, source, debug, request, progress), source, debug)
    return None


def resolve_debian(cache: Cache, series: str, *, debug: bool = False, request: ConfigRequest = ConfigRequest(),
                   progress: Progress = silent) -> DebianBuild:
    """The build of linux-source-``series`` (apt's candidate version), made if not cached.

    As root, an unknown package (or a candidate the archive no longer has) makes
    apt-get update run once.  Raises InputError for a series Debian does not ship
    (listing those it does) and when nothing can be downloaded nor found cached.
    """
    _require_apt()
    name = f"linux-source-{series}"
    progress(f"look up {name}")
    version = candidate_version(name)
    updated = False
    update_failure: str | None = None
    if version is None and os.geteuid() == 0:
        update_failure, updated = _apt_update(progress), True
        version = candidate_version(name)
    if version is None:
        if update_failure is not None:
            fallback = _offline(cache, series, debug, request, update_failure, progress)
            if fallback is not None:
                return fallback
        known = ", ".join(f"debian:{s}" for s in available_series())
        raise InputError(
            f"Debian has no package {name}, so debian:{series} cannot be used; "
            f"available: {known or 'none (is apt configured with a Debian archive?)'}"
        )

    while True:
        package = DebianPackage(series, version)
        entry = cache.builds / package.entry_name(debug, request)
        source = cache.src / package.source_name
        if entry.is_dir():
            if not source.is_dir():  # source removed from the cache: fetch it again if we can
                try:
                    ensure_source(cache, package, progress)
                except (_DownloadFailed, InputError):
                    progress(f"the source of {package.name} {package.version} is not cached")
            return DebianBuild(package, entry, source, debug)
        try:
            source = ensure_source(cache, package, progress)
            break
        except _DownloadFailed as failure:
            if not updated and os.geteuid() == 0:
                # The lists may name a version the archive has dropped since.
                updated = True
                if _apt_update(progress) is None:
                    newer = candidate_version(name)
                    if newer is not None and newer != version:
                        version = newer
                        continue
            fallback = _offline(cache, series, debug, request, failure.reason, progress)
            if fallback is not None:
                return fallback
            raise InputError(
                f"cannot download {name} from the Debian archive: {failure.reason}; "
                "check the network or pass a kernel tree"
            ) from None
    return DebianBuild(package, _build(cache, package, source, debug, request, progress), source, debug)


# --------------------------------------------------------------------------- distro configs


def distro_config(cache: Cache, series: str, version: str | None, progress: Progress = silent) -> Path:
    """Debian's amd64 config of ``series`` (package linux-config-X.Y; ``version`` when apt has it).

    Cached under ``src/``; InputError when the package cannot be had.
    """
    _require_apt()
    name = f"linux-config-{series}"
    chosen = version if version and _has_version(name, version) else candidate_version(name)
    if chosen is None:
        cached = sorted(cache.src.glob(safe_name(f"{name}_") + "*"))
        if cached:
            return cached[-1] / "config.amd64"
        raise InputError(f"Debian has no package {name}, so there is no distro config for {series}")

    def create(work: Path, staged: Path) -> None:
        progress(f"download {name} {chosen}")
        result = _apt(["apt-get", "download", f"{name}={chosen}"], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise InputError(f"cannot download {name} {chosen}: {last_apt_error(result.stdout + result.stderr)}")
        out = work / "x"
        unpack = _apt(["dpkg-deb", "-x", str(debs[0]), str(out)])
        packed = out / "usr" / "src" / name / "config.amd64_none_amd64.xz"
        if unpack.returncode != 0 or not packed.is_file():
            raise InputError(f"{name} {chosen} has no usr/src/{name}/config.amd64_none_amd64.xz")
        staged.mkdir()
        with (staged / "config.amd64").open("wb") as f:
            done = subprocess.run(["xz", "-dc", str(packed)], stdout=f, stderr=subprocess.PIPE, check=False)
        if done.returncode != 0:
            raise InputError(f"cannot unpack {packed.name} of {name} {chosen}")

    entry = cache.ensure("src", cache.src / safe_name(f"{name}_{chosen}"), create, progress)
    return entry / "config.amd64"


def _has_version(package: str, version: str) -> bool:
    result = _apt(["apt-cache", "madison", package])
    return any(line.split("|")[1].strip() == version for line in result.stdout.splitlines() if line.count("|") >= 2)
