"""The privileged instructions the machine carries out itself (image/insns.py finds them): CR3,
MSRs, SWAPGS, RD/WRGSBASE, LSL of the CPU-number segment, VERW and fences, IRETQ, SYSRET, ERETS
and ERETU, and every call into a C function's stub.  Each site gets one action, made once: it
applies the model's pure function and skips the instruction."""

from __future__ import annotations

from entrycheck.machine import fred, model, uc as U
from entrycheck.machine.api import FLAG_GROUPS, MASK64, Op
from entrycheck.machine.context import RunContext
from entrycheck.machine.delivery import Delivery
from entrycheck.machine.events import (Cr2Read, Cr3Read, Cr3Written, DebugRegWritten, FaultKind, Fence, GsChange, Iret, IretFaulted, MsrRead,
                                       MsrWritten, Outcome, Sysret)
from entrycheck.image.insns import PARENT
from entrycheck.machine.memory import Unmapped
from entrycheck.machine.model import Frame, Vector
from entrycheck.machine.state import REG_INDEX
from entrycheck.machine.stops import Stops

RFLAGS_ZF = 1 << 6
_UC_REG = U.UC_REG
_RAX, _RCX, _RDX = _UC_REG["rax"], _UC_REG["rcx"], _UC_REG["rdx"]
_RSP, _RIP, _RFLAGS = _UC_REG["rsp"], _UC_REG["rip"], _UC_REG["rflags"]


