"""CPU feature names and numbers, as the kernel's alternatives use them.

Numbers come from the tree's arch/x86/include/asm/cpufeatures.h (``X86_FEATURE_PTI``
is ``( 7*32+11)``); a bare object without a tree uses a built-in table of the
features the model knows, whose numbers are the same in 6.1 and 6.12.  Feature
names are the lower-case macro names without the prefix (``pti``, ``kernel_ibrs``);
hardware bugs are ``bug_`` + name (``bug_swapgs_fence``).
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from entrycheck.errors import InputError

# The four features the model varies by default, in the order feature sets are listed.
MODEL_FEATURES: tuple[str, ...] = ("pti", "pcid", "fsgsbase", "kernel_ibrs")

# Numbers identical in the 6.1 and 6.12 cpufeatures.h (word*32 + bit).
_BUILTIN: dict[str, int] = {
    "always": 3 * 32 + 21,
    "pcid": 4 * 32 + 17,
    "pti": 7 * 32 + 11,
    "kernel_ibrs": 7 * 32 + 12,
    "rsb_vmexit": 7 * 32 + 13,
    "rsb_ctxsw": 7 * 32 + 19,
    "use_ibpb": 7 * 32 + 21,
    "fence_swapgs_user": 11 * 32 + 4,
    "fence_swapgs_kernel": 11 * 32 + 5,
    "xenpv": 8 * 32 + 16,
    "fsgsbase": 9 * 32 + 0,
    "smap": 9 * 32 + 20,
    "entry_ibpb": 11 * 32 + 10,
    "retpoline": 11 * 32 + 12,
    "rethunk": 11 * 32 + 14,
    "unret": 11 * 32 + 15,
    "srso": 11 * 32 + 24,
    "srso_alias": 11 * 32 + 25,
    "sev_es": 19 * 32 + 3,
    "clear_bhb_loop": 21 * 32 + 1,
    "bug_swapgs": 725,                 # X86_BUG(21): NCAPINTS * 32 + 21, the same in both
}

_DEFINE = re.compile(r"^\s*#\s*define\s+(X86_FEATURE_|X86_BUG_)(\w+)\s+(.+?)\s*(?:/\*.*)?$")
_NCAPINTS = re.compile(r"^\s*#\s*define\s+NCAPINTS\s+(\d+)")


BUILTIN_SOURCE = "built-in table"
# Features the presets and FRED use whose numbers 6.1 and 6.12 do not share: a bare object's
# built-in table lacks them, its tree's cpufeatures.h has them.
_TREE_ONLY = frozenset({"clear_cpu_buf", "fred"})


@dataclass(frozen=True)
class FeatureTable:
    numbers: Mapping[str, int]
    source: str            # "cpufeatures.h of <path>" or "built-in table"

    def number(self, name: str) -> int:
        try:
            return self.numbers[name]
        except KeyError:
            if self.source == BUILTIN_SOURCE and name in _TREE_ONLY:
                # The built-in table has only the numbers 6.1 and 6.12 share: the tree knows the rest.
                raise InputError(f"CPU feature {name!r} is not in the built-in table of a bare object: give "
                                 "--tree with the kernel source its cpufeatures.h comes from") from None
            close = sorted(n for n in self.numbers if n.startswith(name[:3]))[:8]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(f"unknown CPU feature {name!r} in {self.source}{hint}") from None

    def name_of(self, number: int) -> str:
        return self.names_by_number().get(number, f"feature({number // 32}*32+{number % 32})")

    def names_by_number(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for name, num in self.numbers.items():
            out.setdefault(num, name)
        return out


def builtin_table() -> FeatureTable:
    return FeatureTable(MappingProxyType(dict(_BUILTIN)), BUILTIN_SOURCE)


def parse_cpufeatures(text: str, source: str) -> FeatureTable:
    """Feature numbers from the text of a cpufeatures.h."""
    ncapints = None
    for line in text.splitlines():
        m = _NCAPINTS.match(line)
        if m:
            ncapints = int(m.group(1))
            break
    if ncapints is None:
        raise InputError(f"{source}: no NCAPINTS definition; is this arch/x86/include/asm/cpufeatures.h?")
    numbers: dict[str, int] = {}
    for line in text.splitlines():
        m = _DEFINE.match(line)
        if not m:
            continue
        prefix, name, expr = m.groups()
        if name == "":
            continue
        bug = prefix == "X86_BUG_"
        expr = expr.strip()
        if bug:
            call = re.fullmatch(r"X86_BUG\s*\((.+)\)", expr)
            if not call:
                continue  # e.g. the X86_BUG(x) macro itself
            value = _arith(call.group(1), ncapints)
            if value is None:
                continue
            numbers["bug_" + name.lower()] = ncapints * 32 + value
        else:
            value = _arith(expr, ncapints)
            if value is not None:
                numbers[name.lower()] = value
    if "pti" not in numbers:
        raise InputError(f"{source}: no X86_FEATURE_PTI; is this arch/x86/include/asm/cpufeatures.h?")
    return FeatureTable(MappingProxyType(numbers), source)


def load_cpufeatures(path: Path) -> FeatureTable:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read cpufeatures.h ({exc.strerror})") from exc
    return parse_cpufeatures(text, f"cpufeatures.h of {path}")


def _arith(expr: str, ncapints: int) -> int | None:
    """Evaluate the small integer expressions cpufeatures.h uses ('( 7*32+11)')."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id == "NCAPINTS":
            return ncapints
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = ev(n.left), ev(n.right)
            return left + right if isinstance(n.op, ast.Add) else left - right if isinstance(
                n.op, ast.Sub) else left * right
        raise ValueError(expr)

    try:
        return ev(node)
    except ValueError:
        return None


