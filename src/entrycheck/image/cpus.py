"""CPUs, their boot options, and which feature sets a machine can have.

A configuration is a CPU *and its boot options*.  ``derive`` works out the features Linux
turns on for one the way arch/x86/kernel/cpu/bugs.c, common.c and arch/x86/mm/pti.c decide
them (``mitigations=auto`` on bare metal, Debian's MITIGATION_* options, the microcode
assumed), for the features the entry code's alternatives or the model read; every step
names the decision it follows (``SOURCES``: a file, the text of its line, and that line in
Debian's 6.12.118 for when no tree is at hand — kernel/guards.py finds it in a tree).
C-only features (use_ibpb, rsb_ctxsw) are left out: they patch no entry instruction.  smap
stays: its CLAC/STAC are patched in (they clear and set AC).  ``bug_swapgs`` is a hardware bug,
not a feature: it tells the model that SWAPGS runs speculatively.

``infeasible`` is the other direction: the rules a hand-made ``--features`` set must keep
for some machine to have it (a vendor's features together, PTI against the user SWAPGS
fence, one Spectre v2 mode), each citing the decision in the tree.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from types import MappingProxyType

from entrycheck.errors import InputError
from entrycheck.image.features import FeatureSet

BUGS = "arch/x86/kernel/cpu/bugs.c"
COMMON = "arch/x86/kernel/cpu/common.c"
PTI = "arch/x86/mm/pti.c"
CPUFEATURES = "arch/x86/include/asm/cpufeatures.h"


@dataclass(frozen=True)
class Source:
    """A decision of the kernel: the line of ``file`` holding ``anchor`` (``line`` in 6.12.118)."""

    file: str
    anchor: str
    line: int


SOURCES: dict[str, Source] = {
    "pti": Source(PTI, "void __init pti_check_boottime_disable(void)", 79),
    "pti-auto": Source(COMMON, "setup_force_cpu_bug(X86_BUG_CPU_MELTDOWN);", 1540),
    "nopcid": Source(COMMON, 'early_param("nopcid", x86_nopcid_setup);', 264),
    "nofsgsbase": Source(COMMON, '__setup("nofsgsbase", x86_nofsgsbase_setup);', 514),
    "fence-user": Source(BUGS, "!boot_cpu_has(X86_FEATURE_PTI))", 957),
    "fence-kernel": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_FENCE_SWAPGS_KERNEL);", 965),
    "ibrs-intel": Source(BUGS, 'pr_err("%s selected but not Intel CPU. Switching to AUTO select\\n",', 1708),
    "kernel-ibrs": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_KERNEL_IBRS);", 1990),
    "retpoline": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_RETPOLINE);", 2002),
    "bhi": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_CLEAR_BHB_LOOP);", 1880),
    "retbleed": Source(BUGS, "if (!boot_cpu_has_bug(X86_BUG_RETBLEED) || cpu_mitigations_off())", 1061),
    "entry-ibpb": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_ENTRY_IBPB);", 1139),
    "stuff": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_CALL_DEPTH);", 1162),
    "srso": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_SRSO_ALIAS);", 2871),
    "its": Source(BUGS, "set_return_thunk(its_return_thunk);", 1322),
    "verw": Source(BUGS, "setup_force_cpu_cap(X86_FEATURE_CLEAR_CPU_BUF);", 279),
    "not-amd": Source(COMMON, "VULNWL_AMD(X86_FAMILY_ANY,", 1200),
    "srso-amd": Source(COMMON, "VULNBL_AMD(0x19, SRSO", 1303),
    "fred-pti": Source(PTI, 'pr_debug("PTI enabled, disabling FRED\\n");', 417),
    "sev-amd": Source(CPUFEATURES, "AMD-defined memory encryption features, CPUID level 0x8000001f", 443),
}


@dataclass(frozen=True)
class Cpu:
    """A CPU as the kernel sees it at boot: vendor, family, the capabilities and bug bits the
    entry features depend on."""

    name: str
    description: str
    vendor: str                  # "intel" | "amd"
    family: int
    caps: frozenset[str]         # pcid fsgsbase smap ibrs eibrs ibpb bhi_ctrl fred
    bugs: frozenset[str]         # meltdown swapgs retbleed verw bhi its srso

    def has(self, what: str) -> bool:
        return what in self.caps or what in self.bugs


def _cpu(name: str, description: str, vendor: str, family: int, caps: str, bugs: str) -> Cpu:
    return Cpu(name, description, vendor, family, frozenset(caps.split()), frozenset(bugs.split()))


CPUS: dict[str, Cpu] = {c.name: c for c in (
    _cpu("sandybridge", "Intel Sandy Bridge client (family 6 model 0x2A; no FSGSBASE, no SMAP, Meltdown-affected)",
         "intel", 6, "pcid ibrs ibpb", "meltdown swapgs verw"),
    _cpu("skylake", "Intel Skylake client (family 6 model 0x5E; no eIBRS, Meltdown-affected)", "intel", 6,
         "pcid fsgsbase smap ibrs ibpb", "meltdown swapgs retbleed verw"),
    _cpu("cascadelake", "Intel Cascade Lake server (family 6 model 0x55 stepping 7; eIBRS, RDCL_NO, MDS_NO)",
         "intel", 6, "pcid fsgsbase smap ibrs eibrs ibpb", "swapgs retbleed bhi its"),
    _cpu("alderlake", "Intel Alder Lake (eIBRS with BHI_DIS_S; RFDS_CLEAR microcode)", "intel", 6,
         "pcid fsgsbase smap ibrs eibrs ibpb bhi_ctrl", "swapgs bhi verw"),
    _cpu("zen2", "AMD Zen 2 (family 0x17; retbleed, SRSO; no PCID)", "amd", 0x17, "fsgsbase smap ibpb",
         "retbleed srso"),
    _cpu("zen3", "AMD Zen 3 (family 0x19; SRSO)", "amd", 0x19, "pcid fsgsbase smap ibpb", "srso"),
    _cpu("zen4", "AMD Zen 4 (family 0x19; AutoIBRS, SRSO)", "amd", 0x19, "pcid fsgsbase smap ibpb eibrs", "srso"),
)}

# The boot options derive() follows: name -> the values it takes (None: a flag).
OPTIONS: dict[str, tuple[str, ...] | None] = {
    "mitigations": ("off", "auto"), "nopti": None, "pti": ("on", "off", "auto"), "nopcid": None,
    "nofsgsbase": None, "nospectre_v1": None, "nospectre_v2": None,
    "spectre_v2": ("auto", "on", "off", "ibrs", "retpoline"), "retbleed": ("auto", "off", "ibpb", "unret", "stuff"),
    "spectre_bhi": ("on", "off"), "spec_rstack_overflow": ("off", "safe-ret", "ibpb"),
    "indirect_target_selection": ("on", "off"), "mds": ("full", "off"), "tsx_async_abort": ("full", "off"),
    "mmio_stale_data": ("full", "off"), "reg_file_data_sampling": ("on", "off"), "fred": ("on", "off"),
}
_VERW_OPTIONS = ("mds", "tsx_async_abort", "mmio_stale_data", "reg_file_data_sampling")


def parse_cmdline(text: str) -> dict[str, str]:
    """Boot options as the kernel's parser splits them; only those derive() follows."""
    out: dict[str, str] = {}
    for word in shlex.split(text or ""):
        name, _, value = word.partition("=")
        if name not in OPTIONS:
            raise InputError(f"boot option {name!r} is not one entrycheck derives features from; it knows "
                             + ", ".join(OPTIONS))
        values = OPTIONS[name]
        if values is None and value:
            raise InputError(f"boot option {name} takes no value")
        if values is not None and value not in values:
            raise InputError(f"boot option {name}={value or '?'}: one of {', '.join(values)}")
        out[name] = value
    return out


