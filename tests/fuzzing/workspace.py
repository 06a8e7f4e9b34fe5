"""The scratch tree of a fuzz run: the objects to mutate, the files the argument vectors
name, the small kernel source tree patches apply to, and real --finding files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .case import Case, CaseResult
from .elf import ElfSeed
from .files import _listing, _remove, _tree_digest
from .runner import TESTS, Runner

ASM = TESTS / "asm"
PATCH_DATA = TESTS / "data" / "patches"


def have_assembler() -> bool:
    return shutil.which("as") is not None


ENTRY_FILES = ("arch/x86/entry/entry_64.S", "arch/x86/entry/calling.h")
_CALLING_H = """/* SPDX-License-Identifier: GPL-2.0 */
#include <linux/jump_label.h>
#include <asm/unwind_hints.h>

.macro SWITCH_TO_KERNEL_CR3 scratch_reg:req
	ALTERNATIVE "jmp .Lend_\\@", "", X86_FEATURE_PTI
	mov	%cr3, \\scratch_reg
	ADJUST_KERNEL_CR3 \\scratch_reg
	mov	\\scratch_reg, %cr3
.Lend_\\@:
.endm

.macro RESTORE_CR3 scratch_reg:req save_reg:req
	ALTERNATIVE "jmp .Lend_\\@", "", X86_FEATURE_PTI

	ALTERNATIVE "jmp .Lwrcr3_\\@", "", X86_FEATURE_PCID

	/*
	 * KERNEL pages can always resume with NOFLUSH as we do
	 * explicit flushes.
	 */
	bt	$PTI_USER_PGTABLE_BIT, \\save_reg
	jnc	.Lnoflush_\\@
.Lwrcr3_\\@:
	movq	\\save_reg, %cr3
