"""Compare two builds path by path: `entrycheck diff` and `entrycheck review`.

Both builds run the same scenarios, feature sets and injections.  Paths are
matched by scenario + injection chain, each injection site mapped from the old
build to the new one by symbol and instruction: the instructions of each symbol
are aligned (difflib) on their text with addresses replaced by names, so an
instruction keeps its identity when code around it moves.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections import Counter
from dataclasses import dataclass, field

from array import array
from typing import Iterator

from entrycheck.explore.check import CheckResult
from entrycheck.explore.paths import Cost, Finding, PathResult, PathTable
from entrycheck.explore.scenarios import base_name
from entrycheck.machine.events import Injection
from entrycheck.image.image import CODE_SECTIONS, Image

_HEXADDR = re.compile(r"0x[0-9a-f]{6,16}")


class SiteMap:
    """old sym+off -> new sym+off for the instructions the two builds share."""

    def __init__(self, old: Image, new: Image) -> None:
        self.old, self.new = old, new
        self._map: dict[int, int] = {}
        self._kept: dict[str, list[int]] = {}     # symbol -> its instructions in the old build
        self._replaced: tuple[set[int], set[int]] = (set(), set())   # mapped, but another instruction: old, new
        self._sites: dict[str, str | None] = {}
        old_syms, new_syms = _code_symbols(old), _code_symbols(new)
        old_secs, new_secs = _unnamed_code(old), _unnamed_code(new)
        pairs = [(name, _listing(old, name, old_syms[name]), _listing(new, name, new_syms[name]))
                 for name in sorted(set(old_syms) & set(new_syms))]
        # Code no symbol names (the C's .altinstr_aux, static_cpu_has's slow path) is matched as a
        # whole section, or each of its instructions would be "changed" and its paths unmatched.
        pairs += [(sec, _section_listing(old, *old_secs[sec]), _section_listing(new, *new_secs[sec]))
                  for sec in sorted(set(old_secs) & set(new_secs))]
        for name, a, b in pairs:
            sm = difflib.SequenceMatcher(None, [t for _, t in a], [t for _, t in b], autojunk=False)
            for tag, i1, i2, j1, j2 in sm.get_opcodes():
                if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                    for k in range(i2 - i1):
                        self._map.setdefault(a[i1 + k][0], b[j1 + k][0])
                        if tag == "replace":        # the same place, another instruction
                            self._replaced[0].add(a[i1 + k][0])
                            self._replaced[1].add(b[j1 + k][0])
            self._kept[name] = [addr for addr, _ in a]

    def site(self, at: str) -> str | None:
        """The new build's name of the old build's site ``at`` (None: it has none); asked once
        per distinct site (a diff asks it for every CR3 write of every matched path)."""
        if at not in self._sites:
            self._sites[at] = self._site(at)
        return self._sites[at]

    def _site(self, at: str) -> str | None:
        try:
            addr = self.old.parse_location(at)
        except Exception:  # noqa: BLE001 - an unknown site simply has no counterpart
            return None
        got = self._map.get(addr)
        if got is not None:
            return self.new.symbolize(got)
        if self.old.code_section(addr) is None:
            # Not entry code (a C function, model data, the interrupted kernel code, user
            # space): the same name or address stands for the same thing in both builds.
            if at.strip().lower().startswith("0x"):
                return at.strip()
            name, _, off = at.partition("+")
            try:
                return self.new.symbolize(self.new.address_of(name) + (int(off, 0) if off else 0))
            except Exception:  # noqa: BLE001
                return None
        return None

    def violation_site(self, at: str) -> str | None:
        """Where a violation the old build had at ``at`` shows in the new one: its site, or,
        when the new build dropped that instruction, the next one it kept in the same symbol
        (RESTORE_CR3's `bt` before the `btr` gone, the `btr` is where the per-cpu access
        now happens).  Injection sites never move this way."""
        got = self.site(at)
        if got is not None:
            return got
        try:
            addr = self.old.parse_location(at)
        except Exception:  # noqa: BLE001
            return None
        kept = self._kept.get(self.old.symbolize(addr).partition("+")[0], [])
        for a in kept[bisect.bisect_left(kept, addr):]:
            if a in self._map:
                return self.new.symbolize(self._map[a])
        return None

    def unshared(self) -> tuple[list[int], list[int]]:
        """The code instructions of the old image with no counterpart in the new, and the other
        way round: what a change of the source changed (padding and .byte filler left out)."""
        mapped_new = set(self._map.values())
        out = ([], [])
        for image, mapped, replaced, found in ((self.old, self._map, self._replaced[0], out[0]),
                                               (self.new, mapped_new, self._replaced[1], out[1])):
            for ins in image.instructions:
                if (ins.address not in mapped or ins.address in replaced) and \
                        ins.mnemonic not in ("int3", ".byte") and not ins.mnemonic.startswith("nop"):
                    found.append(ins.address)
        return out

    def link(self, link: Injection) -> Injection | None:
        site = self.site(link.at)
        return Injection(link.vector, site, link.hit) if site else None


def _code_symbols(image: Image) -> dict[str, int]:
    out = {}
    for name, addr in image.loaded.symbols.items():
        sec = image.code_section(addr)
        if sec is not None and sec.name in CODE_SECTIONS:
            out[name] = addr
    return out


def _unnamed_code(image: Image) -> dict[str, tuple[int, int]]:
    """The code sections that run and hold no symbol: name -> [start, end)."""
    addrs = sorted(image.loaded.symbols.values())
    out = {}
    for s in image.loaded.sections:
        if s.name in image.loaded.code_sections and s.size:
            k = bisect.bisect_left(addrs, s.address)
            if k == len(addrs) or addrs[k] >= s.address + s.size:
                out[s.name] = (s.address, s.address + s.size)
    return out


def _listing(image: Image, name: str, start: int) -> list[tuple[int, str]]:
    """The instructions of the code symbol ``name`` at ``start`` (its definition: a function the
    model stubs is called elsewhere), each with its text made address-free."""
    size = image.loaded.symbol_sizes.get(name, 0)
    return _section_listing(image, start, start + size if size else image.symbol_range(name)[1])


def _section_listing(image: Image, start: int, end: int) -> list[tuple[int, str]]:
    out = []
    for ins in image.instructions.sweep(start, end):
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
    features: object                          # FeatureSet
    effects: tuple[str, ...]
    injections: tuple[Injection, ...]         # as in the old build
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
        return _sites_change(self.old.cr3_trace, self.new.cr3_trace, sites)


def _sites_change(old_trace, new_trace, sites: SiteMap) -> tuple[tuple[str, ...], tuple[str, ...]]:
    old = Counter(sites.site(s) or f"{s} (old)" for s, _, _ in old_trace)
    new = Counter(s for s, _, _ in new_trace)
    return tuple(sorted((old - new).elements())), tuple(sorted((new - old).elements()))


@dataclass
class ChangeGroup:
    """Changed paths that changed the same way."""

    signature: tuple
    description: str
    count: int = 0
    feature_sets: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = ()
    example: PathDiff | None = None            # the one with the shortest chain


Pair = tuple[PathTable, int, PathTable, int]


@dataclass
class DiffResult:
    old: CheckResult
    new: CheckResult
    sites: SiteMap
    pairs: list[tuple[PathTable, PathTable, array, array]] = field(default_factory=list)   # matched rows
    unmatched: list[tuple[str, PathTable, int]] = field(default_factory=list)   # (side, table, row)
    new_violations: list[Finding] = field(default_factory=list)
    fixed_violations: list[Finding] = field(default_factory=list)
    groups: list[ChangeGroup] = field(default_factory=list)
    new_violation_cells: set[tuple[str, str]] = field(default_factory=set)   # (scenario, features)
    matched_count: int = 0
    changed_count: int = 0
    matched_cells: Counter = field(default_factory=Counter)   # (scenario, features) -> matched paths
    changed_cells: Counter = field(default_factory=Counter)
    summary: list[dict] = field(default_factory=list)
    base: list[PathDiff] = field(default_factory=list)        # matched paths without injection
    _changed: dict = field(default_factory=dict)

    @property
    def only_old_count(self) -> int:
        return sum(1 for side, _, _ in self.unmatched if side == "old")

    @property
    def only_new_count(self) -> int:
        return len(self.unmatched) - self.only_old_count

    @property
    def only_old(self) -> list[PathResult]:
        return [t.row(r) for side, t, r in self.unmatched if side == "old"]

    @property
    def only_new(self) -> list[PathResult]:
        return [t.row(r) for side, t, r in self.unmatched if side == "new"]

    def pair(self, ot: PathTable, orow: int, nt: PathTable, nrow: int) -> PathDiff:
        return PathDiff(ot.scenario, ot.features, ot.effects, ot.chain(orow), ot.row(orow), nt.row(nrow))

    @property
    def matched(self) -> Iterator[PathDiff]:
        for ot, nt, orows, nrows in self.pairs:
            for a, b in zip(orows, nrows):
                yield self.pair(ot, a, nt, b)

    def listed(self) -> list[tuple[PathDiff, bool, int]]:
        """The matched paths without injection and the changed ones, by class: paths of one
        scenario, feature set and effects, injected or not, whose cost counts, outcomes and verdict
        are the same, as (the first of them in exploration order, changed, how many); one pass over
        the pairs (a review at defaults changes a quarter of a million paths of a few thousand
        classes)."""
        classes: dict[tuple, list] = {}
        for ot, nt, orows, nrows in self.pairs:
            cache = self._changed[(id(ot), id(nt))]
            keys: dict[tuple, tuple | None] = {}
            for a, b in zip(orows, nrows):
                injected = ot.link[a] >= 0
                pk = (injected, _pair_key(ot, a, nt, b))
                if pk in keys:
                    got = keys[pk]
                else:
                    changed, behaviour = cache[pk[1]][:2]          # every pair was judged (_summarise)
                    got = None
                    if changed or not injected:
                        got = (ot.scenario, ot.features, ot.effects, injected, ot.costs[ot.cost[a]].counts(),
                               ot.outcomes[ot.outcome[a]], nt.costs[nt.cost[b]].counts(),
                               nt.outcomes[nt.outcome[b]], behaviour, changed)
                    keys[pk] = got
                if got is None:
                    continue
                c = classes.get(got)
                if c is None:
                    classes[got] = [self.pair(ot, a, nt, b), got[-1], 1]
                else:
                    c[2] += 1
        return [(d, changed, n) for d, changed, n in classes.values()]

    def changed(self) -> Iterator[PathDiff]:
        for ot, nt, orows, nrows in self.pairs:
            cache = self._changed.get((id(ot), id(nt)), {})
            for a, b in zip(orows, nrows):
                if cache.get(_pair_key(ot, a, nt, b), (False,))[0]:
                    yield self.pair(ot, a, nt, b)

    def unmatched_groups(self) -> list[tuple[str, str, int]]:
        """(side, symbol, paths): paths injecting at instructions that have no counterpart in
        the other build, grouped by the symbol holding the first such instruction."""
        out: Counter = Counter()
        back = set(self.sites._map.values())
        for side, table, row in self.unmatched:
            chain = table.chain(row)
            sym = None
            for link in chain:
                missing = self.sites.link(link) is None if side == "old" else \
                    self.sites.new.parse_location(link.at) not in back
                if missing:
                    sym = link.at.split("+")[0]
                    break
            if sym is None:
                first = chain[0].at.split("+")[0] if chain else "(no injection)"
                sym = f"{first} (in both builds, but the other's path runs it fewer times or not at all)"
            out[(side, sym)] += 1
        return sorted(((side, sym, n) for (side, sym), n in out.items()), key=lambda t: (t[0], -t[2], t[1]))


def _pair_key(ot: PathTable, a: int, nt: PathTable, b: int) -> tuple:
    return (ot.cost[a], nt.cost[b], ot.cr3[a], nt.cr3[b], ot.end[a], nt.end[b], ot.outcome[a], nt.outcome[b])


def _match(old: CheckResult, new: CheckResult, sites: SiteMap, result: DiffResult) -> None:
    """Pair every old path with the new path of the same scenario, feature set, effects and
    (mapped) injection chain, walking each table's parent links."""
    new_units: dict[tuple, list[PathTable]] = {}
    for table, _, _ in new.segments:
        units = new_units.setdefault((table.scenario, table.features, table.effects), [])
        if not any(t is table for t in units):
            units.append(table)
    index: dict[tuple, dict[int, tuple[int, int]]] = {}
    link_ids: dict[tuple, dict[Injection, int]] = {}
    for key, tables in new_units.items():
        ids: dict[Injection, int] = {}
        idx: dict[int, tuple[int, int]] = {}
        for ti, t in enumerate(tables):
            local = [ids.setdefault(link, len(ids) + 1) for link in t.links]
            for r in range(len(t)):
                li, p = t.link[r], t.parent[r]
                lid = local[li] if li >= 0 else 0
                idx[_code(ti, p, lid) if p >= 0 else _code(-1, -1, lid)] = (ti, r)
        index[key], link_ids[key] = idx, ids
    new_matched = {id(t): bytearray(len(t)) for ts in new_units.values() for t in ts}
    map_cache: dict[Injection, Injection | None] = {}
    old_seen: set[int] = set()
    for ot, a, b in old.segments:
        key = (ot.scenario, ot.features, ot.effects)
        tables = new_units.get(key, [])
        idx, ids = index.get(key, {}), link_ids.get(key, {})
        if id(ot) not in old_seen:
            # Once per table, not per segment: a table has one segment per boundary group,
            # and mapping all its links again for each made the match quadratic.
            old_seen.add(id(ot))
            mapped = []
            for link in ot.links:
                if link not in map_cache:
                    map_cache[link] = sites.link(link)
                m = map_cache[link]
                mapped.append(ids.get(m, -1) if m is not None else -1)
            ot._match = (array("i", [-1]) * len(ot), array("i", [-1]) * len(ot), mapped)
        mt, mr, mapped = ot._match
        per_table: dict[int, tuple[array, array]] = {}
        for r in range(a, b):
            li, p = ot.link[r], ot.parent[r]
            lid = mapped[li] if li >= 0 else 0
            hit = None
            if lid >= 0:
                if p < 0:
                    hit = idx.get(_code(-1, -1, lid))
                elif mt[p] >= 0:
                    hit = idx.get(_code(mt[p], mr[p], lid))
            if hit is None:
                result.unmatched.append(("old", ot, r))
                continue
            ti, nr = hit
            mt[r], mr[r] = ti, nr
            new_matched[id(tables[ti])][nr] = 1
            rows = per_table.get(ti)
            if rows is None:
                rows = per_table[ti] = (array("i"), array("i"))
            rows[0].append(r)
            rows[1].append(nr)
        for ti, (orows, nrows) in per_table.items():
            result.pairs.append((ot, tables[ti], orows, nrows))
    for nt, a, b in new.segments:
        flags = new_matched.get(id(nt))
        for r in range(a, b):
            if flags is None or not flags[r]:
                result.unmatched.append(("new", nt, r))
    for ot, _, _ in old.segments:
        ot.__dict__.pop("_match", None)


