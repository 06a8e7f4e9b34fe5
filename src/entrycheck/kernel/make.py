"""The kernel's own make: the packages a build needs, and building the entry objects of a tree
(``build_entry``), linked as the kernel links them (``link_objects``), with what the build
says of itself (``read_meta``).  Nothing here writes into a tree it was given: a clean source
tree is built out of tree (``make -C SRC O=BUILD``); a tree configured in-tree is first copied
into the caller's private work directory (kbuild.py recognises trees and says what is stale)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..progress import Progress, silent
from .kconfig import entry_objects, script_arguments, unmet
from .noinstr import (closure, jump_label_keys, linker_aliases, object_facts, percpu_names, read_config, static_keys,
                      struct_layouts, thread_flags)
from .kbuild import (ASM_OFFSETS_CMD, ASM_OFFSETS_H, CPUFEATURES_H, ENTRY_OBJECT, META_JSON, STAGED_ASM_OFFSETS,
                     STAGED_CONFIG, STAGED_CPUFEATURES, STAGED_NOINSTR, STAGED_NOINSTR_JSON, STAGED_NOINSTR_PARTS,
                     STAGED_OBJECT, STAGED_PARTS, Dependency, has_debug_line,
                     cmd_file, kernel_version, parse_cmd_deps, source_relative_deps)

_COPY_EXCLUDES = ("./.git", "*.o", "*.ko", "./vmlinux", "./vmlinux.o")

# Variables that would change what the kernel's make does if inherited from the caller.
_MAKE_ENV_DROP = frozenset(
    {
        "MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "MAKEFILES",
        "O", "KBUILD_OUTPUT", "KBUILD_EXTMOD", "KBUILD_SRC", "KCONFIG_CONFIG",
        "ARCH", "SRCARCH", "CROSS_COMPILE", "LLVM", "LLVM_IAS", "CC", "LD", "AS",
        "KCFLAGS", "KAFLAGS", "KCPPFLAGS", "V", "W", "C", "M",
    }
)
# Debian package -> how to tell it is installed.
_TOOL_PACKAGES = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc", "ld": "binutils"}
_HEADER_PACKAGES = {"gelf.h": "libelf-dev", "openssl/opensslv.h": "libssl-dev"}
_HEADER_DIRS = (Path("/usr/include"), Path("/usr/include/x86_64-linux-gnu"), Path("/usr/local/include"))



# --------------------------------------------------------------------------- build tools


def _header_present(header: str) -> bool:
    gcc = shutil.which("gcc")
    if gcc is None:
        return any((d / header).is_file() for d in _HEADER_DIRS)
    probe = subprocess.run(
        [gcc, "-E", "-x", "c", "-o", os.devnull, "-"],
        input=f"#include <{header}>\n",
        text=True,
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def missing_build_packages(extra_tools: Mapping[str, str] | None = None) -> list[str]:
    """Debian packages of the kernel build (and ``extra_tools``: tool -> package) not installed."""
    tools = {**_TOOL_PACKAGES, **(extra_tools or {})}
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    missing += [pkg for header, pkg in _HEADER_PACKAGES.items() if not _header_present(header)]
    return sorted(set(missing))


def _apt_install(packages: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    return subprocess.run(
        ["apt-get", "install", "-y", *packages],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def last_apt_error(output: str) -> str:
    """The last 'E:' line apt printed (or its last line), for one-line messages."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def ensure_build_packages(
    progress: Progress = silent, extra_tools: Mapping[str, str] | None = None
) -> None:
    """Make sure the kernel build dependencies are installed.

    As root with apt-get, missing ones are installed; otherwise an InputError names
    them and the command that installs them.
    """
    missing = missing_build_packages(extra_tools)
    if not missing:
        return
    names = " ".join(missing)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        how = f"sudo apt-get install {names}" if shutil.which("apt-get") else "your package manager"
        raise InputError(f"building the kernel needs {names}, which are missing; install them with: {how}")
    progress(f"installing build dependencies: {names}")
    result = _apt_install(missing)
    if result.returncode != 0 and "Unable to locate package" in result.stdout + result.stderr:
        progress("apt-get update")
        subprocess.run(["apt-get", "update"], stdin=subprocess.DEVNULL, capture_output=True, check=False)
        result = _apt_install(missing)
    if result.returncode != 0:
        reason = last_apt_error(result.stdout + result.stderr)
        raise InputError(
            f"cannot install the build dependencies {names}: {reason}; "
            f"run: apt-get install {names}"
        )
    still = missing_build_packages(extra_tools)
    if still:
        raise InputError(f"building the kernel needs {' '.join(still)}, still missing after apt-get install")


