"""Shared fixtures: the two Debian kernels (built on first use, then cached) and tree copies."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from entrycheck.kernel.targets import KernelBuild, resolve_target

DEBIAN_SERIES = ("6.1", "6.12")
# The fixtures that fetch and build a Debian kernel: a test using one, directly or through another
# fixture, is a `kernel` test whether its file says so or not (``-m "not kernel"`` leaves it out).
KERNEL_FIXTURES = frozenset({"kernel61", "kernel612", "kernel61_debug", "kernel612_debug", "built_kernels",
                             "debian_kernel"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _no_debian_kernel_unless_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `kernel` must not fetch or build a Debian kernel in this process."""
    if request.node.get_closest_marker("kernel") is not None:
        return
    from entrycheck.kernel import targets

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} resolves a Debian kernel: mark it `kernel`")

    monkeypatch.setattr(targets, "resolve_debian", refuse)


@pytest.fixture(scope="session")
def kernel61() -> KernelBuild:
    """Debian's linux-source-6.1, built with defconfig (cached in ~/.cache/entrycheck)."""
    return resolve_target("debian:6.1")


@pytest.fixture(scope="session")
def kernel612() -> KernelBuild:
    """Debian's linux-source-6.12, built with defconfig (cached in ~/.cache/entrycheck)."""
    return resolve_target("debian:6.12")


@pytest.fixture(scope="session")
def kernel61_debug() -> KernelBuild:
    """debian:6.1+debug: built with DWARF line info (cached in ~/.cache/entrycheck)."""
    return resolve_target("debian:6.1+debug")


@pytest.fixture(scope="session")
def kernel612_debug() -> KernelBuild:
    """debian:6.12+debug: built with DWARF line info (cached in ~/.cache/entrycheck)."""
    return resolve_target("debian:6.12+debug")


@pytest.fixture(scope="session")
def built_kernels(kernel61: KernelBuild, kernel612: KernelBuild) -> dict[str, KernelBuild]:
    """Both Debian kernels by series: {"6.1": ..., "6.12": ...}."""
    return {"6.1": kernel61, "6.12": kernel612}


@pytest.fixture(params=DEBIAN_SERIES, ids=[f"debian-{s}" for s in DEBIAN_SERIES])
def debian_kernel(request: pytest.FixtureRequest) -> KernelBuild:
    """Each Debian kernel in turn (parametrized over 6.1 and 6.12)."""
    name = {"6.1": "kernel61", "6.12": "kernel612"}[request.param]
    return request.getfixturevalue(name)


def copy_kernel_tree(source: Path, dest: Path) -> Path:
    """A private copy of kernel tree ``source`` at ``dest``, cheap to make.

    Files are hard links where the file system allows (so the copy costs almost no
    space), except arch/x86/entry/, which is copied for real: tests may edit or touch
    those files without reaching ``source``.  Write other files only after
    replacing them (unlink first).
    """
    linked = subprocess.run(["cp", "-al", str(source), str(dest)], capture_output=True, check=False)
    if linked.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest, symlinks=True)
    entry_dir = dest / "arch" / "x86" / "entry"
    for path in entry_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            private = path.with_name(path.name + ".copying")
            shutil.copy2(path, private)
            private.replace(path)
    return dest


@pytest.fixture(scope="session")
def copy_tree() -> Callable[[Path, Path], Path]:
    """``copy_tree(source, dest)``: see ``copy_kernel_tree``."""
    return copy_kernel_tree


@pytest.fixture
def kernel_tree_copy(kernel61: KernelBuild, tmp_path: Path) -> Callable[[str], Path]:
    """Factory: ``kernel_tree_copy("name")`` -> a private copy of the Debian 6.1 source tree."""
    assert kernel61.source_tree is not None

    def make(name: str = "linux") -> Path:
        return copy_kernel_tree(kernel61.source_tree, tmp_path / name)

    return make
