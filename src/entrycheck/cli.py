"""entrycheck's command line: thin commands, the only place that prints or exits.

Exit codes: 0 clean, 1 violations found (check/diff), 2 bad input, 3 internal error.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import click

from entrycheck.errors import EntrycheckError, InputError, one_line
from entrycheck.report.outputs import Outputs, abort_all

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


def _resolve(target: str, tree: str | None, progress, config: tuple = (None, ())):
    from entrycheck.kernel.kconfig import parse_request
    from entrycheck.kernel.targets import resolve_target

    if tree is not None and not tree.strip():
        raise InputError("--tree needs a kernel source directory")
    return resolve_target(target, tree=Path(tree) if tree else None, progress=progress,
                          request=parse_request(*config))


def _as_given(target: str, opts) -> str:
    """TARGET with the options that chose its build (--tree, --config, --kconfig), quoted for a
    shell: what a reproducer command needs to load the same image."""
    args = [target]
    if opts.tree:
        args += ["--tree", opts.tree]
    if opts.config:
        args += ["--config", opts.config]
    for option in opts.kconfig:
        args += ["--kconfig", option]
    return shlex.join(args)


def _load(target: str, tree: str | None, config: tuple = (None, ())):
    from entrycheck.image import load_build
    from entrycheck.report.progress import terminal_progress

    with terminal_progress() as progress:
        build = _resolve(target, tree, progress, config)
    loaded = load_build(build)
    return build, loaded


def _outputs(json_out: str | None = None, html_out: str | None = None):
    """The command's output files, checked before any work (see report/outputs.py)."""
    out = Outputs()
    out.want("--json", json_out, stdout_ok=True)
    out.want("--html", html_out)
    return out


def _json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _commit(out) -> None:
    """Write the outputs together; what goes to standard output is echoed."""
    for text in out.commit().values():
        click.echo(text, nl=False)


TREE_OPTION = click.option("--tree", type=click.Path(file_okay=False), default=None,
                           help="Kernel tree whose cpufeatures.h numbers the features of a bare .o.")
CONFIG_OPTION = click.option("--config", "config", type=click.Choice(["defconfig", "distro"]), default=None,
                             help="Build the target with defconfig or with Debian's own amd64 config of its "
                             "series (default: a tree's own .config, else defconfig).")
KCONFIG_OPTION = click.option("--kconfig", "kconfig", multiple=True, metavar="NAME=VALUE",
                              help="Set a kernel option on top (scripts/config + olddefconfig), e.g. "
                              "X86_FRED=y or DEBUG_ENTRY=n; repeatable.")


def _config_options(f):
    """--config and --kconfig: the command receives them as ``config`` = (base, options)."""
    @functools.wraps(f)
    def wrapper(**kwargs):
        config = (kwargs.pop("config"), kwargs.pop("kconfig"))
        return f(**kwargs, config=config)

    return CONFIG_OPTION(KCONFIG_OPTION(wrapper))


@cli.command()
@click.argument("target")
@click.argument("symbol")
@click.option("--features", default="", show_default=False,
              help="CPU features to patch alternatives for, e.g. pti,pcid (default: none).")
@TREE_OPTION
@_config_options
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


FEATURES_HELP = ("CPU features, comma-separated (pti,pcid,fsgsbase,kernel_ibrs or any X86_FEATURE_* name "
                 "in lower case); repeat for several sets; 'all' = every combination of pti, pcid, fsgsbase "
                 "and kernel_ibrs (the default); 'none' = no features.")


def _feature_sets(values: tuple[str, ...], cpus: tuple[str, ...] = ()):
    """--features sets, then the --cpu presets' (the 16 model sets when neither is given)."""
    from entrycheck.image.cpus import preset_sets
    from entrycheck.image.features import all_model_feature_sets, parse_feature_sets

    presets = preset_sets(cpus)
    if not values:
        return presets or all_model_feature_sets()
    return tuple(dict.fromkeys(parse_feature_sets(values) + presets))


DEFAULT_VECTORS = "nmi,mc,db,irq"


def _scenarios(text: str | None) -> tuple[str, ...]:
    from entrycheck.explore.scenarios import DEFAULT_SCENARIOS, scenario

    if not text or text == "all":
        return DEFAULT_SCENARIOS
    names = tuple(n.strip() for n in re.split(r",(?![^\[]*\])", text) if n.strip())   # commas in [...] stay
    for n in names:
        scenario(n)
    return names


