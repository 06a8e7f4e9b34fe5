"""The on-disk cache of kernel sources and built entry objects.

Layout under the root ($ENTRYCHECK_CACHE, else ~/.cache/entrycheck)::

    src/<package>_<version>/     pristine Debian source trees (read-only use), Debian's
                                 configs (linux-config-X.Y_<version>/config.amd64)
    builds/<entry>/              one build: entry.o (its entry objects linked), objects/,
                                 cpufeatures.h, asm-offsets.h, kernel.config, meta.json
    builds/linked-<digest>/      entry.o of objects given as a TARGET, linked
    logs/<entry>.log             the full make output of the latest build of <entry>
    locks/<kind>-<entry>.lock    one flock(2) lock file per entry
    tmp/<kind>-<entry>@XXXX/     work in progress (downloads, extraction, builds)

Concurrency: whoever creates an entry holds its lock, works in a private directory
under ``tmp/`` (same file system as the final path) and publishes the finished
directory with a single ``os.rename``.  A final path therefore either does not
exist or is complete; a second run waiting on the lock finds the published entry
and reuses it.  Work directories are removed in a ``finally``; those left behind
by a killed run are removed by the next holder of the same lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..progress import Progress, silent

CACHE_ENV = "ENTRYCHECK_CACHE"
"""Environment variable that overrides the cache root."""

_UNSAFE = re.compile(r"[^A-Za-z0-9.+~_-]")
_WORK_SEPARATOR = "@"  # never produced by safe_name, so tmp/<name>@* is unambiguous


def default_cache_root() -> Path:
    """$ENTRYCHECK_CACHE when set, else ~/.cache/entrycheck."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "entrycheck"


def safe_name(text: str) -> str:
    """``text`` made usable as one path component (no '/', ':', '@', spaces...)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".")
    return cleaned or "_"


def remove_tree(path: Path) -> None:
    """Remove ``path`` (file or directory) if present, making read-only parts writable."""

    def fix_and_retry(func: Callable[..., object], name: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
            func(name)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=fix_and_retry)
        else:
            shutil.rmtree(path, onerror=fix_and_retry)


@dataclass(frozen=True)
class Cache:
    """A cache root and the operations that keep it consistent."""

    root: Path

    @classmethod
    def open(cls, root: Path | None = None) -> Cache:
        """The cache at ``root`` (default: ``default_cache_root()``), created if needed."""
        cache = cls((root or default_cache_root()).absolute())
        try:
            for sub in (cache.src, cache.builds, cache.logs, cache.locks, cache.tmp):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create the entrycheck cache in {cache.root}: {exc.strerror}; "
                f"set {CACHE_ENV} to a writable directory"
            ) from exc
        return cache

    @property
    def src(self) -> Path:
        """Pristine source trees."""
        return self.root / "src"

    @property
    def builds(self) -> Path:
        """Published build entries."""
        return self.root / "builds"

    @property
    def logs(self) -> Path:
        """Build logs, one per entry name."""
        return self.root / "logs"

    @property
    def locks(self) -> Path:
        """Lock files (never removed: removing a lock file races with its users)."""
        return self.root / "locks"

    @property
    def tmp(self) -> Path:
        """Work directories of runs in progress."""
        return self.root / "tmp"

    def log_path(self, name: str) -> Path:
        """Where the log of the build published as ``builds/<name>`` is kept."""
        return self.logs / f"{name}.log"

    @contextmanager
    def locked(self, kind: str, name: str, progress: Progress = silent) -> Iterator[None]:
        """Hold the exclusive lock of entry ``kind``/``name`` for the duration of the block.

        Work directories left for this entry by a run that died while holding the
        lock are removed once the lock is ours.
        """
        key = f"{kind}-{name}"
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                progress(f"waiting for another entrycheck run to finish {name}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            for orphan in self.tmp.glob(f"{key}{_WORK_SEPARATOR}*"):
                remove_tree(orphan)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def workspace(self, kind: str, name: str) -> Iterator[Path]:
        """A fresh private directory under ``tmp/``, removed when the block ends.

        Call it while holding ``locked(kind, name)``.
        """
        work = Path(tempfile.mkdtemp(prefix=f"{kind}-{name}{_WORK_SEPARATOR}", dir=self.tmp))
        try:
            yield work
        finally:
            remove_tree(work)

    def publish(self, staged: Path, final: Path) -> Path:
        """Move the finished directory ``staged`` to ``final`` in one rename.

        If ``final`` already exists (published meanwhile by a run that did not use
        the same lock), the existing entry wins and ``staged`` is left for cleanup.
        """
        try:
            os.rename(staged, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                raise
        return final

    def ensure(
        self,
        kind: str,
        final: Path,
        create: Callable[[Path, Path], None],
        progress: Progress = silent,
    ) -> Path:
        """Return ``final``, creating it first if it does not exist.

        ``create(work, staged)`` must build the complete entry at ``staged`` (a path
        inside the private directory ``work``); it is then published at ``final``.
        Only one run creates a given entry; the others wait and reuse it.
        """
        if final.exists():
            return final
        name = final.name
        with self.locked(kind, name, progress):
            if final.exists():
                return final
            with self.workspace(kind, name) as work:
                staged = work / "entry"
                create(work, staged)
                return self.publish(staged, final)
