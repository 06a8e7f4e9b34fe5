"""Named CPU presets: the features Linux 6.12 turns on for a CPU at its default boot.

Each preset is what arch/x86/kernel/cpu/bugs.c and common.c of Debian's 6.12.118 select with
``mitigations=auto`` on bare metal, with Debian's MITIGATION_* options, for the CPU's bug
bits (common.c's cpu_vuln_blacklist/whitelist and cpu_set_bug_bits) and the microcode
assumed.  Only features the entry code's alternatives or the model read are kept (C-only
ones such as use_ibpb and rsb_ctxsw go too: they patch no entry instruction).  smap stays: its
CLAC/STAC are patched in, and the model runs them as no-ops (AC is not modelled).  ``bug_swapgs``
is a hardware bug, not a feature: it tells the model that SWAPGS runs speculatively.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrycheck.errors import InputError
from entrycheck.image.features import FeatureSet


@dataclass(frozen=True)
class CpuPreset:
    name: str
    cpu: str
    features: FeatureSet
    source: str                 # where each feature comes from


PRESETS: dict[str, CpuPreset] = {p.name: p for p in (
    CpuPreset("skylake", "Intel Skylake client (family 6 model 0x5E; no eIBRS, Meltdown-affected)",
              FeatureSet.of("pti pcid fsgsbase smap kernel_ibrs fence_swapgs_kernel clear_cpu_buf bug_swapgs"
                            .split()),
              "pti: pti_check_boottime_disable (X86_BUG_CPU_MELTDOWN); kernel_ibrs: spectre_v2 AUTO picks IBRS "
              "(retbleed, no eIBRS, Intel); fence_swapgs_kernel: spectre_v1 (FSGSBASE); no fence_swapgs_user: "
              "PTI's CR3 write serialises; clear_cpu_buf: mds_select_mitigation (X86_BUG_MDS)"),
    CpuPreset("cascadelake", "Intel Cascade Lake server (family 6 model 0x55 stepping 7; eIBRS, RDCL_NO, MDS_NO)",
              FeatureSet.of("pcid fsgsbase smap fence_swapgs_kernel fence_swapgs_user clear_bhb_loop rethunk "
                            "bug_swapgs".split()),
              "no pti (RDCL_NO); fence_swapgs_user: X86_BUG_SWAPGS without PTI; clear_bhb_loop: "
              "bhi_select_mitigation (eIBRS, no BHI_CTRL); rethunk: its_select_mitigation (X86_BUG_ITS); no "
              "clear_cpu_buf: TSX is off by default, so TAA needs no VERW"),
    CpuPreset("alderlake", "Intel Alder Lake (eIBRS with BHI_DIS_S; RFDS_CLEAR microcode)",
              FeatureSet.of("pcid fsgsbase smap fence_swapgs_kernel fence_swapgs_user clear_cpu_buf bug_swapgs"
                            .split()),
              "fence_swapgs_user/kernel: spectre_v1 (X86_BUG_SWAPGS, no PTI); clear_cpu_buf: "
              "rfds_select_mitigation; BHI through the BHI_DIS_S control (clear_bhb_hw), not clear_bhb_loop"),
    CpuPreset("zen2", "AMD Zen 2 (family 0x17; retbleed, SRSO)",
              FeatureSet.of("fsgsbase smap fence_swapgs_kernel retpoline unret rethunk srso".split()),
              "unret, rethunk: retbleed_select_mitigation (UNRET) and srso_select_mitigation (safe RET); srso: "
              "family < 0x19; fence_swapgs_kernel without X86_BUG_SWAPGS (AMD does not speculate SWAPGS); no PCID"),
    CpuPreset("zen3", "AMD Zen 3 (family 0x19; SRSO)",
              FeatureSet.of("pcid fsgsbase smap fence_swapgs_kernel retpoline unret rethunk srso_alias".split()),
              "unret, rethunk, srso_alias: srso_select_mitigation (safe RET, family 0x19); retbleed is not a bug "
              "of family 0x19"),
    CpuPreset("zen4", "AMD Zen 4 (family 0x19; AutoIBRS, SRSO)",
              FeatureSet.of("pcid fsgsbase smap fence_swapgs_kernel unret rethunk srso_alias".split()),
              "as zen3; AutoIBRS (ibrs_enhanced) replaces retpoline"),
)}


def preset(name: str) -> CpuPreset:
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise InputError(f"unknown CPU preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_sets(names) -> tuple[FeatureSet, ...]:
    """The feature sets of ``--cpu`` values (each may list several, comma-separated)."""
    out: list[FeatureSet] = []
    for value in names:
        for name in value.split(","):
            if name.strip():
                fs = preset(name).features
                if fs not in out:
                    out.append(fs)
    return tuple(out)
