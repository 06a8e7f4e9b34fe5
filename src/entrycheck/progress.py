"""A tiny progress protocol so that lower layers can report progress without printing.

Layers below ``cli`` accept a ``Progress``; the command line passes one that draws a
rich progress bar on a TTY and stays silent otherwise.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Report that ``stage`` is under way, optionally ``done`` of ``total`` units."""


def silent(stage: str, done: int | None = None, total: int | None = None) -> None:
    """A Progress that reports nothing."""