@dataclass(frozen=True)
class ExploreOptions:
    """What every exploring command (check, diff, review) takes, gathered from its options."""

    features: tuple[str, ...] = ()
    cpu: tuple[str, ...] = ()
    spec_window: int = 512
    scenarios: str | None = None
    vectors: str = DEFAULT_VECTORS
    depth: int = 2
    db_mode: str = "watchable"
    mc_nesting: bool = False
    handler_effects: str | None = None
    no_prune: bool = False
    unfold: bool = False
    user_values: bool = True
    user_depth: int = 1
    max_runs: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    tree: str | None = None
    config: str | None = None
    kconfig: tuple[str, ...] = ()

    @property
    def build_config(self) -> tuple:
        return (self.config, self.kconfig)

    def check_config(self, loaded):
        """The CheckConfig these options ask for, validated against a loaded object."""
        from entrycheck.explore.check import CheckConfig, parse_effects, parse_vectors
        from entrycheck.kernelabi.world import IDT_SYMBOLS

        sets = _feature_sets(self.features, self.cpu)
        for fs in sets:
            fs.validate(loaded.features)
        vecs = parse_vectors(self.vectors)
        if self.vectors == DEFAULT_VECTORS:
            # The default vectors the object has an entry for (a fixture without interrupt entries).
            vecs = tuple(v for v in vecs if IDT_SYMBOLS[v] in loaded.symbols)
        for v in vecs:
            if IDT_SYMBOLS[v] not in loaded.symbols:
                raise InputError(f"this kernel has no entry point for {v.label} ({IDT_SYMBOLS[v]} is missing)")
        return CheckConfig(scenarios=self._runnable(loaded, sets), feature_sets=sets, vectors=vecs, depth=self.depth,
                           db_anywhere=self.db_mode == "anywhere", mc_nesting=self.mc_nesting,
                           effects=parse_effects(self.handler_effects), prune=not self.no_prune,
                           max_runs=self.max_runs, fold=not self.unfold, user_values=self.user_values,
                           user_depth=self.user_depth, spec_window=self.spec_window)

    def _runnable(self, loaded, sets) -> tuple[str, ...]:
        """The scenarios to explore: the default ones this object has an entry for (a fixture
        without interrupt entries skips those), or the ones asked for, each of which must run."""
        from entrycheck.explore.scenarios import scenario
        from entrycheck.kernelabi.world import IDT_SYMBOLS

        names = _scenarios(self.scenarios)

        def missing(name: str) -> str | None:
            sc = scenario(name)
            sym = sc.entry_symbol or IDT_SYMBOLS[sc.vector]
            return sym if sym not in loaded.symbols else None

        if self.scenarios and self.scenarios != "all":
            for name in names:
                sc = scenario(name)
                if missing(name):
                    what = sc.vector.label if sc.vector is not None else sc.entry
                    why = "; a 32-bit entry needs IA32_EMULATION and entry_64_compat.o" if sc.compat else ""
                    raise InputError(f"scenario {name}: this kernel has no entry point for {what} "
                                     f"({missing(name)} is missing{why})")
                if sc.needs and not any(sc.needs in fs for fs in sets):
                    raise InputError(f"scenario {name} needs the {sc.needs} feature: add it to --features "
                                     f"(e.g. --features {sc.needs})")
            return names
        runnable = tuple(n for n in names if not missing(n))
        if not runnable:
            raise InputError("this object has none of the entry points the scenarios start at")
        return runnable

    def validate(self) -> None:
        """What can be checked before any work: option values alone."""
        if self.scheduler is not None and not self.scheduler.strip():
            raise InputError("--scheduler needs the address of a Dask scheduler (e.g. tcp://host:8786)")
        from entrycheck.explore.check import parse_effects, parse_vectors

        parse_vectors(self.vectors)
        parse_effects(self.handler_effects)
        _scenarios(self.scenarios)
        _feature_sets(self.features, self.cpu)


_EXPLORE_FIELDS = tuple(f.name for f in fields(ExploreOptions))


