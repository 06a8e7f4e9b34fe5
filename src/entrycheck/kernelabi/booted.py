"""What a booted kernel holds in the data the entry paths' C reads but no object of the image
defines: one table, a line each saying why.

With the noinstr C in the image (image/noinstr.py), data a path reads comes from the objects'
own sections (their initial values), from the per-cpu area the world lays out, or from here.
Any other undefined datum is not mapped at all: a path that reads it stops with a fault that
names it, never with a silent zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from entrycheck.image.layout import KERNEL_DS, VDSO32_BASE, VDSO32_LANDING_PAD

CPUS = 4                          # CPUs possible, present and online; the modelled one is WorldParams.cpu


@dataclass(frozen=True)
class Booted:
    size: int
    value: Callable[["Booting"], bytes] | bytes
    why: str
    defined_too: bool = False     # also where an object of the image defines it (a value boot code sets)


@dataclass(frozen=True)
class Booting:
    """What a booted value may depend on."""

    cpu: int
    percpu_base: int
    layout: Callable[[str], dict] = lambda struct: {}     # a struct's member offsets (the build's DWARF)
    function: Callable[[str], int | None] = lambda name: None   # where a function of FUNCTIONS is
    address: int = 0                                      # where the value goes
    features: frozenset[str] = frozenset()                # the feature set (what this CPU is)


def _u(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _per_cpu_offsets(b: Booting) -> bytes:
    return b"".join(_u(b.percpu_base if cpu == b.cpu else 0xFFFF_8880_DEAD_0000 + cpu * 0x10000, 8)
                    for cpu in range(64))


def _vdso_image_32(b: Booting) -> bytes:
    data = bytearray(0x100)
    at = b.layout("vdso_image").get("sym_int80_landing_pad")
    if at is not None:
        data[at:at + 8] = _u(VDSO32_LANDING_PAD - VDSO32_BASE, 8)
    return bytes(data)


# Functions a booted value points at; each runs as a stub that returns what kernelabi/boundary.py says.
FUNCTIONS = ("native_apic_mem_read",)
_APIC_STRUCT = 0x40               # where in the booted ``apic`` value the driver it points at lies


def _apic(b: Booting) -> bytes:
    data = bytearray(0x200)
    data[0:8] = _u(b.address + _APIC_STRUCT, 8)
    read, fn = b.layout("apic").get("read"), b.function("native_apic_mem_read")
    if read is not None and fn is not None:
        data[_APIC_STRUCT + read:_APIC_STRUCT + read + 8] = _u(fn, 8)
    return bytes(data)


def _sev_status(b: Booting) -> bytes:
    # MSR_AMD64_SEV: SEV enabled (bit 0) and SEV-ES enabled (bit 1) in an SEV-ES guest.
    return _u(0b11 if "sev_es" in b.features else 0, 8)


def _cc_vendor(b: Booting) -> bytes:
    return _u(1 if "sev_es" in b.features else 0, 4)      # CC_VENDOR_AMD : CC_VENDOR_NONE (asm/coco.h)


def _mask(_: Booting) -> bytes:
    return _u((1 << CPUS) - 1, 8) + bytes(1016)


BOOTED: dict[str, Booted] = {
    "__per_cpu_offset": Booted(8 * 64, _per_cpu_offsets,
                               "per-cpu bases (setup_per_cpu_areas); only this CPU's is mapped, the others point "
                               "at nothing"),
    "x86_verw_sel": Booted(2, _u(KERNEL_DS, 2), "the selector VERW (CLEAR_CPU_BUFFERS) names: __KERNEL_DS"),
    "nr_cpu_ids": Booted(4, _u(CPUS, 4), f"{CPUS} CPUs possible"),
    "__num_online_cpus": Booted(4, _u(CPUS, 4), f"{CPUS} CPUs online"),
    "__cpu_online_mask": Booted(1024, _mask, f"CPUs 0-{CPUS - 1} online"),
    "__cpu_possible_mask": Booted(1024, _mask, f"CPUs 0-{CPUS - 1} possible"),
    "__cpu_present_mask": Booted(1024, _mask, f"CPUs 0-{CPUS - 1} present"),
    "crashing_cpu": Booted(4, _u(-1, 4), "no CPU is crashing (kexec's crash shootdown sets it)"),
    "oops_in_progress": Booted(4, _u(0, 4), "no oops is being printed"),
    "apic": Booted(0x200, _apic, "the APIC driver (6.1: struct apic *apic): its read() is a stub that returns "
                                 "0, no vector in service in the ISR (int80_is_external(): int $0x80 is the "
                                 "software interrupt it is, not an external one)"),
    "sev_status": Booted(8, _sev_status, "sme_enable() reads MSR_AMD64_SEV into it: SEV and SEV-ES enabled "
                                         "under sev_es, else 0", defined_too=True),
    "cc_vendor": Booted(4, _cc_vendor, "sme_enable() sets CC_VENDOR_AMD in an SEV guest (sev_es), else "
                                       "CC_VENDOR_NONE", defined_too=True),
    "vdso_image_32": Booted(0x100, _vdso_image_32,
                            "the 32-bit vDSO: only sym_int80_landing_pad is read (do_fast_syscall_32 returns "
                            "there; the task's vDSO is mapped at current->mm->context.vdso)"),
}


def value(name: str, booting: Booting) -> bytes:
    b = BOOTED[name]
    data = b.value(booting) if callable(b.value) else b.value
    return data[:b.size] + bytes(max(0, b.size - len(data)))


__all__ = ["BOOTED", "Booted", "Booting", "value", "CPUS", "FUNCTIONS"]
