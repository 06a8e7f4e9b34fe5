"""Known findings: a previous `check --json` as the baseline a tree's CI compares against.

A finding is known when the baseline has one with the same invariant, scenario, feature
set, handler effects and injection chain at the same sites.  Sites are compared as diff
maps them between builds — by the instruction, not by its address: the code symbol, the
instruction's text (branch targets and per-cpu operands by name) and which occurrence of
that text in the symbol it is.  So a finding survives an edit elsewhere that moves its
code, and one at a new place in the same function is new.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from entrycheck.errors import InputError
from entrycheck.explore.diff import _listing
from entrycheck.explore.paths import Finding
from entrycheck.image.image import Image


class SiteKeys:
    """sym+off -> the site's identity across builds, for one image."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self._by_symbol: dict[str, dict[int, tuple]] = {}

    def key(self, at: str) -> tuple:
        try:
            addr = self.image.parse_location(at)
        except Exception:  # noqa: BLE001 - not a location of this image: it stands for itself
            return (at,)
        if self.image.code_section(addr) is None:
            return (at,)        # a C function, the interrupted kernel code, user space
        name = self.image.symbolize(addr).partition("+")[0]
        table = self._by_symbol.get(name)
        if table is None:
            table, seen = {}, {}
            try:
                listing = _listing(self.image, name, self.image.loaded.symbols.get(name, addr))
            except Exception:  # noqa: BLE001 - a label without a range: the address is all there is
                listing = []
            for a, text in listing:
                n = seen[text] = seen.get(text, 0) + 1
                table[a] = (name, text, n)
            self._by_symbol[name] = table
        return table.get(addr, (at,))


def keys_by_features(loaded) -> Callable[[Finding], SiteKeys]:
    """The SiteKeys of a finding's image (one per feature set of ``loaded``)."""
    cache: dict = {}

    def keys_of(f: Finding) -> SiteKeys:
        got = cache.get(f.features)
        if got is None:
            got = cache[f.features] = SiteKeys(loaded.image(f.features))
        return got

    return keys_of


def finding_key(keys: SiteKeys, f: Finding) -> list:
    """A JSON-friendly identity of a finding that does not depend on addresses."""
    return [f.invariant, f.scenario, str(f.features), list(f.effects),
            [[i.vector.label, list(keys.key(i.at)), i.hit] for i in f.injections], list(keys.key(f.site))]


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def load(path: str) -> set:
    """The finding keys of a baseline file (a `check --json` document)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read the baseline {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the baseline {path} is not JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"the baseline {path} is not the JSON of entrycheck check (nested too deeply)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("violations"), list):
        raise InputError(f"the baseline {path} is not the JSON of entrycheck check (no 'violations' list)")
    keys = set()
    for v in doc["violations"]:
        key = v.get("match") if isinstance(v, dict) else None
        if not isinstance(key, list):
            raise InputError(f"the baseline {path} has a violation without its 'match' key (written by an older "
                             "entrycheck? run the check again with --json)")
        keys.add(_freeze(key))
    return keys


def split(findings: list[Finding], keys_of, known: set) -> tuple[list[Finding], list[Finding]]:
    """(new, known) findings; ``keys_of(f)`` gives the SiteKeys of a finding's image."""
    new, old = [], []
    for f in findings:
        (old if _freeze(finding_key(keys_of(f), f)) in known else new).append(f)
    return new, old


__all__ = ["SiteKeys", "keys_by_features", "finding_key", "load", "split"]
