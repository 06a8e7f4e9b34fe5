"""Compare two builds path by path: `entrycheck diff` and `entrycheck review`.

Both builds run the same scenarios, feature sets and injections.  Paths are
matched by scenario + injection chain, each injection site mapped from the old
build to the new one by symbol and instruction: the instructions of each symbol
are aligned (difflib) on their text with addresses replaced by names, so an
instruction keeps its identity when code around it moves.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from entrycheck.explore.check import CheckResult
from entrycheck.explore.paths import Cost, Finding, Injected, PathResult
from entrycheck.image.decode import sweep
from entrycheck.image.image import CODE_SECTIONS, Image

_HEXADDR = re.compile(r"0x[0-9a-f]{6,16}")


class SiteMap:
    """old sym+off -> new sym+off for the instructions the two builds share."""

    def __init__(self, old: Image, new: Image) -> None:
        self.old, self.new = old, new
        self._map: dict[int, int] = {}
        old_syms, new_syms = _code_symbols(old), _code_symbols(new)
        for name in sorted(set(old_syms) & set(new_syms)):
            a = _listing(old, name)
            b = _listing(new, name)
            sm = difflib.SequenceMatcher(None, [t for _, t in a], [t for _, t in b], autojunk=False)
            for tag, i1, i2, j1, j2 in sm.get_opcodes():
                if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                    for k in range(i2 - i1):
                        self._map.setdefault(a[i1 + k][0], b[j1 + k][0])

    def site(self, at: str) -> str | None:
        try:
            addr = self.old.parse_location(at)
        except Exception:  # noqa: BLE001 - an unknown site simply has no counterpart
            return None
        got = self._map.get(addr)
        if got is not None:
            return self.new.symbolize(got)
        if self.old.code_section(addr) is None:
            # Not entry code (a C function, model data, the interrupted kernel code):
            # the same name stands for the same thing in both builds.
            name, _, off = at.partition("+")
            try:
                return self.new.symbolize(self.new.address_of(name) + (int(off, 0) if off else 0))
            except Exception:  # noqa: BLE001
                return None
        return None

    def link(self, link: Injected) -> Injected | None:
        site = self.site(link.at)
        return Injected(link.vector, site, link.hit) if site else None


def _code_symbols(image: Image) -> dict[str, int]:
    out = {}
    for name, addr in image.loaded.symbols.items():
        sec = image.code_section(addr)
        if sec is not None and sec.name in CODE_SECTIONS:
            out[name] = addr
    return out


def _listing(image: Image, name: str) -> list[tuple[int, str]]:
    start, end = image.symbol_range(name)
    out = []
    for ins in sweep(image.read(start, end - start), start):
        text = f"{ins.mnemonic} {ins.op_str}"
        if ins.branch_target is not None:
            text = _HEXADDR.sub(image.symbolize(ins.branch_target), text)
        elif ins.gs and ins.rip_target is not None:
            text = re.sub(r"0x[0-9a-f]+\(%rip\)", image.symbolize_percpu(ins.rip_target), text)
        elif ins.rip_target is not None:
            text = re.sub(r"0x[0-9a-f]+\(%rip\)", image.symbolize(ins.rip_target), text)
        else:
            text = _HEXADDR.sub(lambda m: _name(image, int(m.group(0), 16)), text)
        out.append((ins.address, text))
    return out


def _name(image: Image, value: int) -> str:
    name = image.symbolize(value)
    return name if not name.startswith("0x") else hex(value)


@dataclass(frozen=True)
class PathDiff:
    scenario: str
    features: str
    effects: tuple[str, ...]
    injections: tuple[Injected, ...]          # as in the old build
    old: PathResult
    new: PathResult

    @property
    def cost_changed(self) -> bool:
        return self.old.cost.to_json() != self.new.cost.to_json()

    @property
    def behaviour_changed(self) -> bool:
        return self.old.end_state != self.new.end_state or self.old.outcome != self.new.outcome

    def cr3_sites_change(self, sites: SiteMap) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(CR3 write sites only in old (named as in the new build when mapped), only in new)."""
        old = Counter(sites.site(s) or f"{s} (old)" for s, _, _ in self.old.cr3_trace)
        new = Counter(s for s, _, _ in self.new.cr3_trace)
        return tuple(sorted((old - new).elements())), tuple(sorted((new - old).elements()))


