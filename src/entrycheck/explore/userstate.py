"""Hostile user values: which ones the entry code tells apart, found by running it.

User space controls more than the scenarios' fixed start: the RSP and GSBASE the kernel
holds until the entry code replaces them, the RFLAGS bits POPF can set, and the RIP a
system call returns to (rt_sigreturn, ptrace).  Crossing every value with every path is
not affordable, and most values change nothing.  So each scenario is given candidates on
both sides of every threshold the model knows the entry code can compare such a value
against — inside each kernel stack (the NMI entry tests whether the interrupted RSP is on
its own stack; below them all is the default), the sign bit (the paranoid entry's GSBASE test without FSGSBASE), the
canonical limit and TASK_SIZE_MAX (SYSRET's), every settable flag — and a candidate is
kept only when running it makes the entry code do something else: its recorded path,
or the path of an exception delivered where the value is live in kernel mode (RSP or
GSBASE still the user's), differs from the default's and from every candidate kept
before.  Compares the code makes on a user value thus decide which values are explored;
values that fall on the same side of all of them are one.
"""

from __future__ import annotations

from entrycheck.explore.scenarios import (RETURN_FIELDS, USER_RFLAGS, Scenario, UserState, delivery, start_state,
                                          stub_options)
from entrycheck.image import layout
from entrycheck.machine import model
from entrycheck.machine.api import Level, Request
from entrycheck.machine.events import Delivered
from entrycheck.machine.model import Vector
from entrycheck.machine.state import RSP

SETTABLE_FLAGS = (model.RFLAGS_TF, model.RFLAGS_DF, model.RFLAGS_NT, model.RFLAGS_AC)
NON_CANONICAL = 1 << 47


def candidates(world, sc: Scenario) -> list[UserState]:
    """The values to try for ``sc``, each on one side of a threshold the model knows."""
    out: list[UserState] = []
    if not sc.from_user:
        return out
    if sc.vector is None and sc.sysret and not sc.compat:
        # The user RSP stays in RSP across the SYSCALL gap and the SYSRET window: inside each
        # kernel stack the entry code may compare it with (below all of them is the default),
        # a kernel address, non-canonical.  (syscall-iret has the same entry gap, and its
        # IRET restores RSP from the frame: its values would repeat syscall's.)
        tops = sorted(world.ist_tops.values()) + [world.entry_stack_top, world.task_stack_top]
        out += [UserState(rsp=top - 0x40) for top in tops]
        out += [UserState(rsp=layout.KERNEL_TEXT_BASE), UserState(rsp=NON_CANONICAL)]
        # The RIP (and RCX) the system call returns to: past TASK_SIZE_MAX, non-canonical, kernel.
        # An IRET to a bad one faults: only an object with the #GP entry can take that.
        if Vector.GP in world.config.idt:
            out += [UserState(ret_rip=layout.TASK_SIZE_MAX), UserState(ret_rip=NON_CANONICAL),
                    UserState(ret_rip=0xFFFF_8000_0000_0000)]
            # The selectors it returns with: 32-bit code (a valid IRET target SYSRETQ cannot
            # reach), a data segment as CS, a null SS.
            out += [UserState(ret_cs=layout.USER32_CS), UserState(ret_cs=layout.USER_DS), UserState(ret_ss=3)]
    out += [UserState(rflags=USER_RFLAGS | bit) for bit in SETTABLE_FLAGS]
    out.append(UserState(gsbase=0))
    if world.fsgsbase:
        out.append(UserState(gsbase=layout.USER_GSBASE_NEGATIVE))
    return out


def derive(explorer, sc: Scenario, vectors: tuple[Vector, ...]) -> tuple[Scenario, ...]:
    """The variants of ``sc`` whose user values make the entry code behave differently."""
    if not sc.from_user or sc.user.items():
        return ()
    live: set[int] = set()
    default = _signature(explorer, sc, vectors, live)
    seen = {default, default[:1]}          # a candidate seen only through its path compares with that
    kept = []
    for user in candidates(explorer.world, sc):
        variant = sc.with_user(user)
        sig = _signature(explorer, variant, vectors, live)
        if sig not in seen:
            seen.add(sig)
            kept.append(variant)
    return tuple(kept)


def _signature(explorer, sc: Scenario, vectors: tuple[Vector, ...], live: set[int]) -> tuple:
    """What the entry code did from ``sc``'s start: the instructions of its path, and of each
    exception delivered where a user value is still live in kernel mode.  ``live``: the
    instructions where the default run still held the user's RSP or GSBASE (filled by the
    default's run, then read), so that a kernel RSP that merely equals a candidate is no
    place to probe."""
    world = explorer.world
    options = stub_options(sc, frozenset(), explorer.config.pt_regs_contract)
    budget = explorer.config.budget
    start = start_state(world, sc, explorer.pristine)
    # Kernel code sees the return fields and RFLAGS only through the path's own frame (R11,
    # pt_regs): an exception delivered on the way saves the kernel's RFLAGS and RIP, not these.
    probing = bool(vectors) and sc.user.rflags is None and all(getattr(sc.user, f) is None for f in RETURN_FIELDS)
    # Without probes the path's instructions are all a signature needs (PCS: no state per boundary).
    rec = explorer.machine.run(Request(start, deliver=delivery(explorer.world, sc),
                                       level=Level.STEPS if probing else Level.PCS, options=options,
                                       budget=budget, cut_loops=True))
    log = rec.steps
    sig: list = [(rec.outcome, tuple(log.pcs))]
    if not probing:
        return tuple(sig)
    user_rsp = start.regs.rsp
    user_gs = start.cpu.gs_base
    cursor = log.cursor()
    default = not sc.user.items()
    held = [log.cpus[i].cpl == 0 and (regs[RSP] == user_rsp or log.cpus[i].gs_base == user_gs)
            and (default or log.pcs[i] in live) for i, regs in enumerate(log.regs)]
    single_steps = frozenset(e.step for e in rec.events if type(e) is Delivered and e.single_step)
    entry = sc.vector is None
    for i, pc in enumerate(log.pcs):
        # The first and last boundary of each stretch where a user value is held.
        if not held[i] or (0 < i < len(held) - 1 and held[i - 1] and held[i + 1]):
            continue
        cpu = log.cpus[i]
        if default:
            live.add(pc)
        k = log.start + i
        cursor.advance(k)
        state = log.state(k, cursor.frozen())
        for vector in vectors:
            # Where hardware could deliver it (the explorer's rule); a blocked NMI would only be
            # latched, which tells no value apart.
            if not explorer.policy.allowed(vector, log, k, single_steps, entry) or \
                    (vector is Vector.NMI and cpu.nmi_blocked):
                continue
            probe = explorer.machine.run(Request(state, deliver=vector, level=Level.PCS, options=options,
                                                 budget=budget, cut_loops=True))
            sig.append((pc, vector, probe.outcome, tuple(probe.steps.pcs)))
    return tuple(sig)


__all__ = ["candidates", "derive"]