# --------------------------------------------------------------------------- make


def make_jobs() -> int:
    """How many jobs to give make: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _make_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _MAKE_ENV_DROP}
    env["LC_ALL"] = "C"
    return env


_NOISE = re.compile(r"^(make(\[\d+\])?: (\*\*\*|Entering|Leaving|Nothing)|\s*\*\*\*\s*$|\$ )")


def meaningful_error(log: Path) -> str:
    """The last line of a make log that says what went wrong (make's own '***' lines skipped)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output"
    useful = [line for line in lines if line and not _NOISE.match(line)]
    errors = [line for line in useful if re.search(r"\berror\b", line, re.IGNORECASE)]
    line = (errors or useful or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


@dataclass(frozen=True)
class _Make:
    """How to run the kernel's make for one build (source, output dir, log)."""

    directory: Path  # make -C
    output: Path | None  # O=
    log: Path  # appended to
    log_shown: Path  # where the log will be kept, for messages
    what: str  # the tree or package, for messages

    @property
    def out(self) -> Path:
        """Where objects and the .config end up."""
        return self.output or self.directory

    def run(self, *targets: str, jobs: int | None = None) -> None:
        cmd = ["make", "-C", str(self.directory)]
        if self.output is not None:
            cmd.append(f"O={self.output}")
        cmd.append("ARCH=x86_64")
        if jobs:
            cmd.append(f"-j{jobs}")
        cmd += targets
        self.command(cmd, " ".join(targets))

    def run_all_it_can(self, *targets: str, jobs: int | None = None) -> None:
        """make -k: build every target that builds; a failure leaves that one missing (logged)."""
        cmd = ["make", "-C", str(self.directory)] + ([f"O={self.output}"] if self.output is not None else [])
        cmd += ["ARCH=x86_64", "-k"] + ([f"-j{jobs}"] if jobs else []) + list(targets)
        with self.log.open("a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_make_env(),
                           check=False)

    def command(self, cmd: Sequence[str], target: str) -> None:
        with self.log.open("a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            result = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_make_env(), check=False,
            )
        if result.returncode != 0:
            raise InputError(
                f"cannot build {self.what}: make {target} failed: {meaningful_error(self.log)} "
                f"(full log: {self.log_shown})"
            )


def _copy_tree(source: Path, dest: Path, log: Path) -> None:
    """A real copy (not hardlinks) of ``source`` without .git and object files."""
    dest.mkdir(parents=True)
    excludes = [f"--exclude={pattern}" for pattern in _COPY_EXCLUDES]
    with log.open("a") as err:
        pack = subprocess.Popen(
            ["tar", "-C", str(source), "--format=posix", *excludes, "-cf", "-", "."],
            stdout=subprocess.PIPE, stderr=err,
        )
        unpack = subprocess.run(
            ["tar", "-C", str(dest), "--no-same-owner", "-xf", "-"],
            stdin=pack.stdout, stderr=err, check=False,
        )
        assert pack.stdout is not None
        pack.stdout.close()
        packed = pack.wait()
    if packed != 0 or unpack.returncode != 0:
        raise InputError(f"cannot copy {source} to build it: {meaningful_error(log)}")


@dataclass(frozen=True)
class BuildOutput:
    """What a finished build recorded in its staged entry."""

    deps: tuple[str, ...]  # non-generated dependencies, relative to the source tree
    debug_info: bool
    kernel_version: str | None


def build_entry(
    source: Path,
    *,
    work: Path,
    staged: Path,
    log: Path,
    log_shown: Path,
    what: str,
    meta: Mapping[str, object],
    config: Path | None = None,
    copy_tree: bool = False,
    debug: bool = False,
    options: tuple[tuple[str, str], ...] = (),
    own_config: bool = True,
    progress: Progress = silent,
    kernel_c: bool = True,
) -> BuildOutput:
    """Build entry_64.o from ``source`` inside ``work`` and stage the cache entry at ``staged``.

    Out of tree (``O=work/build``) unless ``copy_tree``, in which case ``source`` is
    copied to ``work/tree`` and built there in-tree with its own .config.  The
    configuration is ``config`` if given, else the copy's own .config, else
    defconfig (always defconfig when not ``own_config``); ``options`` (NAME, VALUE) are then set with scripts/config + olddefconfig
    (InputError when olddefconfig does not keep one); ``debug`` adds CONFIG_DEBUG_INFO_DWARF5.
    Every entry object the configuration has is built (see ``kconfig.entry_objects``) and
    the objects are linked into one (``ld -r``), as the kernel's own link would.  ``meta`` is written to
    meta.json together with the versions, the dependency list and the debug flag.
    Raises InputError (naming the make target and the log) when make fails.
    """
    source = source.resolve()
    ensure_build_packages(progress)
    if copy_tree:
        progress(f"copying {source}")
        tree = work / "tree"
        _copy_tree(source, tree, log)
        make = _Make(tree, None, log, log_shown, what)
    else:
        build_dir = work / "build"
        build_dir.mkdir()
        make = _Make(source, build_dir, log, log_shown, what)
        tree = source
    dot_config = make.out / ".config"

    progress("configure")
    if config is not None:
        shutil.copyfile(config, dot_config)
        make.run("olddefconfig")
    elif dot_config.is_file() and own_config:
        make.run("olddefconfig")
    else:
        make.run("defconfig")
    if debug:
        script = tree / "scripts" / "config"
        make.command(
            ["bash", str(script), "--file", str(dot_config), "-e", "DEBUG_INFO_DWARF5",
             "-d", "DEBUG_INFO_NONE"],
            "scripts/config",
        )
        make.run("olddefconfig")

    if options:
        make.command(["bash", str(tree / "scripts" / "config"), "--file", str(dot_config),
                      *script_arguments(options)], "scripts/config")
        make.run("olddefconfig")
        missing = unmet(options, dot_config)
        if missing:
            raise InputError(f"cannot configure {what} as asked: olddefconfig did not keep {'; '.join(missing)}")

    objects = entry_objects(dot_config)
    progress(f"build {', '.join(Path(o).name for o in objects)}")
    make.run(*objects, jobs=make_jobs())
    for rel in objects:
        if not (make.out / rel).is_file():
            raise InputError(f"cannot build {what}: make {rel} produced no object (full log: {log_shown})")
    obj = make.out / ENTRY_OBJECT
    debug_info = has_debug_line(obj)
    if debug and not debug_info:
        raise InputError(
            f"the debug build of {what} has no DWARF line info (.debug_line) although "
            f"CONFIG_DEBUG_INFO_DWARF5 was enabled; check the tree's Kconfig (full log: {log_shown})"
        )

    found = None
    if kernel_c:
        progress("find the noinstr C the entry code calls")
        # -g adds DWARF (the layouts of the structures the model fills in) and changes no code.
        found = closure(tree, make.out, [make.out / rel for rel in objects],
                        lambda targets: make.run_all_it_can(*targets, "KCFLAGS=-g", jobs=make_jobs()))

    deps: list[Dependency] = []
    for cmd in (*(cmd_file(o) for o in objects), ASM_OFFSETS_CMD):
        if (make.out / cmd).is_file():
            deps += parse_cmd_deps(make.out / cmd)
    relative = source_relative_deps(deps, make.out, tree)
    c_deps: list[Dependency] = []
    for rel in found.objects if found is not None else ():
        if (make.out / cmd_file(rel)).is_file():
            c_deps += parse_cmd_deps(make.out / cmd_file(rel))
    c_relative = [d for d in source_relative_deps(c_deps, make.out, tree) if d not in relative]
    version = kernel_version(tree)

    staged.mkdir()
    (staged / STAGED_PARTS).mkdir()
    for rel in objects:
        shutil.copy2(make.out / rel, staged / STAGED_PARTS / Path(rel).name)
    link_objects([staged / STAGED_PARTS / Path(rel).name for rel in objects], staged / STAGED_OBJECT, log)
    if found is not None:
        for rel in found.objects:
            (staged / STAGED_NOINSTR_PARTS / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(make.out / rel, staged / STAGED_NOINSTR_PARTS / rel)
            if not debug:       # the layouts are read from the build's copy; a debug build keeps its line info
                make.command(["objcopy", "--strip-debug", str(staged / STAGED_NOINSTR_PARTS / rel)], f"objcopy {rel}")
        link_objects([staged / STAGED_PARTS / Path(rel).name for rel in objects]
                     + [staged / STAGED_NOINSTR_PARTS / rel for rel in found.objects], staged / STAGED_NOINSTR, log)
        entry_defined = object_facts(staged / STAGED_OBJECT)
        (staged / STAGED_NOINSTR_JSON).write_text(json.dumps({
            "objects": list(found.objects),
            "functions": dict(sorted(found.functions.items())),
            "boundary": sorted(found.boundary),
            "unresolved": sorted(found.unresolved - entry_defined.defined),
            "percpu": sorted(percpu_names(tree)),
            "aliases": linker_aliases(tree),
            "structs": struct_layouts([make.out / rel for rel in found.objects]),
            "deps": c_relative,
            "keys": static_keys(tree, jump_label_keys(staged / STAGED_NOINSTR), read_config(make.out / ".config")),
            "entry_calls": sorted(entry_defined.calls),
            "constants": thread_flags(tree),
        }, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tree / CPUFEATURES_H, staged / STAGED_CPUFEATURES)
    if (make.out / ASM_OFFSETS_H).is_file():
        shutil.copyfile(make.out / ASM_OFFSETS_H, staged / STAGED_ASM_OFFSETS)
    shutil.copyfile(dot_config, staged / STAGED_CONFIG)
    record = {
        **meta,
        "kernel_version": version,
        "debug_info": debug_info,
        "deps": list(relative),
        "c_deps": list(c_relative),          # the noinstr C's sources: they make the build stale too
        "objects": [Path(rel).name for rel in objects],
        "options": [f"{k}={v}" for k, v in options],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "log": str(log_shown),
    }
    (staged / META_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return BuildOutput([*relative, *c_relative], debug_info, version)


def link_objects(objects: Sequence[Path], out: Path, log: Path | None = None) -> None:
    """``ld -r`` the entry objects into ``out`` (a copy when there is one), resolving their cross references.

    The kernel's own link does the same to these objects (vmlinux.o); the order is kept, so
    entry_64.o's sections come first.
    """
    if len(objects) == 1:
        shutil.copyfile(objects[0], out)
        return
    if shutil.which("ld") is None:
        raise InputError("linking the entry objects needs ld (binutils), which is missing; "
                         "install it with: apt-get install binutils")
    done = subprocess.run(["ld", "-m", "elf_x86_64", "-r", "-o", str(out), *map(str, objects)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if log is not None:
        with log.open("a") as f:
            f.write(done.stdout + done.stderr)
    if done.returncode != 0 or not out.is_file():
        lines = (done.stderr or done.stdout or "no output").strip().splitlines()
        raise InputError(f"cannot link {', '.join(p.name for p in objects)} into one object: {lines[-1]}")


def read_meta(entry: Path) -> dict[str, object]:
    """The meta.json of a published cache entry."""
    return json.loads((entry / META_JSON).read_text())
