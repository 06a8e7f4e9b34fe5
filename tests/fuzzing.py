"""Fuzzing the command line: mutated ELF objects, argument vectors, patch texts, --finding files.

Every case is made by a generator from an integer seed alone (``random.Random`` seeded
with the kind and the seed), so a case is reproduced by its kind and seed.  A case of the
command line runs in this process (``entrycheck.cli.main`` with ``sys.argv`` patched and
standard output and error captured), in a scratch directory of its own; a patch text goes
through the patch layer (``parse_patch``/``apply_patches``) on a small source tree.

What every case must hold to (anything else is a *problem*):

* the exit code is 0, 1 or 2 (3 is an internal error, anything else a crash);
* no Python traceback on standard output or error;
* with exit code 2, standard error is exactly one line starting "entrycheck: error: ";
* it ends within the timeout (SIGALRM; a case that does not is a hang);
* it leaves no file behind: the outputs it named only when it succeeded (0 or 1), never a
  temporary file, and nothing in the temporary directory.

The patch layer either applies a patch or raises ``InputError`` with a one-line message;
it never modifies the source tree, and a rejected patch leaves the destination as it was.

Used by tests/test_fuzz.py (a small budget) and benchmarks/fuzz.py (a large one).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ASM = HERE / "asm"
PATCH_DATA = HERE / "data" / "patches"

TRACEBACK = "Traceback (most recent call last)"
ERROR_PREFIX = "entrycheck: error: "
ALLOWED_EXIT = (0, 1, 2)
DEFAULT_TIMEOUT = 60.0
KINDS = ("elf", "args", "patch", "finding")

# A debian:X.Y target downloads and builds a kernel: no generated vector may name one.
_REAL_DEBIAN = re.compile(r"debian:\d+\.\d+(\+debug)?")


def have_assembler() -> bool:
    return shutil.which("as") is not None


# =========================================================================== results


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


# =========================================================================== running one case


class _Hang(BaseException):
    """Raised by the SIGALRM handler: the case ran past its timeout.  Not an Exception, so
    that ``except Exception`` in the code under test does not swallow it."""


@contextlib.contextmanager
def _alarm(timeout: float):
    """Raise _Hang in this thread after ``timeout`` s, and again every second after that
    (the first one may land where it is caught and recorded).  Yields a list that holds
    True once the alarm went off.  SIGALRM, SIGINT and SIGTERM are restored afterwards."""
    fired: list[bool] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM)}

    def on_alarm(signum, frame):
        fired.append(True)
        raise _Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout, 1.0)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _reset_process_state() -> None:
    """Forget what an earlier case loaded: each case is a fresh command, as in a new process
    (the caches are keyed by path and stamp; clearing them also bounds the memory)."""
    from entrycheck import session

    session.reset()


def _listing(root: Path) -> set[str]:
    """Every path under ``root`` (relative), directories with a trailing slash."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        out.update(prefix + d + "/" for d in dirnames)
        out.update(prefix + f for f in filenames)
    return out


