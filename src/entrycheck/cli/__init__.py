"""entrycheck's command line: thin commands, the only place that prints or exits.

The group, ``main`` and what every command shares are here; the exploring commands (check,
diff, review) are in exploring.py, the others in commands.py, their options in options.py.
The work itself is the application layer's (entrycheck/session.py).

Exit codes: 0 clean, 1 violations found (check/diff), 2 bad input, 3 internal error.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from entrycheck import session
from entrycheck.cli.options import resolve
from entrycheck.errors import EntrycheckError, InputError, one_line

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class _State:
    debug = False
    pid = -1


def _fail(message: str, code: int) -> None:
    click.echo(f"entrycheck: error: {one_line(message)}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="entrycheck")
def cli(debug: bool) -> None:
    """Run the Linux x86-64 kernel's own entry code on a model CPU and check it.

    TARGET is a path to an entry_64.o, a kernel source tree or O= build directory,
    or debian:VERSION (e.g. debian:6.1, debian:6.12), fetched and built on first use.
    """
    _State.debug = debug or bool(os.environ.get("ENTRYCHECK_DEBUG"))



def _load(target: str, tree: str | None, config: tuple = (None, (), False)):
    from entrycheck.report.progress import terminal_progress

    with terminal_progress() as progress:
        build = resolve(target, tree, progress, config)
    return build, session.object_ref(build).load()


def _outputs(json_out: str | None = None, html_out: str | None = None):
    """The command's output files, checked before any work (see report/outputs.py)."""
    out = session.outputs()
    out.want("--json", json_out, stdout_ok=True)
    out.want("--html", html_out)
    return out


def _json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _commit(out) -> None:
    """Write the outputs together; what goes to standard output is echoed."""
    for text in out.commit().values():
        click.echo(text, nl=False)



# The commands (they register themselves on ``cli``).
from entrycheck.cli import commands, exploring  # noqa: E402,F401


def _children() -> list[int]:
    """The processes this one started (Linux /proc)."""
    me = str(os.getpid())
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    fields_ = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields_[1].decode() == me:
                out.append(int(name))
    return out


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM: stop now, within the handler (no exception to unwind through code
    that may swallow it): undo output files being written, kill the worker processes,
    one line, exit 130."""
    if os.getpid() != _State.pid:
        os._exit(130)                        # a forked worker before it set its own signals
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        session.abort_outputs()
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)      # workers and tools (make, apt-get) we started
            except OSError:
                pass
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K\x1b[?25h")     # the progress bar's line; the cursor back
        sys.stderr.write("entrycheck: error: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def main() -> None:
    _State.debug = "--debug" in sys.argv[1:] or bool(os.environ.get("ENTRYCHECK_DEBUG"))
    _State.pid = os.getpid()
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cli.main(standalone_mode=False, prog_name="entrycheck")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.UsageError as exc:
        if _State.debug:
            raise
        hint = f" (see: entrycheck {exc.ctx.command.name} --help)" if exc.ctx and exc.ctx.command.name != "cli" \
            else " (see: entrycheck --help)"
        _fail(exc.format_message().replace("\n", " ") + hint, EXIT_BAD_INPUT)
    except click.ClickException as exc:
        if _State.debug:
            raise
        _fail(exc.format_message().replace("\n", " "), EXIT_BAD_INPUT)
    except InputError as exc:
        if _State.debug:
            raise
        _fail(str(exc).replace("\n", " "), EXIT_BAD_INPUT)
    except EntrycheckError as exc:
        if _State.debug:
            raise
        _fail(f"internal error: {exc} (run with --debug for details)", EXIT_INTERNAL)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line unless --debug
        if _State.debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_INTERNAL)


if __name__ == "__main__":
    main()
