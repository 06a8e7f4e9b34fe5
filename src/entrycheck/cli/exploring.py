"""The exploring commands: check, diff and review."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from entrycheck import fixcheck, session
from entrycheck.cli import EXIT_INTERNAL, _commit, _json_text, _load, _outputs, cli
from entrycheck.cli.options import DiffOptions, ExploreOptions, as_given, diff_options, explore_options, resolve
from entrycheck.errors import InputError


def _echo_mail(findings, redundant, build, loaded, target: str, mail_class: str | None, cfg=None,
               workers: int | None = None) -> None:
    from entrycheck.report import mail

    if mail_class == "redundant-write" or (mail_class is None and not findings and redundant):
        if not redundant:
            raise InputError("no redundant writes to write up on the paths without injection")
        def verify_write(w, fix):
            from entrycheck.report.progress import terminal_progress

            with terminal_progress() as progress:
                return fixcheck.verify_redundant_fix(build, loaded, cfg, w, "fix.patch", fix.diff, workers=workers,
                                                     progress=progress)

        click.echo(mail.write_redundant(redundant[0], target=target, kernel_version=build.kernel_version,
                                        others=redundant[1:], source_tree=build.source_tree,
                                        verify=verify_write if cfg is not None else None), nl=False)
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

    def verify(fs, fix):
        if not fix.compiled:
            return fixcheck.verify_refusals(build, loaded, cfg, fs, fix.patched, workers=workers)
        from entrycheck.report.progress import terminal_progress

        with terminal_progress() as progress:
            return fixcheck.verify_patch(build, loaded, cfg, fs, "fix.patch", fix.diff, workers=workers,
                                         progress=progress)

    click.echo(mail.write(findings, target=target, kernel_version=build.kernel_version, invariant=mail_class,
                          source_tree=build.source_tree, source_line=source_line,
                          verify=verify if cfg is not None else None), nl=False)


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
    target = as_given(target, opts.tree, opts.build_config)
    cfg = opts.check_config(loaded, build.source_tree)
    with terminal_progress() as progress:
        done = session.check(build, loaded, cfg, workers=opts.workers, scheduler=opts.scheduler, progress=progress,
                             baseline=known)
    result = done.result
    if json_out:
        out.stage("--json", _json_text(check_json(result, target=build.label, kernel_version=build.kernel_version,
                                                  feature_numbers=loaded.features.source, matches=done.matches,
                                                  baseline=(baseline, done.new) if known is not None else None,
                                                  redundant=done.redundant, coverage=done.coverage,
                                                  kernel_c=session.kernel_c(build))))
    if html_out:
        from entrycheck.report.html import check_html, command_line
        out.stage("--html", check_html(result, build=build, loaded=loaded, target=target, command=command_line(),
                                       coverage=done.coverage, lines=session.source_lines(build, loaded)))
    _commit(out)
    if out_format == "mail":
        _echo_mail(done.new, done.redundant, build, loaded, target, mail_class, cfg, opts.workers)
    elif json_out != "-":
        if any(v.label == "db" for v in cfg.vectors) and cfg.depth and done.ref.refusals is None:
            click.echo("note: no hw_breakpoint.c at hand: #DB may follow an access to anything but\n"
                       "  what within_cpu_entry() of 6.1/6.12 protects (--tree gives the source's list)")
        if known is not None:
            import copy

            shown = copy.copy(result)
            shown.findings = done.new
            text = check_summary(shown, target=target, kernel_version=build.kernel_version, redundant=done.redundant,
                                 coverage=done.coverage, kernel_c=session.kernel_c(build))
            click.echo(f"{len(done.known)} known findings (in the baseline {baseline}) not listed; "
                       f"{len(done.new)} new.\n" + text)
        else:
            click.echo(check_summary(result, target=target, kernel_version=build.kernel_version,
                                     redundant=done.redundant, coverage=done.coverage,
                                     kernel_c=session.kernel_c(build)))
    sys.exit(1 if done.new else (EXIT_INTERNAL if result.errors else 0))


EXIT_NOT_CHECKED = 4      # review: no explored path ran anything the patch changed


def _run_diff(old_build, old_loaded, new_build, new_loaded, opts: ExploreOptions, report: DiffOptions, out,
              html_info=None, review=None):
    """diff and review; ``review``: (patch texts, the applier's placements) for a review."""
    from entrycheck.report.difftext import diff_json, diff_text
    from entrycheck.report.progress import terminal_progress

    model = report.model()
    known = report.known()
    cfg = opts.check_config(old_loaded, old_build.source_tree)
    opts.check_config(new_loaded, new_build.source_tree)
    patch = None
    with terminal_progress() as progress:
        if review is not None:
            reviewed = session.review(old_build, old_loaded, new_build, new_loaded, review[0], review[1], cfg,
                                      workers=opts.workers, scheduler=opts.scheduler, progress=progress,
                                      baseline=known)
            done, patch = reviewed.diffed, reviewed.patch
        else:
            done = session.diff(old_build, old_loaded, new_build, new_loaded, cfg, workers=opts.workers,
                                scheduler=opts.scheduler, progress=progress, baseline=known)
    result = done.result
    if report.json_out:
        out.stage("--json", _json_text(diff_json(result, old_label=old_build.label, new_label=new_build.label,
                                                 old_version=old_build.kernel_version,
                                                 new_version=new_build.kernel_version, model=model,
                                                 nmi_rate=report.nmi_rate, patch=patch,
                                                 kernel_c=(session.kernel_c(old_build), session.kernel_c(new_build)))))
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
                             nmi_rate=report.nmi_rate, patch=patch,
                             kernel_c=(session.kernel_c(old_build), session.kernel_c(new_build))))
        if known is not None:
            click.echo(f"{len(done.in_baseline)} of the {len(result.new_violations)} new violations are known "
                       f"(in the baseline {report.baseline}).")
    if done.unknown:
        sys.exit(1)
    sys.exit(EXIT_NOT_CHECKED if patch is not None and not patch.checked else 0)


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
              {"old_target": as_given(old, opts.tree, opts.build_config),
               "new_target": as_given(new, opts.tree, opts.build_config)})


@cli.command()
@click.argument("target")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A patch (mail, git format-patch, unified diff, or archive text); repeat for a series.")
@explore_options
@diff_options
def review(target, patches, opts: ExploreOptions, report: DiffOptions) -> None:
    """Build TARGET with and without the patch(es), then compare the two like diff, and say what it
    checked of each hunk.

    Exit status: 0 unless the patched build has violations the other had not (then 1), 4 when no
    explored path ran anything the patch changed (nothing of it was checked), 2 on bad input.
    """
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
    new_build = session.with_c_stubs(patched.build) if opts.c_stubs else patched.build
    if patched.applied is not None:
        for pl in patched.applied.placements:
            if pl.context_mismatches or pl.placed_line != pl.header_line:
                click.echo(f"note: {pl.file} hunk {pl.hunk} applied at line {pl.placed_line} (header says "
                           f"{pl.header_line}; {pl.context_mismatches} context lines differ)", err=True)
    _run_diff(base, session.object_ref(base).load(), new_build, session.object_ref(new_build).load(), opts, report, out,
              {"old_target": as_given(target, opts.tree, opts.build_config),
               "new_target": as_given(str(patched.tree), opts.tree, opts.build_config), "patches": texts},
              review=(texts, patched.applied.placements if patched.applied is not None else None))
