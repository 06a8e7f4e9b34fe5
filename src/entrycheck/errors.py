"""The one exception root of entrycheck.

``InputError`` is the user's fault (bad path, unknown feature, a tree that does not
build...): the command line prints its message as one line and exits with 2.
Anything else deriving from ``EntrycheckError`` is an internal fault.  Invariant
violations are never exceptions: they are findings (see ``entrycheck.props``).
"""


class EntrycheckError(Exception):
    """Root of every error entrycheck raises on purpose."""


class InputError(EntrycheckError):
    """Bad input: one line that says what is wrong and what to do (exit 2)."""


class InternalError(EntrycheckError):
    """A fault of entrycheck itself or of its model (a bug to report)."""