def _code(table: int, row: int, link: int) -> int:
    return (((table + 1) << 28) | (row + 1)) << 24 | link


def diff_results(old: CheckResult, new: CheckResult, sites: SiteMap) -> DiffResult:
    result = DiffResult(old, new, sites)
    _match(old, new, sites, result)

    def mapped_key(f: Finding) -> tuple:
        site = sites.violation_site(f.site) or f"{f.site} (old)"
        return (f.invariant, f.scenario, f.features, site, tuple(i.vector for i in f.injections))

    def new_key(f: Finding) -> tuple:
        return (f.invariant, f.scenario, f.features, f.site, tuple(i.vector for i in f.injections))

    old_keys = {mapped_key(f) for f in old.findings}
    new_keys = {new_key(f) for f in new.findings}
    result.new_violations = [f for f in new.findings if new_key(f) not in old_keys]
    result.fixed_violations = [f for f in old.findings if mapped_key(f) not in new_keys]
    old_raw = {mapped_key(f) for f in old.raw_findings}
    result.new_violation_cells = {(base_name(f.scenario), str(f.features)) for f in new.raw_findings
                                  if new_key(f) not in old_raw}
    _summarise(result)
    return result


def _summarise(result: DiffResult) -> None:
    """Counts per cell, the change groups and the per-scenario sums, one pass over the pairs
    (what a pair is decided once per distinct combination of costs, traces and ends)."""
    sites = result.sites
    by_sig: dict[tuple, dict] = {}
    summary: dict[tuple, dict] = {}
    tables: dict[int, PathTable] = {}
    for ot, nt, orows, nrows in result.pairs:
        tables[id(ot)], tables[id(nt)] = ot, nt
        cache = result._changed.setdefault((id(ot), id(nt)), {})
        cell = (base_name(ot.scenario), str(ot.features))       # a user-value variant counts in its scenario
        acc = summary.setdefault((ot.scenario, ot.features, ot.effects),
                                 {"paths": 0, "changed": 0, "behaviour_changed": 0, "old": Counter(),
                                  "new": Counter()})
        result.matched_count += len(orows)
        result.matched_cells[cell] += len(orows)
        acc["paths"] += len(orows)
        for a, b in zip(orows, nrows):
            k = _pair_key(ot, a, nt, b)
            verdict = cache.get(k)
            if verdict is None:
                verdict = cache[k] = _judge(ot, a, nt, b, sites)
            changed, behaviour, cost_changed, sig, values_differ = verdict
            acc["old"][(id(ot), ot.cost[a])] += 1
            acc["new"][(id(nt), nt.cost[b])] += 1
            if ot.link[a] < 0:
                result.base.append(result.pair(ot, a, nt, b))
            if cost_changed or behaviour:
                acc["changed"] += 1
            acc["behaviour_changed"] += behaviour
            if not changed:
                continue
            result.changed_count += 1
            result.changed_cells[cell] += 1
            g = by_sig.get(sig)
            if g is None:
                g = by_sig[sig] = {"count": 0, "fs": set(), "sc": set(), "values": False, "best": None}
            g["count"] += 1
            g["fs"].add(str(ot.features))
            g["sc"].add(ot.scenario)
            g["values"] = g["values"] or values_differ
            rank = (_depth(ot, a), ot.scenario, str(ot.features))
            if g["best"] is None or rank < g["best"][0]:
                g["best"] = (rank, ot, a, nt, b)
    # Signatures that read the same (e.g. NOFLUSH with PCID, flushing without) form one group.
    groups: dict[str, ChangeGroup] = {}
    best: dict[str, tuple] = {}
    for sig, g in by_sig.items():
        text = describe(sig, g["values"])
        group = groups.get(text)
        if group is None:
            group = groups[text] = ChangeGroup(sig, text)
        group.count += g["count"]
        group.feature_sets = tuple(sorted(set(group.feature_sets) | g["fs"]))
        group.scenarios = tuple(sorted(set(group.scenarios) | g["sc"]))
        if text not in best or g["best"][0] < best[text][0]:
            best[text] = g["best"]
    for text, group in groups.items():
        _, ot, a, nt, b = best[text]
        group.example = result.pair(ot, a, nt, b)
    result.groups = sorted(groups.values(), key=lambda g: (-g.count, g.description))
    for (sc, fs, eff), acc in summary.items():
        sums = {}
        for side in ("old", "new"):
            total = Cost()
            for (tid, cid), n in sorted(acc[side].items(), key=lambda t: (t[0][1], t[1])):
                total = total + tables[tid].costs[cid].times(n)
            sums[side] = total
        result.summary.append({"scenario": sc, "features": str(fs), "effects": list(eff), "paths": acc["paths"],
                               "changed": acc["changed"], "behaviour_changed": acc["behaviour_changed"],
                               "old": sums["old"], "new": sums["new"]})


