"""Tests of entrycheck.kernel: TARGET resolution, kernel builds and the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from entrycheck.errors import InputError
from entrycheck.kernel.cache import CACHE_ENV, Cache
from entrycheck.kernel.debian import compare_versions
from entrycheck.kernel.kbuild import object_is_current, parse_cmd_deps
from entrycheck.kernel.make import ensure_build_packages
from entrycheck.kernel.targets import KernelBuild, build_tree_object, resolve_target

ENTRY_O = "arch/x86/entry/entry_64.o"
COMPAT_O = "arch/x86/entry/entry_64_compat.o"
ENTRY_S = "arch/x86/entry/entry_64.S"
CPUFEATURES = "arch/x86/include/asm/cpufeatures.h"


# --------------------------------------------------------------------------- helpers


def makefile_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL read from a tree's top Makefile."""
    text = (tree / "Makefile").read_text()
    fields = ("VERSION", "PATCHLEVEL", "SUBLEVEL")
    return ".".join(re.search(rf"^{name}\s*=\s*(\d+)$", text, re.MULTILINE).group(1) for name in fields)


def elf_summary(path: Path) -> tuple[str, str, set[str]]:
    with path.open("rb") as f:
        elf = ELFFile(f)
        return elf["e_type"], elf["e_machine"], {s.name for s in elf.iter_sections()}


def apt_versions(package: str) -> set[str]:
    out = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True, check=True).stdout
    return {line.split("|")[1].strip() for line in out.splitlines() if "|" in line}


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mtime, size and mode (symlinks not followed)."""
    seen: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            seen[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return seen


class Stages:
    """A Progress that records the stages reported."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        self.seen.append(stage)

    def built(self) -> bool:
        return any(stage.startswith("build ") for stage in self.seen)


def one_line_input_error(call: Callable[[], object]) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "builds").iterdir()) if (root / "builds").is_dir() else []


def work_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tmp").iterdir()) if (root / "tmp").is_dir() else []