def _stray_temporaries(directory: Path) -> set[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {n for n in names if n.startswith(".") and n.endswith((".tmp", ".new"))}


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


class Runner:
    """Runs cases in this process, in the scratch directories of a Workspace."""

    def __init__(self, ws: "Workspace", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.ws = ws
        self.timeout = timeout

    # ------------------------------------------------------------------ the command line

    def run(self, case: Case, *, debug: bool = False) -> CaseResult:
        ws = self.ws
        for d in case.dirs:
            d.mkdir(parents=True, exist_ok=True)
        for path, data in case.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        outputs = [self._output_path(o) for o in case.outputs]
        before = _listing(ws.root)
        outside = {p: _exists(p) for p in outputs if not _inside(p, ws.root)}
        temps_before = {p.parent: _stray_temporaries(p.parent) for p in outputs if not _inside(p, ws.root)}
        argv = (["--debug"] if debug else []) + list(case.argv)
        code, out, err, seconds, hung, escaped = self._invoke(argv)
        problem = None
        if hung:
            problem = "hang"
        elif escaped is not None:
            problem = "traceback"
        elif code not in ALLOWED_EXIT:
            problem = f"exit {code}"
        elif TRACEBACK in err or TRACEBACK in out:
            problem = "traceback"
        elif code == 2 and not _one_line_error(err):
            problem = "stderr not one line for exit 2"
            if _one_line_error(err.replace("\r", "")):
                problem += " (a carriage return in it)"
        left = self._leftovers(before, outputs, outside, temps_before, code)
        if left and problem is None:
            problem = "leftover files: " + ", ".join(sorted(left))
        self._clean(before, case)
        return CaseResult(case.kind, case.seed, tuple(case.argv), code, err, seconds, problem, out, case.note)

    def _output_path(self, dest: str) -> Path:
        try:
            path = Path(dest).expanduser()
        except RuntimeError:                       # ~user that does not exist
            path = Path(dest)
        return path if path.is_absolute() else self.ws.run / path

    def _invoke(self, argv: list[str]):
        """main() with this argv: (exit code, stdout, stderr, seconds, hung, escaped exception)."""
        from entrycheck import cli

        _reset_process_state()
        out_buf, err_buf = io.BytesIO(), io.BytesIO()
        out = io.TextIOWrapper(out_buf, encoding=sys.__stdout__.encoding or "utf-8",
                               errors=sys.__stdout__.errors or "strict", write_through=True)
        err = io.TextIOWrapper(err_buf, encoding=sys.__stderr__.encoding or "utf-8",
                               errors=sys.__stderr__.errors or "backslashreplace", write_through=True)
        saved_argv, saved_cwd, saved_stdin = sys.argv, os.getcwd(), sys.stdin
        saved_tempdir, saved_debug = tempfile.tempdir, os.environ.pop("ENTRYCHECK_DEBUG", None)
        code: int | None = None
        escaped: BaseException | None = None
        hung = False
        start = time.monotonic()
        try:
            sys.argv = ["entrycheck", *argv]
            sys.stdin = io.StringIO("")
            tempfile.tempdir = str(self.ws.tmp)
            os.chdir(self.ws.run)
            with _alarm(self.timeout) as fired:
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        try:
                            cli.main()
                            code = 0
                        except SystemExit as exc:
                            code = _exit_code(exc, err)
                except _Hang:
                    hung = True
                except BaseException as exc:  # noqa: BLE001 - escaped main(): a crash of its own
                    escaped = exc
                    err.write("".join(traceback.format_exception(exc)))
            hung = hung or bool(fired)
        finally:
            seconds = time.monotonic() - start
            sys.argv, sys.stdin, tempfile.tempdir = saved_argv, saved_stdin, saved_tempdir
            os.chdir(saved_cwd)
            if saved_debug is not None:
                os.environ["ENTRYCHECK_DEBUG"] = saved_debug
        out.flush()
        err.flush()
        dec = sys.__stdout__.encoding or "utf-8"
        return (code, out_buf.getvalue().decode(dec, "backslashreplace"),
                err_buf.getvalue().decode(dec, "backslashreplace"), seconds, hung, escaped)

    def _leftovers(self, before: set[str], outputs: list[Path], outside: dict[Path, bool],
                   temps_before: dict[Path, set[str]], code: int | None) -> set[str]:
        ws = self.ws
        allowed: set[str] = set()
        if code in (0, 1):
            for p in outputs:
                if _inside(p, ws.root):
                    rel = os.path.relpath(p, ws.root)
                    allowed.add(rel)
                    allowed.add(rel + "/")
                    parent = Path(rel).parent
                    while str(parent) not in (".", "run"):
                        allowed.add(str(parent) + "/")
                        parent = parent.parent
                    if _is_dir(p):                # --keep DIR: what it holds
                        allowed.update(rel + "/" + x for x in _listing(p))
        new = {p for p in _listing(ws.root) - before if p not in allowed}
        for p, existed in outside.items():
            if not existed and _exists(p) and code not in (0, 1):
                new.add(str(p))
        for parent, had in temps_before.items():
            new.update(str(parent / n) for n in _stray_temporaries(parent) - had)
        return new

    def _clean(self, before: set[str], case: Case) -> None:
        """Remove what the case and its inputs added under the workspace."""
        ws = self.ws
        for rel in sorted(_listing(ws.root) - before, key=len, reverse=True):
            _remove(ws.root / rel)
        for path in case.files:
            _remove(path)
        for d in case.dirs:
            _remove(d)
        for sub in (ws.run, ws.tmp, ws.inputs):
            for name in os.listdir(sub):
                _remove(sub / name)

    # ------------------------------------------------------------------ the patch layer

    def run_patch(self, case: PatchCase) -> CaseResult:
        from entrycheck.errors import InputError
        from entrycheck.kernel.patchapply import apply_patches

        ws = self.ws
        dest = ws.root / "patch-dest"
        _remove(dest)
        _hardlink_copy(ws.patch_src, dest)
        code: int | None = None
        message = ""
        where = ""
        hung = False
        problem = None
        start = time.monotonic()
        saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(ws.tmp)
        try:
            with _alarm(self.timeout) as fired:
                try:
                    result = apply_patches(ws.patch_src, case.patches, dest)
                    code = 0
                    message = "applied: " + ", ".join(result.files)
                except InputError as exc:
                    code = 2
                    message = str(exc)
                except _Hang:
                    hung = True
                except Exception as exc:  # noqa: BLE001 - what the fuzzing looks for
                    code = 3
                    message = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc))
                    where = raise_site(exc)
            hung = hung or bool(fired)
        finally:
            tempfile.tempdir = saved_tempdir
        seconds = time.monotonic() - start
        if hung:
            problem = "hang"
        elif code == 3:
            problem = f"exception {message.splitlines()[0][:200]}"
        elif code == 2 and (not message.strip() or "\n" in message or "\r" in message):
            problem = "InputError message not one line"
        if problem is None and _tree_digest(ws.patch_src) != ws.patch_src_digest:
            problem = "the source tree was modified"
        if problem is None and code == 2 and _tree_digest(dest) != ws.patch_src_digest:
            problem = "a rejected patch changed the destination tree"
        if problem is None:
            stray = sorted(p for p in _listing(dest) if Path(p).name.startswith(".") and
                           Path(p).name.endswith((".new", ".tmp")))
            stray += sorted(os.listdir(ws.tmp))
            if stray:
                problem = "leftover files: " + ", ".join(stray)
        _remove(dest)
        for name in os.listdir(ws.tmp):
            _remove(ws.tmp / name)
        if problem is not None and ws.patch_src_digest != _tree_digest(ws.patch_src):
            ws.reset_patch_src()
        return CaseResult(case.kind, case.seed, (), code, message, seconds, problem, "", case.note, where)

    # ------------------------------------------------------------------ locating a fault

    def locate(self, case: Case) -> str:
        """Where the internal error of ``case`` is raised: rerun it with --debug, recording
        the frame each exception is raised in; the one the output names is the answer."""
        raised: dict[int, tuple[str, str, str]] = {}

        def tracer(frame, event, arg):
            if event == "exception":
                exc = arg[1]
                if id(exc) not in raised:
                    raised[id(exc)] = (type(exc).__name__, _safe_str(exc), _frame_where(frame))
            return tracer

        ws = self.ws
        for path, data in case.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        before = _listing(ws.root)
        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            code, out, err, _, hung, escaped = self._invoke(["--debug", *case.argv])
        finally:
            sys.settrace(old)
            self._clean(before, case)
        if escaped is not None:
            return f"{type(escaped).__name__}: {_safe_str(escaped)[:200]} at {raise_site(escaped)}"
        if hung:
            return "hang"
        text = err + "\n" + out
        for name, msg, where in raised.values():
            if f"{name}: {msg}" in text or (msg and msg in text and name in text):
                return f"{name}: {msg[:200]} at {where}"
        return ""


