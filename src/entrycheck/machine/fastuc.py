"""Direct ctypes calls into libunicorn for the hot paths: registers and physical memory.

The binding's generic reg_read/mem_read cost about 3 us and 8 us a call (argument
checks and buffer allocation on every call); the explorer makes hundreds of
thousands of them, so they are called here through prototypes made once.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

from unicorn import Uc
from unicorn.unicorn_py3 import unicorn as _ucmod

from entrycheck.errors import InternalError


class FastUc:
    """Registers and physical memory of one Unicorn instance."""

    def __init__(self, uc: Uc) -> None:
        lib = _ucmod.uclib
        handle = uc._uch
        self._h = handle.value if hasattr(handle, "value") else handle
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
        self._rd = proto(("uc_reg_read", lib))
        self._wr = proto(("uc_reg_write", lib))
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.addressof(self._buf)
        mem = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)
        self._mrd = mem(("uc_mem_read", lib))
        self._mwr = mem(("uc_mem_write", lib))
        self._mbuf = ctypes.create_string_buffer(0x1000)
        batch = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
        self._rdb = batch(("uc_reg_read_batch", lib))
        self._wrb = batch(("uc_reg_write_batch", lib))
        self._batches: dict = {}

    def read(self, reg: int) -> int:
        if self._rd(self._h, reg, self._ref):
            raise InternalError(f"cannot read register {reg}")
        return self._buf.value

    def write(self, reg: int, value: int) -> None:
        self._buf.value = value & ((1 << 64) - 1)
        if self._wr(self._h, reg, self._ref):
            raise InternalError(f"cannot write register {reg}")

    def mem_read(self, phys: int, size: int) -> bytes:
        buf = self._mbuf if size <= 0x1000 else ctypes.create_string_buffer(size)
        if self._mrd(self._h, phys, buf, size):
            raise InternalError(f"cannot read physical memory at {phys:#x}")
        return buf.raw[:size]

    def mem_write(self, phys: int, data: bytes) -> None:
        if self._mwr(self._h, phys, data, len(data)):
            raise InternalError(f"cannot write physical memory at {phys:#x}")

    def read_all(self, regs: Sequence[int]) -> tuple[int, ...]:
        ids, ptrs, bufs = self._batch(regs)
        if self._rdb(self._h, ids, ptrs, len(regs)):
            raise InternalError("cannot read registers")
        return tuple(b.value for b in bufs)

    def write_all(self, regs: Sequence[int], values: Sequence[int]) -> None:
        ids, ptrs, bufs = self._batch(regs)
        for b, v in zip(bufs, values):
            b.value = v & ((1 << 64) - 1)
        if self._wrb(self._h, ids, ptrs, len(regs)):
            raise InternalError("cannot write registers")

    def _batch(self, regs: Sequence[int]):
        key = tuple(regs)
        got = self._batches.get(key)
        if got is None:
            bufs = [ctypes.c_uint64() for _ in key]
            ids = (ctypes.c_int * len(key))(*key)
            ptrs = (ctypes.c_void_p * len(key))(*(ctypes.addressof(b) for b in bufs))
            got = self._batches[key] = (ids, ptrs, bufs)
        return got
