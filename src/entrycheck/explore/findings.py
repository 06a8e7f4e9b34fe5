"""Findings from a path's violations: the trace window before each, the preconditions of its
links, the build options it relies on, and the folding of symptoms under an ist-reentered
root cause (props/reentry.py).

A path relies on a build option when an NMI arrives while NMIs are unmasked only because of
an IRET to itself that the option compiles in (x86_64 defconfig's DEBUG_ENTRY), or when an
injection sits inside such a block: the tree's entry_64.S says which (kernel/guards.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.explore.paths import Finding, finding_key
from entrycheck.explore.preconditions import Precondition, Reach
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import Image
from entrycheck.machine.events import Delivered, Injection, Iret
from entrycheck.machine.model import Vector
from entrycheck.props.invariants import Violation
from entrycheck.props.reentry import Reentry, RootCauses


@dataclass(frozen=True)
class Where:
    """What every finding of one unit names: its scenario, feature set and handler effects."""

    scenario: str
    features: FeatureSet
    effects: tuple[str, ...]


class Findings:
    """Makes the findings of one explorer's paths (one image)."""

    def __init__(self, image: Image, trace_window: int) -> None:
        self.image = image
        self.window = trace_window
        self.guards: dict[str, str] = {}              # label -> the CONFIG_ option its iretq needs
        self._guarded: dict[int, Precondition] = {}   # instructions only a build option compiles in
        self._early: dict[int, Precondition | None] = {}
        self._disasm: dict[int, str] = {}
        self._shown: list | None = None               # shown_before's keys of the findings list last asked of

    # ---- build options ---------------------------------------------------------------------
    def set_guards(self, guards) -> None:
        """The tree's build-option guarded IRETs (kernel/guards.py): (label, CONFIG_X, n
        instructions of the block before the iretq)."""
        self.guards = {label: option for label, option, _ in guards}
        self._early.clear()
        self._guarded = {}
        for label, option, n in guards:
            if label not in self.image.loaded.symbols:
                continue
            start, end = self.image.symbol_range(label)
            insns = list(self.image.instructions.sweep(start, end))
            at = next((k for k, ins in enumerate(insns) if ins.mnemonic in ("iretq", "iret")), None)
            if at is None:
                continue
            site = self.image.symbolize(insns[at].address)
            pre = Precondition(Reach.BUILD, "config", f"a kernel built with {option}=y (the code at "
                               f"{self.image.symbolize(insns[max(0, at - max(n, 0))].address)}..{site} that "
                               "unmasks NMIs early exists only then)")
            for ins in insns[max(0, at - max(n, 0)):at + 1]:
                self._guarded[ins.address] = pre

    def relied_on(self, events) -> tuple[Precondition, ...]:
        """Build options a path relies on: an NMI delivered while NMIs are unmasked only
        because of an IRET to itself that the option compiles in."""
        out: list[Precondition] = []
        early = None
        for e in events:
            t = type(e)
            if t is Iret:
                early = self.early_iret(e)
            elif t is Delivered and e.vector is Vector.NMI and early is not None and early not in out:
                out.append(early)
        return tuple(out)

    def guarded_links(self, chain) -> tuple[Precondition, ...]:
        if not self._guarded:
            return ()
        out = []
        for link in chain:
            try:
                p = self._guarded.get(self.image.parse_location(link.at))
            except Exception:  # noqa: BLE001 - a site outside the image is not guarded code
                p = None
            if p is not None and p not in out:
                out.append(p)
        return tuple(out)

    def early_iret(self, e: Iret) -> Precondition | None:
        """An IRET to the next instruction (it only unmasks NMIs): the build option that
        compiled it in, from the tree's source when at hand."""
        if not 0 < e.frame.rip - e.pc <= 2:
            return None
        got = self._early.get(e.pc, False)
        if got is False:
            site = self.image.symbolize(e.pc)
            option = self.guards.get(site.partition("+")[0])
            if option:
                got = Precondition(Reach.BUILD, "config", f"a kernel built with {option}=y (its IRET to itself at "
                                   f"{site} unmasks NMIs early, and an NMI arrives then)")
            else:
                got = Precondition(Reach.UNPRIVILEGED, "early-iret", f"the IRET to itself at {site}, which "
                                   "unmasks NMIs early (built in by an option? the source was not at hand)")
            self._early[e.pc] = got
        return got

    # ---- findings ---------------------------------------------------------------------------
    def add(self, out: list[Finding], where: Where, roots: RootCauses, violations: list[Violation],
            chain: tuple[Injection, ...], pcs, pcs_start: int, steps: dict, local: tuple,
            pre: tuple[Precondition, ...], options: tuple = ()) -> None:
        """Findings of a path's violations, appended to ``out``; with an ist-reentered delivery
        on the path, those from that delivery on are its symptoms and fold under it."""
        guarded = self.guarded_links(chain)
        if guarded:
            options = options + tuple(p for p in guarded if p not in options)
        cut = roots.cut()
        if cut is not None:
            at = {id(t[3]): t[2] for t in local}
        for v in violations:
            if cut is not None and at.get(id(v), cut) >= cut:
                roots.folds(v.invariant)
                continue
            trace = self.trace_window(pcs, steps[id(v)] - pcs_start)
            out.append(Finding(v.invariant, where.scenario, where.features, where.effects, chain,
                               self.image.symbolize(v.pc), v.message, trace, pre + options))

    def shown_before(self, out: list[Finding], where: Where, roots: RootCauses, violations: list[Violation],
                     chain: tuple[Injection, ...], local: tuple) -> bool:
        """Whether ``add`` would fold each of these violations, or append it after a finding in
        ``out`` with its key and a chain no longer: the merge keeps the first finding of a key
        (or a shorter one), so such a finding's trace is never shown."""
        cut = roots.cut()
        at = {id(t[3]): t[2] for t in local} if cut is not None else {}
        keys = self._shown               # (the list it is of, how much of it is read, key -> shortest chain)
        if keys is None or keys[0] is not out:
            keys = self._shown = [out, 0, {}]
        for f in out[keys[1]:]:
            k = f.key()
            keys[2][k] = min(keys[2].get(k, len(f.injections)), len(f.injections))
        keys[1] = len(out)
        for v in violations:
            if cut is not None and at.get(id(v), cut) >= cut:
                continue
            k = finding_key(v.invariant, where.scenario, self.image.symbolize(v.pc), chain)
            if keys[2].get(k, len(chain) + 1) > len(chain):
                return False
        return True

    def reentry(self, where: Where, r: Reentry, pre: tuple[Precondition, ...]) -> Finding:
        """The finding of an ist-reentered root cause, with the symptoms folded under it."""
        return Finding("ist-reentered", where.scenario, where.features, where.effects, r.chain,
                       self.image.symbolize(r.pc), r.message, r.trace, pre + self.guarded_links(r.chain),
                       tuple(sorted(r.folded)))

    def trace_window(self, pcs, upto: int) -> tuple[str, ...]:
        n = self.window
        upto = max(0, min(len(pcs), upto))
        return tuple(self.line(a) for a in pcs[max(0, upto - n):upto])

    def line(self, addr: int) -> str:
        got = self._disasm.get(addr)
        if got is None:
            got = self._disasm[addr] = f"{self.image.symbolize(addr)}: {self.image.instruction_text(addr)}"
        return got


__all__ = ["Findings", "Where"]