def _exit_code(exc: SystemExit, err) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    err.write(str(exc.code) + "\n")          # what Python prints for sys.exit("text")
    return 1


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return "?"


def _frame_where(frame) -> str:
    return f"{_relative(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def _relative(filename: str) -> str:
    """A frame's file relative to the project, the site-packages or the standard library."""
    try:
        return str(Path(filename).resolve().relative_to(ROOT))
    except ValueError:
        pass
    marker = "site-packages/"
    if marker in filename:
        return filename[filename.index(marker) + len(marker):]
    stdlib = os.path.dirname(os.__file__) + os.sep
    return filename[len(stdlib):] if filename.startswith(stdlib) else filename


def raise_site(exc: BaseException) -> str:
    """file:line of the innermost frame of entrycheck in ``exc``'s traceback (and of the
    innermost frame, when that is elsewhere: the library or the standard library)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((_relative(code.co_filename), tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    if not frames:
        return ""
    ours = [f for f in frames if "entrycheck" in f[0] and "tests/" not in f[0] and not f[0].startswith("tests")]
    text = "{}:{} in {}".format(*(ours[-1] if ours else frames[-1]))
    if ours and ours[-1] != frames[-1]:
        text += " -> {}:{} in {}".format(*frames[-1])
    return text


def _exists(path: Path) -> bool:
    """Whether anything (a dangling symlink too) is at ``path``; False for a name the
    system refuses (too long, ...)."""
    try:
        os.lstat(path)
        return True
    except (OSError, ValueError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(root)
        return True
    except ValueError:
        return False


def _remove(path: Path) -> None:
    try:
        if _is_dir(path) and not os.path.islink(path):
            for dirpath, dirnames, _ in os.walk(path):
                for d in dirnames:
                    with contextlib.suppress(OSError):
                        os.chmod(os.path.join(dirpath, d), 0o755)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        pass


def _hardlink_copy(src: Path, dest: Path) -> None:
    """A copy of ``src`` whose files are hard links (as ``cp -al``, as review makes)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dest if rel == "." else dest / rel
        target.mkdir(parents=True, exist_ok=True)
        for f in filenames:
            os.link(os.path.join(dirpath, f), target / f)


