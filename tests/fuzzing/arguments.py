"""Argument vectors: commands with positional arguments and options, plausible or hostile.

The hard rule: a generated vector never builds or downloads a kernel (a ``debian:X.Y``
target is rewritten), never runs the demo for real, and a check or diff that can really run
on an object stays small (see ``_safe``).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .case import Case, rng
from .files import _inside, _is_file

if TYPE_CHECKING:
    from .workspace import Workspace

# A debian:X.Y target downloads and builds a kernel: no generated vector may name one.
_REAL_DEBIAN = re.compile(r"debian:\d+\.\d+(\+debug)?")


class ArgumentVectors:
    """Argument vectors, each made from its seed alone (given the workspace)."""

    def __init__(self, ws: "Workspace") -> None:
        from entrycheck.explore.scenarios import SCENARIOS
        from entrycheck.props.invariants import INVARIANTS

        self.ws = ws
        self.scenario_names = list(SCENARIOS)
        self.invariant_names = list(INVARIANTS)

    def _paths(self) -> list[str]:
        ws = self.ws
        f = ws.fixed
        return [str(ws.demo), str(ws.demo_objects[2]), str(ws.seeds_dir / "tiny_entry.o"),
                str(ws.seeds_dir / "no_entry_text.o"), str(f / "text.txt"), str(f / "junk.bin"), str(f / "empty"),
                str(f / "empty-dir"), str(f / "dir"), str(f / "elf-magic.o"), str(f / "unicode-ünï.o"),
                str(f / "space name.o"), str(f / "dangling"), str(f / "loop"), str(f / "findings-0.json"),
                str(f / "nested.json"), str(f / "json-array.json"), str(ws.root), "../fixed/text.txt",
                "../seeds/" + ws.demo.name, str(f / "missing.o"), str(f / "text.txt") + "/x", "."]

    def _hostile(self, rnd: random.Random, files: bool = True) -> str:
        pool = ["", "-", " ", "0", "-1", "99999999999", "inf", "nan", "1e309", "all", "none", "ünïcødé",
                "\u202eevil", "😀", "\udcff\udcfe", "x" * 5000, "/", "/proc/self/mem", "/dev/null",
                "/nonexistent/x", "~nosuch/x.o", "--", "-x", "a\nb", "a\r\nb", ",", ",,", "@", "#", "+", ":",
                "%s%n", "{}", "..", "~", "debian:", "debian:x", "debian:6", "debian:6.1.", "debian:../6.1",
                "debian:6.1 ", "debian: 6.1", "debian:6.x", "debian:+debug", "\t", "'", '"', "\\", "*", "?",
                "-1e9", "0x10", "1_000", "٣", "１", "True", "null", "[]", "\x7f", "\x1b[31mred"]
        value = rnd.choice(pool + (self._paths() if files else []))
        if rnd.random() < 0.1:
            value = value + rnd.choice(["", ",", "+debug", ":0", "/", "\n"]) + rnd.choice(pool)
        return value

    def _value(self, rnd: random.Random, kind: str) -> str:
        """A value for an option of this kind: plausible, or (often) hostile."""
        if rnd.random() < 0.35:
            return self._hostile(rnd, files=kind not in ("output", "keep"))
        sc, inv = self.scenario_names, self.invariant_names
        feats = ["pti", "pcid", "fsgsbase", "kernel_ibrs", "smap", "x86_feature_pti", "PTI", "xenpv", "bogus",
                 "none", "all"]
        if kind == "features":
            return rnd.choice(["pti", "pti,pcid", "none", "all", "pcid", "fsgsbase,kernel_ibrs", "pti,,pcid",
                               ",".join(rnd.sample(feats, rnd.randint(1, 4))), "pti,none", "all,pti"])
        if kind == "scenarios":
            return rnd.choice(["all", ",".join(rnd.sample(sc, rnd.randint(1, 3))), "syscall", "syscall,",
                               "syscall,bogus", rnd.choice(sc) + "-x", ",".join(sc)])
        if kind == "scenario":
            return rnd.choice(sc + ["bogus", "all", "syscall,syscall-iret", "SYSCALL"])
        if kind == "vectors":
            vs = ["nmi", "mc", "db", "df", "vc", "irq", "pf", "bogus", "NMI", ""]
            return ",".join(rnd.choice(vs) for _ in range(rnd.randint(1, 4)))
        if kind == "depth":
            return rnd.choice(["0", "1", "2", "3", "4", "5", "-1", "1.5", "00", "+1", " 1"])
        if kind == "db":
            return rnd.choice(["watchable", "anywhere", "Watchable", "any", "watch"])
        if kind == "effects":
            es = ["invalidate-user-asid", "switch-kernel-asid", "bogus", "", "INVALIDATE-USER-ASID"]
            return ",".join(rnd.choice(es) for _ in range(rnd.randint(1, 3)))
        if kind == "max-runs":
            return rnd.choice(["1", "2", "10", "1000", "0", "-5", "1e3", "999999999999999999999"])
        if kind == "workers":
            return rnd.choice(["1", "2", "64", "65", "0", "-1", "one", "1.0"])
        if kind == "scheduler":
            return rnd.choice(["x", "tcp://", "tcp://[::1", "inproc://nope", "::::", "tls://", "ucx://:",
                               "tcp://:abc", "http://", "tcp://host:port", "tcp://a:99999999", "://"])
        if kind == "dir":
            return rnd.choice([str(self.ws.fixed / "empty-dir"), str(self.ws.fixed / "dir"), "/", str(self.ws.root),
                               str(self.ws.fixed / "missing-dir"), str(self.ws.fixed / "text.txt"), ".", "~nosuch"])
        if kind == "output":
            return rnd.choice(["out.json", "out.html", "-", "sub/out.json", "missing-dir/out.json", "out dir.json",
                               ".hidden.json", "ünï.json", str(self.ws.run / "abs.json"), "x" * 300 + ".json",
                               str(self.ws.fixed / "empty-dir"), "/dev/null", "/proc/self/mem", "out.json/",
                               str(self.ws.fixed / "text.txt") + "/x.json"])
        if kind == "keep":
            return rnd.choice(["kept", "kept/sub", str(self.ws.fixed / "text.txt"), "/", "-"])
        if kind == "explain":
            return rnd.choice(inv + ["bogus", "redundant-write", inv[0].upper()])
        if kind == "class":
            return rnd.choice(inv + ["redundant-write", "bogus"])
        if kind == "format":
            return rnd.choice(["text", "mail", "html", "MAIL"])
        if kind == "file":
            return rnd.choice(self._paths())
        if kind == "json-file":
            return rnd.choice([str(self.ws.fixed / "findings-0.json"), str(self.ws.fixed / "findings-2.json"),
                               str(self.ws.fixed / "nested.json"), str(self.ws.fixed / "json-array.json"),
                               str(self.ws.fixed / "text.txt"), str(self.ws.fixed / "empty"), "/dev/null"])
        if kind == "finding":
            path = rnd.choice([str(self.ws.fixed / "findings-0.json"), str(self.ws.fixed / "findings-2.json"),
                               str(self.ws.fixed / "text.txt"), str(self.ws.fixed / "nested.json")])
            return path + rnd.choice(["", ":0", ":1", ":5", ":99999999999999999999", ":", ":-1", ":x"])
        if kind == "inject":
            vec = rnd.choice(["nmi", "mc", "db", "df", "vc", "irq", "bogus", ""])
            sym = rnd.choice(["entry_SYSCALL_64", "paranoid_exit", "asm_exc_nmi", "sync_regs", "nosuch", "",
                              "cpu_tss_rw", "exc_nmi", "do_syscall_64"])
            off = rnd.choice(["", "+0", "+1", "+0x3", "+0x1d", "+0xffffffffffffffffffff", "-1", "+-0x1", "+x",
                              "+99999999999999999999"])
            hit = rnd.choice(["", "", "#1", "#2", "#0", "#-1", "#99999999999999999999", "#x", "#"])
            return f"{vec}@{sym}{off}{hit}" if rnd.random() < 0.9 else f"{vec}{sym}{off}{hit}"
        if kind == "cost":
            parts = []
            for _ in range(rnd.randint(1, 4)):
                key = rnd.choice(["cr3", "cr3_flush", "wrmsr", "bogus", "", "CR3"])
                val = rnd.choice(["200", "0", "-1", "1e309", "nan", "inf", "x", "", "1.5", "99999999999999999999"])
                parts.append(rnd.choice([f"{key}={val}", key, f"{key}=", f"={val}", f"{key}={val}={val}"]))
            return ",".join(parts)
        if kind == "rate":
            return rnd.choice(["0", "1000", "1e9", "1e10", "-1", "inf", "nan", "1e309", "-0", "1e-320", "x"])
        if kind == "patch":
            return rnd.choice([str(self.ws.patch_file), str(self.ws.fixed / "text.txt"), str(self.ws.fixed / "empty"),
                               str(self.ws.fixed / "empty-dir"), str(self.ws.fixed / "junk.bin"), "-",
                               str(self.ws.fixed / "missing.patch")])
        return self._hostile(rnd)

    EXPLORE = {"--features": "features", "--scenarios": "scenarios", "--vectors": "vectors", "--depth": "depth",
               "--db": "db", "--mc-nesting": None, "--handler-effects": "effects", "--no-prune": None,
               "--unfold": None, "--max-runs": "max-runs", "--workers": "workers", "--scheduler": "scheduler",
               "--tree": "dir"}
    DIFF = {"--cost": "cost", "--nmi-rate": "rate", "--json": "output", "--html": "output",
            "--baseline": "json-file"}
    COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, str | None]]] = {
        "check": (("target",), {**EXPLORE, "--json": "output", "--html": "output", "--explain": "explain",
                                "--baseline": "json-file", "--format": "format", "--class": "class"}),
        "trace": (("target",), {"--scenario": "scenario", "--features": "features", "--inject": "inject",
                                "--handler-effects": "effects", "--finding": "finding", "--tree": "dir",
                                "--json": "output"}),
        "disasm": (("target", "symbol"), {"--features": "features", "--tree": "dir", "--intel": None,
                                          "--json": "output"}),
        "diff": (("target", "target"), {**EXPLORE, **DIFF}),
        "review": (("target",), {"--patch": "patch", **EXPLORE, **DIFF}),
        "scenarios": ((), {}),
        "demo": ((), {"--json": "output", "--workers": "workers", "--keep": "keep"}),
    }
    OUTPUT_OPTIONS = ("--json", "--html", "--keep")

    def _positional(self, rnd: random.Random, what: str) -> str:
        if what == "symbol":
            return rnd.choice(["entry_SYSCALL_64", "paranoid_exit", "asm_exc_nmi", "cpu_tss_rw", "do_syscall_64",
                               "nosuch", "tiny_entry", "VARIANT", "", "entry_SYSCALL_64+0x3", "0xffffffff81000000"]
                              if rnd.random() < 0.7 else [self._hostile(rnd)])
        if rnd.random() < 0.55:
            return rnd.choice([str(self.ws.demo), str(self.ws.demo), str(self.ws.demo_objects[3]),
                               str(self.ws.seeds_dir / "tiny_entry.o"), "../seeds/" + self.ws.demo.name])
        return self._hostile(rnd)

    def case(self, seed: int) -> Case:
        rnd = rng("args", seed)
        command = rnd.choices(list(self.COMMANDS) + ["(none)"], weights=[30, 20, 15, 12, 10, 3, 5, 5])[0]
        if command == "(none)":
            argv = rnd.choice([[], ["--version"], ["--help"], ["bogus"], ["-h"], [self._hostile(rnd)],
                               ["--debugx"], ["check", "--help"], ["", "check"], ["--", "check"]])
            return Case("args", seed, argv, note="top level")
        positionals, options = self.COMMANDS[command]
        pos = [self._positional(rnd, p) for p in positionals]
        roll = rnd.random()
        if roll < 0.05 and pos:
            pos = pos[:-1]                                          # one missing
        elif roll < 0.10:
            pos.append(self._hostile(rnd))                          # one too many
        pairs: list[tuple[str, str | None]] = []
        for _ in range(rnd.choice([0, 1, 2, 2, 3, 3, 4, 5, 7])):
            if not options:
                break
            name = rnd.choice(list(options))
            kind = options[name]
            pairs.append((name, None if kind is None else self._value(rnd, kind)))
        if rnd.random() < 0.05:
            pairs.append((rnd.choice(["--bogus", "-x", "--feature", "--json=", "--depth=1=2", "---"]), None))
        if command == "review" and not any(n == "--patch" for n, _ in pairs) and rnd.random() < 0.85:
            pairs.append(("--patch", self._value(rnd, "patch")))
        pairs, tail = self._safe(rnd, command, pos, pairs)
        argv = [command]
        items: list[list[str]] = [[p] for p in pos]
        for name, value in pairs:
            if value is None:
                items.append([name])
            elif rnd.random() < 0.1 and not name.startswith("--json="):
                items.append([f"{name}={value}"])
            else:
                items.append([name, value])
        if rnd.random() < 0.5:
            rnd.shuffle(items)
        else:                                                        # options first, then positionals
            items = items[len(pos):] + items[:len(pos)]
        for item in items:
            argv.extend(item)
        argv.extend(tail)                          # last: an option given twice takes its last value
        if rnd.random() < 0.03 and options:
            argv.append(rnd.choice([n for n, k in options.items() if k is not None] or ["--json"]))   # no value
        if rnd.random() < 0.03:
            argv.insert(rnd.randrange(1, len(argv) + 1), rnd.choice(["--help", "-h"]))
        argv = ["debian:x" if _REAL_DEBIAN.fullmatch(token) else token for token in argv]
        outputs = tuple(v for n, v in pairs if n in self.OUTPUT_OPTIONS and v not in (None, "-", ""))
        return Case("args", seed, argv, outputs=outputs)

    def _valid_object(self, value: str) -> bool:
        path = Path(value) if Path(value).is_absolute() else self.ws.run / value
        return value.endswith(".o") and _is_file(path) and _inside(path, self.ws.root) and \
            path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 64

    def _safe(self, rnd: random.Random, command: str, pos: list[str], pairs: list[tuple[str, str | None]]
              ) -> tuple[list[tuple[str, str | None]], list[str]]:
        """Keep every generated vector small: no kernel is ever built, the demo never runs, and a
        check that could really run on an object stays at depth 0 (or 1 on one scenario) with
        one worker.  Returns the pairs and the tokens that must come last in the vector (click
        takes the last value of an option given twice, and converts only that one)."""
        if command == "demo":
            return pairs, rnd.choice([["--workers", rnd.choice(["0", "65", "-1", "x", "", "1.5"])], ["--bogus"],
                                      ["--help"]])
        if command in ("check", "diff") and pos and all(self._valid_object(p) for p in pos):
            if rnd.random() < 0.8:
                return pairs, ["--depth", "0", "--workers", "1"]
            pairs = [(n, v) for n, v in pairs if n not in ("--features", "--scenarios")]
            return pairs, ["--depth", "1", "--features", "pti", "--scenarios", "syscall", "--workers", "1"]
        if command in ("check", "diff"):
            return pairs, ["--workers", "1"]
        return pairs, []