@functools.cache
def _options(cmdline: str) -> MappingProxyType:
    """``parse_cmdline``, once per command line (derive() is asked for every preset under
    every line ``_witnesses`` tries)."""
    return MappingProxyType(parse_cmdline(cmdline))


@dataclass(frozen=True)
class Derived:
    features: FeatureSet
    why: tuple[tuple[str, str], ...]          # (feature or "-feature", SOURCES key)


def derive(cpu: Cpu, cmdline: str = "") -> Derived:
    """The features Linux 6.12 sets for ``cpu`` booted with ``cmdline``, in the order
    cpu_select_mitigations() decides them, each with the decision it comes from.  (6.1
    differs in one corner: its ``pti=on`` holds against ``mitigations=off``.)"""
    opts = _options(cmdline)
    off = opts.get("mitigations") == "off"
    f: set[str] = set()
    why: list[tuple[str, str]] = []

    def add(name: str, source: str) -> None:
        f.add(name)
        why.append((name, source))

    def drop(name: str, source: str) -> None:
        if name in f:
            f.discard(name)
            why.append(("-" + name, source))

    def ibpb_on_entry() -> None:
        # retbleed's and SRSO's IBPB mitigation alike: "IBPB on entry already obviates the need
        # for software-based untraining so clear those"
        add("entry_ibpb", "entry-ibpb")
        drop("unret", "entry-ibpb")
        drop("rethunk", "entry-ibpb")

    if cpu.has("pcid") and "nopcid" not in opts:
        add("pcid", "nopcid")
    if cpu.has("fsgsbase") and "nofsgsbase" not in opts:
        add("fsgsbase", "nofsgsbase")
    if cpu.has("smap"):
        f.add("smap")
    if cpu.has("swapgs"):
        add("bug_swapgs", "not-amd")
    pti = "off" if "nopti" in opts else opts.get("pti", "auto")
    if not off and pti != "off" and (pti == "on" or cpu.has("meltdown")):
        add("pti", "pti" if pti == "on" else "pti-auto")
    # spectre_v1: the SWAPGS fences, unless SMAP alone stops a user GS (no FSGSBASE, no Meltdown).
    if not off and "nospectre_v1" not in opts and ("fsgsbase" in f or not cpu.has("smap") or cpu.has("meltdown")):
        if cpu.has("swapgs") and "pti" not in f:
            add("fence_swapgs_user", "fence-user")
        add("fence_swapgs_kernel", "fence-kernel")
    # spectre_v2: one mode.
    v2 = "off" if off or "nospectre_v2" in opts else opts.get("spectre_v2", "auto")
    retbleed = opts.get("retbleed", "auto")
    mode = "none"
    if v2 == "ibrs" and cpu.vendor == "intel" and cpu.has("ibrs"):
        mode = "ibrs"
    elif v2 == "retpoline":
        mode = "retpoline"
    elif v2 != "off":
        if cpu.has("eibrs"):
            mode = "eibrs"
        elif cpu.has("retbleed") and retbleed not in ("off", "stuff") and cpu.vendor == "intel" and cpu.has("ibrs"):
            mode = "ibrs"
        else:
            mode = "retpoline"
    if mode == "ibrs":
        add("kernel_ibrs", "kernel-ibrs")
    elif mode == "retpoline":
        add("retpoline", "retpoline")
    if mode != "none" and cpu.has("bhi") and not cpu.has("bhi_ctrl") and opts.get("spectre_bhi") != "off":
        add("clear_bhb_loop", "bhi")
    # retbleed (after spectre_v2)
    ibpb_entry = False
    if cpu.has("retbleed") and not off and retbleed != "off":
        if retbleed == "ibpb" and cpu.has("ibpb"):
            ibpb_on_entry()
            ibpb_entry = True
        elif retbleed == "stuff" and mode == "retpoline":
            add("rethunk", "stuff")                    # call depth tracking: the RSB stuffed on entry
            add("call_depth", "stuff")
        elif retbleed == "unret" or (retbleed in ("auto", "stuff") and cpu.vendor == "amd"):
            add("rethunk", "retbleed")
            add("unret", "retbleed")
    # the VERW of MDS, TAA, MMIO and RFDS: one feature any of them turns on
    if cpu.has("verw") and not off and not all(opts.get(o) == "off" for o in _VERW_OPTIONS):
        add("clear_cpu_buf", "verw")
    # SRSO (after retbleed): with retbleed's IBPB on entry nothing more; else the safe RET
    srso = opts.get("spec_rstack_overflow", "safe-ret")
    if cpu.has("srso") and not off and srso != "off" and not ibpb_entry:
        if srso == "ibpb":
            ibpb_on_entry()
        else:
            add("rethunk", "srso")
            add("unret", "srso")
            add("srso_alias" if cpu.family == 0x19 else "srso", "srso")
    # ITS (last): aligned return thunks, unless Spectre v2 is off
    if cpu.has("its") and not off and mode != "none" and opts.get("indirect_target_selection") != "off" \
            and not ("retpoline" in f and "call_depth" in f):     # retpoline with call depth tracking covers ITS
        add("rethunk", "its")
    if cpu.has("fred") and opts.get("fred") == "on" and "pti" not in f:
        f.add("fred")                                  # pti.c turns FRED off under PTI
    return Derived(FeatureSet.of(f), tuple(why))


