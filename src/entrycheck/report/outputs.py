"""The files one command writes: checked before any work, written together at the end.

A command names its output paths first (``Outputs.want``: one clear InputError for a path
that cannot be written, before anything runs), stages each text as it is made
(``stage``), and ``commit`` writes them all: every file to a temporary name in its
directory, then every rename.  A failure, or an interrupt (``abort``, called by the
command line's signal handler), removes the temporary files and the files this commit
already put in place: the command leaves all of its outputs or none.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from entrycheck.errors import InputError

NAME_MAX = 255

def check_path(dest: str, option: str = "--html", stdout_ok: bool = False) -> Path | None:
    """Fail early (one-line InputError) if ``dest`` cannot be written as a file.
    None for "-" (standard output) where that is allowed."""
    if dest == "-" and stdout_ok:
        return None
    if dest in ("", "-"):
        raise InputError(f"{option} needs a file path")
    path = Path(dest)
    try:
        if "\0" in dest:
            raise InputError(f"{option}: the path contains a NUL byte")
        if any(len(part) > NAME_MAX for part in path.parts):
            raise InputError(f"cannot write {_short(dest)}: a file name longer than {NAME_MAX} bytes")
        if path.is_dir():
            raise InputError(f"cannot write {_short(dest)}: it is a directory")
        if path.exists() and not path.is_file():
            raise InputError(f"cannot write {_short(dest)}: it is not a regular file")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"cannot write {_short(dest)}: no such directory {_short(str(parent))}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {_short(dest)}: permission denied")
        # Whether a file can really be made there (a read-only or pseudo file system says so
        # only when asked): the temporary file the commit would write, made and removed.
        fd, probe = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write {_short(dest)}: {exc.strerror or exc}") from exc
    return path


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Outputs:
    """The output files of one command (see the module's docstring)."""

    def __init__(self, registry: list | None = None) -> None:
        # ``registry``: where a commit in progress is listed, for an interrupt to abort it
        # (the application's: entrycheck/session.py).
        self._registry = registry if registry is not None else []
        self._paths: dict[str, Path | None] = {}          # option -> path (None: standard output)
        self._texts: dict[str, str] = {}
        self._tmp: list[str] = []
        self._placed: list[Path] = []

    def want(self, option: str, dest: str | None, stdout_ok: bool = False) -> None:
        if dest is None:
            return
        path = check_path(dest, option, stdout_ok)
        if path is not None and any(p is not None and _same(p, path) for p in self._paths.values()):
            raise InputError(f"{option} {_short(dest)}: the same file is given for two outputs")
        self._paths[option] = path

    def wants(self, option: str) -> bool:
        return option in self._paths

    def to_stdout(self, option: str) -> bool:
        return option in self._paths and self._paths[option] is None

    def stage(self, option: str, text: str) -> None:
        if option not in self._paths:
            raise KeyError(option)
        self._texts[option] = text

    def commit(self) -> dict[str, str]:
        """Write every staged file; return the texts meant for standard output, by option."""
        stdout = {o: t for o, t in self._texts.items() if self._paths[o] is None}
        files = [(self._paths[o], t) for o, t in self._texts.items() if self._paths[o] is not None]
        self._registry.append(self)
        try:
            staged = []
            for path, text in files:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
                self._tmp.append(tmp)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.chmod(tmp, 0o644)
                staged.append((tmp, path))
            for tmp, path in staged:
                os.replace(tmp, path)
                self._tmp.remove(tmp)
                self._placed.append(path)
        except OSError as exc:
            self.abort()
            raise InputError(f"cannot write {_short(str(exc.filename or ''))}: {exc.strerror or exc}") from exc
        except BaseException:
            self.abort()
            raise
        finally:
            if self in self._registry:
                self._registry.remove(self)
        self._placed = []
        return stdout

    def abort(self) -> None:
        """Remove what an unfinished commit wrote."""
        for name in list(self._tmp) + [str(p) for p in self._placed]:
            try:
                os.unlink(name)
            except OSError:
                pass
        self._tmp, self._placed = [], []


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return str(a) == str(b)


__all__ = ["Outputs", "check_path"]