def _tree_digest(tree: Path) -> str:
    h = hashlib.sha256()
    for rel in sorted(_listing(tree)):
        p = tree / rel
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if not rel.endswith("/"):
            st = p.lstat()
            h.update(f"{stat.S_IMODE(st.st_mode):o}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# =========================================================================== ELF objects


SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
SHT_RELA = 4
# section header fields: (offset, struct format)
SH_FIELDS = {"sh_name": (0, "<I"), "sh_type": (4, "<I"), "sh_flags": (8, "<Q"), "sh_addr": (16, "<Q"),
             "sh_offset": (24, "<Q"), "sh_size": (32, "<Q"), "sh_link": (40, "<I"), "sh_info": (44, "<I"),
             "sh_addralign": (48, "<Q"), "sh_entsize": (56, "<Q")}
ST_FIELDS = {"st_name": (0, "<I"), "st_info": (4, "<B"), "st_other": (5, "<B"), "st_shndx": (6, "<H"),
             "st_value": (8, "<Q"), "st_size": (16, "<Q")}
R_FIELDS = {"r_offset": (0, "<Q"), "r_info": (8, "<Q"), "r_addend": (16, "<Q")}
EH_FIELDS = {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_version": (20, "<I"), "e_entry": (24, "<Q"),
             "e_phoff": (32, "<Q"), "e_shoff": (40, "<Q"), "e_flags": (48, "<I"), "e_ehsize": (52, "<H"),
             "e_phentsize": (54, "<H"), "e_phnum": (56, "<H"), "e_shentsize": (58, "<H"), "e_shnum": (60, "<H"),
             "e_shstrndx": (62, "<H")}


@dataclass(frozen=True)
class ElfSection:
    index: int
    name: str
    header: int          # file offset of its section header
    type: int
    offset: int
    size: int
    entsize: int


@dataclass(frozen=True)
class ElfSymbol:
    index: int
    name: str
    at: int              # file offset of its symbol table entry
    kind: int            # STT_*
    shndx: int
    value: int
    size: int


@dataclass(frozen=True)
class ElfSeed:
    """A real object to mutate, read once while it is intact (ELF64 little-endian)."""

    name: str
    path: Path
    raw: bytes
    sections: tuple[ElfSection, ...]
    symbols: tuple[ElfSymbol, ...]
    weight: float = 1.0

    @cached_property
    def functions(self) -> list[str]:
        return [s.name for s in self.symbols if s.name and s.kind in (0, 2) and s.shndx not in (SHN_UNDEF, SHN_ABS)
                and self.section(s.shndx) is not None and self.section(s.shndx).name.endswith("text")]

    @cached_property
    def data_symbols(self) -> list[str]:
        functions = set(self.functions)
        return [s.name for s in self.symbols if s.name and s.name not in functions and s.kind != 4]

    def section(self, index: int) -> ElfSection | None:
        return self.sections[index] if 0 <= index < len(self.sections) else None

    def by_name(self, name: str) -> ElfSection | None:
        return next((s for s in self.sections if s.name == name), None)

    @property
    def has_syscall(self) -> bool:
        return "entry_SYSCALL_64" in self.functions

    @classmethod
    def read(cls, name: str, path: Path, weight: float = 1.0) -> "ElfSeed":
        raw = path.read_bytes()
        shoff, = struct.unpack_from("<Q", raw, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)

        def header(i: int) -> tuple:
            return struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize)

        strtab_off = header(shstrndx)[4]

        def cstr(at: int) -> str:
            return raw[at:raw.index(b"\0", at)].decode("utf-8", "replace")

        sections = []
        for i in range(shnum):
            h = header(i)
            sections.append(ElfSection(i, cstr(strtab_off + h[0]), shoff + i * shentsize, h[1], h[4], h[5], h[9]))
        symbols: list[ElfSymbol] = []
        symtab = next((s for s in sections if s.type == 2), None)
        if symtab is not None:
            names_off = sections[header(symtab.index)[6]].offset
            for k in range(symtab.size // 24):
                at = symtab.offset + 24 * k
                st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", raw, at)
                symbols.append(ElfSymbol(k, cstr(names_off + st_name), at, st_info & 0xF, st_shndx, st_value,
                                         st_size))
        return cls(name, path, raw, tuple(sections), tuple(symbols), weight)


def _interesting(rnd: random.Random, fmt: str, original: int, file_size: int) -> int:
    bits = struct.calcsize(fmt) * 8
    mask = (1 << bits) - 1
    choices = [0, 1, 2, 7, 8, 16, 24, 64, 0x1000, original + 1, original - 1, original * 2, original + 8,
               original ^ (1 << rnd.randrange(bits)), file_size, file_size - 1, file_size + 1,
               1 << 40, 1 << 62, mask, 1 << (bits - 1), (1 << (bits - 1)) - 1, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0xFFFF, 0xFF00, rnd.getrandbits(bits), rnd.randrange(max(2, file_size))]
    return rnd.choice(choices) & mask


def _put(data: bytearray, at: int, fmt: str, value: int) -> bool:
    size = struct.calcsize(fmt)
    if at < 0 or at + size > len(data):
        return False
    struct.pack_into(fmt, data, at, value & ((1 << (8 * size)) - 1))
    return True


def _get(data: bytes, at: int, fmt: str) -> int:
    if at < 0 or at + struct.calcsize(fmt) > len(data):
        return 0
    return struct.unpack_from(fmt, data, at)[0]


def _rela_sections(seed: ElfSeed) -> list[ElfSection]:
    return [s for s in seed.sections if s.type == SHT_RELA and s.size >= 24]


def _weighted_section(rnd: random.Random, seed: ElfSeed) -> ElfSection:
    hot = [s for s in seed.sections if s.name in (".entry.text", ".symtab", ".strtab", ".shstrtab",
                                                   ".altinstructions", ".altinstr_replacement")
           or s.name.startswith(".rela.entry") or s.name.startswith(".rela.altinstr")]
    return rnd.choice(hot) if hot and rnd.random() < 0.7 else rnd.choice(seed.sections)


def mutate_elf(rnd: random.Random, seed: ElfSeed) -> tuple[bytes, list[str], str | None]:
    """One to three mutations of ``seed``: the bytes, what was done, and the name of a symbol
    an edit touched (None if no symbol was edited)."""
    data = bytearray(seed.raw)
    size = len(data)
    notes: list[str] = []
    touched: str | None = None
    ops = ["sh_field"] * 5 + ["symbol"] * 4 + ["reloc"] * 4 + ["alt"] * 3 + ["ehdr_field"] * 2 + \
          ["ehdr_flip"] * 2 + ["truncate"] * 3 + ["code"] + ["anywhere"]
    chosen = [rnd.choice(ops) for _ in range(rnd.choice((1, 1, 1, 2, 2, 3)))]
    truncate = "truncate" in chosen
    for op in [c for c in chosen if c != "truncate"]:
        if op == "sh_field":
            sec = _weighted_section(rnd, seed)
            fname = rnd.choice(list(SH_FIELDS))
            off, fmt = SH_FIELDS[fname]
            old = _get(data, sec.header + off, fmt)
            if fname == "sh_type":
                value = rnd.choice([0, 1, 2, 3, 4, 8, 9, 11, 0x6FFF4321, 0x70000001, 0xFFFFFFFF, rnd.getrandbits(32)])
            elif fname in ("sh_link", "sh_info"):
                value = rnd.choice([0, 1, len(seed.sections) - 1, len(seed.sections), len(seed.sections) + 1,
                                    old + 1, 0xFFFF, 0xFFFFFFFF, rnd.getrandbits(32)])
            elif fname == "sh_entsize":
                value = rnd.choice([0, 1, 12, 23, 25, 48, 1 << 40, 0xFFFFFFFFFFFFFFFF, rnd.getrandbits(64)])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, sec.header + off, fmt, value)
            notes.append(f"{sec.name or '#' + str(sec.index)}.{fname}={value:#x}")
        elif op == "symbol" and seed.symbols:
            sym = rnd.choice(seed.symbols[1:] or seed.symbols)
            fname = rnd.choice(list(ST_FIELDS))
            off, fmt = ST_FIELDS[fname]
            old = _get(data, sym.at + off, fmt)
            if fname == "st_shndx":
                value = rnd.choice([SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX, 0xFF00, len(seed.sections),
                                    len(seed.sections) + 3, rnd.randrange(len(seed.sections)), rnd.getrandbits(16)])
            elif fname == "st_info":
                value = rnd.choice([(b << 4) | t for b in (0, 1, 2, 10, 15) for t in (0, 1, 2, 3, 4, 6, 10, 15)]
                                   + [rnd.getrandbits(8)])
            elif fname == "st_value":
                sec = seed.section(sym.shndx)
                ssize = sec.size if sec else 0
                value = rnd.choice([0, ssize, ssize + 1, ssize - 1, old + 1, old + 0x10000, 1 << 40,
                                    (1 << 64) - 1, 1 << 63, -old, rnd.getrandbits(64), rnd.getrandbits(20)])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, sym.at + off, fmt, value)
            touched = sym.name or touched
            notes.append(f"symbol {sym.name or '#' + str(sym.index)}.{fname}={value & 0xFFFFFFFFFFFFFFFF:#x}")
        elif op == "reloc" and _rela_sections(seed):
            sec = rnd.choice(_rela_sections(seed))
            target = seed.section(_get(seed.raw, sec.header + 44, "<I"))
            k = rnd.randrange(sec.size // 24)
            at = sec.offset + 24 * k
            fname = rnd.choice(list(R_FIELDS))
            off, fmt = R_FIELDS[fname]
            old = _get(data, at + off, fmt)
            if fname == "r_offset":
                tsize = target.size if target else 0
                value = rnd.choice([tsize, tsize - 1, tsize - 2, tsize - 3, tsize + 100, 1 << 40, (1 << 64) - 1,
                                    old + 1, rnd.randrange(max(1, tsize))])
            elif fname == "r_info":
                sym, rtype = old >> 32, old & 0xFFFFFFFF
                nsyms = len(seed.symbols)
                if rnd.random() < 0.5:
                    sym = rnd.choice([0, nsyms - 1, nsyms, nsyms + 1, 0xFFFFFFFF, rnd.randrange(max(1, nsyms))])
                else:
                    rtype = rnd.choice([0, 1, 2, 3, 4, 9, 10, 11, 24, 41, 42, 43, 50, 0xFF, 0xFFFFFFFF,
                                        rnd.getrandbits(32)])
                value = (sym << 32) | rtype
            else:
                value = rnd.choice([0, 1, -1, -4, 1 << 31, -(1 << 31) - 1, 1 << 40, -(1 << 63), (1 << 63) - 1,
                                    old + 1, old - 1, rnd.getrandbits(64)])
            _put(data, at + off, fmt, value)
            notes.append(f"{sec.name}[{k}].{fname}={value & 0xFFFFFFFFFFFFFFFF:#x}")
        elif op == "alt":
            secs = [s for s in seed.sections if s.name in (".altinstructions", ".altinstr_replacement") and s.size]
            if not secs:
                continue
            sec = rnd.choice(secs)
            for _ in range(rnd.randint(1, 4)):
                at = sec.offset + rnd.randrange(sec.size)
                value = rnd.choice([0, 0xFF, 0x7F, 0x80, 1, 2, 5, 0x90, 0xCC, 0xE8, 0xE9, 0xEB, 0x0F,
                                    rnd.getrandbits(8)])
                if at < size:
                    data[at] = value
                    notes.append(f"{sec.name}+{at - sec.offset:#x}={value:#04x}")
        elif op == "ehdr_field":
            fname = rnd.choice(["e_shoff", "e_shnum", "e_shstrndx", "e_shentsize", "e_shnum", "e_shstrndx",
                                "e_shoff", "e_ehsize", "e_phoff", "e_phnum", "e_type", "e_machine"])
            off, fmt = EH_FIELDS[fname]
            old = _get(data, off, fmt)
            if fname == "e_shnum":
                value = rnd.choice([0, 1, old - 1, old + 1, old * 2, 0xFF00, 0xFFFF])
            elif fname == "e_shstrndx":
                value = rnd.choice([0, 1, old - 1, old + 1, len(seed.sections), SHN_XINDEX, 0xFF00,
                                    rnd.randrange(len(seed.sections))])
            elif fname == "e_shentsize":
                value = rnd.choice([0, 1, 32, 63, 65, 128, 0xFFFF])
            else:
                value = _interesting(rnd, fmt, old, size)
            _put(data, off, fmt, value)
            notes.append(f"{fname}={value:#x}")
        elif op == "ehdr_flip":
            for _ in range(rnd.randint(1, 4)):
                at = rnd.randrange(64)
                data[at] = rnd.getrandbits(8)
                notes.append(f"ehdr[{at}]={data[at]:#04x}")
        elif op == "code":
            sec = seed.by_name(".entry.text")
            if sec is None or not sec.size:
                continue
            for _ in range(rnd.randint(1, 6)):
                at = sec.offset + rnd.randrange(sec.size)
                data[at] = rnd.choice([0x0F, 0xCC, 0xC3, 0xE8, 0xE9, 0xEB, 0xFF, 0x00, 0x90, 0xCF, 0x48, 0x65,
                                       rnd.getrandbits(8)])
                notes.append(f".entry.text+{at - sec.offset:#x}={data[at]:#04x}")
        elif op == "anywhere":
            for _ in range(rnd.randint(1, 8)):
                at = rnd.randrange(size)
                data[at] = rnd.getrandbits(8)
            notes.append("random bytes")
    if truncate:
        length = rnd.choice([rnd.randrange(size), rnd.randrange(min(size, 128)), size - rnd.randint(1, 64),
                             rnd.randrange(size // 2, size)])
        length = max(0, min(size - 1, length))
        del data[length:]
        notes.append(f"truncated to {length} of {size} bytes")
    return bytes(data), notes, touched


# =========================================================================== the workspace


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


# =========================================================================== generators


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(f"entrycheck-fuzz:{kind}:{seed}")


class Generators:
    """The four kinds of cases, each made from its seed alone (given the workspace)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        from entrycheck.explore.scenarios import SCENARIOS
        from entrycheck.props.invariants import INVARIANTS

        self.scenario_names = list(SCENARIOS)
        self.invariant_names = list(INVARIANTS)

    def case(self, kind: str, seed: int) -> Case | PatchCase:
        return {"elf": self.elf, "args": self.args, "patch": self.patch, "finding": self.finding}[kind](seed)

    # ------------------------------------------------------------------ ELF mutants

    def elf(self, seed: int) -> Case:
        rnd = _rng("elf", seed)
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

    def args(self, seed: int) -> Case:
        rnd = _rng("args", seed)
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
        rnd = _rng("patch", seed)
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
        rnd = _rng("finding", seed)
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


# ---------------------------------------------------------------------- patch mutations

_HUNK_NUMBERS = ["0", "1", "-1", "99999999999999999999999", "4294967296", "2147483648", "", "x", "00", "1e3"]


def _mutate_patch(rnd: random.Random, text: str) -> tuple[str, str]:
    lines = text.split("\n")
    n = len(lines)
    hunks = [k for k, ln in enumerate(lines) if ln.startswith("@@")]
    headers = [k for k, ln in enumerate(lines) if ln.startswith(("diff --git", "--- ", "+++ ", "index "))]
    body = [k for k, ln in enumerate(lines) if ln[:1] in ("+", "-", " ") and k not in headers]
    op = rnd.choice(["delete", "duplicate", "swap", "hunk", "hunk", "hunk", "header", "header", "junk", "crlf",
                     "long", "empty", "truncate", "marker", "marker", "nonewline", "context", "git-extended",
                     "tabs", "repeat-file"])
    if op == "delete" and n:
        k = rnd.choice(body or list(range(n)))
        count = rnd.choice([1, 1, 2, 5])
        del lines[k:k + count]
        return "\n".join(lines), f"deleted {count} line(s) at {k}"
    if op == "duplicate" and n:
        k = rnd.choice(body or list(range(n)))
        lines.insert(k, lines[k])
        return "\n".join(lines), f"duplicated line {k}"
    if op == "swap" and n > 1:
        k = rnd.choice(body or list(range(n - 1)))
        k = min(k, n - 2)
        lines[k], lines[k + 1] = lines[k + 1], lines[k]
        return "\n".join(lines), f"swapped lines {k} and {k + 1}"
    if op == "hunk" and hunks:
        k = rnd.choice(hunks)
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)", lines[k])
        nums = [m.group(i) or "1" for i in (1, 2, 3, 4)] if m else ["1", "1", "1", "1"]
        style = rnd.random()
        if style < 0.6:
            i = rnd.randrange(4)
            nums[i] = rnd.choice(_HUNK_NUMBERS + [str(int(nums[i]) + rnd.choice([-2, -1, 1, 2, 100]))])
            lines[k] = f"@@ -{nums[0]},{nums[1]} +{nums[2]},{nums[3]} @@"
        elif style < 0.75:
            lines[k] = f"@@ -{nums[0]} +{nums[2]} @@"
        elif style < 0.85:
            lines[k] = rnd.choice(["@@", "@@ @@", "@@ -,+, @@", "@@@ -1,2 +1,2 @@@", "@@ -1,2 +1,2", "@@ - +  @@"])
        else:
            lines[k] = lines[k] + rnd.choice([" trailing", "@@", "\t", " @@ -1,1 +1,1 @@"])
        return "\n".join(lines), f"hunk header {k}: {lines[k][:80]!r}"
    if op == "header" and headers:
        k = rnd.choice(headers)
        head = lines[k].split(" ")[0]
        choice = rnd.random()
        if choice < 0.3:
            del lines[k]
            return "\n".join(lines), f"removed header line {k}"
        path = rnd.choice(["/dev/null", "../../etc/passwd", "/abs/path", "a/", "", "a/b c", "a/x\ty", "b/../../x",
                           "a/arch/x86/entry/entry_64.S\t2023-01-01", "arch/x86/entry/calling.h", "ünï",
                           "a/" + "x" * 300, "a/arch/x86/entry/", "a//arch//x86/entry/entry_64.S"])
        if head == "diff":
            lines[k] = rnd.choice([f"diff --git {path} {path}", "diff --git", f"diff --git a/{path}", "diff --gi"])
        elif head in ("---", "+++"):
            lines[k] = f"{head} {path}"
        else:
            lines[k] = rnd.choice(["index", "index zzz..yyy", "index 0000000..1111111 999999"])
        return "\n".join(lines), f"header {k}: {lines[k][:80]!r}"
    if op == "junk":
        junk = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 400))).decode("utf-8", "replace")
        k = rnd.randrange(n + 1)
        lines.insert(k, junk.replace("\n", ""))
        return "\n".join(lines), f"binary junk at line {k}"
    if op == "crlf":
        if rnd.random() < 0.5:
            return "\r\n".join(lines), "CRLF line ends"
        k = rnd.randrange(n) if n else 0
        if n:
            lines[k] += "\r"
        return "\n".join(lines), f"a CR at line {k}"
    if op == "long":
        k = rnd.randrange(n + 1)
        lines.insert(k, rnd.choice(["+", "-", " ", ""]) + "x" * rnd.choice([10000, 100000, 1000000]))
        return "\n".join(lines), f"a very long line at {k}"
    if op == "empty":
        return rnd.choice(["", "\n", " ", "\n\n\n", "\r\n"]), "empty"
    if op == "truncate" and text:
        at = rnd.randrange(len(text))
        return text[:at], f"truncated at {at} of {len(text)} characters"
    if op == "marker" and body:
        k = rnd.choice(body)
        lines[k] = rnd.choice(["+", "-", " ", "", "\\ ", "@"]) + lines[k][1:]
        return "\n".join(lines), f"marker of line {k} changed to {lines[k][:1]!r}"
    if op == "nonewline":
        k = rnd.randrange(n + 1)
        lines.insert(k, "\\ No newline at end of file")
        return "\n".join(lines), f"'\\ No newline' at line {k}"
    if op == "context" and body:
        k = rnd.choice(body)
        lines[k] = lines[k][:1] + rnd.choice(["drifted context", "", "\t", "  spaces  ", lines[k][1:].upper()])
        return "\n".join(lines), f"line {k} text changed"
    if op == "git-extended" and n:
        k = rnd.choice(headers or [0])
        lines.insert(k + 1, rnd.choice(["rename from x", "rename to y", "copy from x", "old mode 100644",
                                        "new mode 100755", "new file mode 100644", "deleted file mode 100644",
                                        "GIT binary patch", "Binary files a/x and b/x differ", "similarity index 90%",
                                        "new file mode 777777", "new mode 100000"]))
        return "\n".join(lines), f"git extended header after line {k}: {lines[k + 1]!r}"
    if op == "tabs" and body:
        k = rnd.choice(body)
        lines[k] = lines[k].replace("\t", "        ") if "\t" in lines[k] else lines[k].replace("    ", "\t")
        return "\n".join(lines), f"whitespace of line {k} changed"
    if op == "repeat-file":
        return text + "\n" + text, "the whole text twice"
    return text, "unchanged"


# ---------------------------------------------------------------------- JSON mutations

_WRONG = [None, True, False, 0, -1, 1.5, 10 ** 30, -(10 ** 30), "", "x", [], {}, [[]], [None], {"a": 1},
          "sync_regs+0xffffffffffffffffff", "nmi@sync_regs", float("inf")]


def _json_paths(doc, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_json_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            out.extend(_json_paths(v, prefix + (i,)))
    return out


def _mutate_json(rnd: random.Random, doc: dict) -> str:
    viol = [p for p in _json_paths(doc) if p[:1] == ("violations",)]
    paths = viol if viol and rnd.random() < 0.85 else _json_paths(doc)
    path = rnd.choice([p for p in paths if p] or [("violations",)])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    op = rnd.random()
    special = {"hit": [0, -1, 10 ** 20, True, "1", 1.5, None, 2 ** 63],
               "vector": ["bogus", "", "NMI", "irq", "pf", 2, None, "df", "vc"],
               "at": ["", "nosuch", "entry_SYSCALL_64+0xfffff", "entry_SYSCALL_64+1", "+", "sync_regs+-1",
                      "0xffffffff81000000", "entry_SYSCALL_64+0x" + "f" * 40, "paranoid_exit+0x3"],
               "scenario": ["bogus", "", "nmi-from-user", "vc-from-kernel", "irq-from-user", 1, None],
               "features": ["", "bogus", "all", "none", "pti,pcid,fsgsbase,kernel_ibrs", "x86_feature_smap", 0],
               "effects": [["bogus"], [1], "invalidate-user-asid", ["invalidate-user-asid", "invalidate-user-asid"],
                           None, ["switch-kernel-asid"]]}
    if op < 0.3 and isinstance(parent, (dict, list)):
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(last, int) and last < len(parent):
            del parent[last]
        return f"deleted {'/'.join(map(str, path))}"
    if op < 0.7 and isinstance(last, str) and last in special:
        value = rnd.choice(special[last])
    elif op < 0.8 and isinstance(parent, list):
        parent.extend(copy.deepcopy(parent[:1]) * rnd.choice([1, 100]))
        return f"extended {'/'.join(map(str, path[:-1]))}"
    else:
        value = rnd.choice(_WRONG)
    parent[last] = value
    return f"{'/'.join(map(str, path))}={json.dumps(value)[:40]}"


def _mutate_json_text(rnd: random.Random, text: str) -> tuple[bytes, str]:
    roll = rnd.random()
    if roll < 0.55:
        return text.encode(), ""
    if roll < 0.62:
        at = rnd.randrange(len(text) + 1)
        return text[:at].encode(), f"truncated at {at}"
    if roll < 0.70:
        depth = rnd.choice([100, 1000, 10000, 100000])
        nest = rnd.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        where = rnd.choice(["whole", "violations", "injections"])
        if where == "whole":
            return nest.encode(), f"nesting {depth} deep"
        if where == "violations":
            return json.dumps({"violations": "@"}).replace('"@"', nest).encode(), f"violations nested {depth} deep"
        return json.dumps({"violations": [{"scenario": "syscall", "features": "pti", "injections": "@"}]}) \
            .replace('"@"', nest).encode(), f"injections nested {depth} deep"
    if roll < 0.76:
        data = bytearray(text.encode())
        for _ in range(rnd.randint(1, 5)):
            data.insert(rnd.randrange(len(data) + 1), rnd.choice([0xFF, 0xC3, 0x80, 0xFE, 0xED]))
        return bytes(data), "invalid UTF-8"
    if roll < 0.80:
        return text.encode("utf-16"), "UTF-16"
    if roll < 0.84:
        return b"\xef\xbb\xbf" + text.encode(), "a byte order mark"
    if roll < 0.88:
        return (text + rnd.choice(["garbage", "}", "\0", "\n\n{}", " "])).encode(), "trailing text"
    if roll < 0.92:
        return rnd.choice([b"", b"null", b"0", b'"x"', b"{}", b'{"violations": null}', b'{"violations": {}}',
                           b'{"violations": [null]}', b'{"violations": [[]]}', b"NaN", b"Infinity", b"1e999",
                           b'{"violations": [{"scenario": "syscall", "features": "pti", "injections": NaN}]}']), \
            "a small document"
    if roll < 0.96:
        return re.sub(r"\b(\d+)\b", lambda m: rnd.choice(["1e999", "-0", "NaN", "99999999999999999999999",
                                                          m.group(1)]), text, count=50).encode(), "odd numbers"
    return bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 2000))), "binary junk"


# =========================================================================== driving


class Fuzzer:
    """A workspace, its generators and a runner: ``run(kind, seeds)``."""

    def __init__(self, root: Path, *, kernel_objects: Sequence[Path] = (), timeout: float = DEFAULT_TIMEOUT):
        self.ws = Workspace(root, kernel_objects=kernel_objects)
        self.gen = Generators(self.ws)
        self.runner = Runner(self.ws, timeout)

    def run_one(self, kind: str, seed: int) -> CaseResult:
        case = self.gen.case(kind, seed)
        try:
            if isinstance(case, PatchCase):
                return self.runner.run_patch(case)
            return self.runner.run(case)
        except Exception as exc:  # noqa: BLE001 - a fault of this harness: shown as such, the run goes on
            argv = tuple(case.argv) if isinstance(case, Case) else ()
            return CaseResult(kind, seed, argv, None, "".join(traceback.format_exception(exc)), 0.0,
                              f"harness error: {type(exc).__name__}: {exc}", note=case.note)

    def run(self, kind: str, seeds: Iterable[int],
            progress: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
        out = []
        for seed in seeds:
            res = self.run_one(kind, seed)
            out.append(res)
            if progress:
                progress(res)
        return out

    def locate(self, result: CaseResult) -> str:
        """The raising place of a problem case (regenerated from its seed)."""
        if result.kind == "patch":
            return result.where
        case = self.gen.case(result.kind, result.seed)
        assert isinstance(case, Case)
        return self.runner.locate(case)

    def materialize(self, kind: str, seed: int, directory: Path) -> list[str]:
        """Write the inputs of a case to ``directory``: the argv to reproduce it there."""
        case = self.gen.case(kind, seed)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(case, PatchCase):
            tree = directory / "tree"
            if not tree.exists():
                shutil.copytree(self.ws.patch_src, tree)
            for k, (name, text) in enumerate(case.patches):
                (directory / f"{k}-{Path(name).name or 'unnamed'}"[:200]).write_text(text, errors="surrogateescape")
            return []
        argv = []
        mapping = {str(p): str(directory / p.name) for p in case.files}
        for path, data in case.files.items():
            (directory / path.name).write_bytes(data)
        for token in case.argv:
            for old, new in mapping.items():
                token = token.replace(old, new)
            argv.append(token)
        return argv


__all__ = ["ALLOWED_EXIT", "Case", "CaseResult", "DEFAULT_TIMEOUT", "ElfSeed", "Fuzzer", "Generators", "KINDS",
           "PatchCase", "Runner", "Workspace", "have_assembler", "mutate_elf", "problems", "report", "signature"]