@dataclass(frozen=True)
class CpuPreset:
    name: str
    cpu: str
    features: FeatureSet
    cmdline: str = ""
    guest: str = ""              # the kind of guest the kernel runs as ("": bare metal or any)

    @property
    def label(self) -> str:
        return f"{self.name} {self.cmdline}".strip() + (f", as {self.guest}" if self.guest else "")


PRESETS: dict[str, CpuPreset] = {c.name: CpuPreset(c.name, c.description, derive(c).features)
                                 for c in CPUS.values()}


def preset(name: str) -> CpuPreset:
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise InputError(f"unknown CPU preset {name!r}; choose from {', '.join(PRESETS)} (or presets, all)") from None


def configuration(name: str, cmdline: str = "") -> CpuPreset:
    """A preset booted with ``cmdline``."""
    p = preset(name)
    return CpuPreset(p.name, p.cpu, derive(CPUS[p.name], cmdline).features, " ".join(shlex.split(cmdline or "")))


# The boot options that change what a preset's entry code runs ('--cpu all' tries each alone).
ENTRY_OPTIONS: tuple[str, ...] = ("nopti", "pti=on", "nopcid", "nofsgsbase", "nospectre_v1", "spectre_v2=ibrs",
                                  "spectre_v2=retpoline", "retbleed=ibpb", "retbleed=stuff", "spectre_bhi=off",
                                  "mitigations=off")