def _depth(table: PathTable, row: int) -> int:
    n = 0
    while row >= 0 and table.link[row] >= 0:
        n += 1
        row = table.parent[row]
    return n


def _judge(ot: PathTable, a: int, nt: PathTable, b: int, sites: SiteMap) -> tuple:
    """(changed, behaviour changed, cost changed, signature, CR3 values differ) of a pair."""
    oc, nc = ot.costs[ot.cost[a]], nt.costs[nt.cost[b]]
    ocr, ncr = ot.cr3s[ot.cr3[a]], nt.cr3s[nt.cr3[b]]
    oout, nout = ot.outcomes[ot.outcome[a]], nt.outcomes[nt.outcome[b]]
    behaviour = ot.ends[ot.end[a]] != nt.ends[nt.end[b]] or oout != nout
    cost_changed = oc.to_json() != nc.to_json()
    trace_changed = [(sites.site(s), v, n) for s, v, n in ocr] != list(ncr)
    gone, added = _sites_change(ocr, ncr, sites)
    sig = (_delta(oc, nc), gone, added, behaviour, oout, nout)
    values_differ = tuple(v for _, v, _ in ocr) != tuple(v for _, v, _ in ncr)
    return cost_changed or behaviour or trace_changed, behaviour, cost_changed, sig, values_differ


def _delta(old: Cost, new: Cost) -> tuple:
    return tuple(getattr(new, f) - getattr(old, f) for f in ("cr3_writes", "cr3_flushing", "cr3_noflush",
                                                             "cr3_redundant", "msr_writes", "swapgs", "exceptions"))


_LABELS = ("CR3 writes", "flushing", "NOFLUSH", "redundant", "MSR writes", "SWAPGS", "exceptions")


def describe(sig: tuple, values_differ: bool) -> str:
    """One line for a kind of change (``values_differ``: some path of this kind writes CR3
    with other values at the same places)."""
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
        if values_differ:
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
    """Per scenario and feature set: path counts and costs summed over matched paths."""
    return result.summary