def _explore_options(f):
    """Add the exploring options to a command; it receives them as one ``opts`` object."""
    @functools.wraps(f)
    def wrapper(**kwargs):
        opts = ExploreOptions(**{k: kwargs.pop(k) for k in _EXPLORE_FIELDS})
        return f(opts=opts, **kwargs)

    for opt in reversed([
        click.option("--features", "features", multiple=True, metavar="LIST", help=FEATURES_HELP),
        click.option("--cpu", "cpu", multiple=True, metavar="NAME",
                     help="A feature set as Linux 6.12 sets it for a CPU at its default boot: skylake, "
                     "cascadelake, alderlake, zen2, zen3, zen4 (see 'entrycheck cpus')."),
        click.option("--spec-window", default=512, show_default=True, type=click.IntRange(0, 4096),
                     help="Instructions a mispredicted conditional branch runs ahead when a feature set asks "
                     "for swapgs-unfenced (the largest published reorder buffers hold 512 micro-ops; 0: "
                     "never follow one)."),
        click.option("--scenarios", default=None, metavar="LIST",
                     help="Scenarios to explore, comma-separated (default: all; see 'entrycheck scenarios')."),
        click.option("--vectors", default=DEFAULT_VECTORS, show_default=True, metavar="LIST",
                     help="What to inject: nmi, mc, db, irq (a maskable interrupt, where IF=1), df, vc."),
        click.option("--depth", default=2, show_default=True, type=click.IntRange(0, 4),
                     help="Nesting depth of injection (0: the paths alone)."),
        click.option("--db", "db_mode", type=click.Choice(["watchable", "anywhere"]), default="watchable",
                     show_default=True, help="Where #DB is injected: as a trap after a data access a "
                     "hardware breakpoint may watch, or at every boundary."),
        click.option("--mc-nesting", is_flag=True, help="Also inject #MC inside an #MC handler after it "
                     "cleared MCIP (Linux assumes this never happens)."),
        click.option("--handler-effects", default=None, metavar="LIST",
                     help="Also explore handlers that do this: invalidate-user-asid, switch-kernel-asid."),
        click.option("--no-prune", is_flag=True, help="Brute force: run every injection to its end (no "
                     "convergence, no latched-NMI sharing, no shared handler runs)."),
        click.option("--unfold", is_flag=True, help="Also report on their own the symptoms folded under an "
                     "ist-reentered root cause."),
        click.option("--user-values/--no-user-values", default=True, show_default=True,
                     help="Also start each scenario from the hostile user values (RSP, GSBASE, RFLAGS, the "
                     "RIP a system call returns to) the entry code tells apart, found by running it."),
        click.option("--user-depth", default=1, show_default=True, type=click.IntRange(0, 4),
                     help="Nesting depth for those user values (at most --depth)."),
        click.option("--max-runs", type=click.IntRange(1), default=None, help="Stop after this many runs."),
        click.option("--workers", type=click.IntRange(1, 64), default=None,
                     help="Worker processes (default: one per CPU)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Run on a Dask distributed scheduler, e.g. tcp://host:8786."),
        TREE_OPTION,
        CONFIG_OPTION,
        KCONFIG_OPTION,
    ]):
        wrapper = opt(wrapper)
    return wrapper


def _coverage(build, loaded, result):
    """Per entry object, the instructions the check's recorded paths executed (any feature set)."""
    from entrycheck.explore.coverage import coverage
    from entrycheck.image.features import FeatureSet

    executed = frozenset().union(*result.covered.values()) if result.covered else frozenset()
    fred = (any("fred" in fs.names for fs in result.feature_sets), any("fred" not in fs.names
                                                                        for fs in result.feature_sets))
    return coverage(loaded.image(FeatureSet.of(())), build.parts, executed, fred)


def _echo_mail(findings, redundant, build, loaded, target: str, mail_class: str | None) -> None:
    from entrycheck.report import mail
    from entrycheck.report.srclines import SourceLines

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
    lines = SourceLines.from_build(build, loaded)
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


def _object_ref(build):
    from entrycheck.explore.check import ObjectRef
    from entrycheck.kernel.guards import breakpoint_refusals, iret_guards

    return ObjectRef(build.object_path, build.cpufeatures_h, build.asm_offsets_h,
                     guards=iret_guards(build.source_tree), refusals=breakpoint_refusals(build.source_tree))


def _run_check(build, cfg, opts: ExploreOptions, ref=None):
    from entrycheck.explore.check import default_workers, run_check
    from entrycheck.report.progress import terminal_progress

    with terminal_progress() as progress:
        return run_check(ref or _object_ref(build), cfg, workers=opts.workers or default_workers(),
                         scheduler=opts.scheduler, progress=progress)


