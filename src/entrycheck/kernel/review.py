"""A kernel build with a patch series applied: `entrycheck review`.

The patched tree is a hard-linked copy of the target's source in the cache (the
applier writes changed files as new files, so the original is never touched),
kept under a key made of the source and the patch texts, and built out of tree
like any other tree: a second review of the same patch is a cache hit.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from entrycheck.errors import InputError
from entrycheck.kernel.cache import Cache
from entrycheck.kernel.patch import ApplyResult, apply_patches
from entrycheck.kernel.targets import KernelBuild, build_tree_object
from entrycheck.progress import Progress, silent


@dataclass(frozen=True)
class PatchedBuild:
    build: KernelBuild
    applied: ApplyResult | None      # None when the patched tree came from the cache
    tree: Path


def read_patches(paths: Sequence[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        try:
            out.append((Path(p).name, Path(p).read_text(errors="replace")))
        except OSError as exc:
            raise InputError(f"cannot read patch {p}: {exc.strerror}") from exc
    if not out:
        raise InputError("review needs at least one --patch FILE")
    return out


def patched_build(base: KernelBuild, patches: Sequence[tuple[str, str]], *,
                  progress: Progress = silent) -> PatchedBuild:
    """Build ``base``'s source with ``patches`` applied in order (cached)."""
    if base.source_tree is None:
        raise InputError(f"{base.label} has no source tree to patch; review needs debian:VERSION or a kernel tree")
    digest = hashlib.sha256()
    digest.update(str(base.source_tree.resolve()).encode())
    digest.update((base.package_version or base.kernel_version or "").encode())
    for name, text in patches:
        digest.update(b"\0" + name.encode() + b"\0" + text.encode())
    key = digest.hexdigest()[:16]
    cache = Cache.open()
    final = cache.src / f"patched-{base.source_tree.name}-{key}"
    applied: list[ApplyResult] = []

    def create(work: Path, staged: Path) -> None:
        progress("copying the source tree")
        done = subprocess.run(["cp", "-al", str(base.source_tree), str(staged)], capture_output=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(base.source_tree, staged, symlinks=True)
        progress("applying the patches")
        applied.append(apply_patches(base.source_tree, patches, staged))

    existed = final.exists()
    cache.ensure("patched", final, create, progress)
    names = " + ".join(name for name, _ in patches)
    build = build_tree_object(final, debug=base.debug_info, key_extra=f"patch-{key}", progress=progress)
    build = replace(build, label=f"{base.label} + {names}")
    return PatchedBuild(build, None if existed or not applied else applied[0], final)
