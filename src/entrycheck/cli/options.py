"""The command line's options: what the exploring commands (check, diff, review) and the others take,
gathered into objects the commands hand to the application layer (entrycheck/session.py).

Each setting's default is the one its configuration declares (ExploreConfig, CheckConfig): the
options below read it from there.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

import click

from entrycheck.errors import InputError
from entrycheck.explore.check import CLI_DEPTH, CheckConfig

def resolve(target: str, tree: str | None, progress, config: tuple = (None, (), False)):
    """The build of TARGET; ``config`` is (--config, --kconfig, --c-stubs)."""
    from entrycheck.kernel.kconfig import parse_request
    from entrycheck.kernel.targets import resolve_target

    from entrycheck.session import with_c_stubs

    if tree is not None and not tree.strip():
        raise InputError("--tree needs a kernel source directory")
    build = resolve_target(target, tree=Path(tree) if tree else None, progress=progress,
                           request=parse_request(*config[:2]))
    return with_c_stubs(build) if config[2:] and config[2] else build


def as_given(target: str, tree: str | None, build_config: tuple) -> str:
    """TARGET with the options that chose its build (--tree, and ``build_config``: --config,
    --kconfig, --c-stubs as ``config_options`` gives them), quoted for a shell: what a
    reproducer command needs to load the same image."""
    config, kconfig, c_stubs = build_config
    args = [target]
    if tree:
        args += ["--tree", tree]
    if config:
        args += ["--config", config]
    for option in kconfig:
        args += ["--kconfig", option]
    if c_stubs:
        args.append("--c-stubs")
    return shlex.join(args)



TREE_OPTION = click.option("--tree", type=click.Path(file_okay=False), default=None,
                           help="Kernel tree whose cpufeatures.h numbers the features of a bare .o.")
CONFIG_OPTION = click.option("--config", "config", type=click.Choice(["defconfig", "distro"]), default=None,
                             help="Build the target with defconfig or with Debian's own amd64 config of its "
                             "series (default: a tree's own .config, else defconfig).")
KCONFIG_OPTION = click.option("--kconfig", "kconfig", multiple=True, metavar="NAME=VALUE",
                              help="Set a kernel option on top (scripts/config + olddefconfig), e.g. "
                              "X86_FRED=y or DEBUG_ENTRY=n; repeatable.")
C_STUBS_OPTION = click.option("--c-stubs", "c_stubs", is_flag=True,
                               help="Stand a hand-written contract stub at every call the entry assembly makes "
                               "instead of running the kernel's compiled noinstr C (the model before it ran "
                               "the C; to compare).")


def config_options(f):
    """--config, --kconfig and --c-stubs: the command receives them as ``config`` = (base, options,
    c_stubs)."""
    @functools.wraps(f)
    def wrapper(**kwargs):
        config = (kwargs.pop("config"), kwargs.pop("kconfig"), kwargs.pop("c_stubs"))
        return f(**kwargs, config=config)

    return CONFIG_OPTION(KCONFIG_OPTION(C_STUBS_OPTION(wrapper)))


FEATURES_HELP = ("CPU features, comma-separated (pti,pcid,fsgsbase,kernel_ibrs or any X86_FEATURE_* name "
                 "in lower case); repeat for several sets; 'all' = every combination of pti, pcid, fsgsbase "
                 "and kernel_ibrs (the default); 'none' = no features.")


def feature_sets(values: tuple[str, ...], cpus: tuple[str, ...] = (), cmdline: str | None = None):
    """--features sets, then the --cpu presets' booted with --cmdline (the 16 model sets when
    neither is given)."""
    from entrycheck.image.cpus import preset_sets
    from entrycheck.image.features import all_model_feature_sets, parse_feature_sets

    if cmdline is not None and not cpus:
        raise InputError("--cmdline goes with --cpu: boot options derive a CPU's features")
    presets = preset_sets(cpus, cmdline or "")
    if not values:
        return presets or all_model_feature_sets()
    return tuple(dict.fromkeys(parse_feature_sets(values) + presets))


DEFAULT_VECTORS = ",".join(v.label for v in CheckConfig.vectors)


def scenario_names(text: str | None) -> tuple[str, ...]:
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
    cmdline: str | None = None
    allow_infeasible: bool = False
    spec_window: int = CheckConfig.spec_window
    scenarios: str | None = None
    vectors: str = DEFAULT_VECTORS
    depth: int = CLI_DEPTH
    db_mode: str = "anywhere" if CheckConfig.db_anywhere else "watchable"
    mc_nesting: bool = CheckConfig.mc_nesting
    handler_effects: str | None = None
    no_prune: bool = not CheckConfig.prune
    no_share: bool = not CheckConfig.share
    unfold: bool = not CheckConfig.fold
    user_values: bool = CheckConfig.user_values
    user_depth: int = CheckConfig.user_depth
    max_runs: int | None = CheckConfig.max_runs
    workers: int | None = None
    scheduler: str | None = None
    tree: str | None = None
    config: str | None = None
    kconfig: tuple[str, ...] = ()
    c_stubs: bool = False

    @property
    def build_config(self) -> tuple:
        return (self.config, self.kconfig, self.c_stubs)

    def check_config(self, loaded, source_tree=None):
        """The CheckConfig these options ask for, validated against a loaded object (and the
        feasibility rules as its source tree, if any, makes them)."""
        from entrycheck.explore.check import parse_effects, parse_vectors
        from entrycheck.kernelabi.linux import fred_built
        from entrycheck.kernelabi.world import IDT_SYMBOLS

        def here(fs) -> bool:                 # this kernel has every feature of fs
            return all(n in loaded.features.numbers for n in fs.names)

        sets = feature_sets(self.features, self.cpu, self.cmdline)
        if any(n.strip().lower() in ("all", "presets") for value in self.cpu for n in value.split(",")):
            # a configuration needing a feature this kernel does not have (call depth tracking
            # before 6.2) is not one of this kernel's
            from entrycheck.image.features import parse_feature_sets

            given = set(parse_feature_sets(self.features))
            sets = tuple(fs for fs in sets if fs in given or here(fs))
        cpus, paths_only = self.cpu, ()
        if not self.features and not self.cpu:
            # The model sets hold no CPU bug: the seven presets as they boot join them at depth 0, so
            # that a default check runs the speculation checks on every path.
            paths_only = tuple(fs for fs in feature_sets((), ("presets",)) if fs not in sets and here(fs))
            sets, cpus = sets + paths_only, ("presets",)
        for fs in sets:
            fs.validate(loaded.features)
        not_checked = ()
        if fred_built(loaded.symbols) and not any("fred" in fs for fs in sets):
            not_checked = ("the FRED entry (entry_64_fred.o is built, but no set has fred and no preset CPU has "
                           "FRED; e.g. --features fred,pcid,fsgsbase,smap,clear_cpu_buf runs it)",)
        origins = configurations(sets, source_tree, self.allow_infeasible, cpus, self.cmdline or "")
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
                           share=not self.no_share, max_runs=self.max_runs, fold=not self.unfold,
                           user_values=self.user_values, user_depth=self.user_depth, spec_window=self.spec_window,
                           configurations=origins, paths_only=paths_only,
                           not_checked=not_checked)

    def _runnable(self, loaded, sets) -> tuple[str, ...]:
        """The scenarios to explore: the default ones this object has an entry for (a fixture
        without interrupt entries skips those), or the ones asked for, each of which must run."""
        from entrycheck.explore.scenarios import scenario
        from entrycheck.kernelabi.world import IDT_SYMBOLS

        names = scenario_names(self.scenarios)

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
        scenario_names(self.scenarios)
        feature_sets(self.features, self.cpu, self.cmdline)


def configurations(sets, source_tree, allow_infeasible: bool, cpus=(), cmdline: str = "") -> tuple:
    """Per feature set: (set, the configuration that has it, the rule it breaks).  A set that
    breaks a feasibility rule the tree makes is refused unless ``allow_infeasible``."""
    from entrycheck.image.cpus import configurations as of_cpus
    from entrycheck.image.cpus import SOURCES, infeasible, witness
    from entrycheck.kernel.guards import cite_decisions

    cites = cite_decisions(source_tree, SOURCES)
    named = {fs: c.label for fs, c in of_cpus(cpus, cmdline).items()}
    out = []
    for fs in sets:
        broken = [b for b in infeasible(fs) if all(cites.get(k) for k in b.sources)]
        rule = "; ".join(f"{b.rule} ({', '.join(cites[k] for k in b.sources)})" for b in broken)
        if rule and not allow_infeasible:
            raise InputError(f"feature set {fs} is on no machine: {rule}; --allow-infeasible runs it anyway")
        w = witness(fs) if fs not in named else None
        out.append((str(fs), named.get(fs) or (w.label if w else ""), rule))
    return tuple(out)


_EXPLORE_FIELDS = tuple(f.name for f in fields(ExploreOptions))


def explore_options(f):
    """Add the exploring options to a command; it receives them as one ``opts`` object."""
    @functools.wraps(f)
    def wrapper(**kwargs):
        opts = ExploreOptions(**{k: kwargs.pop(k) for k in _EXPLORE_FIELDS})
        return f(opts=opts, **kwargs)

    for opt in reversed([
        click.option("--features", "features", multiple=True, metavar="LIST", help=FEATURES_HELP),
        click.option("--cpu", "cpu", multiple=True, metavar="NAME",
                     help="A feature set as Linux 6.12 sets it for a CPU at its default boot (or under "
                     "--cmdline): sandybridge, skylake, cascadelake, alderlake, zen2, zen3, zen4; presets: all "
                     "seven; all: each of them also booted with each boot option that changes its entry "
                     "code (see 'entrycheck cpus')."),
        click.option("--cmdline", default=None, metavar="OPTIONS",
                     help="Boot options of the --cpu presets, e.g. \"retbleed=ibpb nofsgsbase\": their features "
                     "are derived as bugs.c, common.c and pti.c decide them (see 'entrycheck cpus')."),
        click.option("--allow-infeasible", is_flag=True, help="Run a --features set no machine can have (it "
                     "breaks a rule of which features occur together) and mark each of its findings so."),
        click.option("--spec-window", default=ExploreOptions.spec_window, show_default=True, type=click.IntRange(0, 4096),
                     help="Instructions a mispredicted conditional branch runs ahead when a feature set asks "
                     "for swapgs-unfenced (the largest published reorder buffers hold 512 micro-ops; 0: "
                     "never follow one)."),
        click.option("--scenarios", default=None, metavar="LIST",
                     help="Scenarios to explore, comma-separated (default: all; see 'entrycheck scenarios')."),
        click.option("--vectors", default=ExploreOptions.vectors, show_default=True, metavar="LIST",
                     help="What to inject: nmi, mc, db, irq (a maskable interrupt, where IF=1), df, vc."),
        click.option("--depth", default=ExploreOptions.depth, show_default=True, type=click.IntRange(0, 4),
                     help="Nesting depth of injection (0: the paths alone)."),
        click.option("--db", "db_mode", type=click.Choice(["watchable", "anywhere"]), default=ExploreOptions.db_mode,
                     show_default=True, help="Where #DB is injected: as a trap after a data access a "
                     "hardware breakpoint may watch, or at every boundary."),
        click.option("--mc-nesting", is_flag=True, help="Also inject #MC inside an #MC handler after it "
                     "cleared MCIP (Linux assumes this never happens)."),
        click.option("--handler-effects", default=None, metavar="LIST",
                     help="Also explore handlers that do this: invalidate-user-asid, switch-kernel-asid, "
                     "tlb-shootdown, page-fault (it writes CR2: what cr2-clobbered checks)."),
        click.option("--no-prune", is_flag=True, help="Brute force: run every injection to its end (no "
                     "convergence, no latched-NMI sharing, no shared handler runs)."),
        click.option("--no-share", is_flag=True, help="Run every injected handler (no handler run standing for "
                     "the boundaries whose state agrees with it on what it used); runs still stop where they "
                     "rejoin a recorded run."),
        click.option("--unfold", is_flag=True, help="Also report on their own the symptoms folded under an "
                     "ist-reentered root cause."),
        click.option("--user-values/--no-user-values", default=ExploreOptions.user_values, show_default=True,
                     help="Also start each scenario from the hostile user values (RSP, GSBASE, RFLAGS, the "
                     "RIP a system call returns to) the entry code tells apart, found by running it."),
        click.option("--user-depth", default=ExploreOptions.user_depth, show_default=True, type=click.IntRange(0, 4),
                     help="Nesting depth for those user values (at most --depth)."),
        click.option("--max-runs", type=click.IntRange(1), default=None, help="Stop after this many runs."),
        click.option("--workers", type=click.IntRange(1, 64), default=None,
                     help="Worker processes (default: one per CPU)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Run on a Dask distributed scheduler, e.g. tcp://host:8786."),
        TREE_OPTION,
        CONFIG_OPTION,
        KCONFIG_OPTION,
        C_STUBS_OPTION,
    ]):
        wrapper = opt(wrapper)
    return wrapper



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


def diff_options(f):
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
