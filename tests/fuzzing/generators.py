"""The four kinds of cases: mutated ELF objects, argument vectors, patch texts and --finding
files, each made from its seed alone (given the workspace)."""

from __future__ import annotations

import copy
import difflib
import json
import random

from .arguments import ArgumentVectors
from .case import Case, PatchCase, rng
from .elf import mutate_elf
from .mutations import _mutate_json, _mutate_json_text, _mutate_patch
from .workspace import ENTRY_FILES, PATCH_DATA, Workspace


class Generators:
    """The four kinds of cases, each made from its seed alone (given the workspace)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.arguments = ArgumentVectors(ws)

    def case(self, kind: str, seed: int) -> Case | PatchCase:
        return {"elf": self.elf, "args": self.args, "patch": self.patch, "finding": self.finding}[kind](seed)

    # ------------------------------------------------------------------ ELF mutants

    def elf(self, seed: int) -> Case:
        rnd = rng("elf", seed)
        seeds = self.ws.elf_seeds
        base = rnd.choices(seeds, weights=[s.weight for s in seeds])[0]
        data, notes, touched = mutate_elf(rnd, base)
        path = self.ws.inputs / f"elf-{seed}.o"
        functions = base.functions or ["entry_SYSCALL_64"]
        symbol = rnd.choice(["entry_SYSCALL_64"] * 3 + functions) if base.has_syscall else rnd.choice(functions)
        if touched and rnd.random() < 0.5:
            symbol = touched
        elif base.data_symbols and rnd.random() < 0.1:
            symbol = rnd.choice(base.data_symbols)
        roll = rnd.random()
        if base.has_syscall and roll < 0.30:
            argv = ["check", str(path), "--depth", "0", "--scenarios", "syscall", "--features", "pti",
                    "--workers", "1"]
        elif base.has_syscall and roll < 0.34:
            argv = ["check", str(path), "--depth", "1", "--scenarios", "syscall", "--features", "pti",
                    "--workers", "1"]
        elif base.has_syscall and roll < 0.42:
            argv = ["trace", str(path), "--scenario", "syscall", "--features", rnd.choice(["pti", "pti,pcid"])]
        elif roll < 0.65:
            argv = ["disasm", str(path), symbol, "--features", "pti,pcid"]
        else:
            argv = ["disasm", str(path), symbol]
        return Case("elf", seed, argv, files={path: data}, note=f"{base.name}: " + "; ".join(notes))

    # ------------------------------------------------------------------ argument vectors

    def args(self, seed: int) -> Case:
        return self.arguments.case(seed)

    # ------------------------------------------------------------------ patch texts

    def _base_patches(self, rnd: random.Random) -> tuple[str, str]:
        """(name, text) of a patch to start from: the archived one, or a diff made here."""
        ws = self.ws
        if rnd.random() < 0.4:
            return "x86-entry-paranoid-restore-cr3.archive.txt", \
                (PATCH_DATA / "x86-entry-paranoid-restore-cr3.archive.txt").read_text()
        name = rnd.choice(list(ENTRY_FILES) + ["arch/x86/entry/Makefile"])
        old = (ws.patch_src / name).read_text(errors="replace").splitlines(keepends=True)
        new = list(old)
        kind = rnd.random()
        if kind < 0.1:
            text = "".join(difflib.unified_diff([], ["/* new */\n", "int x;\n"], "/dev/null",
                                                "b/arch/x86/entry/new.h"))
            return "new-file.patch", "diff --git a/arch/x86/entry/new.h b/arch/x86/entry/new.h\n" \
                "new file mode 100644\nindex 0000000..1111111\n" + text
        if kind < 0.15 and name.endswith("Makefile"):
            text = "".join(difflib.unified_diff(old, [], "a/" + name, "/dev/null"))
            return "delete.patch", f"diff --git a/{name} b/{name}\ndeleted file mode 100644\n" + text
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(max(1, len(new)))
            op = rnd.random()
            if op < 0.4 and new:
                new[at] = "\t/* changed */ " + new[at]
            elif op < 0.7:
                new.insert(at, "\tnop\n")
            elif new:
                del new[at]
        diff = "".join(difflib.unified_diff(old, new, "a/" + name, "b/" + name, n=rnd.choice([0, 1, 3, 3, 5])))
        header = rnd.choice([f"diff --git a/{name} b/{name}\nindex 1234567..89abcde 100644\n",
                             "From 0000 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] x86/entry: test\n\n---\n"
                             f" {name} | 2 +-\n\ndiff --git a/{name} b/{name}\n", ""])
        return "generated.patch", header + diff

    def patch(self, seed: int) -> PatchCase:
        rnd = rng("patch", seed)
        name, text = self._base_patches(rnd)
        notes = [name]
        series = [(name, text)]
        for _ in range(rnd.choice([0, 1, 1, 2, 2, 3, 4])):
            k = rnd.randrange(len(series))
            sname, stext = series[k]
            stext, what = _mutate_patch(rnd, stext)
            series[k] = (sname, stext)
            notes.append(what)
        roll = rnd.random()
        if roll < 0.1:
            series.append(series[0])                     # the same patch twice: already applied
            notes.append("applied twice")
        elif roll < 0.2:
            series.append(self._base_patches(rnd))
            notes.append("then " + series[-1][0])
        if rnd.random() < 0.1:
            series = [(rnd.choice(["", "ünï.patch", "a b.patch", "x" * 300]), t) for _, t in series]
        return PatchCase("patch", seed, series, "; ".join(notes))

    # ------------------------------------------------------------------ --finding files

    def finding(self, seed: int) -> Case:
        rnd = rng("finding", seed)
        obj, base = rnd.choice(self.ws.findings)
        doc = copy.deepcopy(base)
        notes: list[str] = []
        for _ in range(rnd.choice([0, 1, 1, 2, 3])):
            notes.append(_mutate_json(rnd, doc))
        text = json.dumps(doc, indent=rnd.choice([None, 2]))
        data, how = _mutate_json_text(rnd, text)
        if how:
            notes.append(how)
        path = self.ws.inputs / rnd.choice(["finding.json", "f.json", "with:colon.json", "ünï.json", "f:1"])
        n = len(doc.get("violations", [])) if isinstance(doc, dict) and isinstance(doc.get("violations"), list) else 1
        index = rnd.choice(["", "", ":0", f":{max(0, n - 1)}", f":{n}", ":99999999999999999999", ":", ":-1",
                            ":1", ":007", ":" + "9" * 5000, ":٣"])
        target = str(obj) if rnd.random() < 0.85 else str(rnd.choice(self.ws.demo_objects))
        if rnd.random() < 0.8:
            argv = ["trace", target, "--finding", f"{path}{index}"]
            if rnd.random() < 0.15:
                argv += [rnd.choice(["--scenario", "--features", "--inject"]), rnd.choice(["syscall", "pti", "x"])]
        else:
            argv = ["check", target, "--depth", "0", "--features", "pti", "--scenarios", "syscall", "--workers",
                    "1", "--baseline", str(path)]
        outputs: tuple[str, ...] = ()
        if rnd.random() < 0.15:
            argv += ["--json", "out.json"]
            outputs = ("out.json",)
        return Case("finding", seed, argv, files={path: data}, outputs=outputs, note="; ".join(notes) or "as is")
