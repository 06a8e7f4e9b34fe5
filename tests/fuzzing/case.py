"""What a case is and what it must hold to: the cases, how one went, and the rules.

A case of the command line (Case) or of the patch layer (PatchCase) is made from its kind
and seed alone (``rng``); how it went is a CaseResult, whose ``problem`` says which rule it
broke (see the package's docstring), None when it held to them all.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
ERROR_PREFIX = "entrycheck: error: "
ALLOWED_EXIT = (0, 1, 2)
DEFAULT_TIMEOUT = 60.0
KINDS = ("elf", "args", "patch", "finding")


def rng(kind: str, seed: int) -> random.Random:
    """The random generator of a case: seeded with its kind and seed alone."""
    return random.Random(f"entrycheck-fuzz:{kind}:{seed}")


@dataclass
class Case:
    """One command line to run: its inputs (files written before it runs, removed after)
    and the output paths it names (allowed to remain when it succeeds)."""

    kind: str
    seed: int
    argv: list[str]
    files: dict[Path, bytes] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)
    outputs: tuple[str, ...] = ()
    note: str = ""


@dataclass
class PatchCase:
    kind: str
    seed: int
    patches: list[tuple[str, str]]
    note: str = ""


@dataclass
class CaseResult:
    """How one case went.  ``problem`` is None when the case held to the rules."""

    kind: str
    seed: int
    argv: tuple[str, ...]
    exit_code: int | None
    stderr: str
    seconds: float
    problem: str | None
    stdout: str = ""
    note: str = ""          # what the input was (the mutations made)
    where: str = ""         # the raising code of an internal error, when located

    def describe(self, limit: int = 1500) -> str:
        argv = " ".join(_shell_quote(a) for a in self.argv) if self.argv else "(patch layer)"
        lines = [f"[{self.kind} seed {self.seed}] {self.problem or 'ok'}; exit {self.exit_code}; "
                 f"{self.seconds:.2f} s"]
        if self.argv:
            lines.append(f"  argv: entrycheck {argv}")
        if self.note:
            lines.append(f"  input: {_clip(self.note, 400)}")
        if self.where:
            lines.append(f"  raised at: {self.where}")
        if self.stderr:
            lines.append("  stderr: " + _clip(self.stderr, limit).replace("\n", "\n          "))
        if self.problem and self.stdout and (self.exit_code not in ALLOWED_EXIT or TRACEBACK in self.stdout):
            lines.append("  stdout (end): " + _clip(self.stdout[-limit:], limit).replace("\n", "\n          "))
        return "\n".join(lines)


MARK = "ENTRYCHECK_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Processes whose environment has MARK=mark (a command started with it and every worker
    it forked), from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in env.split(b"\0"):
            out.append(int(name))
    return out


def problems(results: Iterable[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.problem]


def report(results: Iterable[CaseResult], limit: int = 20) -> str:
    """The failing cases, for an assertion message."""
    bad = problems(results)
    shown = "\n".join(r.describe() for r in bad[:limit])
    more = f"\n... and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} problem case(s):\n{shown}{more}"


def _clip(text: str, limit: int) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _shell_quote(arg: str) -> str:
    import shlex

    shown = arg if len(arg) <= 200 else arg[:60] + f"...<{len(arg)} chars>"
    return shlex.quote(shown)


def _one_line_error(stderr: str) -> bool:
    """Exactly one line (a final newline, no other newline or carriage return) that starts
    with the error prefix."""
    return (stderr.startswith(ERROR_PREFIX) and stderr.endswith("\n")
            and "\n" not in stderr[:-1] and "\r" not in stderr)


def signature(result: CaseResult) -> str:
    """What groups problem cases by cause: the problem, the raising place when known,
    and the error text with its numbers, paths and quoted values blanked out."""
    if result.problem and "carriage return" in result.problem:
        return f"{result.kind}: {result.problem}"           # one cause, whatever the message
    text = result.where or _first_error(result)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"(/[^\s:;,()]+)+", "PATH", text)
    text = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)
    return f"{result.kind}: {result.problem.split(':')[0] if result.problem else 'ok'}: {text[:240]}"


def _first_error(result: CaseResult) -> str:
    for stream in (result.stderr, result.stdout):
        for line in stream.splitlines():
            if "error" in line.lower() or "Error" in line:
                return line.strip()
    return (result.stderr or result.stdout).strip().splitlines()[-1:][0] if (result.stderr or result.stdout) \
        else ""
