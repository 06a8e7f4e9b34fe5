"""The one exception root of entrycheck.

``InputError`` is the user's fault (bad path, unknown feature, a tree that does not
build...): the command line prints its message as one line and exits with 2.
Anything else deriving from ``EntrycheckError`` is an internal fault.  Invariant
violations are never exceptions: they are findings (see ``entrycheck.props``).
"""


class EntrycheckError(Exception):
    """Root of every error entrycheck raises on purpose."""


class InputError(EntrycheckError):
    """Bad input: one line that says what is wrong and what to do (exit 2).  Characters
    that would break the line (a newline or carriage return in a user's file name) are
    shown escaped."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    """``text`` with its control characters escaped, as one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InternalError(EntrycheckError):
    """A fault of entrycheck itself or of its model (a bug to report)."""