def configurations(names, cmdline: str = "") -> dict[FeatureSet, CpuPreset]:
    """The configurations of ``--cpu`` values (each may list several, comma-separated) booted
    with ``cmdline``, by feature set (the first that gives a set names it).  ``presets``: every
    preset (booted with ``cmdline``); ``all``: every preset at its default boot, then each with
    each of ``ENTRY_OPTIONS`` added."""
    out: dict[FeatureSet, CpuPreset] = {}
    for value in names:
        for name in value.split(","):
            if name.strip().lower() in ("presets", "all"):
                for extra in ("",) + (ENTRY_OPTIONS if name.strip().lower() == "all" else ()):
                    for cpu in CPUS:
                        c = configuration(cpu, f"{cmdline} {extra}".strip())
                        out.setdefault(c.features, c)
            elif name.strip():
                c = configuration(name, cmdline)
                out.setdefault(c.features, c)
    return out


def preset_sets(names, cmdline: str = "") -> tuple[FeatureSet, ...]:
    """The feature sets of ``--cpu`` values, booted with ``cmdline`` (see ``configurations``)."""
    return tuple(configurations(names, cmdline))


# ---- feasibility --------------------------------------------------------------------------------
# Features only one vendor's CPUs get: (feature, vendor, SOURCES key, why).
VENDOR_ONLY: tuple[tuple[str, str, str, str], ...] = (
    ("kernel_ibrs", "intel", "ibrs-intel", "IBRS on kernel entry is chosen only on Intel"),
    ("bug_swapgs", "intel", "not-amd", "AMD and Hygon do not speculate SWAPGS (NO_SWAPGS)"),
    ("fence_swapgs_user", "intel", "fence-user", "the user SWAPGS fence needs X86_BUG_SWAPGS, which AMD lacks"),
    ("clear_bhb_loop", "intel", "not-amd", "AMD and Hygon have no BHI (NO_BHI)"),
    ("srso", "amd", "srso-amd", "only AMD and Hygon families have SRSO"),
    ("srso_alias", "amd", "srso-amd", "only AMD and Hygon families have SRSO"),
    ("sev_es", "amd", "sev-amd", "SEV-ES is an AMD memory-encryption feature (CPUID 0x8000001f)"),
)


