"""--config / --kconfig: the configuration a target is built with, and the entry objects it has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from entrycheck.errors import InputError
from entrycheck.image import load_build
from entrycheck.kernel.kconfig import (
    ConfigRequest,
    entry_objects,
    parse_request,
    read_config,
    script_arguments,
    unmet,
)
from entrycheck.kernel.targets import KernelBuild, resolve_target


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".config"
    path.write_text(text)
    return path


def test_requests_are_normalised_so_equal_requests_share_a_build() -> None:
    a = parse_request(None, ["X86_FRED=y", "CONFIG_DEBUG_ENTRY=n"])
    b = parse_request(None, ["DEBUG_ENTRY=y", "X86_FRED=y", "DEBUG_ENTRY=n"])   # the last one wins
    assert a == b == ConfigRequest(None, (("DEBUG_ENTRY", "n"), ("X86_FRED", "y")))
    assert a.key() == b.key() != parse_request("distro", ["X86_FRED=y", "DEBUG_ENTRY=n"]).key()
    assert parse_request(None, []).default and not parse_request("defconfig", []).default
    assert parse_request("distro", ["X86_FRED=y"]).describe() == "distro config, X86_FRED=y"


@pytest.mark.parametrize("bad", ["x86_fred=y", "X86_FRED", "X86_FRED=yes", "=y", "NR_CPUS=1 2"])
def test_bad_kconfig_is_one_input_error(bad: str) -> None:
    with pytest.raises(InputError, match="--kconfig"):
        parse_request(None, [bad])
    with pytest.raises(InputError, match="defconfig or distro"):
        parse_request("allyes", [])


def test_options_become_scripts_config_arguments() -> None:
    opts = parse_request(None, ["A=y", "B=n", "C=m", "D=0x10", 'E="x y"']).options
    assert script_arguments(opts) == ["--enable", "A", "--disable", "B", "--module", "C", "--set-val", "D", "0x10",
                                      "--set-str", "E", "x y"]


def test_an_option_olddefconfig_dropped_is_named(tmp_path: Path) -> None:
    config = _config(tmp_path, "CONFIG_IA32_EMULATION=y\n# CONFIG_X86_FRED is not set\nCONFIG_NR_CPUS=64\n")
    assert read_config(config) == {"IA32_EMULATION": "y", "X86_FRED": "n", "NR_CPUS": "64"}
    assert unmet((("IA32_EMULATION", "y"), ("DEBUG_ENTRY", "n")), config) == []   # absent reads as n
    missing = unmet((("X86_FRED", "y"), ("NOPE", "y")), config)
    assert "X86_FRED=y (the result has X86_FRED=n)" in missing[0]
    assert "no such option" in missing[1]


def test_entry_objects_follow_the_config(tmp_path: Path) -> None:
    assert entry_objects(_config(tmp_path, "# CONFIG_IA32_EMULATION is not set\n")) == ("arch/x86/entry/entry_64.o",)
    both = entry_objects(_config(tmp_path, "CONFIG_IA32_EMULATION=y\nCONFIG_X86_FRED=y\n"))
    assert both == ("arch/x86/entry/entry_64.o", "arch/x86/entry/entry_64_compat.o", "arch/x86/entry/entry_64_fred.o")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrycheck.cli", *args], capture_output=True, text=True, check=False)


def test_config_of_a_built_object_is_refused(tmp_path: Path) -> None:
    obj = tmp_path / "entry_64.o"
    obj.write_bytes(b"\x7fELF")
    done = _cli("disasm", str(obj), "entry_SYSCALL_64", "--kconfig", "X86_FRED=y")
    assert done.returncode == 2 and "a built object already has its configuration" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.kernel
def test_default_debian_build_links_entry_and_compat(kernel612: KernelBuild) -> None:
    assert [p.name for p in kernel612.parts] == ["entry_64.o", "entry_64_compat.o"]
    loaded = load_build(kernel612)
    # entry_64.o's asm_int80_emulation reaches the compat object's int80_emulation, resolved by the link.
    assert "int80_emulation" in loaded.symbols and "entry_SYSENTER_compat" in loaded.symbols
    assert "int80_emulation" not in loaded.resolution.functions
    assert "do_int80_emulation" in loaded.resolution.functions
    assert kernel612.label.endswith("; defconfig)")


@pytest.mark.kernel
def test_kconfig_builds_fred_and_says_so(kernel612: KernelBuild) -> None:
    fred = resolve_target("debian:6.12", request=parse_request(None, ["X86_FRED=y"]))
    assert [p.name for p in fred.parts] == ["entry_64.o", "entry_64_compat.o", "entry_64_fred.o"]
    assert fred.label.endswith("; defconfig, X86_FRED=y)")
    assert read_config(fred.config_file)["X86_FRED"] == "y"
    assert "asm_fred_entrypoint_user" in load_build(fred).symbols
    assert fred.object_path != kernel612.object_path


@pytest.mark.kernel
def test_kconfig_that_does_not_stick_is_exit_2(kernel61: KernelBuild) -> None:
    done = _cli("disasm", "debian:6.1", "entry_SYSCALL_64", "--kconfig", "X86_FRED=y")
    assert done.returncode == 2
    assert "olddefconfig did not keep X86_FRED=y" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.kernel
def test_distro_config_is_debians(kernel612: KernelBuild) -> None:
    distro = resolve_target("debian:6.12", request=parse_request("distro", []))
    have = read_config(distro.config_file)
    # Debian's amd64 config, not defconfig: no DEBUG_ENTRY, Xen PV and SEV built in.
    assert (have.get("DEBUG_ENTRY", "n"), have["XEN_PV"], have["AMD_MEM_ENCRYPT"]) == ("n", "y", "y")
    assert read_config(kernel612.config_file).get("DEBUG_ENTRY") == "y"
    assert distro.label.endswith("; distro config)")


def _assemble(tmp_path: Path, name: str, text: str) -> Path:
    src, obj = tmp_path / f"{name}.S", tmp_path / f"{name}.o"
    src.write_text(text)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    return obj


def test_objects_named_together_are_linked_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TARGET a.o,b.o: the objects are linked as the kernel links them, b's reference to a's
    exit resolved; the build lists both parts."""
    monkeypatch.setenv("ENTRYCHECK_CACHE", str(tmp_path / "cache"))
    a = _assemble(tmp_path, "entry_64", ".section .entry.text,\"ax\"\n.globl common_exit\n"
                                        "entry_a: nop\ncommon_exit: iretq\n")
    b = _assemble(tmp_path, "entry_64_compat", ".section .entry.text,\"ax\"\n.globl entry_b\n"
                                               "entry_b: nop\n jmp common_exit\n")
    kb = resolve_target(f"{a},{b}")
    assert kb.parts == (a, b) and kb.object_path not in (a, b)
    from entrycheck.image.objfile import load_object

    obj = load_object(kb.object_path)
    defined = {s.name for s in obj.symbols if not s.undefined and s.name}
    assert {"common_exit", "entry_b"} <= defined
    assert not [s.name for s in obj.symbols if s.undefined and s.name == "common_exit"]
    with pytest.raises(InputError, match="several objects are joined with commas"):
        resolve_target(f"{a},{tmp_path / 'missing.o'}")
