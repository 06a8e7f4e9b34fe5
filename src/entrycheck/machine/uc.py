"""Unicorn, called directly: the only module that imports it.

The binding's generic calls cost 3-8 us each and every hook goes through three Python
frames; the explorer makes millions of them.  So registers, physical memory, hooks,
emu_start and TLB flushes go through ctypes prototypes made once, and hooks are plain
CFUNCTYPE callbacks.  The prototypes are PYFUNCTYPE: calls keep the GIL instead of
releasing and re-taking it around every register read (about 7% of a depth-2 check).
Register names map to Unicorn's numbers here.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc, UcError
from unicorn import unicorn_const as UCC
from unicorn import x86_const as UX
from unicorn.unicorn_py3 import unicorn as _binding

from entrycheck.errors import InternalError
from entrycheck.machine.api import MASK64
from entrycheck.machine.state import REG_NAMES

UC_REG = {name: getattr(UX, "UC_X86_REG_" + name.upper()) for name in REG_NAMES}
UC_ALL = tuple(UC_REG[n] for n in REG_NAMES)
UC_GS_BASE = UX.UC_X86_REG_GS_BASE
OK = UCC.UC_ERR_OK
ERR_INSN_INVALID = UCC.UC_ERR_INSN_INVALID
ERR_PROT = (UCC.UC_ERR_WRITE_PROT, UCC.UC_ERR_READ_PROT, UCC.UC_ERR_FETCH_PROT)
ERR_UNMAPPED = (UCC.UC_ERR_READ_UNMAPPED, UCC.UC_ERR_WRITE_UNMAPPED, UCC.UC_ERR_FETCH_UNMAPPED)
PROT_READ, PROT_WRITE, PROT_EXEC, PROT_ALL = UCC.UC_PROT_READ, UCC.UC_PROT_WRITE, UCC.UC_PROT_EXEC, UCC.UC_PROT_ALL
MEM_WRITE, MEM_FETCH = UCC.UC_MEM_WRITE, UCC.UC_MEM_FETCH
HOOK_CODE, HOOK_INTR, HOOK_TLB_FILL = UCC.UC_HOOK_CODE, UCC.UC_HOOK_INTR, UCC.UC_HOOK_TLB_FILL
HOOK_MEM = UCC.UC_HOOK_MEM_READ | UCC.UC_HOOK_MEM_WRITE


def error_text(errno: int) -> str:
    return str(UcError(errno))


_lib = _binding.uclib
CODE_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
MEM_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                           ctypes.c_void_p)
INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
TLB_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                           ctypes.POINTER(_binding.uc_tlb_entry), ctypes.c_void_p)
_REG_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_MEM_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)
_BATCH_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_START_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                             ctypes.c_size_t)
_STOP_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_CTL_FN = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_HOOK_ADD = _lib.uc_hook_add
_CTL_TLB_FLUSH = (UCC.UC_CTL_IO_WRITE << 30) | UCC.UC_CTL_TLB_FLUSH


class Unicorn:
    """One Unicorn instance, called through prototypes made once (the binding's generic
    calls cost 3-8 us each; the explorer makes millions)."""

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_tlb_mode(UCC.UC_TLB_VIRTUAL)
        handle = self.uc._uch
        self.h = handle.value if hasattr(handle, "value") else handle
        self._rd = _REG_FN(("uc_reg_read", _lib))
        self._wr = _REG_FN(("uc_reg_write", _lib))
        self._mrd = _MEM_FN(("uc_mem_read", _lib))
        self._mwr = _MEM_FN(("uc_mem_write", _lib))
        self._rdb = _BATCH_FN(("uc_reg_read_batch", _lib))
        self._wrb = _BATCH_FN(("uc_reg_write_batch", _lib))
        self._start = _START_FN(("uc_emu_start", _lib))
        self._stop_fn = _STOP_FN(("uc_emu_stop", _lib))
        self._ctl = _CTL_FN(("uc_ctl", _lib))
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.addressof(self._buf)
        self._mbuf = ctypes.create_string_buffer(0x1000)
        n = len(UC_ALL)
        self._all = (ctypes.c_uint64 * n)()
        self._all_ids = (ctypes.c_int * n)(*UC_ALL)
        base = ctypes.addressof(self._all)
        self._all_ptrs = (ctypes.c_void_p * n)(*(base + 8 * k for k in range(n)))
        self._callbacks: list = []
        self.error: BaseException | None = None

    def hook(self, htype: int, fn, cbtype, begin: int = 1, end: int = 0) -> None:
        def guarded(*args):
            try:
                return fn(*args[1:-1])
            except BaseException as exc:  # noqa: BLE001 - re-raised by start()
                if self.error is None:
                    self.error = exc
                self._stop_fn(self.h)
                return False
        cb = cbtype(guarded)
        self._callbacks.append(cb)
        hh = _binding.uc_hook_h()
        status = _HOOK_ADD(self.h, ctypes.byref(hh), htype, ctypes.cast(cb, ctypes.c_void_p),
                           ctypes.c_void_p(0), ctypes.c_uint64(begin), ctypes.c_uint64(end))
        if status != UCC.UC_ERR_OK:
            raise UcError(status)

    def start(self, pc: int, count: int) -> int:
        self.error = None
        status = self._start(self.h, pc, 0, 0, count)
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return status

    def emu_stop(self) -> None:
        self._stop_fn(self.h)

    def read(self, reg: int) -> int:
        self._rd(self.h, reg, self._ref)
        return self._buf.value

    def write(self, reg: int, value: int) -> None:
        self._buf.value = value & MASK64
        self._wr(self.h, reg, self._ref)

    def read_all(self) -> tuple[int, ...]:
        self._rdb(self.h, self._all_ids, self._all_ptrs, 18)
        return tuple(self._all)

    def write_all(self, values: Sequence[int]) -> None:
        self._all[:] = [v & MASK64 for v in values]
        self._wrb(self.h, self._all_ids, self._all_ptrs, 18)

    def mem_read(self, phys: int, size: int) -> bytes:
        buf = self._mbuf
        if size > len(buf):
            # One buffer of the largest size asked (the writable memory, read whole at every
            # recorded run's end and loop watch): not a zero-filled one per read.
            buf = self._mbuf = ctypes.create_string_buffer(size)
        if self._mrd(self.h, phys, buf, size):
            raise InternalError(f"cannot read physical memory at {phys:#x}")
        return ctypes.string_at(buf, size)

    def mem_write(self, phys: int, data: bytes) -> None:
        if self._mwr(self.h, phys, data, len(data)):
            raise InternalError(f"cannot write physical memory at {phys:#x}")

    def flush_tlb(self) -> None:
        self._ctl(self.h, _CTL_TLB_FLUSH)


__all__ = ["Unicorn", "UC_REG", "CODE_CB", "MEM_CB", "INTR_CB", "TLB_CB"]
