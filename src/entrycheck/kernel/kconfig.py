"""Which configuration a target is built with: ``--config defconfig|distro`` and ``--kconfig NAME=VALUE``.

A ``ConfigRequest`` names a base configuration and options on top of it.  The base is
``defconfig`` (``make defconfig``), ``distro`` (Debian's own amd64 config of the series,
from the package linux-config-X.Y), or, when not given, what the target has (a tree's own
.config, else defconfig).  The options are applied with the kernel's own
``scripts/config`` and ``make olddefconfig``; an option that olddefconfig does not keep
(unknown to this kernel, or its dependencies unmet) is an input error, so a build never
silently runs without what was asked for.

Which entry objects a configuration builds (``entry_objects``): entry_64.o always,
entry_64_compat.o with IA32_EMULATION, entry_64_fred.o with X86_FRED.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

BASES = ("defconfig", "distro")
_NAME = re.compile(r"[A-Z0-9_]+")
_VALUE = re.compile(r"[ynm]|-?(0x[0-9a-fA-F]+|[0-9]+)|\"[^\"\n]*\"")

ENTRY_OBJECTS: tuple[tuple[str, str | None], ...] = (
    ("arch/x86/entry/entry_64.o", None),
    ("arch/x86/entry/entry_64_compat.o", "IA32_EMULATION"),
    ("arch/x86/entry/entry_64_fred.o", "X86_FRED"),
)
"""Each entry object and the option that compiles it (None: always)."""

SHOWN = ("IA32_EMULATION", "X86_FRED", "AMD_MEM_ENCRYPT", "XEN_PV", "DEBUG_ENTRY",
         "MITIGATION_PAGE_TABLE_ISOLATION", "PAGE_TABLE_ISOLATION")
"""Options a report names when it states the configuration (those that change the entry code's paths)."""


@dataclass(frozen=True)
class ConfigRequest:
    """A base configuration (None: the target's own) and options set on top, sorted by name."""

    base: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def default(self) -> bool:
        return self.base is None and not self.options

    def describe(self) -> str:
        """'defconfig', 'distro config', 'distro config, X86_FRED=y DEBUG_ENTRY=n'."""
        base = {"defconfig": "defconfig", "distro": "distro config", None: "own config"}[self.base]
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{base}, {opts}" if opts else base

    def key(self) -> str:
        """A short digest naming this request in cache keys."""
        text = f"{self.base}\0" + "\0".join(f"{k}={v}" for k, v in self.options)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_request(config: str | None, kconfig: tuple[str, ...] | list[str] = ()) -> ConfigRequest:
    """The request of ``--config`` and the repeated ``--kconfig NAME=VALUE`` (later ones win)."""
    if config is not None and config not in BASES:
        raise InputError(f"--config {config!r}: choose defconfig or distro")
    options: dict[str, str] = {}
    for item in kconfig:
        name, eq, value = item.strip().partition("=")
        name = name.removeprefix("CONFIG_")
        if not eq or not _NAME.fullmatch(name):
            raise InputError(f"--kconfig {item!r}: expected NAME=VALUE, e.g. X86_FRED=y or DEBUG_ENTRY=n")
        if not _VALUE.fullmatch(value):
            raise InputError(f"--kconfig {item!r}: the value is y, n, m, a number or a \"string\"")
        options[name] = value
    return ConfigRequest(config, tuple(sorted(options.items())))


def read_config(path: Path) -> dict[str, str]:
    """NAME -> value of a .config (CONFIG_ stripped; 'n' for '# CONFIG_X is not set')."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line[len("CONFIG_"):].partition("=")
            out[name] = value
        else:
            match = re.fullmatch(r"# CONFIG_(\w+) is not set", line.strip())
            if match:
                out[match.group(1)] = "n"
    return out


def script_arguments(options: tuple[tuple[str, str], ...]) -> list[str]:
    """scripts/config arguments that set ``options``."""
    args: list[str] = []
    for name, value in options:
        if value == "y":
            args += ["--enable", name]
        elif value == "n":
            args += ["--disable", name]
        elif value == "m":
            args += ["--module", name]
        elif value.startswith('"'):
            args += ["--set-str", name, value[1:-1]]
        else:
            args += ["--set-val", name, value]
    return args


def unmet(options: tuple[tuple[str, str], ...], config: Path) -> list[str]:
    """The requested options the resulting .config does not have."""
    have = read_config(config)
    missing = []
    for name, value in options:
        got = have.get(name, "n")
        if got != value:
            missing.append(f"{name}={value} (the result has {name}={got})" if name in have
                           else f"{name}={value} (this kernel has no such option, or its dependencies are not met)")
    return missing


def entry_objects(config: Path) -> tuple[str, ...]:
    """The entry objects ``config`` builds, entry_64.o first."""
    have = read_config(config)
    return tuple(obj for obj, option in ENTRY_OBJECTS if option is None or have.get(option, "n") == "y")


def summary(config: Path | None) -> str:
    """The options of ``config`` that shape the entry code, e.g. 'IA32_EMULATION=y X86_FRED=n ...'."""
    if config is None or not config.is_file():
        return ""
    have = read_config(config)
    return " ".join(f"{name}={have[name]}" for name in SHOWN if name in have)
