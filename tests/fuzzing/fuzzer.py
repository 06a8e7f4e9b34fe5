"""Driving a run: a workspace, its generators and a runner."""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .case import DEFAULT_TIMEOUT, Case, CaseResult, PatchCase
from .generators import Generators
from .runner import Runner
from .workspace import Workspace


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