@cli.command()
@click.argument("target", required=False)
@_explore_options
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
        inv = invariant(explain)
        import textwrap

        click.echo(textwrap.fill(f"{inv.name}: {inv.summary}", 80) + "\n")
        click.echo(textwrap.fill(inv.rationale, 80))
        if inv.needs:
            click.echo("\n" + textwrap.fill(f"Checked when the feature set has {inv.needs}.", 80))
        if inv.history:
            click.echo("\nHistory:")
            for commit, what in inv.history:
                click.echo(textwrap.fill(f"{commit} {what}", 80, initial_indent="  ", subsequent_indent="    "))
        return
    if not target:
        raise click.UsageError("missing TARGET (or use --explain INVARIANT; invariants: "
                               + ", ".join(INVARIANTS) + ")")
    from entrycheck.report.jsonout import check_json
    from entrycheck.report.text import check_summary

    out = _outputs(json_out, html_out)
    opts.validate()
    from entrycheck.explore import baseline as known_findings

    if mail_class is not None:
        if out_format != "mail":
            raise InputError("--class goes with --format mail")
        if mail_class != "redundant-write":
            invariant(mail_class)
    if out_format == "mail" and json_out == "-":
        raise InputError("--format mail writes to standard output: give --json a file")
    known = known_findings.load(baseline) if baseline else None
    build, loaded = _load(target, opts.tree, opts.build_config)
    target = _as_given(target, opts)
    cfg = opts.check_config(loaded)
    ref = _object_ref(build)
    result = _run_check(build, cfg, opts, ref)
    from entrycheck.explore.redundant import redundant_writes
    from entrycheck.kernelabi.world import build_world

    redundant = redundant_writes(result, lambda fs: build_world(loaded.image(fs)))
    cover = _coverage(build, loaded, result)
    keys_of = known_findings.keys_by_features(loaded)
    matches = [known_findings.finding_key(keys_of(f), f) for f in result.findings]
    new = result.findings
    if known is not None:
        new, old = known_findings.split(result.findings, keys_of, known)
    if json_out:
        out.stage("--json", _json_text(check_json(result, target=build.label, kernel_version=build.kernel_version,
                                                  feature_numbers=loaded.features.source, matches=matches,
                                                  baseline=(baseline, new) if known is not None else None,
                                                  redundant=redundant, coverage=cover)))
    if html_out:
        from entrycheck.report.html import check_html, command_line
        out.stage("--html", check_html(result, build=build, loaded=loaded, target=target, command=command_line(),
                                       coverage=cover))
    _commit(out)
    if out_format == "mail":
        _echo_mail(new, redundant, build, loaded, target, mail_class)
    elif json_out != "-":
        if any(v.label == "db" for v in cfg.vectors) and cfg.depth and ref.refusals is None:
            click.echo("note: no hw_breakpoint.c at hand: #DB may follow an access to anything but\n"
                       "  what within_cpu_entry() of 6.1/6.12 protects (--tree gives the source's list)")
        if known is not None:
            import copy

            shown = copy.copy(result)
            shown.findings = new
            text = check_summary(shown, target=target, kernel_version=build.kernel_version, redundant=redundant,
                                 coverage=cover)
            click.echo(f"{len(old)} known findings (in the baseline {baseline}) not listed; "
                       f"{len(new)} new.\n" + text)
        else:
            click.echo(check_summary(result, target=target, kernel_version=build.kernel_version,
                                     redundant=redundant, coverage=cover))
    sys.exit(1 if new else (EXIT_INTERNAL if result.errors else 0))


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
@_config_options
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
    from entrycheck.explore.check import default_workers
    from entrycheck.report.progress import terminal_progress

    out = _outputs(json_out)
    with terminal_progress() as progress:
        result = run_demo(workers=workers or default_workers(), keep=Path(keep) if keep else None,
                          progress=progress)
    if json_out:
        out.stage("--json", _json_text(demo_json(result)))
    _commit(out)
    if json_out != "-":
        click.echo(demo_text(result))
    sys.exit(0 if result.as_expected else 1)
# ---- end of demo ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffOptions:
    """What diff and review report with: the cost model, an NMI rate, the output files."""

    cost_spec: str | None = None
    nmi_rate: float | None = None
    json_out: str | None = None
    html_out: str | None = None
    baseline: str | None = None

    def model(self):
        from entrycheck.explore.costmodel import parse_cost

        return parse_cost(self.cost_spec)

    def known(self):
        """The finding keys of --baseline (read before any build), or None."""
        from entrycheck.explore import baseline

        return baseline.load(self.baseline) if self.baseline else None


