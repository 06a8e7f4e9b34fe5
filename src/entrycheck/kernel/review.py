"""A kernel build with a patch series applied: `entrycheck review`.

The patched tree is a hard-linked copy of the target's source in the cache (the
applier writes changed files as new files, so the original is never touched),
kept under a key made of the source and the patch texts, and built out of tree
like any other tree: a second review of the same patch is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from entrycheck.errors import InputError
from entrycheck.kernel.cache import Cache
from entrycheck.kernel.patch import ApplyResult, HunkPlacement
from entrycheck.kernel.patchapply import apply_patches
from entrycheck.kernel.targets import KernelBuild, build_tree_object
from entrycheck.progress import Progress, silent


APPLIED = ".entrycheck-applied.json"      # kept in the patched copy: how the hunks were placed


@dataclass(frozen=True)
class PatchedBuild:
    build: KernelBuild
    applied: ApplyResult | None      # None if the record of the placements is missing
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
    def create(work: Path, staged: Path) -> None:
        progress("copying the source tree")
        done = subprocess.run(["cp", "-al", str(base.source_tree), str(staged)], capture_output=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(base.source_tree, staged, symlinks=True)
        progress("applying the patches")
        result = apply_patches(base.source_tree, patches, staged)
        (staged / APPLIED).write_text(json.dumps({"files": list(result.files),
                                                  "placements": [asdict(p) for p in result.placements]}))

    cache.ensure("patched", final, create, progress)
    names = " + ".join(name for name, _ in patches)
    # The patched tree is built with the configuration the base was built with.
    build = build_tree_object(final, debug=base.debug_info, config=base.config_file, key_extra=f"patch-{key}",
                              progress=progress)
    build = replace(build, label=f"{base.label} + {names}")
    return PatchedBuild(build, _read_applied(final), final)


def _read_applied(tree: Path) -> ApplyResult | None:
    """How the patches were placed (recorded when the patched tree was made)."""
    try:
        doc = json.loads((tree / APPLIED).read_text())
        return ApplyResult(tuple(doc["files"]), tuple(HunkPlacement(**p) for p in doc["placements"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
