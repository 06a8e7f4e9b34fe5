"""Running one case: the command line in this process, or a patch through the patch layer.

A case of the command line runs ``entrycheck.cli.main`` with ``sys.argv`` patched, standard
output and error captured, in the workspace's run/ directory with its tmp/ as the temporary
directory, under an alarm (the timeout); the state an earlier case left in the process is
reset first.  What the case left behind is compared with the workspace before it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .case import ALLOWED_EXIT, DEFAULT_TIMEOUT, TRACEBACK, Case, CaseResult, PatchCase, _one_line_error
from .files import (_exists, _hardlink_copy, _inside, _is_dir, _listing, _remove, _stray_temporaries,
                    _tree_digest)

if TYPE_CHECKING:
    from .workspace import Workspace

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent


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
