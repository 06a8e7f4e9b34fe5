"""Configurations a machine can have: CPU presets booted with boot options, the feasibility
rules of hand-made feature sets, and where the tree makes each decision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from entrycheck.cli import cli
from entrycheck.errors import InputError
from entrycheck.image import cpus
from entrycheck.image.cpus import CPUS, PRESETS, SOURCES, configuration, derive, infeasible, witness
from entrycheck.image.features import FeatureSet, all_model_feature_sets
from entrycheck.kernel.guards import cite_decisions
from entrycheck.kernel.targets import KernelBuild


def names(cpu: str, cmdline: str = "") -> set[str]:
    return set(configuration(cpu, cmdline).features.names)


def test_boot_options_change_the_features_as_bugs_c_decides() -> None:
    # nopti: the CR3 write no longer serialises, so spectre_v1 adds the user-side fence.
    assert "pti" in names("skylake") and "fence_swapgs_user" not in names("skylake")
    assert "pti" not in names("skylake", "nopti") and "fence_swapgs_user" in names("skylake", "nopti")
    # nofsgsbase: with Meltdown SMAP does not stop a user GS speculatively: the kernel fence stays;
    # without Meltdown (Cascade Lake) SMAP does, and both fences go.
    assert {"fence_swapgs_kernel"} <= names("skylake", "nofsgsbase") and "fsgsbase" not in names("skylake",
                                                                                                "nofsgsbase")
    assert not names("cascadelake", "nofsgsbase") & {"fence_swapgs_kernel", "fence_swapgs_user", "fsgsbase"}
    # retbleed=ibpb on Cascade Lake: IBPB on entry; ITS, decided later, puts the return thunk back.
    assert {"entry_ibpb", "rethunk", "clear_bhb_loop"} <= names("cascadelake", "retbleed=ibpb")
    assert "entry_ibpb" not in names("cascadelake")
    # retbleed=ibpb on Zen 2: no untraining, and SRSO keeps retbleed's IBPB.
    assert "entry_ibpb" in names("zen2", "retbleed=ibpb")
    assert not names("zen2", "retbleed=ibpb") & {"unret", "rethunk", "srso"}
    # spectre_v2=retpoline on Skylake: no kernel IBRS; spectre_bhi=off on Cascade Lake: no BHB loop.
    assert "kernel_ibrs" not in names("skylake", "spectre_v2=retpoline") and "retpoline" in names(
        "skylake", "spectre_v2=retpoline")
    assert "clear_bhb_loop" not in names("cascadelake", "spectre_bhi=off")
    # mitigations=off leaves the CPU's own capabilities.
    assert names("skylake", "mitigations=off") == {"pcid", "fsgsbase", "smap", "bug_swapgs"}
    # retbleed=stuff: call depth tracking, which needs the retpoline mode (not on eIBRS parts).
    assert {"call_depth", "rethunk", "retpoline"} <= names("skylake", "retbleed=stuff")
    assert "kernel_ibrs" not in names("skylake", "retbleed=stuff")
    assert "call_depth" not in names("cascadelake", "retbleed=stuff")
    # spectre_v2=ibrs is Intel's: on AMD the kernel switches to AUTO.
    assert "kernel_ibrs" not in names("zen3", "spectre_v2=ibrs")
    assert [why for why in derive(CPUS["skylake"]).why if why[0] == "kernel_ibrs"] == [("kernel_ibrs", "kernel-ibrs")]


def test_cpu_all_is_every_preset_and_each_boot_option_that_changes_it() -> None:
    got = cpus.configurations(["all"])
    labels = [c.label for c in got.values()]
    assert labels[:len(PRESETS)] == list(PRESETS)
    assert {"cascadelake retbleed=ibpb", "skylake nofsgsbase", "skylake retbleed=stuff"} <= set(labels)
    assert len(got) > 40
    for fs, c in got.items():
        assert configuration(c.name, c.cmdline).features == fs and not infeasible(fs), c.label


def test_cpu_presets_is_every_preset_booted_with_the_cmdline() -> None:
    got = cpus.configurations(["presets"])
    assert [c.label for c in got.values()] == list(PRESETS)
    nopti = cpus.configurations(["presets"], "nopti")
    assert all(c.cmdline == "nopti" and "pti" not in fs for fs, c in nopti.items())


def test_bad_boot_options_are_input_errors() -> None:
    for line, match in (("retbleed=maybe", "retbleed=maybe: one of"), ("quiet", "'quiet' is not one"),
                        ("nopti=1", "nopti takes no value")):
        with pytest.raises(InputError, match=match):
            configuration("skylake", line)


def test_every_derived_configuration_keeps_the_rules() -> None:
    """The rules and the derivation are written apart: what the kernel can choose breaks none."""
    lines = cpus._choices()
    assert len(lines) > 1000
    for cpu in CPUS.values():
        for line in lines:
            fs = derive(cpu, line).features
            assert not infeasible(fs), (cpu.name, line, infeasible(fs))


@pytest.mark.parametrize("features, rule", [
    ("sev_es,kernel_ibrs", "on no one CPU"),
    ("pti,pcid,kernel_ibrs,srso", "on no one CPU"),
    ("clear_bhb_loop,sev_es", "on no one CPU"),
    ("pti,fence_swapgs_user,fence_swapgs_kernel", "only without pti"),
    ("fence_swapgs_user,bug_swapgs", "comes only with fence_swapgs_kernel"),
    ("kernel_ibrs,retpoline", "two Spectre v2 modes"),
    ("fred,pti", "turns FRED off when PTI is on"),
])
def test_each_feasibility_rule_refuses_what_it_says(features: str, rule: str) -> None:
    broken = infeasible(FeatureSet.parse(features))
    assert broken and any(rule in b.rule for b in broken), broken
    for b in broken:
        assert b.sources and all(k in SOURCES for k in b.sources)


def test_every_default_set_names_a_configuration_that_has_it() -> None:
    for fs in all_model_feature_sets():
        w = witness(fs)
        assert w is not None, fs
        got = set(derive(CPUS[w.name], w.cmdline).features.names) - {"smap"}
        if not got & {"fence_swapgs_kernel", "fence_swapgs_user"}:
            got.discard("bug_swapgs")          # nothing speculates without a fence feature
        assert got == set(fs.names), (fs, w.label)
    assert witness(PRESETS["zen2"].features).label == "zen2"
    # SEV-ES is the guest's: an AMD configuration as a guest has it, an Intel one does not
    guest = witness(FeatureSet.parse("sev_es,fsgsbase"))
    assert guest.name.startswith("zen") and guest.label.endswith(", as an SEV-ES guest")
    assert set(guest.features.names) == {"sev_es", "fsgsbase"}
    assert witness(FeatureSet.parse("sev_es,kernel_ibrs")) is None


def test_cmdline_needs_cpu_and_is_checked_before_any_work(tmp_path: Path) -> None:
    for args, msg in ((["--cmdline", "nopti"], "--cmdline goes with --cpu"),
                      (["--cpu", "skylake", "--cmdline", "retbleed=sometimes"], "retbleed=sometimes")):
        p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "check",
                            str(tmp_path / "missing.o"), *args], capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cpus_lists_the_derivation_and_the_default_sets() -> None:
    out = CliRunner().invoke(cli, ["cpus", "--cmdline", "nofsgsbase"])
    assert out.exit_code == 0, out.output
    assert "skylake nofsgsbase:" in out.output and "fence_swapgs_kernel bugs.c:965" in out.output
    assert "pti,pcid: zen4 pti=on nofsgsbase" in out.output


@pytest.mark.kernel
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_every_decision_is_found_in_the_tree(kernel: str, built_kernels: dict[str, KernelBuild]) -> None:
    tree = built_kernels[kernel].source_tree
    cites = cite_decisions(tree, SOURCES)
    assert set(cites) == set(SOURCES)
    # 6.1 has no FRED and no call depth tracking: the decisions about them are not in its tree.
    assert {k for k, v in cites.items() if v is None} == ({"fred-pti", "stuff"} if kernel == "6.1" else set()), cites
    for key, where in cites.items():
        if where is None:
            continue
        path, line = where.rsplit(":", 1)
        text = (tree / path).read_text(errors="replace").splitlines()[int(line) - 1]
        assert " ".join(SOURCES[key].anchor.split()) in " ".join(text.split()), (key, where, text)
    # The rules' lines say what the rules say.
    assert "X86_FEATURE_PTI" in (tree / "arch/x86/kernel/cpu/bugs.c").read_text().splitlines()[
        int(cites["fence-user"].rsplit(":", 1)[1]) - 1]
    assert "NO_SWAPGS" in (tree / "arch/x86/kernel/cpu/common.c").read_text().splitlines()[
        int(cites["not-amd"].rsplit(":", 1)[1]) - 1]
    assert "not Intel" in (tree / "arch/x86/kernel/cpu/bugs.c").read_text().splitlines()[
        int(cites["ibrs-intel"].rsplit(":", 1)[1]) - 1]


@pytest.mark.kernel
def test_an_infeasible_set_is_refused_with_its_rule_or_run_and_marked(built_kernels: dict[str, KernelBuild],
                                                                     tmp_path: Path) -> None:
    k = built_kernels["6.12"]
    base = [sys.executable, "-c", "from entrycheck.cli import main; main()", "check", str(k.object_path),
            "--tree", str(k.source_tree), "--depth", "0", "--scenarios", "syscall"]
    p = subprocess.run(base + ["--features", "sev_es,kernel_ibrs"], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "kernel_ibrs and sev_es are on no one CPU" in p.stderr
    assert "arch/x86/kernel/cpu/bugs.c:" in p.stderr and "cpufeatures.h:" in p.stderr
    out = tmp_path / "c.json"
    p = subprocess.run(base + ["--features", "pti,fence_swapgs_kernel,fence_swapgs_user;pti,pcid",
                               "--allow-infeasible", "--json", str(out)], capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr
    doc = json.loads(out.read_text())
    by = {c["features"]: c for c in doc["configurations"]}
    assert "only without pti" in by["pti,fence_swapgs_kernel,fence_swapgs_user"]["infeasible"]
    assert by["pti,pcid"]["cpu"].startswith("zen4 pti=on") and "infeasible" not in by["pti,pcid"]
    assert all("infeasible" in v for v in doc["violations"] if v["features"] == "pti,fence_swapgs_kernel,"
               "fence_swapgs_user")
    assert "ON NO MACHINE" in p.stdout
    # trace refuses such a set too; a finding of one replays with the mark its check gave it
    trace = [sys.executable, "-c", "from entrycheck.cli import main; main()", "trace", str(k.object_path),
             "--tree", str(k.source_tree)]
    p = subprocess.run(trace + ["--scenario", "syscall", "--features", "pti,fence_swapgs_kernel,fence_swapgs_user"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "only without pti" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    finding = tmp_path / "f.json"
    finding.write_text(json.dumps({"violations": [{"scenario": "syscall", "injections": [],
                                                   "features": "pti,fence_swapgs_kernel,fence_swapgs_user",
                                                   "infeasible": "fence_swapgs_user is set only without pti"}]}))
    p = subprocess.run(trace + ["--finding", str(finding)], capture_output=True, text=True)
    assert p.returncode == 0 and "is on no machine: fence_swapgs_user is set only without pti" in p.stderr, p.stderr
    assert "sysretq" in p.stdout.lower()


@pytest.mark.kernel
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_reach_is_read_from_the_tree_and_the_config(kernel: str, built_kernels: dict[str, KernelBuild]) -> None:
    from entrycheck.kernel.guards import reach_facts

    k = built_kernels[kernel]
    facts = reach_facts(k.source_tree, k.config_file)
    # FRED is off unless fred=on (6.12's common.c); 6.1 has no FRED.
    if kernel == "6.12":
        path, line = facts["fred"].rsplit(":", 1)
        assert '"fred"' in (k.source_tree / path).read_text().splitlines()[int(line) - 1]
    else:
        assert facts["fred"] is None
    assert facts["modify_ldt"] == "y"                 # defconfig keeps modify_ldt(), so espfix64 is reachable
    assert facts["breakpoint"] == "CAP_SYS_ADMIN"     # hw_breakpoint.c's capable() test
    assert reach_facts(None, None) == {"fred": None, "modify_ldt": None, "breakpoint": None}


@pytest.mark.kernel
def test_a_default_check_adds_the_presets_at_depth_0_and_says_what_it_leaves(built_kernels: dict[str, KernelBuild],
                                                                             tmp_path: Path) -> None:
    """The 16 model sets hold no CPU bug: a default check adds the seven presets as they boot,
    explored at depth 0 (their paths and mispredicted branches), and finds the espfix64 SWAPGS
    class on 6.12 with them; sets asked for (--features, --cpu) are explored as asked."""
    from entrycheck.cli.options import ExploreOptions
    from entrycheck.explore.check import make_units
    from entrycheck.image import load_build

    k = built_kernels["6.12"]
    loaded = load_build(k)
    cfg = ExploreOptions().check_config(loaded, k.source_tree)
    presets = set(cpus.preset_sets(["presets"]))
    assert set(cfg.paths_only) == presets and cfg.feature_sets[:16] == all_model_feature_sets()
    assert cfg.depth == 1 and {u.depth for u in make_units(cfg) if u.features in presets} == {0}
    assert {u.depth for u in make_units(cfg) if u.features not in presets} == {None}
    named = {fs: cpu for fs, cpu, _ in cfg.configurations}
    assert all(named[str(fs)] == configuration(c).label for c in CPUS for fs in [configuration(c).features])
    assert not cfg.not_checked                          # 6.12's defconfig builds no FRED entry
    assert not ExploreOptions(features=("pti,pcid",)).check_config(loaded, k.source_tree).paths_only
    assert not ExploreOptions(cpu=("zen2",)).check_config(loaded, k.source_tree).paths_only
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, "-c", "from entrycheck.cli import main; main()", "check", "debian:6.12",
                        "--scenarios", "irq-from-kernel", "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["paths_only"]) == {str(fs) for fs in presets} and doc["speculation_checked"]
    espfix = [v for v in doc["violations"] if v["invariant"] == "swapgs-unfenced"]
    assert espfix and all(v["site"].startswith("native_irq_return_ldt") and v["features"] in doc["paths_only"]
                          for v in espfix)
    assert "and the 7 preset CPUs as they boot at depth 0" in " ".join(p.stdout.split())
