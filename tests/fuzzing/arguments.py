"""Argument vectors: a command of the command line with positional arguments and options,
plausible or hostile, made from a seed alone.

The commands, their positional arguments and their options are click's own (commandline.py);
the values come from values.py.  The hard rule: a generated vector never builds or downloads
a kernel (a ``debian:X.Y`` target is rewritten, and no token names a kernel tree or build
directory), never runs the demo for real, and a check or diff that can really run on an
object stays small (see ``_safe``).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .case import Case, rng
from .commandline import CommandSpec, OptionSpec, command_specs, help_names, top_level_options
from .files import _inside, _is_dir, _is_file
from .values import Values

if TYPE_CHECKING:
    from .workspace import Workspace

# A debian:X.Y target downloads and builds a kernel: no generated vector may name one.
_REAL_DEBIAN = re.compile(r"debian:\d+\.\d+(\+debug)?")

# How often each command is made, against the top level alone ("(none)"); a command added
# later gets NEW_COMMAND.
WEIGHTS = {"check": 30, "trace": 20, "disasm": 15, "diff": 12, "review": 10, "scenarios": 3, "cpus": 3, "demo": 5,
           "(none)": 5}
NEW_COMMAND = 5

# An option and its values (None for a flag).
Pair = tuple[str, tuple[str, ...] | None]

# The exploring options that widen a run: dropped from a vector that runs at depth 1.
_WIDENING = ("features", "scenarios", "cpu", "spec-window")


class ArgumentVectors:
    """Argument vectors, each made from its seed alone (given the workspace)."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws = ws
        self.values = Values(ws)
        self.commands: dict[str, CommandSpec] = command_specs()
        self.top_level: tuple[OptionSpec, ...] = top_level_options()
        self.help = help_names()

    # ------------------------------------------------------------------ one vector

    def case(self, seed: int) -> Case:
        rnd = rng("args", seed)
        names = list(self.commands) + ["(none)"]
        command = rnd.choices(names, weights=[WEIGHTS.get(n, NEW_COMMAND) for n in names])[0]
        if command == "(none)":
            return Case("args", seed, self._top_level(rnd), note="top level")
        spec = self.commands[command]
        pos = self._positionals(rnd, spec)
        pairs: list[Pair] = []
        for _ in range(rnd.choice([0, 1, 2, 2, 3, 3, 4, 5, 7])):
            if not spec.options:
                break
            pairs.append(self._pair(rnd, rnd.choice(spec.options)))
        if rnd.random() < 0.05:
            pairs.append((rnd.choice(["--bogus", "-x", "--feature", "--json=", "--depth=1=2", "---"]), None))
        for opt in spec.options:                       # a required option, most of the time
            if opt.required and not any(n in opt.names for n, _ in pairs) and rnd.random() < 0.85:
                pairs.append(self._pair(rnd, opt, opt.names[0]))
        pairs, tail = self._safe(rnd, spec, pos, pairs)
        argv = [command]
        items: list[list[str]] = [[p] for p in pos]
        for name, values in pairs:
            if values is None:
                items.append([name])
            elif rnd.random() < 0.1 and len(values) == 1:
                items.append([f"{name}={values[0]}"])
            else:
                items.append([name, *values])
        if rnd.random() < 0.5:
            rnd.shuffle(items)
        else:                                                        # options first, then positionals
            items = items[len(pos):] + items[:len(pos)]
        for item in items:
            argv.extend(item)
        argv.extend(tail)                          # last: an option given twice takes its last value
        if rnd.random() < 0.03 and spec.options:
            argv.append(rnd.choice([n for o in spec.options if o.kind is not None for n in o.names] or ["--json"]))
        if rnd.random() < 0.03:
            argv.insert(rnd.randrange(1, len(argv) + 1), rnd.choice(self.help))
        argv = [self._harmless(token) for token in argv]
        writes = {n for o in spec.options if o.output for n in o.names}
        outputs = tuple(v[0] for n, v in pairs if n in writes and v and v[0] not in ("-", ""))
        return Case("args", seed, argv, outputs=outputs)

    def _top_level(self, rnd: random.Random) -> list[str]:
        """The group alone: its own options (but --debug), help, no command, a bad one."""
        own = [[n, *([] if o.kind is None else [self.values.of(rnd, o)])] for o in self.top_level for n in o.names]
        return rnd.choice([[], [rnd.choice(self.help)], ["bogus"], [self.values.hostile(rnd)], ["--debugx"],
                           ["check", "--help"], ["", "check"], ["--", "check"]] + own)

    def _pair(self, rnd: random.Random, opt: OptionSpec, name: str | None = None) -> Pair:
        """An option and its values (None for a flag; one value but for an option of nargs > 1)."""
        name = name or rnd.choice(opt.names)
        if opt.kind is None:
            return name, None
        return name, tuple(self.values.of(rnd, opt) for _ in range(opt.nargs))

    def _positionals(self, rnd: random.Random, spec: CommandSpec) -> list[str]:
        pos = []
        for arg in spec.arguments:
            count = rnd.randint(0, 3) if arg.nargs < 0 else arg.nargs
            pos += [self._positional(rnd, arg.kind) for _ in range(count)]
        roll = rnd.random()
        if roll < 0.05 and pos:
            pos = pos[:-1]                                          # one missing
        elif roll < 0.10:
            pos.append(self.values.hostile(rnd))                    # one too many
        return pos

    def _positional(self, rnd: random.Random, kind: str) -> str:
        if kind == "symbol":
            return rnd.choice(["entry_SYSCALL_64", "paranoid_exit", "asm_exc_nmi", "cpu_tss_rw", "do_syscall_64",
                               "nosuch", "tiny_entry", "VARIANT", "", "entry_SYSCALL_64+0x3", "0xffffffff81000000"]
                              if rnd.random() < 0.7 else [self.values.hostile(rnd)])
        if kind == "target" and rnd.random() < 0.55:
            ws = self.ws
            return rnd.choice([str(ws.demo), str(ws.demo), str(ws.demo_objects[3]),
                               str(ws.seeds_dir / "tiny_entry.o"), "../seeds/" + ws.demo.name])
        return self.values.hostile(rnd)

    # ------------------------------------------------------------------ the hard rule

    def _valid_object(self, value: str) -> bool:
        path = Path(value) if Path(value).is_absolute() else self.ws.run / value
        return value.endswith(".o") and _is_file(path) and _inside(path, self.ws.root) and \
            path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 64

    def _safe(self, rnd: random.Random, spec: CommandSpec, pos: list[str], pairs: list[Pair]
              ) -> tuple[list[Pair], list[str]]:
        """Keep every generated vector small: the demo never runs, and a check that could really run
        on an object stays at depth 0 (or 1 on one scenario and one feature set) with one worker,
        and keeps only the options the kinds table knows (one it does not know only with a value
        click refuses).  Returns the pairs and the tokens that must come last in the vector (click
        takes the last value of an option given twice, and converts only that one)."""
        command = spec.name
        if command == "demo":
            return pairs, rnd.choice([["--workers", rnd.choice(["0", "65", "-1", "x", "", "1.5"])], ["--bogus"],
                                      [rnd.choice(self.help)]])
        if command in ("check", "diff") and pos and all(self._valid_object(p) for p in pos):
            pairs = [(n, v) for n, v in pairs if self._may_run(spec, n, v)]
            if rnd.random() < 0.8:
                return pairs, ["--depth", "0", "--workers", "1"]
            pairs = [(n, v) for n, v in pairs if (spec.option(n) is None or spec.option(n).kind not in _WIDENING)]
            return pairs, ["--depth", "1", "--features", "pti", "--scenarios", "syscall", "--workers", "1"]
        if command in ("check", "diff"):
            return pairs, ["--workers", "1"]
        return pairs, []

    @staticmethod
    def _may_run(spec: CommandSpec, name: str, values: tuple[str, ...] | None) -> bool:
        """Whether a vector that really runs keeps this option: one the kinds table knows, or not
        an option of the command (a usage error), or a value click refuses (the same)."""
        opt = spec.option(name.split("=", 1)[0])
        if opt is None or opt.known:
            return True
        return values is not None and any(opt.rejects(v) for v in values)

    def _harmless(self, token: str) -> str:
        """The token, unless it would have a kernel built: a debian:X.Y target, or a directory
        that is a kernel source tree or build directory (a TARGET, --tree, a name=value)."""
        if _REAL_DEBIAN.fullmatch(token):
            return "debian:x"
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if _kernel_tree(value, self.ws.run) or _kernel_tree(value.removesuffix("+debug"), self.ws.run):
            return token[:len(token) - len(value)] + str(self.ws.fixed / "empty-dir")
        return token


def _kernel_tree(value: str, cwd: Path) -> bool:
    """Whether ``value`` names a directory a build could start from: a Makefile with the entry
    code next to it, or a .config (an O= build directory)."""
    if not value or "\0" in value:
        return False
    try:
        path = Path(os.path.join(cwd, os.path.expanduser(value)))
        return _is_dir(path) and ((_is_file(path / "Makefile") and _is_file(path / "arch/x86/entry/entry_64.S"))
                                  or _is_file(path / ".config"))
    except (OSError, ValueError, RuntimeError):
        return False

