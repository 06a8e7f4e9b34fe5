"""ELF object -> Image: layout, symbols, relocations, alternatives, PTI user mappings."""

from __future__ import annotations

from entrycheck.image.features import FeatureSet, FeatureTable
from entrycheck.image.image import Image, LoadedObject, load
from entrycheck.kernel.targets import KernelBuild


def load_build(build: KernelBuild) -> LoadedObject:
    """Load the entry object of a resolved kernel target."""
    return load(build.object_path, cpufeatures=build.cpufeatures_h, asm_offsets=build.asm_offsets_h)


__all__ = ["FeatureSet", "FeatureTable", "Image", "LoadedObject", "load", "load_build"]