@dataclass(frozen=True, order=True)
class FeatureSet:
    """A set of CPU feature names, in a canonical order (model features first)."""

    names: tuple[str, ...]

    @staticmethod
    def of(names: Iterable[str]) -> "FeatureSet":
        uniq = set(n.strip().lower() for n in names if n.strip())
        order = {n: i for i, n in enumerate(MODEL_FEATURES)}
        return FeatureSet(tuple(sorted(uniq, key=lambda n: (order.get(n, len(order)), n))))

    @staticmethod
    def parse(text: "str | FeatureSet") -> "FeatureSet":
        """'pti,pcid' -> FeatureSet; 'none' or '' -> the empty set (a FeatureSet stays as it is)."""
        if isinstance(text, FeatureSet):
            return text
        text = text.strip()
        if text in ("", "none", "-"):
            return FeatureSet(())
        return FeatureSet.of(text.split(","))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __str__(self) -> str:
        return ",".join(self.names) if self.names else "none"

    def validate(self, table: FeatureTable) -> None:
        for name in self.names:
            table.number(name)


def all_model_feature_sets() -> tuple[FeatureSet, ...]:
    """Every combination of pti/pcid/fsgsbase/kernel_ibrs (16 sets), smallest first."""
    sets = []
    for r in range(len(MODEL_FEATURES) + 1):
        for combo in itertools.combinations(MODEL_FEATURES, r):
            sets.append(FeatureSet.of(combo))
    return tuple(sets)


def parse_feature_sets(specs: Iterable[str]) -> tuple[FeatureSet, ...]:
    """Feature sets from command-line values; each value may hold several sets split by ';'."""
    out: list[FeatureSet] = []
    for spec in specs:
        for part in spec.split(";"):
            if part.strip() == "all":
                out.extend(all_model_feature_sets())
            elif part.strip() or spec.strip() in ("", "none"):
                out.append(FeatureSet.parse(part))
    seen: dict[FeatureSet, None] = {}
    for fs in out:
        seen.setdefault(fs, None)
    return tuple(seen)
