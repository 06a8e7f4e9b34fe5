"""The instructions the machine carries out itself: a filter over the image's decoded
instructions (image/insns.py)."""

from __future__ import annotations

from entrycheck.errors import InternalError
from entrycheck.image.image import Image
from entrycheck.image.insns import PARENT, SiteKind, branch_of, site_of
from entrycheck.machine.api import MachineConfig
from entrycheck.machine.state import REG_INDEX

_REGISTER_SITES = (SiteKind.CR3_READ.value, SiteKind.CR3_WRITE.value, SiteKind.CR2_READ.value, SiteKind.CR2_WRITE.value,
                   SiteKind.RDGSBASE.value,
                   SiteKind.WRGSBASE.value)


def find_sites(image: Image, config: MachineConfig) -> tuple[dict[int, tuple], frozenset[int]]:
    """address -> (kind, operands): the instructions the machine carries out itself (with the
    RETs and indirect branches when a feature set orders mitigations before them, the start of
    clear_bhb_loop when it checks that, and every C function's stub); and the loop heads."""
    spec = config.spec
    branches = spec is not None and spec.branches
    sites: dict[int, tuple] = {}
    insns = image.instructions
    for ins in insns:
        got = site_of(ins)
        if got is None and branches:
            got = branch_of(ins)
        if got is not None:
            if got[0] in _REGISTER_SITES and got[1] not in REG_INDEX:
                raise InternalError(f"no register {got[1]} at {ins.address:#x}")
            sites[ins.address] = got
    if spec is not None and spec.bhb and "clear_bhb_loop" in image.loaded.symbols:
        sites[image.loaded.symbols["clear_bhb_loop"]] = ("bhb",)
    for addr, name in config.stubs.items():
        sites[addr] = ("stub", name)
    for addr, name in config.c_entries.items():
        if addr not in sites:
            sites[addr] = ("c_entry", name)
    return sites, insns.loop_heads()


__all__ = ["find_sites", "PARENT"]