@dataclass(frozen=True)
class ChangeGroup:
    """Changed paths that changed the same way."""

    signature: tuple
    description: str
    paths: tuple[PathDiff, ...]

    @property
    def feature_sets(self) -> tuple[str, ...]:
        return tuple(sorted({p.features for p in self.paths}))


@dataclass
class DiffResult:
    old: CheckResult
    new: CheckResult
    sites: SiteMap
    matched: list[PathDiff] = field(default_factory=list)
    only_old: list[PathResult] = field(default_factory=list)
    only_new: list[PathResult] = field(default_factory=list)
    new_violations: list[Finding] = field(default_factory=list)
    fixed_violations: list[Finding] = field(default_factory=list)
    groups: list[ChangeGroup] = field(default_factory=list)
    new_violation_cells: set[tuple[str, str]] = field(default_factory=set)   # (scenario, features)

    def unmatched_groups(self) -> list[tuple[str, str, int]]:
        """(side, symbol, paths): paths injecting at instructions that have no counterpart in
        the other build, grouped by the symbol holding the first such instruction."""
        out: Counter = Counter()
        back = set(self.sites._map.values())
        for side, paths in (("old", self.only_old), ("new", self.only_new)):
            for p in paths:
                sym = None
                for link in p.injections:
                    missing = self.sites.link(link) is None if side == "old" else \
                        self.sites.new.parse_location(link.at) not in back
                    if missing:
                        sym = link.at.split("+")[0]
                        break
                if sym is None:
                    first = p.injections[0].at.split("+")[0] if p.injections else "(no injection)"
                    sym = f"{first} (in both builds, but the other's path runs it fewer times or not at all)"
                out[(side, sym)] += 1
        return sorted(((side, sym, n) for (side, sym), n in out.items()), key=lambda t: (t[0], -t[2], t[1]))

    def changed(self) -> list[PathDiff]:
        return [d for d in self.matched if d.cost_changed or d.behaviour_changed or
                [(self.sites.site(s), v, n) for s, v, n in d.old.cr3_trace] != list(d.new.cr3_trace)]


def diff_results(old: CheckResult, new: CheckResult, sites: SiteMap) -> DiffResult:
    result = DiffResult(old, new, sites)
    new_paths = {(p.scenario, p.features, p.effects, p.injections): p for p in new.paths}
    used = set()
    for p in old.paths:
        mapped = tuple(sites.link(i) for i in p.injections)
        if any(m is None for m in mapped):
            result.only_old.append(p)
            continue
        key = (p.scenario, p.features, p.effects, mapped)
        q = new_paths.get(key)
        if q is None:
            result.only_old.append(p)
            continue
        used.add(key)
        result.matched.append(PathDiff(p.scenario, p.features, p.effects, p.injections, p, q))
    result.only_new = [q for k, q in new_paths.items() if k not in used]

    def mapped_key(f: Finding) -> tuple:
        site = sites.site(f.site) or f"{f.site} (old)"
        return (f.invariant, f.scenario, f.features, site, tuple(i.vector for i in f.injections))

    old_keys = {mapped_key(f) for f in old.findings}
    new_keys = {(f.invariant, f.scenario, f.features, f.site, tuple(i.vector for i in f.injections))
                for f in new.findings}
    result.new_violations = [f for f in new.findings if (f.invariant, f.scenario, f.features, f.site,
                                                         tuple(i.vector for i in f.injections)) not in old_keys]
    result.fixed_violations = [f for f in old.findings if mapped_key(f) not in new_keys]
    old_raw = {mapped_key(f) for f in old.raw_findings}
    result.new_violation_cells = {(f.scenario, f.features) for f in new.raw_findings
                                  if (f.invariant, f.scenario, f.features, f.site,
                                      tuple(i.vector for i in f.injections)) not in old_raw}
    result.groups = group_changes(result)
    return result


