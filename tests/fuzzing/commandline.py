"""The command line as click defines it: each command's positional arguments and options, and
the kind of value the argument fuzzer makes for each option.

Nothing here copies the command line: the commands, their arguments and their options are
read from ``entrycheck.cli.cli``.  What the fuzzer adds is knowledge of values: VALUE_KINDS
names, by option name, a kind of value that needs to know the domain (a feature list, an
injection, an output path, ...; values.py makes them).  An option the table does not name
takes values derived from its click type: a Choice its choices and near misses, an IntRange or
FloatRange its bounds, just outside them and junk, a flag no value, anything else hostile
strings (file names among them).  So an option added later is fuzzed as it is defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

# Option name -> the kind of value values.py makes for it; "flag" for a flag (no value) that a
# vector which really runs may keep.  An option not named here is known by its click type only.
VALUE_KINDS: dict[str, str] = {
    "--features": "features", "--cpu": "cpu", "--spec-window": "spec-window", "--scenarios": "scenarios",
    "--scenario": "scenario", "--vectors": "vectors", "--depth": "depth", "--user-depth": "user-depth",
    "--db": "db", "--handler-effects": "effects", "--max-runs": "max-runs", "--workers": "workers",
    "--scheduler": "scheduler", "--tree": "dir", "--config": "config", "--kconfig": "kconfig",
    "--json": "output", "--html": "output", "--keep": "keep", "--explain": "explain", "--baseline": "json-file",
    "--format": "format", "--class": "class", "--inject": "inject", "--finding": "finding", "--cost": "cost",
    "--nmi-rate": "rate", "--patch": "patch",
    "--mc-nesting": "flag", "--no-prune": "flag", "--unfold": "flag", "--user-values": "flag",
    "--no-user-values": "flag", "--intel": "flag",
}

# The kinds whose values name a file or directory the command writes (allowed to remain when it
# succeeds).
OUTPUT_KINDS = ("output", "keep")

# Never generated, and why: what the option does is not a fault of the command line.
EXCLUDED: dict[str, str] = {
    "--debug": "shows the traceback of every error on purpose",
}

# Positional argument name -> the kind of value (arguments.py); any other name: hostile strings.
POSITIONAL_KINDS: dict[str, str] = {"target": "target", "old": "target", "new": "target", "symbol": "symbol"}


@dataclass(frozen=True)
class OptionSpec:
    """One option of one command, as the fuzzer makes it."""

    names: tuple[str, ...]          # every spelling: --user-values and --no-user-values
    kind: str | None                # a VALUE_KINDS kind, else from the click type ("choice", "int",
    #                                 "float", "path", "text"); None for a flag
    known: bool                     # whether VALUE_KINDS names it
    required: bool = False
    nargs: int = 1
    output: bool = False            # its value names what the command writes
    choices: tuple[str, ...] = ()
    low: float | None = None        # the bounds of an IntRange or FloatRange
    high: float | None = None
    param: click.Option | None = field(default=None, compare=False, repr=False)

    def rejects(self, value: str) -> bool:
        """Whether click refuses ``value`` for this option (the command then stops before any work)."""
        if self.param is None:
            return True
        try:
            self.param.type.convert(value, self.param, None)
        except Exception:  # noqa: BLE001 - click.BadParameter, or a type that fails otherwise
            return True
        return False


@dataclass(frozen=True)
class ArgumentSpec:
    name: str
    kind: str                       # a POSITIONAL_KINDS kind, or "text"
    nargs: int = 1                  # -1: any number
    required: bool = True


@dataclass(frozen=True)
class CommandSpec:
    name: str
    arguments: tuple[ArgumentSpec, ...]
    options: tuple[OptionSpec, ...]

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if name in o.names), None)


def option_spec(param: click.Option) -> OptionSpec:
    names = tuple(param.opts) + tuple(param.secondary_opts)
    named = next((VALUE_KINDS[n] for n in names if n in VALUE_KINDS), None)
    common = {"names": names, "known": named is not None, "required": bool(param.required),
              "nargs": max(1, param.nargs), "param": param}
    if param.is_flag or param.count:
        return OptionSpec(kind=None, **common)
    if named is not None and named != "flag":
        return OptionSpec(kind=named, output=named in OUTPUT_KINDS, **common)
    t = param.type
    if isinstance(t, click.Choice):
        return OptionSpec(kind="choice", choices=tuple(str(getattr(c, "name", c)) for c in t.choices), **common)
    if isinstance(t, (click.IntRange, click.FloatRange)):
        return OptionSpec(kind="int" if isinstance(t, click.IntRange) else "float", low=t.min, high=t.max,
                          **common)
    if isinstance(t, (click.types.IntParamType, click.types.FloatParamType)):
        return OptionSpec(kind="int" if isinstance(t, click.types.IntParamType) else "float", **common)
    if isinstance(t, click.Path) and t.writable:           # what the command writes
        return OptionSpec(kind="keep" if not t.file_okay else "output", output=True, **common)
    if isinstance(t, click.File) and ("w" in t.mode or "a" in t.mode):
        return OptionSpec(kind="output", output=True, **common)
    if isinstance(t, (click.Path, click.File)):
        return OptionSpec(kind="path", **common)
    return OptionSpec(kind="text", **common)


def command_spec(name: str, command: click.Command) -> CommandSpec:
    arguments, options = [], []
    for param in command.params:
        if isinstance(param, click.Argument):
            arguments.append(ArgumentSpec(param.name, POSITIONAL_KINDS.get(param.name, "text"), param.nargs,
                                          bool(param.required)))
        elif isinstance(param, click.Option) and not any(n in EXCLUDED for n in param.opts):
            options.append(option_spec(param))
    return CommandSpec(name, tuple(arguments), tuple(options))


def cli_group() -> click.Group:
    from entrycheck.cli import cli

    return cli


def command_specs() -> dict[str, CommandSpec]:
    """Every command of the command line, by name (sorted: the registration order does not matter)."""
    cli = cli_group()
    return {name: command_spec(name, cli.commands[name]) for name in sorted(cli.commands)}


def top_level_options() -> tuple[OptionSpec, ...]:
    """The group's own options (--version, ...), but the excluded ones."""
    return tuple(option_spec(p) for p in cli_group().params
                 if isinstance(p, click.Option) and not any(n in EXCLUDED for n in p.opts))


def help_names() -> tuple[str, ...]:
    return tuple(cli_group().context_settings.get("help_option_names", ["--help"]))
