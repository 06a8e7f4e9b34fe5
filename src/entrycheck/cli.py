"""entrycheck's command line: thin commands, the only place that prints or exits.

Exit codes: 0 clean, 1 violations found (check/diff), 2 bad input, 3 internal error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from entrycheck import session
from entrycheck.cli_options import (TREE_OPTION, DiffOptions, ExploreOptions, as_given, config_options, diff_options,
                                    explore_options, resolve)
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



def _load(target: str, tree: str | None, config: tuple = (None, ())):
    from entrycheck.image import load_build
    from entrycheck.report.progress import terminal_progress

    with terminal_progress() as progress:
        build = resolve(target, tree, progress, config)
    loaded = load_build(build)
    return build, loaded


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



@cli.command()
@click.argument("target")
@click.argument("symbol")
@click.option("--features", default="", show_default=False,
              help="CPU features to patch alternatives for, e.g. pti,pcid (default: none).")
@TREE_OPTION
@config_options
@click.option("--intel", is_flag=True, help="Intel syntax instead of AT&T.")
@click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the listing as JSON.")
def disasm(target: str, symbol: str, features: str, tree: str | None, intel: bool, json_out: str | None,
           config: tuple) -> None:
    """Show the code that really runs for SYMBOL with a feature set, objdump-like."""
    from entrycheck.image.features import FeatureSet
    from entrycheck.report.disasm import disassemble, format_lines

    out = _outputs(json_out)
    build, loaded = _load(target, tree, config)
    fs = FeatureSet.parse(features)
    image = loaded.image(fs)
    lines = disassemble(image, symbol, att=not intel)
    note = f"# {build.label}; features: {fs}; feature numbers from the {loaded.features.source}"
    if json_out:
        out.stage("--json", _json_text({
            "target": build.label, "kernel_version": build.kernel_version, "symbol": symbol,
            "features": list(fs.names), "feature_numbers": loaded.features.source,
            "instructions": [{"address": f"{ln.address:#x}", "at": ln.location, "bytes": ln.raw.hex(),
                              "text": ln.text, "relocation": ln.reloc, "alternative": ln.alt}
                             for ln in lines]}))
        _commit(out)
        if json_out == "-":
            return
    click.echo(note, err=True)
    click.echo(format_lines(image, symbol, lines))


def _echo_mail(findings, redundant, build, loaded, target: str, mail_class: str | None) -> None:
    from entrycheck.report import mail

    if mail_class == "redundant-write" or (mail_class is None and not findings and redundant):
        if not redundant:
            raise InputError("no redundant writes to write up on the paths without injection")
        click.echo(mail.write_redundant(redundant[0], target=target, kernel_version=build.kernel_version,
                                        others=redundant[1:]), nl=False)
        return
    if not findings:
        click.echo("No findings: nothing to write up.")
        return
    if mail_class is not None and mail_class not in {f.invariant for f in findings}:
        raise InputError(f"no {mail_class} findings to write up; found: "
                         + ", ".join(mail.classes(findings)))
    lines = session.source_lines(build, loaded)
    images: dict = {}

    def source_line(f, site: str):
        if not lines:
            return None
        image = images.get(f.features)
        if image is None:
            image = images[f.features] = loaded.image(f.features)
        try:
            return lines.location(image.parse_location(site))
        except Exception:  # noqa: BLE001 - a site outside the object has no line
            return None

    click.echo(mail.write(findings, target=target, kernel_version=build.kernel_version, invariant=mail_class,
                          source_tree=build.source_tree, source_line=source_line), nl=False)


def _explain(name: str) -> None:
    import textwrap

    from entrycheck.props.invariants import invariant

    inv = invariant(name)
    click.echo(textwrap.fill(f"{inv.name}: {inv.summary}", 80) + "\n")
    click.echo(textwrap.fill(inv.rationale, 80))
    if inv.needs:
        click.echo("\n" + textwrap.fill(f"Checked when the feature set has {inv.needs}.", 80))
    if inv.history:
        click.echo("\nHistory:")
        for commit, what in inv.history:
            click.echo(textwrap.fill(f"{commit} {what}", 80, initial_indent="  ", subsequent_indent="    "))


@cli.command()
@click.argument("target", required=False)
@explore_options
@click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the result as JSON.")
@click.option("--html", "html_out", default=None, metavar="PATH",
              help="Also write a self-contained HTML report to PATH.")
@click.option("--explain", default=None, metavar="INVARIANT", help="Say what an invariant checks, and why.")
@click.option("--baseline", default=None, metavar="FILE",
              help="A previous --json of this check: its findings are known; exit 1 only for new ones.")
@click.option("--format", "out_format", type=click.Choice(["text", "mail"]), default="text", show_default=True,
              help="mail: one finding class written up for the maintainers (72 columns), instead of the summary.")
@click.option("--class", "mail_class", default=None, metavar="INVARIANT",
              help="With --format mail: the class to write up, an invariant or redundant-write (default: "
              "the first root cause, else the easiest to reach).")
def check(target, opts: ExploreOptions, json_out, html_out, explain, baseline, out_format, mail_class) -> None:
    """Inject exceptions at every instruction boundary of every path and check the invariants.

    Exit status: 0 clean (or nothing beyond the baseline), 1 violations found, 2 bad input.
    """
    from entrycheck.props.invariants import INVARIANTS, invariant

    if explain:
        _explain(explain)
        return
    if not target:
        raise click.UsageError("missing TARGET (or use --explain INVARIANT; invariants: "
                               + ", ".join(INVARIANTS) + ")")
    from entrycheck.explore import baseline as known_findings
    from entrycheck.report.jsonout import check_json
    from entrycheck.report.progress import terminal_progress
    from entrycheck.report.text import check_summary

    out = _outputs(json_out, html_out)
    opts.validate()
    if mail_class is not None:
        if out_format != "mail":
            raise InputError("--class goes with --format mail")
        if mail_class != "redundant-write":
            invariant(mail_class)
    if out_format == "mail" and json_out == "-":
        raise InputError("--format mail writes to standard output: give --json a file")
    known = known_findings.load(baseline) if baseline else None
    build, loaded = _load(target, opts.tree, opts.build_config)
    target = as_given(target, opts)
    cfg = opts.check_config(loaded)
    with terminal_progress() as progress:
        done = session.check(build, loaded, cfg, workers=opts.workers, scheduler=opts.scheduler, progress=progress,
                             baseline=known)
    result = done.result
    if json_out:
        out.stage("--json", _json_text(check_json(result, target=build.label, kernel_version=build.kernel_version,
                                                  feature_numbers=loaded.features.source, matches=done.matches,
                                                  baseline=(baseline, done.new) if known is not None else None,
                                                  redundant=done.redundant, coverage=done.coverage)))
    if html_out:
        from entrycheck.report.html import check_html, command_line
        out.stage("--html", check_html(result, build=build, loaded=loaded, target=target, command=command_line(),
                                       coverage=done.coverage, lines=session.source_lines(build, loaded)))
    _commit(out)
    if out_format == "mail":
        _echo_mail(done.new, done.redundant, build, loaded, target, mail_class)
    elif json_out != "-":
        if any(v.label == "db" for v in cfg.vectors) and cfg.depth and done.ref.refusals is None:
            click.echo("note: no hw_breakpoint.c at hand: #DB may follow an access to anything but\n"
                       "  what within_cpu_entry() of 6.1/6.12 protects (--tree gives the source's list)")
        if known is not None:
            import copy

            shown = copy.copy(result)
            shown.findings = done.new
            text = check_summary(shown, target=target, kernel_version=build.kernel_version, redundant=done.redundant,
                                 coverage=done.coverage)
            click.echo(f"{len(done.known)} known findings (in the baseline {baseline}) not listed; "
                       f"{len(done.new)} new.\n" + text)
        else:
            click.echo(check_summary(result, target=target, kernel_version=build.kernel_version,
                                     redundant=done.redundant, coverage=done.coverage))
    sys.exit(1 if done.new else (EXIT_INTERNAL if result.errors else 0))


@cli.command()
@click.argument("target")
@click.option("--scenario", "scenario_name", default=None, help="The path to run (see 'entrycheck scenarios').")
@click.option("--features", default="pti,pcid", show_default=True, metavar="LIST", help="One feature set.")
@click.option("--inject", "injects", multiple=True, metavar="VEC@SYM+OFF[#N]",
              help="Deliver VEC before the N-th execution (default 1st) of that instruction, counted from the "
                   "previous injection; repeat to nest.")
@click.option("--handler-effects", default=None, metavar="LIST", help="Handlers also do this (see check).")
@click.option("--finding", default=None, metavar="FILE[:N]",
              help="Replay violation N (default 0) of a check JSON file.")
@TREE_OPTION
@config_options
@click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the trace as JSON.")
def trace(target, scenario_name, features, injects, handler_effects, finding, tree, json_out, config) -> None:
    """Run one path instruction by instruction and show every privileged state change."""
    from entrycheck.explore.check import parse_effects
    from entrycheck.explore.replay import parse_injection, trace as run_trace
    from entrycheck.explore.scenarios import scenario
    from entrycheck.image.features import FeatureSet
    from entrycheck.kernelabi.world import build_world
    from entrycheck.report.jsonout import trace_json
    from entrycheck.report.text import trace_text

    if finding:
        scenario_name, features, injects, handler_effects = _from_finding(finding)
    if not scenario_name:
        from entrycheck.explore.scenarios import SCENARIOS

        raise click.UsageError("missing --scenario; choose from " + ", ".join(SCENARIOS))
    sc = scenario(scenario_name)
    out = _outputs(json_out)
    build, loaded = _load(target, tree, config)
    fs = FeatureSet.parse(features)
    image = loaded.image(fs)
    world = build_world(image)
    injections = tuple(parse_injection(i, image) for i in injects)
    effects = frozenset(parse_effects(handler_effects))
    t = run_trace(world, sc, injections, effects)
    if json_out:
        out.stage("--json", _json_text(trace_json(t, image, target=build.label, kernel_version=build.kernel_version,
                                                  features=str(fs))))
    _commit(out)
    if json_out != "-":
        click.echo(trace_text(t, image, target=target, features=str(fs)))


def _from_finding(spec: str):
    from entrycheck.machine.events import Injection

    path, _, index = spec.rpartition(":") if ":" in spec and spec.rsplit(":", 1)[1].isdigit() else (spec, "", "0")
    try:
        doc = json.loads(Path(path).read_text())
        v = doc["violations"][int(index or 0)]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise InputError(f"{path} has no violation {index or 0} (expected the JSON of entrycheck check)") from None
    try:
        injects = tuple(Injection.from_json(i).spec() for i in v.get("injections", []))
        effects = v.get("effects", [])
        if not isinstance(v["scenario"], str) or not isinstance(v["features"], str) or \
                not all(isinstance(e, str) for e in effects):
            raise TypeError
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError):
        raise InputError(f"{path} has no violation {index or 0} (expected the JSON of entrycheck check)") from None
    return v["scenario"], v["features"], injects, ",".join(effects) or None



# ---- demo: the bundled fixture --------------------------------------------------------------
@cli.command()
@click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the result as JSON.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Worker processes (default: one per CPU); the variants are checked side by side.")
@click.option("--keep", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Keep the assembled objects (and the fixture's source) in DIR, so that the "
                   "reproducers can be replayed with 'entrycheck trace'.")
def demo(json_out: str | None, workers: int | None, keep: str | None) -> None:
    """Check a small bundled entry fixture in four variants: no network, no kernel build.

    The fixture is assembled with GNU as (binutils) at run time.  Variants 0 and 1
    (the paranoid return before and after skipping redundant CR3 writes) must come out
    safe, the broken variants 2 and 3 unsafe.  Exit status: 0 when they do, 1 when not,
    2 when GNU as is missing.
    """
    from entrycheck.demo import demo_json, demo_text, run_demo
    from entrycheck.report.progress import terminal_progress

    out = _outputs(json_out)
    with terminal_progress() as progress:
        result = run_demo(workers=workers or session.default_workers(), keep=Path(keep) if keep else None,
                          progress=progress)
    if json_out:
        out.stage("--json", _json_text(demo_json(result)))
    _commit(out)
    if json_out != "-":
        click.echo(demo_text(result))
    sys.exit(0 if result.as_expected else 1)
# ---- end of demo ----------------------------------------------------------------------------


def _run_diff(old_build, old_loaded, new_build, new_loaded, opts: ExploreOptions, report: DiffOptions, out,
              html_info=None):
    from entrycheck.report.difftext import diff_json, diff_text
    from entrycheck.report.progress import terminal_progress

    model = report.model()
    known = report.known()
    cfg = opts.check_config(old_loaded)
    opts.check_config(new_loaded)
    with terminal_progress() as progress:
        done = session.diff(old_build, old_loaded, new_build, new_loaded, cfg, workers=opts.workers,
                            scheduler=opts.scheduler, progress=progress, baseline=known)
    result = done.result
    if report.json_out:
        out.stage("--json", _json_text(diff_json(result, old_label=old_build.label, new_label=new_build.label,
                                                 old_version=old_build.kernel_version,
                                                 new_version=new_build.kernel_version, model=model,
                                                 nmi_rate=report.nmi_rate)))
    if report.html_out:
        from entrycheck.report.html import command_line, diff_html
        out.stage("--html", diff_html(result, old_build=old_build, old_loaded=old_loaded,
                                      new_build=new_build, new_loaded=new_loaded, model=model,
                                      nmi_rate=report.nmi_rate, command=command_line(),
                                      lines=(session.source_lines(old_build, old_loaded),
                                             session.source_lines(new_build, new_loaded)), **html_info))
    _commit(out)
    if report.json_out != "-":
        click.echo(diff_text(result, old_label=old_build.label, new_label=new_build.label, model=model,
                             nmi_rate=report.nmi_rate))
        if known is not None:
            click.echo(f"{len(done.in_baseline)} of the {len(result.new_violations)} new violations are known "
                       f"(in the baseline {report.baseline}).")
    sys.exit(1 if done.unknown else 0)


@cli.command()
@click.argument("old")
@click.argument("new")
@explore_options
@diff_options
def diff(old, new, opts: ExploreOptions, report: DiffOptions) -> None:
    """Run the same scenarios and injections on two builds and compare them path by path.

    Exit status: 0 unless NEW has violations OLD had not (then 1); 2 on bad input.
    """
    report.model()
    report.known()
    opts.validate()
    out = _outputs(report.json_out, report.html_out)
    old_build, old_loaded = _load(old, opts.tree, opts.build_config)
    new_build, new_loaded = _load(new, opts.tree, opts.build_config)
    _run_diff(old_build, old_loaded, new_build, new_loaded, opts, report, out,
              {"old_target": as_given(old, opts), "new_target": as_given(new, opts)})


@cli.command()
@click.argument("target")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A patch (mail, git format-patch, unified diff, or archive text); repeat for a series.")
@explore_options
@diff_options
def review(target, patches, opts: ExploreOptions, report: DiffOptions) -> None:
    """Build TARGET with and without the patch(es), then compare the two like diff."""
    from entrycheck.image import load_build
    from entrycheck.kernel.review import patched_build, read_patches
    from entrycheck.report.progress import terminal_progress

    report.model()                 # bad options fail before any build
    report.known()
    opts.validate()
    texts = read_patches([Path(p) for p in patches])
    out = _outputs(report.json_out, report.html_out)
    with terminal_progress() as progress:
        base = resolve(target, opts.tree, progress, opts.build_config)
        patched = patched_build(base, texts, progress=progress)
    if patched.applied is not None:
        for pl in patched.applied.placements:
            if pl.context_mismatches or pl.placed_line != pl.header_line:
                click.echo(f"note: {pl.file} hunk {pl.hunk} applied at line {pl.placed_line} (header says "
                           f"{pl.header_line}; {pl.context_mismatches} context lines differ)", err=True)
    _run_diff(base, load_build(base), patched.build, load_build(patched.build), opts, report, out,
              {"old_target": as_given(target, opts), "new_target": as_given(str(patched.tree), opts),
               "patches": texts})


@cli.command()
def scenarios() -> None:
    """List the scenarios and the invariants."""
    from entrycheck.explore.scenarios import SCENARIOS
    from entrycheck.props.invariants import INVARIANTS

    click.echo("Scenarios:")
    for sc in SCENARIOS.values():
        click.echo(f"  {sc.name:<24s}{sc.description}" + (f" (needs {sc.needs})" if sc.needs else ""))
    click.echo("User values (from user mode: NAME[field=value,...], e.g. syscall[rsp=0xfffffe0000008fc0]):")
    click.echo("  rsp, gsbase, rflags (what user space set before entering); ret_rip (the RIP a system call")
    click.echo("  returns to, as rt_sigreturn or ptrace set it).  check derives the values that matter.")
    click.echo("Invariants:")
    for inv in INVARIANTS.values():
        click.echo(f"  {inv.name:<30s}{inv.summary}")


@cli.command()
def cpus() -> None:
    """List the CPU presets of --cpu: the features Linux 6.12 sets for each, and where they come from."""
    from entrycheck.image.cpus import PRESETS
    import textwrap

    for p in PRESETS.values():
        click.echo(f"{p.name}: {p.cpu}")
        click.echo(f"  --features {p.features}")
        click.echo(textwrap.fill(p.source, 80, initial_indent="  ", subsequent_indent="  "))


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

