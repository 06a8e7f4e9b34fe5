"""Progress display: a rich progress bar on a TTY, nothing in pipes and CI."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from entrycheck.progress import Progress, silent


@contextmanager
def terminal_progress(enabled: bool | None = None) -> Iterator[Progress]:
    """Yield a Progress that draws on stderr when it is a terminal (or when forced)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield silent
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn, \
        TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int | None = None, total: int | None = None) -> None:
            if stage not in tasks:
                for other in tasks.values():
                    bar.update(other, visible=False)
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done if done is not None else 0, total=total)

        yield report