class Actions:
    def __init__(self, ctx: RunContext, delivery: Delivery, stops: Stops, stubs, speculation) -> None:
        self.ctx, self.delivery, self.stops, self.stubs = ctx, delivery, stops, stubs
        self.config = ctx.config
        self.speculation = speculation
        spec = ctx.config.spec
        self._tracks = spec is not None and spec.tracks

    def make(self, kind: str, *args):
        """The action of a site (``find_sites``' (kind, operands))."""
        if kind in ("branch", "bhb"):
            return getattr(self.speculation, "act_" + kind)(*args)
        return getattr(self, "_" + kind)(*args)

    # ---- MOV from/to CR3, CR2 and the debug registers --------------------------------------
    def _mov_from(self, reg: str, value, then=None):
        """MOV from a control or debug register into ``reg``: ``value(cpu)``; ``then(addr, v)``."""
        ctx = self.ctx
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            ctx.skip(addr, size)
            v = value(ctx.cpu)
            ctx.u.write(uc_reg, v)
            ctx.flow(Op.CONST, loc)
            if then is not None:
                then(addr, v)
        return act

    def _mov_to(self, reg: str, apply):
        """MOV from ``reg`` to a control or debug register: ``apply(addr, value)``."""
        ctx = self.ctx
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            ctx.skip(addr, size)
            ctx.flow(Op.USE, loc)
            apply(addr, ctx.u.read(uc_reg))
        return act

    def _cr3_read(self, reg: str):
        ctx = self.ctx
        return self._mov_from(reg, lambda cpu: cpu.cr3, lambda addr, v: ctx.emit(Cr3Read, pc=addr, value=v))

    def _cr3_write(self, reg: str):
        ctx = self.ctx

        def apply(addr: int, value: int) -> None:
            cpu, write = model.write_cr3(ctx.cpu, value)
            ctx.set_cpu(cpu)
            ctx.emit(Cr3Written, pc=addr, write=write, user_view=ctx.user_view)
        return self._mov_to(reg, apply)

    def _cr2_read(self, reg: str):
        ctx = self.ctx

        def then(addr: int, value: int) -> None:
            out = ctx.run.outstanding
            ctx.emit(Cr2Read, pc=addr, value=value, handling=out[-1].vector if out else None)
        return self._mov_from(reg, lambda cpu: cpu.cr2, then)

    def _cr2_write(self, reg: str):
        ctx = self.ctx
        return self._mov_to(reg, lambda addr, value: ctx.set_cpu(ctx.cpu.but(cr2=value)))

    def _dr_read(self, reg: str, n: int):
        return self._mov_from(PARENT[reg], lambda cpu: model.read_dr(cpu, n))

    def _dr_write(self, reg: str, n: int):
        ctx = self.ctx

        def apply(addr: int, value: int) -> None:
            old = model.read_dr(ctx.cpu, n)
            cpu = model.write_dr(ctx.cpu, n, value)
            ctx.set_cpu(cpu)
            ctx.emit(DebugRegWritten, pc=addr, number=n, old=old, value=model.read_dr(cpu, n))
        return self._mov_to(PARENT[reg], apply)

    def _rdmsr(self):
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            ctx.flow(Op.USE, REG_INDEX["rcx"])
            msr = ctx.u.read(_RCX) & 0xFFFFFFFF
            try:
                value = model.rdmsr(ctx.cpu, msr)
            except model.MsrError as exc:
                ctx.fault(FaultKind.GP, str(exc))
                return
            ctx.skip(addr, size)
            ctx.u.write(_RAX, value & 0xFFFFFFFF)
            ctx.u.write(_RDX, value >> 32)
            ctx.flow(Op.CONST, REG_INDEX["rax"])
            ctx.flow(Op.CONST, REG_INDEX["rdx"])
            ctx.emit(MsrRead, pc=addr, msr=msr, value=value)
        return act

    def _wrmsr(self):
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            for name in ("rcx", "rax", "rdx"):
                ctx.flow(Op.USE, REG_INDEX[name])
            u = ctx.u
            msr = u.read(_RCX) & 0xFFFFFFFF
            value = (u.read(_RAX) & 0xFFFFFFFF) | ((u.read(_RDX) & 0xFFFFFFFF) << 32)
            try:
                cpu, write = model.wrmsr(ctx.cpu, msr, value)
            except model.MsrError as exc:
                ctx.fault(FaultKind.GP, str(exc))
                return
            ctx.skip(addr, size)
            ctx.set_cpu(cpu)
            ctx.emit(MsrWritten, pc=addr, write=write)
            if msr in (model.MSR_GS_BASE, model.MSR_KERNEL_GS_BASE):
                ctx.emit(GsChange, pc=addr, how="wrmsr", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _swapgs(self):
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            if self.config.fred is not None:
                ctx.fault(FaultKind.UD, f"SWAPGS at {ctx.symbolize(addr)}: it #UDs with FRED enabled")
                return
            ctx.skip(addr, size)
            cpu = model.swapgs(ctx.cpu)
            ctx.set_cpu(cpu)
            ctx.emit(GsChange, pc=addr, how="swapgs", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _rdgsbase(self, reg: str):
        ctx = self.ctx
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            if not ctx.cpu.fsgsbase:
                ctx.fault(FaultKind.UD, f"RDGSBASE with CR4.FSGSBASE clear at {ctx.symbolize(addr)}")
                return
            ctx.skip(addr, size)
            ctx.u.write(uc_reg, ctx.cpu.gs_base)
            ctx.flow(Op.CONST, loc)
        return act

    def _wrgsbase(self, reg: str):
        ctx = self.ctx
        uc_reg, loc = _UC_REG[reg], REG_INDEX[reg]

        def act(addr: int, size: int) -> None:
            if not ctx.cpu.fsgsbase:
                ctx.fault(FaultKind.UD, f"WRGSBASE with CR4.FSGSBASE clear at {ctx.symbolize(addr)}")
                return
            ctx.skip(addr, size)
            ctx.flow(Op.USE, loc)
            cpu = model.wrgsbase(ctx.cpu, ctx.u.read(uc_reg))
            ctx.set_cpu(cpu)
            ctx.emit(GsChange, pc=addr, how="wrgsbase", gs_base=cpu.gs_base, kernel_gs_base=cpu.kernel_gs_base)
        return act

    def _lsl(self, dst: str, src: str):
        ctx = self.ctx
        uc_dst, uc_src = _UC_REG[dst], _UC_REG[PARENT[src]]
        src_loc = REG_INDEX[PARENT[src]]

        def act(addr: int, size: int) -> None:
            selector = ctx.u.read(uc_src) & 0xFFFF
            if selector != self.config.cpunode_selector:
                ctx.fault(FaultKind.GP, f"LSL of selector {selector:#x}: only the CPU-number segment is modelled")
                return
            ctx.skip(addr, size)
            ctx.flow(Op.USE, src_loc)
            ctx.flow(Op.USE, FLAG_GROUPS["arith"])
            ctx.u.write(uc_dst, self.config.cpunode_limit)
            ctx.u.write(_RFLAGS, ctx.u.read(_RFLAGS) | RFLAGS_ZF)
            ctx.flow(Op.CONST, REG_INDEX[dst])
            ctx.flow(Op.CONST, FLAG_GROUPS["arith"])
        return act

    def _fence(self, kind: str):
        ctx = self.ctx
        verw = kind == "verw" and self._tracks
        ac = {"clac": 0, "stac": model.RFLAGS_AC}.get(kind)
        other = FLAG_GROUPS["other"]

        def act(addr: int, size: int) -> None:
            ctx.skip(addr, size)
            if verw:
                ctx.set_cpu(ctx.cpu.but(spec=(ctx.cpu.spec | model.SPEC_VERW) & ~model.SPEC_VERW_UNDONE))
            if ac is not None:
                # CLAC/STAC (smap) clear/set RFLAGS.AC: the C's DEBUG_ENTRY checks on entry from user
                # mode that AC is clear.  The rest of AC's flag group is kept, so the run uses it.
                ctx.flow(Op.USE, other)
                ctx.u.write(_RFLAGS, (ctx.u.read(_RFLAGS) & ~model.RFLAGS_AC) | ac)
                ctx.flow(Op.CONST, other)
            ctx.emit(Fence, pc=addr, kind=kind)
        return act

    def _unsupported(self, what: str):
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            ctx.fault(FaultKind.UD, f"{what} at {ctx.symbolize(addr)} is not modelled")
        return act

    # ---- returns ------------------------------------------------------------------------------
    def _iretq(self):
        ctx = self.ctx

        def act(addr: int, size: int) -> None:
            u = ctx.u
            rsp = u.read(_RSP)
            if not (ctx.mapped(rsp) and ctx.mapped(rsp + 39)):
                ctx.fault(FaultKind.UNMAPPED, f"IRET frame at unmapped {rsp:#x}", rsp)
                return
            run = ctx.run
            raw = ctx.read_quietly(rsp, 40)
            frame = Frame(None, *(int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(5)))
            try:
                cpu = model.iret(ctx.cpu, frame)
            except model.IretFault as exc:
                self._iret_faults(addr, rsp, frame, exc)
                return
            if run.flow is not None:
                run.flow.append((Op.SKIP,))
                run.flow.append((Op.IRET, ctx.layout.phys(rsp)))
            to_user = frame.cs & 3 == 3
            ctx.emit(Iret, pc=addr, cpu=cpu, frame=frame, to_user=to_user)
            u.write(_RIP, frame.rip)
            u.write(_RSP, frame.rsp)
            u.write(_RFLAGS, frame.rflags | model.RFLAGS_FIXED)
            if frame.rflags & model.RFLAGS_TF:
                run.tf_watch = True
            ctx.set_cpu(cpu)
            self.stops.returned(addr, frame.rip, frame.rsp, to_user, "IRET")
        return act

    def _iret_faults(self, addr: int, rsp: int, frame: Frame, exc: model.IretFault) -> None:
        """The IRET at ``addr`` faults: NMIs are unblocked, and the fault is delivered at the
        IRET itself, in the mode it ran in (the bad-IRET case of error_entry); a latched NMI
        then arrives before the handler's first instruction."""
        ctx = self.ctx
        run = ctx.run
        if exc.vector not in self.config.idt or not self.config.iret_faults:
            ctx.fault(FaultKind.GP, f"{exc} at {ctx.symbolize(addr)}")
            return
        if run.flow is not None:
            run.flow.append((Op.READ, rsp, 40))
            run.flow.append((Op.SKIP,))
        ctx.emit(IretFaulted, pc=addr, frame=frame, vector=exc.vector, error_code=exc.error_code, reason=str(exc))
        ctx.set_cpu(exc.cpu)
        ctx.u.write(_RIP, addr)
        if not self.delivery.deliver(exc.vector, exc.error_code) or run.outcome is not None:
            return
        self.delivery.latched_nmi()

    def _sysret(self, compat: bool):
        """SYSRETQ (to 64-bit mode: RIP = RCX, which must be canonical) or SYSRETL (to compat mode:
        RIP = ECX); RFLAGS from R11 either way."""
        ctx = self.ctx
        how = "SYSRETL to compat mode" if compat else "SYSRET to user mode"

        def act(addr: int, size: int) -> None:
            u = ctx.u
            ctx.flow(Op.USE, REG_INDEX["rcx"])
            ctx.flow(Op.USE, REG_INDEX["r11"])
            rip = u.read(_RCX) & (0xFFFFFFFF if compat else MASK64)
            r11 = u.read(_UC_REG["r11"])
            if compat:
                cpu = model.sysretl(ctx.cpu)
            else:
                try:
                    cpu = model.sysret(ctx.cpu, rip)
                except model.FrameError as exc:
                    ctx.fault(FaultKind.GP, f"{exc}: the #GP is delivered on the user's RSP "
                                            f"({u.read(_RSP):#x}) with GSBASE {ctx.cpu.gs_base:#x}")
                    return
            u.write(_RIP, rip)
            u.write(_RFLAGS, (r11 & 0x3C7FD7) | model.RFLAGS_FIXED)
            ctx.set_cpu(cpu)
            ctx.emit(Sysret, pc=addr, rip=rip)
            ctx.end(Outcome.RETURNED, how)
        return act

    def _eret(self, to_user: bool):
        ctx = self.ctx
        name = "ERETU" if to_user else "ERETS"

        def act(addr: int, size: int) -> None:
            u, run = ctx.u, ctx.run
            if self.config.fred is None:
                ctx.fault(FaultKind.UD, f"{name} at {ctx.symbolize(addr)} without FRED")
                return
            rsp = u.read(_RSP)
            if not (ctx.mapped(rsp) and ctx.mapped(rsp + 47)):
                ctx.fault(FaultKind.UNMAPPED, f"{name} frame at unmapped {rsp:#x}", rsp)
                return
            raw = ctx.read_quietly(rsp, 48)
            words = [int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(6)]
            frame = Frame(None, words[1], words[2] & 0xFFFF, words[3], words[4], words[5] & 0xFFFF)
            try:
                cpu = fred.eret(ctx.cpu, words, to_user)
            except fred.EretFault as exc:
                if not to_user or not self.config.iret_faults:
                    ctx.fault(FaultKind.GP, f"{exc} at {ctx.symbolize(addr)}")
                    return
                # A refused ERETU raises #GP(0) in ring 0, at the ERETU (the kernel's extable entry
                # EX_TYPE_ERETU turns it into a #GP of the user mode it was returning to).
                ctx.emit(IretFaulted, pc=addr, frame=frame, vector=Vector.GP, error_code=0, reason=str(exc))
                self.delivery.deliver(Vector.GP, 0)
                return
            if run.flow is not None:
                run.flow.append((Op.SKIP,))
                run.flow.append((Op.IRET, ctx.layout.phys(rsp + 8)))
            ctx.emit(Iret, pc=addr, cpu=cpu, frame=frame, to_user=to_user, eret=name)
            rip = words[1] & 0xFFFF_FFFF if cpu.compat and to_user else words[1]
            u.write(_RIP, rip)
            u.write(_RSP, words[4])
            u.write(_RFLAGS, words[3] | model.RFLAGS_FIXED)
            ctx.set_cpu(cpu)
            self.stops.returned(addr, words[1], words[4], to_user, name)
        return act

    def _c_entry(self, name: str):
        ctx, stubs = self.ctx, self.stubs

        def act(addr: int, size: int) -> None:      # checks only: the instruction runs
            try:
                stubs.enter(ctx, name)
            except Unmapped as exc:
                ctx.fault(FaultKind.UNMAPPED, f"{name} was given an address it reads or writes through, "
                                              f"and {exc}", exc.addr)
        return act

    def _stub(self, name: str):
        ctx, stubs = self.ctx, self.stubs

        def act(addr: int, size: int) -> None:
            try:
                stubs(ctx, name)
            except Unmapped as exc:
                ctx.fault(FaultKind.UNMAPPED, f"{name} was given an address it reads or writes through, "
                                              f"and {exc}", exc.addr)
        return act


__all__ = ["Actions"]
