"""What a finding needs on real hardware, worked out from the path that found it.

Every link of a finding's path is an event something outside the entry code must
cause: the scenario's own entry, each injected exception, each handler effect.  Each
becomes a ``Precondition`` with how hard it is to bring about (``Reach``); a finding
is as hard to reach as its hardest precondition, and reports order findings by it.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from entrycheck.kernel.guards import KERNEL_BREAKPOINT_CAPABILITY
from entrycheck.kernelabi.world import World
from entrycheck.machine.model import Vector


class Reach(enum.IntEnum):
    """Who can make a precondition happen, easiest first."""

    UNPRIVILEGED = 0        # any local user
    ROOT = 1                # root, or a capability such as CAP_SYS_ADMIN
    MACHINE_CHECK = 2       # a hardware error at that instant
    BUILD = 3               # a build option a production kernel leaves off

    @property
    def label(self) -> str:
        return {Reach.UNPRIVILEGED: "unprivileged", Reach.ROOT: "needs root",
                Reach.MACHINE_CHECK: "needs a machine check", Reach.BUILD: "needs a debug build option"}[self]


@dataclass(frozen=True, order=True)
class Precondition:
    reach: Reach
    kind: str               # "entry", "nmi", "db", "mc", "effect", "config"
    text: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "reach": self.reach.label, "text": self.text}


def reach_of(pres: tuple[Precondition, ...]) -> Reach:
    return max((p.reach for p in pres), default=Reach.UNPRIVILEGED)


_NMI = Precondition(Reach.UNPRIVILEGED, "nmi", "an NMI at that instruction (the NMI watchdog, an NMI IPI from "
                    "another CPU, or perf sampling, open to unprivileged users where perf_event_paranoid <= 2)")
_MC = Precondition(Reach.MACHINE_CHECK, "mc", "a machine check at that instruction")


def for_entry(vector: Vector | None, from_user: bool, name: str) -> Precondition:
    """The scenario's own entry into the kernel."""
    if vector is None:
        return Precondition(Reach.UNPRIVILEGED, "entry", f"the entry of scenario {name} (any user can make it)")
    if vector is Vector.MC:
        return Precondition(Reach.MACHINE_CHECK, "entry", "a machine check " + ("in user mode" if from_user else
                                                                               "in the kernel"))
    if vector is Vector.NMI:
        return Precondition(_NMI.reach, "entry", "an NMI " + ("in user mode" if from_user else "in the kernel"))
    if vector is Vector.DB:
        if from_user:
            return Precondition(Reach.UNPRIVILEGED, "entry",
                                "a #DB in user mode (single-step or a breakpoint of the user's own)")
        return Precondition(Reach.ROOT, "entry", f"a #DB in the kernel (a kernel breakpoint: {KERNEL_BREAKPOINT_CAPABILITY})")
    return Precondition(Reach.UNPRIVILEGED, "entry", f"the entry of scenario {name}")


def for_injection(vector: Vector, watched: str | None = None) -> Precondition:
    if vector is Vector.NMI:
        return _NMI
    if vector is Vector.MC:
        return _MC
    if vector is Vector.DB:
        what = watched or "the data the instruction before accessed"
        return Precondition(Reach.ROOT, "db", f"a kernel data breakpoint on {what} ({KERNEL_BREAKPOINT_CAPABILITY}, "
                            "through perf_event_open)")
    if vector is Vector.IRQ:
        return Precondition(Reach.UNPRIVILEGED, "irq", "a device interrupt or IPI at that instruction, where "
                            "IF=1 lets it in (a user can cause one: network traffic, a TLB shootdown)")
    if vector is Vector.MISPREDICT:
        return _MISPREDICT
    return Precondition(Reach.ROOT, vector.label, f"a {vector.label} exception at that instruction")


_MISPREDICT = Precondition(Reach.UNPRIVILEGED, "mispredict", "user space trains the branch predictor so that this "
                           "conditional branch is mispredicted (Spectre v1): the other side runs speculatively "
                           "until an LFENCE or a serialising instruction")


_USER_TEXT = {
    "rsp": "user space set RSP={v:#x} before it entered the kernel",
    "gsbase": "user space loaded GSBASE={v:#x} (WRGSBASE with FSGSBASE, arch_prctl(ARCH_SET_GS))",
    "rflags": "user space set RFLAGS={v:#x} with POPF",
    "ret_rip": "the system call returns to RIP=RCX={v:#x} (rt_sigreturn of a crafted frame, or ptrace)",
    "ret_cs": "the system call returns with CS={v:#x} (rt_sigreturn of a crafted frame)",
    "ret_ss": "the system call returns with SS={v:#x} (rt_sigreturn of a crafted frame)",
}


