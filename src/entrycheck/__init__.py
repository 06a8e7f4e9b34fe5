"""entrycheck: execute the kernel's own x86-64 entry code on a model CPU and check it."""

__version__ = "0.1.0"
