"""`entrycheck demo`: a small kernel-style entry fixture, checked in four variants.

``mini_entry.S`` is written from scratch in the kernel's conventions (a syscall
path, paranoid entry and exit, NMI/#MC/#DB entries, PTI/PCID CR3 switching as
alternatives).  Its paranoid return comes in four variants: two safe ones (before
and after the change that skips redundant CR3 writes) and two broken ones that the
checker must catch.  ``run_demo`` assembles and checks them; ``demo_text`` and
``demo_json`` describe the result.
"""

from entrycheck.demo.report import demo_json, demo_text
from entrycheck.demo.run import VARIANTS, DemoResult, Variant, VariantResult, assemble, demo_config, \
    find_assembler, run_demo

__all__ = ["VARIANTS", "DemoResult", "Variant", "VariantResult", "assemble", "demo_config", "demo_json",
           "demo_text", "find_assembler", "run_demo"]