def for_user(items: tuple[tuple[str, int], ...]) -> tuple[Precondition, ...]:
    """The hostile user values the scenario started from: any user can set them."""
    return tuple(Precondition(Reach.UNPRIVILEGED, "user", _USER_TEXT[k].format(v=v)) for k, v in items)


def for_effect(name: str) -> Precondition:
    if name == "tlb-shootdown":
        return Precondition(Reach.UNPRIVILEGED, "effect", "the interrupt is a TLB-flush IPI, whose handler does "
                            "invalidate_user_asid (another CPU unmapping memory of this mm: any user can cause it)")
    return Precondition(Reach.UNPRIVILEGED, "effect", f"the handler does {name} (as C code may on this path)")


ESPFIX = ("native_irq_return_ldt", "espfix")


def for_machine(f, configuration: str, facts: dict) -> tuple[Precondition, ...]:
    """What the machine must be for finding ``f``: the configuration that has its feature set
    (a CPU and boot options, or none known), and what the tree says about the code its path
    needs: FRED's boot option, SEV-ES's hypervisor, espfix64's build option and how user space
    gets there.  They name the machine, not who attacks it: the reach stays the path's."""
    names = f.features.names
    text = (f"a machine configured as {configuration}" if configuration
            else "a machine with these features (none of the presets booted any way entrycheck knows has them)")
    out = [Precondition(Reach.UNPRIVILEGED, "machine", text)]
    if "fred" in names:
        where = facts.get("fred")
        out.append(Precondition(Reach.UNPRIVILEGED, "machine", "a CPU with FRED booted with fred=on"
                                + (f" (FRED is off otherwise: {where})" if where else "")))
    if "sev_es" in names:
        out.append(Precondition(Reach.UNPRIVILEGED, "machine", "an SEV-ES guest: its hypervisor intercepts the "
                                "instructions #VC reports (the guest's own kernel handles them)"))
    if any(site.startswith(ESPFIX) for site in (f.site, *(t.partition(":")[0] for t in f.trace))):
        ldt = facts.get("modify_ldt")
        how = "user space returns to a 16-bit SS it installed with modify_ldt()"
        if ldt == "y":
            out.append(Precondition(Reach.UNPRIVILEGED, "machine", f"espfix64: {how} (CONFIG_MODIFY_LDT_SYSCALL=y in "
                                    "this build)"))
        elif ldt == "n":
            out.append(Precondition(Reach.BUILD, "config", "espfix64, which needs CONFIG_MODIFY_LDT_SYSCALL=y: this "
                                    "build does not have it"))
        else:
            out.append(Precondition(Reach.UNPRIVILEGED, "machine", f"espfix64: {how} (if the kernel has "
                                    "CONFIG_MODIFY_LDT_SYSCALL=y; its .config was not at hand)"))
    return tuple(out)


class DataNames:
    """Names data by the physical address the machine's memory hooks report: a per-cpu
    variable, a kernel data symbol, or the region it lies in."""

    def __init__(self, world: World, space) -> None:
        image = world.image
        self._image = image
        self._world = world
        spans = []
        for r in space.regions:
            page = space.pages.get(r.start >> 12)
            if page is not None:
                spans.append((page.phys, page.phys + r.size, r.start, r.name))
        spans.sort()
        self._spans = spans
        self._starts = [s[0] for s in spans]
        res = image.loaded.resolution
        self._data = sorted((addr, addr + max(1, res.data_sizes.get(name, 1)), name) for name, addr in res.data.items())
        self._data_starts = [d[0] for d in self._data]
        self._percpu_end = max(world.percpu.values(), default=-0x1000) + 0x1000

    def virtual(self, phys: int) -> int | None:
        k = bisect.bisect_right(self._starts, phys) - 1
        if k < 0 or phys >= self._spans[k][1]:
            return None
        lo, _, vstart, _ = self._spans[k]
        return vstart + phys - lo

    def name(self, phys: int) -> str:
        virt = self.virtual(phys)
        if virt is None:
            return f"physical {phys:#x}"
        w = self._world
        off = virt - w.percpu_base
        if 0 <= off < self._percpu_end:
            return self._image.symbolize_percpu(off)
        k = bisect.bisect_right(self._data_starts, virt) - 1
        if k >= 0 and virt < self._data[k][1]:
            start, _, name = self._data[k]
            return name if virt == start else f"{name}+{virt - start:#x}"
        k = bisect.bisect_right(self._starts, phys) - 1
        return f"{self._spans[k][3]} {virt:#x}"


__all__ = ["Reach", "Precondition", "reach_of", "for_entry", "for_injection", "for_effect", "for_machine",
           "DataNames"]