def _delta(old: Cost, new: Cost) -> tuple:
    return tuple(getattr(new, f) - getattr(old, f) for f in ("cr3_writes", "cr3_flushing", "cr3_noflush",
                                                             "cr3_redundant", "msr_writes", "swapgs", "exceptions"))


def group_changes(result: DiffResult) -> list[ChangeGroup]:
    groups: dict[tuple, list[PathDiff]] = defaultdict(list)
    for d in result.changed():
        gone, added = d.cr3_sites_change(result.sites)
        sig = (_delta(d.old.cost, d.new.cost), gone, added, d.behaviour_changed,
               d.old.outcome, d.new.outcome)
        groups[sig].append(d)
    # Signatures that read the same (e.g. NOFLUSH with PCID, flushing without) form one group.
    by_text: dict[str, list[PathDiff]] = defaultdict(list)
    sigs: dict[str, tuple] = {}
    for sig, paths in groups.items():
        text = describe(sig, paths)
        by_text[text].extend(paths)
        sigs.setdefault(text, sig)
    out = [ChangeGroup(sigs[text], text, tuple(paths)) for text, paths in by_text.items()]
    out.sort(key=lambda g: (-len(g.paths), g.description))
    return out


_LABELS = ("CR3 writes", "flushing", "NOFLUSH", "redundant", "MSR writes", "SWAPGS", "exceptions")


def describe(sig: tuple, paths: list[PathDiff]) -> str:
    delta, gone, added, behaviour, old_outcome, new_outcome = sig
    parts = []
    d = dict(zip(_LABELS, delta))
    if d["CR3 writes"] < 0 and d["redundant"] == d["CR3 writes"] and not added:
        parts.append(f"{-d['CR3 writes']} redundant CR3 write(s) gone at {', '.join(sorted(set(gone)))} "
                     "(the write left CR3 unchanged with nothing stale to flush)")
    elif gone or added:
        if gone:
            parts.append(f"CR3 written no more at {', '.join(sorted(set(gone)))}")
        if added:
            parts.append(f"CR3 newly written at {', '.join(sorted(set(added)))}")
    elif d["CR3 writes"] == 0 and any(d[k] for k in ("flushing", "NOFLUSH", "redundant")):
        parts.append("same CR3 writes, different kind (" + ", ".join(
            f"{k} {d[k]:+d}" for k in ("flushing", "NOFLUSH", "redundant") if d[k]) + ")")
    elif not any(delta[:4]) and not gone and not added:
        kinds = {tuple(v for _, v, _ in p.old.cr3_trace) != tuple(v for _, v, _ in p.new.cr3_trace)
                 for p in paths}
        if True in kinds:
            parts.append("CR3 written with different values at the same places")
    for label in ("MSR writes", "SWAPGS", "exceptions"):
        if d[label]:
            parts.append(f"{label} {d[label]:+d}")
    if old_outcome != new_outcome:
        parts.append(f"outcome {old_outcome} -> {new_outcome}")
    elif behaviour:
        parts.append("ends in a different state")
    return "; ".join(parts) or "same counts; the order or sites of privileged operations differ"


def scenario_summary(result: DiffResult) -> list[dict]:
    """Per scenario and feature set: path counts and CR3 writes summed over matched paths."""
    acc: dict[tuple, dict] = {}
    for d in result.matched:
        key = (d.scenario, d.features, d.effects)
        a = acc.setdefault(key, {"paths": 0, "changed": 0, "behaviour_changed": 0, "old": Cost(), "new": Cost()})
        a["paths"] += 1
        a["old"] = a["old"] + d.old.cost
        a["new"] = a["new"] + d.new.cost
        if d.cost_changed or d.behaviour_changed:
            a["changed"] += 1
        if d.behaviour_changed:
            a["behaviour_changed"] += 1
    return [{"scenario": k[0], "features": k[1], "effects": list(k[2]), **v} for k, v in acc.items()]
