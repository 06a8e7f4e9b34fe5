"""The other commands: disasm, trace, demo, scenarios, cpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import textwrap

import click

from entrycheck import session
from entrycheck.cli import _commit, _json_text, _load, _outputs, cli
from entrycheck.cli.options import TREE_OPTION, as_given, config_options, configurations
from entrycheck.errors import InputError


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
@click.option("--allow-infeasible", is_flag=True, help="Run a --features set no machine can have.")
@TREE_OPTION
@config_options
@click.option("--json", "json_out", default=None, metavar="PATH|-", help="Write the trace as JSON.")
def trace(target, scenario_name, features, injects, handler_effects, finding, allow_infeasible, tree, json_out,
          config) -> None:
    """Run one path instruction by instruction and show every privileged state change."""
    from entrycheck.explore.check import parse_effects
    from entrycheck.explore.replay import parse_injection, trace as run_trace
    from entrycheck.explore.scenarios import scenario
    from entrycheck.image.features import FeatureSet
    from entrycheck.kernelabi.world import build_world
    from entrycheck.report.jsonout import trace_json
    from entrycheck.report.text import trace_text

    if finding:
        # a finding of a set its check ran under --allow-infeasible replays as it was found
        scenario_name, features, injects, handler_effects, marked = _from_finding(finding)
        allow_infeasible = allow_infeasible or marked
    if not scenario_name:
        from entrycheck.explore.scenarios import SCENARIOS

        raise click.UsageError("missing --scenario; choose from " + ", ".join(SCENARIOS))
    sc = scenario(scenario_name)
    out = _outputs(json_out)
    build, loaded = _load(target, tree, config)
    fs = FeatureSet.parse(features)
    fs.validate(loaded.features)
    (_, _, rule), = configurations((fs,), build.source_tree, allow_infeasible)
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
        # the header is the command that replays it: the build's options included
        shown = as_given(target, tree, config)
        click.echo(trace_text(t, image, target=shown, features=str(fs)))
    if rule:
        click.echo(f"feature set {fs} is on no machine: {rule}", err=True)


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
    return v["scenario"], v["features"], injects, ",".join(effects) or None, bool(v.get("infeasible"))



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
@click.option("--cmdline", default="", metavar="OPTIONS", help="Boot options to derive the features under.")
def cpus(cmdline: str) -> None:
    """List the CPU presets of --cpu with the features Linux 6.12 sets for each (under --cmdline),
    each from the decision of bugs.c/common.c/pti.c it follows, and a CPU for each default set."""
    from entrycheck.image.cpus import CPUS, OPTIONS, SOURCES, derive, witness
    from entrycheck.image.features import all_model_feature_sets

    def cite(key: str) -> str:
        return f"{SOURCES[key].file.rsplit('/', 1)[-1]}:{SOURCES[key].line}"

    for cpu in CPUS.values():
        d = derive(cpu, cmdline)
        click.echo(f"{cpu.name}{' ' + cmdline if cmdline else ''}: {cpu.description}")
        click.echo(f"  --features {d.features}")
        click.echo(textwrap.fill("; ".join(f"{name} {cite(key)}" for name, key in d.why), 80, initial_indent="  ",
                                 subsequent_indent="  "))
    click.echo(textwrap.fill("boot options (--cmdline): " + ", ".join(
        name + ("=" + "|".join(v) if v else "") for name, v in OPTIONS.items()), 80, subsequent_indent="  "))
    click.echo("the default feature sets (lines of Debian's 6.12.118; a tree's own lines are cited in a check):")
    for fs in all_model_feature_sets():
        w = witness(fs)
        click.echo(textwrap.fill(f"{fs}: {w.label if w else 'none of the presets has it'}", 80,
                                 initial_indent="  ", subsequent_indent="      "))