@pytest.fixture
def scratch_cache(kernel61: KernelBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache root for this test (the Debian fixtures stay in the default one)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def run_make(tree: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    subprocess.run(["make", "-C", str(tree), "ARCH=x86_64", *args], env=env, check=True, capture_output=True)


# --------------------------------------------------------------------------- Debian kernels


@pytest.mark.kernel
def test_debian_kernel_resolves_to_entry_object(debian_kernel: KernelBuild) -> None:
    kb = debian_kernel
    e_type, machine, sections = elf_summary(kb.object_path)
    assert (e_type, machine) == ("ET_REL", "EM_X86_64")
    assert {".entry.text", ".altinstructions"} <= sections
    assert kb.source_tree is not None and (kb.source_tree / ENTRY_S).is_file()
    assert kb.cpufeatures_h is not None
    assert kb.cpufeatures_h.read_bytes() == (kb.source_tree / CPUFEATURES).read_bytes()
    assert kb.cpufeatures_h.parent == kb.object_path.parent
    assert kb.asm_offsets_h is not None and "#define TSS_sp0" in kb.asm_offsets_h.read_text()
    assert kb.kernel_version == makefile_version(kb.source_tree)
    series = ".".join(kb.kernel_version.split(".")[:2])
    assert kb.package_version in apt_versions(f"linux-source-{series}")
    assert kb.package_version.split("-")[0] == kb.kernel_version
    assert kb.label == f"debian:{series} (linux-source-{series} {kb.package_version}; defconfig)"
    assert kb.debug_info is False and ".debug_line" not in sections


@pytest.mark.kernel
def test_debian_meta_json_records_the_built_versions(debian_kernel: KernelBuild) -> None:
    meta = json.loads((debian_kernel.object_path.parent / "meta.json").read_text())
    assert meta["kernel_version"] == makefile_version(debian_kernel.source_tree)
    assert meta["package_version"] == debian_kernel.package_version
    assert meta["package"] == f"linux-source-{meta['series']}"
    assert meta["source_tree"] == str(debian_kernel.source_tree)
    assert ENTRY_S in meta["deps"]


@pytest.mark.kernel
def test_debian_second_resolve_is_a_cache_hit(kernel61: KernelBuild) -> None:
    entry = kernel61.object_path.parent
    before = snapshot(entry)
    stages = Stages()
    started = time.monotonic()
    again = resolve_target("debian:6.1", progress=stages)
    assert time.monotonic() - started < 10
    assert again == kernel61
    assert snapshot(entry) == before
    assert not stages.built()
    assert not any(s.startswith(("download", "extract", "configure")) for s in stages.seen)


@pytest.mark.kernel
def test_debian_debug_build_carries_line_info(kernel61: KernelBuild) -> None:
    stages = Stages()
    debug = resolve_target("debian:6.1+debug", progress=stages)
    assert debug.debug_info is True
    assert ".debug_line" in elf_summary(debug.object_path)[2]
    assert debug.object_path != kernel61.object_path
    assert debug.source_tree == kernel61.source_tree  # same pristine source, not extracted again
    assert not any(s.startswith(("download", "extract")) for s in stages.seen)
    assert (debug.kernel_version, debug.package_version) == (kernel61.kernel_version, kernel61.package_version)
    assert debug.label.startswith("debian:6.1+debug ")
    # the same object given as a plain path is recognised as carrying line info
    assert resolve_target(str(debug.object_path)).debug_info is True


def offline_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Put an apt-get on PATH that fails like apt-get without network; return its error line."""
    error = "E: Failed to fetch http://deb.debian.org/debian/pool/main/l/linux/x.deb  Temporary failure resolving"
    fake = tmp_path / "bin" / "apt-get"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{error}' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return error


@pytest.mark.kernel
def test_debian_without_network_uses_the_newest_cached_build(
    kernel61: KernelBuild, scratch_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = offline_apt(tmp_path, monkeypatch)
    # Older builds of the series in the cache (the candidate itself is not cached).
    major, minor, _ = kernel61.kernel_version.split(".")
    for sublevel in ("1", "2", "10"):
        entry = scratch_cache / "builds" / f"debian-6.1_{major}.{minor}.{sublevel}-1"
        shutil.copytree(kernel61.object_path.parent, entry)
        meta = json.loads((entry / "meta.json").read_text())
        meta.update(package_version=f"{major}.{minor}.{sublevel}-1", kernel_version=f"{major}.{minor}.{sublevel}")
        (entry / "meta.json").write_text(json.dumps(meta))
    stages = Stages()
    kb = resolve_target("debian:6.1", progress=stages)
    assert kb.package_version == f"{major}.{minor}.10-1"
    assert kb.object_path.parent.name == f"debian-6.1_{major}.{minor}.10-1"
    assert any("unreachable" in stage and error in stage for stage in stages.seen)
    assert work_dirs(scratch_cache) == [] and list((scratch_cache / "src").iterdir()) == []


@pytest.mark.kernel
def test_debian_without_network_or_cache_is_an_input_error(
    kernel61: KernelBuild, scratch_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = offline_apt(tmp_path, monkeypatch)
    message = one_line_input_error(lambda: resolve_target("debian:6.1"))
    assert message.startswith("cannot download linux-source-6.1 from the Debian archive")
    assert error in message and "pass a kernel tree" in message
    assert cache_entries(scratch_cache) == [] and work_dirs(scratch_cache) == []


# --------------------------------------------------------------------------- local trees


@pytest.mark.kernel
def test_source_tree_builds_out_of_tree_and_rebuilds_when_edited(
    kernel_tree_copy: Callable[[str], Path], scratch_cache: Path
) -> None:
    tree = kernel_tree_copy("linux")
    before = snapshot(tree)
    stages = Stages()
    kb = resolve_target(str(tree), progress=stages)
    assert stages.built()
    assert snapshot(tree) == before  # nothing written into the user's tree
    assert kb.object_path.is_relative_to(scratch_cache / "builds")
    assert cache_entries(scratch_cache) == [kb.object_path.parent.name]
    assert work_dirs(scratch_cache) == []
    assert kb.source_tree == tree.resolve()
    assert kb.kernel_version == makefile_version(tree)
    assert kb.package_version is None and kb.label == str(tree)
    assert {".entry.text", ".altinstructions"} <= elf_summary(kb.object_path)[2]
    assert kb.cpufeatures_h.read_bytes() == (tree / CPUFEATURES).read_bytes()

    # Unchanged tree: a cache hit, without building.
    again_stages = Stages()
    assert resolve_target(str(tree), progress=again_stages) == kb
    assert not again_stages.built()

    # Edited tree: rebuilt (not served the old object), and a failing build
    # publishes nothing and names the make target, the error and the log.
    entry_s = tree / ENTRY_S
    entry_s.write_text(entry_s.read_text() + "\n\tentrycheck_bogus_insn %rax\n")
    message = one_line_input_error(lambda: resolve_target(str(tree)))
    assert ENTRY_O in message
    assert "entrycheck_bogus_insn" in message
    log = Path(re.search(r"full log: (\S+)\)", message).group(1))
    assert log.is_relative_to(scratch_cache) and "entrycheck_bogus_insn" in log.read_text()
    assert cache_entries(scratch_cache) == [kb.object_path.parent.name]
    assert work_dirs(scratch_cache) == []


@pytest.mark.kernel
def test_tree_configured_in_tree_concurrent_runs_build_once(
    kernel_tree_copy: Callable[[str], Path], user_build_dir: tuple[Path, Path], scratch_cache: Path
) -> None:
    tree = kernel_tree_copy("linux")
    # A .config in the tree itself: kbuild refuses O= builds of such a tree.
    shutil.copyfile(user_build_dir[1] / ".config", tree / ".config")
    before = snapshot(tree)
    script = textwrap.dedent(
        """
        import json, sys
        from entrycheck.kernel.targets import resolve_target
        stages = []
        kb = resolve_target(sys.argv[1], progress=lambda stage, done=None, total=None: stages.append(stage))
        print(json.dumps({"object": str(kb.object_path), "stages": stages}))
        """
    )
    env = {**os.environ, CACHE_ENV: str(scratch_cache)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tree)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["object"] == results[1]["object"]
    assert [any(s.startswith("build ") for s in r["stages"]) for r in results].count(True) == 1
    assert [any(s.startswith("copying ") for s in r["stages"]) for r in results].count(True) == 1
    assert cache_entries(scratch_cache) == [Path(results[0]["object"]).parent.name]
    assert work_dirs(scratch_cache) == []
    assert snapshot(tree) == before
    built = Path(results[0]["object"])
    assert elf_summary(built)[0] == "ET_REL"
    assert (built.parent / "kernel.config").read_text() == (tree / ".config").read_text()


@pytest.fixture(scope="module")
def user_build_dir(
    kernel61: KernelBuild, copy_tree: Callable[[Path, Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A user's source tree and O= build dir with a built, current entry_64.o.

    The configuration is defconfig plus CONFIG_DEBUG_ENTRY, so that a build that
    uses this directory's .config can be told from a defconfig build.
    """
    base = tmp_path_factory.mktemp("user")
    tree = copy_tree(kernel61.source_tree, base / "linux")
    build = base / "build"
    run_make(tree, f"O={build}", "defconfig")
    subprocess.run(
        ["bash", str(tree / "scripts/config"), "--file", str(build / ".config"), "-e", "DEBUG_ENTRY"], check=True
    )
    run_make(tree, f"O={build}", "olddefconfig")
    run_make(tree, f"O={build}", f"-j{os.cpu_count()}", ENTRY_O, COMPAT_O)
    return tree, build


@pytest.mark.kernel
def test_build_dir_with_current_object_is_used_as_is(user_build_dir: tuple[Path, Path], scratch_cache: Path) -> None:
    tree, build = user_build_dir
    assert object_is_current(build)
    stages = Stages()
    kb = resolve_target(str(build), progress=stages)
    # Its own objects are used (linked into one in the cache), not rebuilt.
    assert kb.parts == (build.resolve() / ENTRY_O, build.resolve() / COMPAT_O)
    assert kb.object_path.is_relative_to(scratch_cache) and not any(s.startswith(("configure", "build ")) for s in stages.seen)
    assert kb.asm_offsets_h == build.resolve() / "include/generated/asm-offsets.h"
    assert kb.cpufeatures_h == tree.resolve() / CPUFEATURES
    assert kb.source_tree == tree.resolve()
    assert kb.kernel_version == makefile_version(tree)
    assert not stages.built()
    assert cache_entries(scratch_cache) == [kb.object_path.parent.name]   # only the link of its objects


@pytest.mark.kernel
def test_stale_build_dir_is_rebuilt_into_the_cache(user_build_dir: tuple[Path, Path], scratch_cache: Path) -> None:
    tree, build = user_build_dir
    entry_s = tree / ENTRY_S
    original = entry_s.stat()
    try:
        os.utime(entry_s, ns=(original.st_atime_ns, time.time_ns()))
        assert not object_is_current(build)
        tree_before, build_before = snapshot(tree), snapshot(build)
        stages = Stages()
        kb = resolve_target(str(build), progress=stages)
        assert stages.built()
        assert kb.object_path.is_relative_to(scratch_cache / "builds")
        assert cache_entries(scratch_cache) == [kb.object_path.parent.name]
        assert (snapshot(tree), snapshot(build)) == (tree_before, build_before)
        assert "CONFIG_DEBUG_ENTRY=y" in (kb.object_path.parent / "kernel.config").read_text()
        assert kb.source_tree == tree.resolve() and kb.asm_offsets_h.is_file()
        assert {".entry.text", ".altinstructions"} <= elf_summary(kb.object_path)[2]
        # The same stale directory again: the cached rebuild is reused.
        assert resolve_target(str(build)) == kb
    finally:
        os.utime(entry_s, ns=(original.st_atime_ns, original.st_mtime_ns))
    assert object_is_current(build)


# --------------------------------------------------------------------------- bare objects


@pytest.mark.kernel
def test_bare_object_path(kernel61: KernelBuild, tmp_path: Path) -> None:
    obj = tmp_path / "entry_64.o"
    shutil.copyfile(kernel61.object_path, obj)
    kb = resolve_target(str(obj))
    assert kb == KernelBuild(
        label=str(obj), object_path=obj, cpufeatures_h=None, asm_offsets_h=None,
        source_tree=None, kernel_version=None, package_version=None, debug_info=False, parts=(obj,),
    )


@pytest.mark.kernel
def test_bare_object_paired_with_tree(kernel61: KernelBuild, user_build_dir: tuple[Path, Path], tmp_path: Path) -> None:
    obj = tmp_path / "entry_64.o"
    shutil.copyfile(kernel61.object_path, obj)
    kb = resolve_target(str(obj), tree=kernel61.source_tree)
    assert kb.object_path == obj
    assert kb.cpufeatures_h == kernel61.source_tree / CPUFEATURES
    assert kb.source_tree == kernel61.source_tree
    assert kb.kernel_version == kernel61.kernel_version
    assert kb.asm_offsets_h is None  # a clean source tree has no generated headers
    tree, build = user_build_dir
    from_build = resolve_target(str(obj), tree=build)
    assert from_build.cpufeatures_h == tree.resolve() / CPUFEATURES
    assert from_build.asm_offsets_h == build.resolve() / "include/generated/asm-offsets.h"
    message = one_line_input_error(lambda: resolve_target(str(obj), tree=tmp_path))
    assert str(tmp_path) in message


# --------------------------------------------------------------------------- bad targets


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "entry_64.o"
    assert str(missing) in one_line_input_error(lambda: resolve_target(str(missing)))


def test_directory_that_is_no_kernel_tree(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    message = one_line_input_error(lambda: resolve_target(str(tmp_path)))
    assert str(tmp_path) in message and "kernel source tree" in message
    assert "kernel source tree" in one_line_input_error(lambda: build_tree_object(tmp_path))


@pytest.mark.parametrize("spec", ["garbage", "debian:", "debian:six", "debian:6.1+fast", "debian:6", "  "])
def test_unrecognised_target_lists_the_accepted_forms(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    message = one_line_input_error(lambda: resolve_target(spec))
    assert "debian:X.Y" in message


@pytest.mark.kernel
def test_unknown_debian_series_names_the_available_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    message = one_line_input_error(lambda: resolve_target("debian:9.99"))
    assert "linux-source-9.99" in message
    out = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-source-[0-9.]+$"], capture_output=True, text=True, check=True
    ).stdout
    known = re.findall(r"^linux-source-(\d+\.\d+) ", out, re.MULTILINE)
    assert known and all(f"debian:{series}" in message for series in known)
    assert cache_entries(tmp_path / "cache") == []


def test_missing_build_tools_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, *a, **k: None if tool in ("flex", "bc") else real_which(tool))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    message = one_line_input_error(lambda: ensure_build_packages())
    assert "bc flex" in message and "apt-get install bc flex" in message


# --------------------------------------------------------------------------- cache and staleness machinery


ENSURE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from entrycheck.kernel.cache import Cache
    cache = Cache.open(Path(sys.argv[1]))
    def create(work, staged):
        with open(sys.argv[2], "a") as log:
            log.write("created\\n")
        time.sleep(1.0)
        staged.mkdir()
        (staged / "payload").write_text("done")
    print(cache.ensure("build", cache.builds / "entry", create))
    """
)


def test_cache_concurrent_ensure_creates_once(tmp_path: Path) -> None:
    root, journal = tmp_path / "cache", tmp_path / "journal"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_SCRIPT, str(root), str(journal)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = {run.communicate(timeout=60)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert outputs == {str(root / "builds" / "entry")}
    assert journal.read_text() == "created\n"
    assert (root / "builds" / "entry" / "payload").read_text() == "done"
    assert work_dirs(root) == []


def test_cache_failed_creation_publishes_nothing(tmp_path: Path) -> None:
    cache = Cache.open(tmp_path / "cache")

    def create(work: Path, staged: Path) -> None:
        staged.mkdir()
        (staged / "half").write_text("written")
        raise InputError("build failed")

    with pytest.raises(InputError):
        cache.ensure("build", cache.builds / "entry", create)
    assert cache_entries(cache.root) == [] and work_dirs(cache.root) == []


def test_cache_removes_work_left_by_a_dead_run(tmp_path: Path) -> None:
    cache = Cache.open(tmp_path / "cache")
    orphan = cache.tmp / "build-entry@dead1234"
    (orphan / "build").mkdir(parents=True)
    other = cache.tmp / "build-entry2@alive999"
    other.mkdir()
    cache.ensure("build", cache.builds / "entry", lambda work, staged: staged.mkdir())
    assert not orphan.exists() and other.exists()
    assert cache_entries(cache.root) == ["entry"]


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert Cache.open().root == tmp_path / "elsewhere"
    assert {p.name for p in (tmp_path / "elsewhere").iterdir()} == {"src", "builds", "logs", "locks", "tmp"}
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Cache.open().root == tmp_path / "home" / ".cache" / "entrycheck"


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg to compare against")
@pytest.mark.parametrize(
    "a,b",
    [
        ("6.1.192-2", "6.1.192-1"), ("6.1.192-1", "6.1.190-1"), ("6.1.9-1", "6.1.10-1"),
        ("6.12.117-1~deb12u1", "6.12.117-1"), ("6.12.117-1~deb12u1", "6.12.115-2~deb12u1"),
        ("1:6.1-1", "6.2-1"), ("6.1.192-2", "6.1.192-2"), ("6.1+b1-1", "6.1-1"), ("6.1a-1", "6.1-1"),
    ],
)
def test_version_order_matches_dpkg(a: str, b: str) -> None:
    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False).returncode == 0

    ours = compare_versions(a, b)
    assert (ours < 0, ours == 0, ours > 0) == (dpkg("lt"), dpkg("eq"), dpkg("gt"))
    assert (compare_versions(b, a) > 0) == dpkg("lt")


def test_object_currency_follows_the_dependency_list(tmp_path: Path) -> None:
    src, build = tmp_path / "src", tmp_path / "build"
    (src / "arch/x86/entry").mkdir(parents=True)
    (build / "arch/x86/entry").mkdir(parents=True)
    (build / "include/generated").mkdir(parents=True)
    source, header = src / ENTRY_S, src / "header.h"
    generated, optional = build / "include/generated/gen.h", build / "include/config/OPTION"
    for path in (source, header, generated, build / ".config"):
        path.write_text("x\n")
    (build / "arch/x86/entry/.entry_64.o.cmd").write_text(
        f"cmd_{ENTRY_O} := gcc -c\n\nsource_{ENTRY_O} := {source}\n\n"
        f"deps_{ENTRY_O} := \\\n    $(wildcard include/config/OPTION) \\\n"
        f"  {header} \\\n  include/generated/gen.h \\\n\n"
        f"{ENTRY_O}: $(deps_{ENTRY_O})\n"
    )
    deps = parse_cmd_deps(build / "arch/x86/entry/.entry_64.o.cmd")
    assert [(d.path, d.optional) for d in deps] == [
        (str(source), False), ("include/config/OPTION", True), (str(header), False), ("include/generated/gen.h", False)
    ]
    obj = build / ENTRY_O
    obj.write_text("object")
    now = time.time_ns()
    old, new = now - 10**10, now
    for path in (source, header, generated, build / ".config"):
        os.utime(path, ns=(old, old))
    os.utime(obj, ns=(new, new))
    assert object_is_current(build)
    for stale in (source, header, generated, build / ".config"):
        os.utime(stale, ns=(new + 10**9, new + 10**9))
        assert not object_is_current(build), stale
        os.utime(stale, ns=(old, old))
    assert object_is_current(build)
    optional.parent.mkdir(parents=True)
    optional.write_text("")
    os.utime(optional, ns=(new + 10**9, new + 10**9))
    assert not object_is_current(build)  # an optional dependency counts once it exists
    optional.unlink()
    header.unlink()
    assert not object_is_current(build)  # a required dependency that vanished