@dataclass(frozen=True)
class Breach:
    """A rule a feature set breaks: what it says, and the decisions in the kernel it rests on."""

    rule: str
    sources: tuple[str, ...]


def infeasible(fs: FeatureSet) -> list[Breach]:
    """The rules of which features occur together that ``fs`` breaks (empty: feasible)."""
    names = set(fs.names)
    out: list[Breach] = []
    vendors: dict[str, tuple[str, str, str]] = {}
    for name, vendor, source, why in VENDOR_ONLY:
        if name in names:
            vendors.setdefault(vendor, (name, source, why))
    if len(vendors) > 1:
        (a, sa, wa), (b, sb, wb) = vendors["intel"], vendors["amd"]
        out.append(Breach(f"{a} and {b} are on no one CPU: {wa}; {wb}", (sa, sb)))
    if "fence_swapgs_user" in names and "pti" in names:
        out.append(Breach("fence_swapgs_user is set only without pti (PTI's CR3 write serialises)",
                          ("fence-user",)))
    if "fence_swapgs_user" in names and "fence_swapgs_kernel" not in names:
        out.append(Breach("fence_swapgs_user comes only with fence_swapgs_kernel", ("fence-user", "fence-kernel")))
    if "fred" in names and "pti" in names:
        out.append(Breach("fred and pti: the kernel turns FRED off when PTI is on", ("fred-pti",)))
    if "kernel_ibrs" in names and "retpoline" in names:
        out.append(Breach("kernel_ibrs and retpoline are two Spectre v2 modes; the kernel picks one",
                          ("kernel-ibrs", "retpoline")))
    return out


# ---- the configurations a feature set stands for ------------------------------------------------
# Features that do not tell configurations apart for the model: SMAP's CLAC/STAC change only AC,
# which nothing in kernel mode reads but DEBUG_ENTRY's check, and that check masks AC out without
# SMAP; bug_swapgs only says SWAPGS speculates, which nothing follows without a fence feature.
def _effective(names) -> frozenset[str]:
    out = set(names) - {"smap"}
    if not out & {"fence_swapgs_kernel", "fence_swapgs_user"}:
        out.discard("bug_swapgs")
    return frozenset(out)


def _choices() -> list[str]:
    """Boot command lines to try, fewest options first."""
    import itertools

    axes = (("", "nopti", "pti=on"), ("", "nopcid"), ("", "nofsgsbase"), ("", "nospectre_v1"),
            ("", "spectre_v2=off", "spectre_v2=ibrs", "spectre_v2=retpoline"), ("", "retbleed=off", "retbleed=ibpb"),
            ("", " ".join(f"{o}=off" for o in _VERW_OPTIONS)), ("", "spec_rstack_overflow=off"),
            ("", "mitigations=off"))
    lines = [" ".join(w for w in combo if w) for combo in itertools.product(*axes)]
    return sorted(lines, key=lambda s: (len(s.split()), s))


@functools.cache
def _witnesses() -> dict[frozenset[str], CpuPreset]:
    """Every preset under every command line of ``_choices``, by what the model runs of it."""
    found: dict[frozenset[str], CpuPreset] = {}
    for line in _choices():
        for cpu in CPUS.values():
            d = derive(cpu, line)
            found.setdefault(_effective(d.features.names), CpuPreset(cpu.name, cpu.description, d.features, line))
    return found


def witness(fs: FeatureSet) -> CpuPreset | None:
    """A preset and boot options whose features are ``fs`` for everything the model runs (the
    first found, fewest options first), or None when no CPU here can have it.  SEV-ES is not the
    CPU's but the guest's: an AMD preset's set plus ``sev_es`` is that preset as an SEV-ES guest."""
    if "sev_es" in fs.names:
        host = witness(FeatureSet.of(n for n in fs.names if n != "sev_es"))
        if host is None or CPUS[host.name].vendor != "amd":
            return None
        return CpuPreset(host.name, host.cpu, fs, host.cmdline, "an SEV-ES guest")
    return _witnesses().get(_effective(fs.names))


__all__ = ["CPUS", "Cpu", "CpuPreset", "Derived", "ENTRY_OPTIONS", "PRESETS", "SOURCES", "Source", "Breach",
           "configuration", "configurations", "witness",
           "derive", "infeasible", "parse_cmdline", "preset", "preset_sets"]
