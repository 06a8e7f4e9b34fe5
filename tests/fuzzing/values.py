"""Values for the argument fuzzer: plausible or hostile, of the kinds the domain knows (features,
scenarios, injections, output paths, ...) or derived from an option's click type."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .commandline import OptionSpec

if TYPE_CHECKING:
    from .workspace import Workspace


class Values:
    """Values for options and positional arguments, given the workspace (whose files they name)."""

    def __init__(self, ws: "Workspace") -> None:
        from entrycheck.explore.scenarios import SCENARIOS
        from entrycheck.image.cpus import PRESETS
        from entrycheck.props.invariants import INVARIANTS

        self.ws = ws
        self.scenario_names = list(SCENARIOS)
        self.invariant_names = list(INVARIANTS)
        self.cpu_names = list(PRESETS)

    def paths(self) -> list[str]:
        ws = self.ws
        f = ws.fixed
        return [str(ws.demo), str(ws.demo_objects[2]), str(ws.seeds_dir / "tiny_entry.o"),
                str(ws.seeds_dir / "no_entry_text.o"), str(f / "text.txt"), str(f / "junk.bin"), str(f / "empty"),
                str(f / "empty-dir"), str(f / "dir"), str(f / "elf-magic.o"), str(f / "unicode-ünï.o"),
                str(f / "space name.o"), str(f / "dangling"), str(f / "loop"), str(f / "findings-0.json"),
                str(f / "nested.json"), str(f / "json-array.json"), str(ws.root), "../fixed/text.txt",
                "../seeds/" + ws.demo.name, str(f / "missing.o"), str(f / "text.txt") + "/x", "."]

    def hostile(self, rnd: random.Random, files: bool = True) -> str:
        pool = ["", "-", " ", "0", "-1", "99999999999", "inf", "nan", "1e309", "all", "none", "ünïcødé",
                "\u202eevil", "😀", "\udcff\udcfe", "x" * 5000, "/", "/proc/self/mem", "/dev/null",
                "/nonexistent/x", "~nosuch/x.o", "--", "-x", "a\nb", "a\r\nb", ",", ",,", "@", "#", "+", ":",
                "%s%n", "{}", "..", "~", "debian:", "debian:x", "debian:6", "debian:6.1.", "debian:../6.1",
                "debian:6.1 ", "debian: 6.1", "debian:6.x", "debian:+debug", "\t", "'", '"', "\\", "*", "?",
                "-1e9", "0x10", "1_000", "٣", "１", "True", "null", "[]", "\x7f", "\x1b[31mred"]
        value = rnd.choice(pool + (self.paths() if files else []))
        if rnd.random() < 0.1:
            value = value + rnd.choice(["", ",", "+debug", ":0", "/", "\n"]) + rnd.choice(pool)
        return value

    def of_kind(self, rnd: random.Random, kind: str) -> str:
        """A value of this kind: plausible, or (often) hostile."""
        if rnd.random() < 0.35:
            return self.hostile(rnd, files=kind not in ("output", "keep"))
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
            return rnd.choice(self.paths())
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
        if kind == "cpu":
            names = self.cpu_names
            one = rnd.choice(names)
            return rnd.choice([one, one, ",".join(rnd.sample(names, rnd.randint(2, len(names)))), ",".join(names),
                               one.upper(), f" {one} ", one + ",", ",", one[:-1], one + "x", f"{one},,bogus",
                               f"{one},{one}", "zen5", "icelake", "intel", "amd", "all", "none", "default"])
        if kind == "spec-window":
            return rnd.choice(["0", "1", "2", "16", "64", "512", "4096", "4097", "-1", "x", "1.5", "1e3", "0x10",
                               "99999999999999999999"])
        if kind == "user-depth":
            return rnd.choice(["0", "1", "2", "3", "4", "5", "-1", "x", "1.5", "00"])
        if kind == "config":
            return rnd.choice(["defconfig", "distro", "defconfig", "distro", "Defconfig", "DISTRO", "distro ",
                               "def", "allnoconfig", "tinyconfig", "defconfig,distro", ".config"])
        if kind == "kconfig":
            return rnd.choice(["X86_FRED=y", "X86_FRED=n", "DEBUG_ENTRY=y", "DEBUG_ENTRY=n",
                               "CONFIG_MITIGATION_PAGE_TABLE_ISOLATION=n", "IA32_EMULATION=m", "HZ=250",
                               'CMDLINE="quiet"', "NR_CPUS=0x40", " X86_FRED=y ",
                               "X86_FRED", "=y", "X86_FRED=", "x86_fred=y", "X86 FRED=y", "X86_FRED=y=n",
                               "X86_FRED=maybe", "X86_FRED=y,DEBUG_ENTRY=n", "X86_FRED=y\nDEBUG_ENTRY=n",
                               'CMDLINE="unterminated', "CMDLINE=$(shell true)", "CONFIG_=y", "1X=y", "X=-",
                               "X=" + "9" * 400, "X" * 300 + "=y", "ÜNÏ=y"])
        return self.hostile(rnd)

    # ------------------------------------------------------------------ from the click type

    def of(self, rnd: random.Random, spec: OptionSpec) -> str:
        """A value for this option: of its kind when the kinds table names one, else from its type."""
        if spec.kind == "choice":
            return self._choice(rnd, spec)
        if spec.kind in ("int", "float"):
            return self._number(rnd, spec)
        if spec.kind == "path":
            return self.of_kind(rnd, "file")
        if spec.kind in (None, "text"):
            return self.hostile(rnd)
        return self.of_kind(rnd, spec.kind)

    def _choice(self, rnd: random.Random, spec: OptionSpec) -> str:
        """One of the choices, or a near miss: another case, one letter short or long, padded, a list."""
        if rnd.random() < 0.35 or not spec.choices:
            return self.hostile(rnd)
        c = rnd.choice(spec.choices)
        return rnd.choice([c, c, c, c.upper(), c.capitalize(), c[:-1], c + "x", f" {c}", c + ",",
                           ",".join(spec.choices), c.replace("-", "_")])

    def _number(self, rnd: random.Random, spec: OptionSpec) -> str:
        """The range's bounds, just outside them, or junk."""
        if rnd.random() < 0.35:
            return self.hostile(rnd)
        integer = spec.kind == "int"
        near: list[float] = []
        for bound in (spec.low, spec.high):
            if bound is not None:
                near += [bound, bound - 1, bound + 1] if integer else [bound, bound - 1, bound + 1, bound * 2]
        if not near:
            near = [0, 1, -1, 2 ** 31, 2 ** 64]
        junk = ["x", "", "1.5" if integer else "1,5", "nan", "inf", "-inf", "1e309", "99999999999999999999",
                " 1", "+1", "0x10", "-0", "1_0", "٣"]
        return str(rnd.choice(near)) if rnd.random() < 0.7 else rnd.choice(junk)
