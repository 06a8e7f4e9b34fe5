"""The file system around a case: what is under a tree, what a case may leave, removing it.

Every helper takes paths the fuzzed command line may have named: a name the system refuses
(too long, a NUL byte, ...) is an answer (False, nothing), never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from pathlib import Path


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