_DIFF_FIELDS = tuple(f.name for f in fields(DiffOptions))


def _diff_options(f):
    @functools.wraps(f)
    def wrapper(**kwargs):
        return f(report=DiffOptions(**{k: kwargs.pop(k) for k in _DIFF_FIELDS}), **kwargs)

    for opt in reversed([
        click.option("--cost", "cost_spec", default=None, metavar="cr3=N,cr3_flush=N,wrmsr=N",
                     help="Cycles per operation for the cost estimate (defaults: cr3=200, cr3_flush=13000, "
                          "wrmsr=300; see the documentation for their sources)."),
        click.option("--nmi-rate", type=click.FloatRange(min=0, max=1e9), default=None, metavar="HZ",
                     help="What-if: NMIs per second from kernel context (e.g. perf sampling) to turn the "
                          "per-return saving into cycles per second per CPU."),
        click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the comparison as JSON."),
        click.option("--html", "html_out", default=None, metavar="PATH",
                     help="Also write a self-contained HTML report to PATH."),
        click.option("--baseline", default=None, metavar="FILE",
                     help="A check --json of NEW's findings known already: exit 1 only for new ones not in it."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def _run_diff(old_build, old_loaded, new_build, new_loaded, opts: ExploreOptions, report: DiffOptions, out,
              html_info=None):
    from entrycheck.explore.diff import SiteMap, diff_results
    from entrycheck.report.difftext import diff_json, diff_text

    model = report.model()
    known = report.known()
    cfg = opts.check_config(old_loaded)
    opts.check_config(new_loaded)
    old = _run_check(old_build, cfg, opts)
    new = _run_check(new_build, cfg, opts)
    from entrycheck.image.features import FeatureSet

    fs0 = cfg.feature_sets[0] if cfg.feature_sets else FeatureSet(())
    sites = SiteMap(old_loaded.image(fs0), new_loaded.image(fs0))
    result = diff_results(old, new, sites)
    if report.json_out:
        out.stage("--json", _json_text(diff_json(result, old_label=old_build.label, new_label=new_build.label,
                                                 old_version=old_build.kernel_version,
                                                 new_version=new_build.kernel_version, model=model,
                                                 nmi_rate=report.nmi_rate)))
    if report.html_out:
        from entrycheck.report.html import command_line, diff_html
        out.stage("--html", diff_html(result, old_build=old_build, old_loaded=old_loaded,
                                      new_build=new_build, new_loaded=new_loaded, model=model,
                                      nmi_rate=report.nmi_rate, command=command_line(), **html_info))
    _commit(out)
    if report.json_out != "-":
        click.echo(diff_text(result, old_label=old_build.label, new_label=new_build.label, model=model,
                             nmi_rate=report.nmi_rate))
    unknown = result.new_violations
    if known is not None:
        from entrycheck.explore import baseline

        unknown, in_baseline = baseline.split(result.new_violations, baseline.keys_by_features(new_loaded), known)
        if report.json_out != "-":
            click.echo(f"{len(in_baseline)} of the {len(result.new_violations)} new violations are known "
                       f"(in the baseline {report.baseline}).")
    sys.exit(1 if unknown else 0)


@cli.command()
@click.argument("old")
@click.argument("new")
@_explore_options
@_diff_options
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
              {"old_target": _as_given(old, opts), "new_target": _as_given(new, opts)})


@cli.command()
@click.argument("target")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A patch (mail, git format-patch, unified diff, or archive text); repeat for a series.")
@_explore_options
@_diff_options
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
        base = _resolve(target, opts.tree, progress, opts.build_config)
        patched = patched_build(base, texts, progress=progress)
    if patched.applied is not None:
        for pl in patched.applied.placements:
            if pl.context_mismatches or pl.placed_line != pl.header_line:
                click.echo(f"note: {pl.file} hunk {pl.hunk} applied at line {pl.placed_line} (header says "
                           f"{pl.header_line}; {pl.context_mismatches} context lines differ)", err=True)
    _run_diff(base, load_build(base), patched.build, load_build(patched.build), opts, report, out,
              {"old_target": _as_given(target, opts), "new_target": _as_given(str(patched.tree), opts),
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
        abort_all()
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
