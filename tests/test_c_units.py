"""The pieces the kernel's C needs that are testable without a kernel: the booted table, the IST
re-entry test below the hardware frame, reading who may set a kernel breakpoint, and the
build options under which the C does not run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from entrycheck import session
from entrycheck.kernel.guards import kernel_breakpoint_capability
from entrycheck.kernelabi import booted
from entrycheck.machine.model import Vector
from entrycheck.props import reentry

TOP = 0x10000


class _Layout:
    """A flat address space: every page mapped, physical = virtual."""

    writable_base = 0
    pages = {p: object() for p in range(0, TOP >> 12)}

    @staticmethod
    def phys(a: int) -> int:
        return a


class _Live:
    def __init__(self, words: set[int]) -> None:
        self.words = words

    def live(self, word: int, boundary: int) -> bool:
        return word in self.words


def _outer(vector: Vector):
    return SimpleNamespace(vector=vector)


def test_a_live_word_under_the_frame_is_a_reentry_for_an_ist_entry_that_pushes_pt_regs() -> None:
    frame = Vector.DB.frame_bytes
    below = TOP - frame - 8              # orig_ax's slot: written by the nested entry's first push
    got = reentry.live_frame(_Layout, _Live({below}), [_outer(Vector.DB)], Vector.DB, TOP, 0)
    assert got is not None and got[1] == (below,) and got[2] is False
    # The hardware frame's own words come first and say so.
    got = reentry.live_frame(_Layout, _Live({below, TOP - 8}), [_outer(Vector.DB)], Vector.DB, TOP, 0)
    assert got is not None and got[1] == (TOP - 8,) and got[2] is True
    # Beyond what the entry pushes before it can leave the stack: not this delivery's doing.
    assert reentry.live_frame(_Layout, _Live({TOP - reentry.ENTRY_PUSHES - 8}), [_outer(Vector.DB)],
                              Vector.DB, TOP, 0) is None
    # asm_exc_nmi tells a nested NMI apart before it pushes more than the frame.
    assert reentry.live_frame(_Layout, _Live({below}), [_outer(Vector.NMI)], Vector.NMI, TOP, 0) is None
    # Another IST slot's exception outstanding: no re-entry of this one.
    assert reentry.live_frame(_Layout, _Live({TOP - 8}), [_outer(Vector.MC)], Vector.DB, TOP, 0) is None
    msg = reentry.message(Vector.DB, SimpleNamespace(vector=Vector.DB, rip=0x401000, cpu=SimpleNamespace(cpl=3)),
                          1, "", hex, in_frame=False)
    assert "still runs on that stack" in msg and "overwrite 1 words" in msg


def test_the_booted_apic_points_its_read_at_the_stub_the_image_gives() -> None:
    b = booted.Booting(cpu=0, percpu_base=0xFFFF888000000000,
                       layout=lambda struct: {"read": 0x18} if struct == "apic" else {},
                       function=lambda name: 0xFFFFFFFF82000040 if name == "native_apic_mem_read" else None,
                       address=0xFFFFFFFF83000000)
    data = booted.value("apic", b)
    assert len(data) == booted.BOOTED["apic"].size
    struct = int.from_bytes(data[:8], "little")
    assert struct == 0xFFFFFFFF83000000 + 0x40
    read_at = struct - 0xFFFFFFFF83000000 + 0x18
    assert int.from_bytes(data[read_at:read_at + 8], "little") == 0xFFFFFFFF82000040
    assert "native_apic_mem_read" in booted.FUNCTIONS
    # Without the struct's layout the pointer is left null: a read of it faults, naming nothing silently.
    bare = booted.value("apic", booted.Booting(cpu=0, percpu_base=0, address=0x1000))
    assert bare[0x40:0x200] == bytes(0x1C0)


def test_who_may_set_a_kernel_breakpoint_is_parsed_from_hw_breakpoint_c(tmp_path: Path) -> None:
    src = tmp_path / "kernel" / "events" / "hw_breakpoint.c"
    src.parent.mkdir(parents=True)
    src.write_text("int hw_breakpoint_parse(...)\n{\n\tif (arch_check_bp_in_kernelspace(hw)) {\n"
                   "\t\tif (attr->exclude_kernel)\n\t\t\treturn -EINVAL;\n"
                   "\t\tif (!capable(CAP_PERFMON))\n\t\t\treturn -EPERM;\n\t}\n\treturn 0;\n}\n")
    assert kernel_breakpoint_capability(tmp_path) == "CAP_PERFMON"
    src.write_text("int nothing;\n")
    assert kernel_breakpoint_capability(tmp_path) is None
    assert kernel_breakpoint_capability(tmp_path / "missing") is None


def test_a_paravirt_xxl_build_keeps_the_stubs_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "config"
    info = tmp_path / "noinstr.json"
    info.write_text('{"objects": ["arch/x86/entry/common.o", "arch/x86/kernel/traps.o"], "deps": ["a.c"]}')
    build = SimpleNamespace(noinstr_object=tmp_path / "noinstr.o", noinstr_info=info, config_file=config,
                            c_note="", sources=("arch/x86/entry/entry_64.S",))
    config.write_text("CONFIG_PARAVIRT=y\n")
    assert session.kernel_c(build).startswith("the kernel's noinstr C ran (2 objects")
    assert session.image_sources(build) == ("arch/x86/entry/entry_64.S", "a.c")
    config.write_text("CONFIG_PARAVIRT=y\nCONFIG_PARAVIRT_XXL=y\n")
    assert "CONFIG_PARAVIRT_XXL" in session.kernel_c(build)
    stubbed = SimpleNamespace(noinstr_object=None, noinstr_info=None, config_file=None, c_note="--c-stubs")
    assert session.kernel_c(stubbed) == "contract stubs stood in for the kernel's C (--c-stubs)"