.Lend_\\@:
.endm
"""
_MAKEFILE = """# SPDX-License-Identifier: GPL-2.0
#
# Makefile for the x86 low level entry code
#
obj-y				:= entry.o entry_$(BITS).o syscall_$(BITS).o
"""


def kernel_source_candidates() -> list[Path]:
    """Kernel source trees cached on this machine (read only: two files are copied)."""
    base = Path(os.environ.get("ENTRYCHECK_CACHE", Path.home() / ".cache" / "entrycheck")) / "src"
    try:
        return sorted(p for p in base.glob("linux-source-6.1*") if (p / ENTRY_FILES[0]).is_file()
                      and (p / ENTRY_FILES[1]).is_file())
    except OSError:
        return []


class Workspace:
    """The scratch tree of a fuzz run.

    root/seeds   the real objects (assembled), run/ the working directory of every case,
    in/ the inputs of the case being run, tmp/ the temporary directory of the case,
    fixed/ files and directories the argument vectors name, patch-src/ the tree patches apply to.
    """

    def __init__(self, root: Path, *, kernel_objects: Sequence[Path] = ()) -> None:
        from entrycheck.demo import VARIANTS, assemble, find_assembler

        self.root = Path(root).resolve()
        for sub in ("seeds", "run", "in", "tmp", "fixed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.seeds_dir = self.root / "seeds"
        self.run, self.inputs, self.tmp, self.fixed = (self.root / s for s in ("run", "in", "tmp", "fixed"))
        assembler = find_assembler()
        self.demo_objects = [assemble(assembler, v, self.seeds_dir) for v in VARIANTS]
        self.demo = self.demo_objects[0]
        seeds = [ElfSeed.read(p.name, p, 3.0) for p in self.demo_objects]
        for name, flags in (("tiny_entry", ()), ("alternatives", ()), ("no_entry_text", ()),
                            ("reloc_overflow", ("--defsym", "FAR_VALUE=0x1000"))):
            out = self.seeds_dir / f"{name}.o"
            subprocess.run(["as", "--64", *flags, "-o", str(out), str(ASM / f"{name}.S")], check=True,
                           capture_output=True)
            seeds.append(ElfSeed.read(out.name, out, 0.5 if name == "no_entry_text" else 1.0))
        for k, obj in enumerate(kernel_objects):
            copy_ = self.seeds_dir / f"kernel-{k}-entry_64.o"
            shutil.copyfile(obj, copy_)
            seeds.append(ElfSeed.read(f"{obj}", copy_, 8.0))
        self.elf_seeds = seeds
        self._fixed_files()
        self._patch_tree()
        self.findings = self._findings()

    # ------------------------------------------------------------------ fixed inputs

    def _fixed_files(self) -> None:
        f = self.fixed
        (f / "text.txt").write_text("This is a text file, not an object.\n" * 20)
        (f / "junk.bin").write_bytes(bytes(random.Random(7).getrandbits(8) or 1 for _ in range(3000)))
        (f / "empty").write_bytes(b"")
        (f / "empty-dir").mkdir(exist_ok=True)
        (f / "dir").mkdir(exist_ok=True)
        (f / "dir" / "entry_64.o").write_bytes(b"\x7fELF" + bytes(60))
        (f / "dir" / "Makefile").write_text("all:\n\ttrue\n")
        (f / "elf-magic.o").write_bytes(b"\x7fELF")
        (f / "unicode-ünï.o").write_bytes(self.demo.read_bytes())
        (f / "space name.o").write_bytes(self.demo.read_bytes())
        (f / "json-array.json").write_text("[]")
        (f / "nested.json").write_text("[" * 100000 + "]" * 100000)
        if not (f / "dangling").is_symlink():
            os.symlink(f / "does-not-exist", f / "dangling")
        if not (f / "loop").is_symlink():
            os.symlink(f / "loop", f / "loop")
        self.patch_file = f / "good.patch"
        self.patch_file.write_text((PATCH_DATA / "x86-entry-paranoid-restore-cr3.archive.txt").read_text())

    # ------------------------------------------------------------------ the patch tree

    def _patch_tree(self) -> None:
        self.patch_src = self.root / "patch-src"
        self.reset_patch_src()

    def reset_patch_src(self) -> None:
        from entrycheck.demo.run import FIXTURE

        _remove(self.patch_src)
        entry = self.patch_src / "arch" / "x86" / "entry"
        entry.mkdir(parents=True)
        trees = kernel_source_candidates()
        if trees:
            for name in ENTRY_FILES:
                shutil.copyfile(trees[-1] / name, self.patch_src / name)
            self.patch_tree_from = str(trees[-1])
        else:
            from importlib import resources

            (entry / "entry_64.S").write_text(resources.files("entrycheck.demo").joinpath(FIXTURE).read_text())
            (entry / "calling.h").write_text(_CALLING_H)
            self.patch_tree_from = "the demo fixture"
        (entry / "Makefile").write_text(_MAKEFILE)
        (self.patch_src / "README").write_text("Linux kernel\n============\n")
        self.patch_src_digest = _tree_digest(self.patch_src)

    # ------------------------------------------------------------------ real --finding files

    def _findings(self) -> list[tuple[Path, dict]]:
        """Real `check --json` documents of the demo variants, made once with the command."""
        runner = Runner(self)
        out = []
        for k, feats in ((0, "pti"), (2, "pti"), (3, "pti,pcid")):
            obj = self.demo_objects[k]
            name = f"findings-{k}.json"
            case = Case("setup", k, ["check", str(obj), "--depth", "1", "--features", feats, "--workers", "1",
                                     "--json", name], outputs=(name,))
            res = _run_keeping(runner, case, self.run / name, self.fixed / name)
            if res.exit_code not in (0, 1) or not (self.fixed / name).is_file():
                raise RuntimeError(f"cannot make a real finding file: {res.describe()}")
            out.append((obj, json.loads((self.fixed / name).read_text())))
        return out


def _run_keeping(runner: Runner, case: Case, made: Path, keep: Path) -> CaseResult:
    """Run a setup case and keep one of its outputs (moved before the clean-up)."""
    ws = runner.ws
    before = _listing(ws.root)
    code, out, err, seconds, hung, escaped = runner._invoke(case.argv)
    if made.exists():
        shutil.move(str(made), str(keep))
        before.add(os.path.relpath(keep, ws.root))
    runner._clean(before, case)
    return CaseResult(case.kind, case.seed, tuple(case.argv), code, err, seconds,
                      None if code in (0, 1) else "setup failed", out)
