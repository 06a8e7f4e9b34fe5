"""Fixes checked before a mail suggests them (report/mail.py makes them).

Each runs the check again on what a finding class or a redundant write needs (its feature sets
and scenarios) with the fix in place: a fix to a file the checks only read (hw_breakpoint.c's
within_cpu_entry()) by re-reading the patched file; a fix to code the image holds by building
the tree with the fix applied and comparing the two builds as ``review`` does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from entrycheck.explore.check import CheckConfig
from entrycheck.image.features import FeatureSet
from entrycheck.image.image import LoadedObject
from entrycheck.session import Diffed, Progress, default_workers, diff, object_ref, run_check


def _restricted(cfg: CheckConfig, paths) -> CheckConfig:
    """The check restricted to the feature sets and scenarios of ``paths`` ((scenario, feature
    set) pairs; a user-value variant counts as its scenario)."""
    sets = tuple(dict.fromkeys(FeatureSet.parse(fs) for _, fs in paths))
    return replace(cfg, feature_sets=sets, scenarios=tuple(dict.fromkeys(sc.partition("[")[0] for sc, _ in paths)),
                   configurations=tuple(c for c in cfg.configurations if c[0] in {str(s) for s in sets}))


def _of_findings(cfg: CheckConfig, findings: list) -> CheckConfig:
    return _restricted(cfg, [(f.scenario, f.features) for f in findings])


def _keys(loaded: LoadedObject) -> Callable[[object], str]:
    """A finding's address-free identity (explore/baseline.py), as a hashable string."""
    from entrycheck.explore.baseline import finding_key, keys_by_features

    keys_of = keys_by_features(loaded)
    return lambda f: repr(finding_key(keys_of(f), f))


def _with_patch(build, loaded: LoadedObject, cfg: CheckConfig, name: str, diff_text: str,
                workers: int | None, progress: Progress | None) -> Diffed:
    """``build``'s tree built with ``diff_text`` applied, both builds checked with ``cfg``."""
    from entrycheck.kernel.review import patched_build

    patched = patched_build(build, [(name, diff_text)], **({"progress": progress} if progress else {})).build
    return diff(build, loaded, patched, object_ref(patched).load(), cfg, workers=workers, progress=progress)


def verify_refusals(build, loaded: LoadedObject, cfg: CheckConfig, findings: list, patched: str, *,
                    workers: int | None = None) -> tuple[int, int, list]:
    """A within_cpu_entry() fix checked: the check run again, on the feature sets and scenarios
    of ``findings``, with the breakpoint refusals of ``patched`` (hw_breakpoint.c as the fix
    leaves it; the file is not compiled into the image, the checks read it).  (how many of
    ``findings`` are gone, how many there were, the findings the fixed run has that the
    original did not)."""
    from entrycheck.kernel.guards import parse_refusals

    small = _of_findings(cfg, findings)
    original = run_check(object_ref(build), small, workers=workers or default_workers())
    fixed = run_check(replace(object_ref(build), refusals=parse_refusals(patched)), small,
                      workers=workers or default_workers())
    key = _keys(loaded)
    after = {key(f) for f in fixed.findings}
    before = {key(f) for f in original.findings}
    gone = sum(1 for f in findings if key(f) not in after)
    return gone, len(findings), [f for f in fixed.findings if key(f) not in before]


def verify_patch(build, loaded: LoadedObject, cfg: CheckConfig, findings: list, name: str, diff_text: str, *,
                 workers: int | None = None, progress: Progress | None = None) -> tuple[int, int, list]:
    """A fix to code the image holds checked: the tree built with ``diff_text`` applied and
    both builds checked on the feature sets and scenarios of ``findings``, as ``review``
    does.  (how many of ``findings`` the fixed build no longer has, how many there were, the
    findings only the fixed build has)."""
    done = _with_patch(build, loaded, _of_findings(cfg, findings), name, diff_text, workers, progress)
    key = _keys(loaded)
    fixed = {key(f) for f in done.result.fixed_violations}
    return sum(1 for f in findings if key(f) in fixed), len(findings), list(done.result.new_violations)


def verify_redundant_fix(build, loaded: LoadedObject, cfg: CheckConfig, w, name: str, diff_text: str, *,
                         workers: int | None = None, progress: Progress | None = None) -> tuple[int, int, list]:
    """A fix of a redundant write checked: both builds checked on the write's paths (feature
    sets and scenarios); (the redundant writes of its register on the paths without injection
    before, after, the findings only the fixed build has)."""
    done = _with_patch(build, loaded, _restricted(cfg, w.paths), name, diff_text, workers, progress)
    msr = w.register != "CR3"

    def redundant(result) -> int:
        cost = result.cost()
        return cost.msr_redundant if msr else cost.cr3_redundant

    return redundant(done.old.result), redundant(done.new.result), list(done.result.new_violations)


__all__ = ["verify_refusals", "verify_patch", "verify_redundant_fix"]
