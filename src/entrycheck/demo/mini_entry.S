/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * mini_entry.S - a small x86-64 entry fixture in the style of the Linux kernel.
 *
 * It follows the kernel's conventions closely enough for entrycheck to run it
 * exactly as it runs arch/x86/entry/entry_64.o: the code lives in .entry.text,
 * per-cpu data is reached through %gs with undefined symbols, C functions are
 * undefined symbols reached with `call`, and the code that depends on PTI and
 * PCID is patched in by .altinstructions entries (12-byte layout).
 *
 * What is here:
 *   entry_SYSCALL_64        SYSCALL from user mode; SYSRET (or IRET) back
 *   asm_exc_nmi             NMI, from user mode or from kernel mode
 *   asm_exc_machine_check   #MC, from user mode or from kernel mode
 *   asm_exc_debug           #DB, from user mode or from kernel mode
 *   paranoid_entry/_exit    IST exceptions from kernel mode: the interrupted CR3
 *                           and GSBASE are unknown, so they are saved and restored
 *   return_to_user_iret     the IRET return to user mode
 *
 * Left out: nested-NMI protection (an NMI arriving in the NMI handler is latched
 * by the CPU until the handler's IRET, unless a #MC or #DB interrupts the handler
 * and its IRET releases the latched NMI early, onto the same IST stack, over the
 * outer frame: a chain of two injections); the FSGSBASE paths (paranoid_entry
 * tells the GSBASEs apart with RDMSR, which works either way); the IBRS
 * (kernel_ibrs) mitigation; interrupts and page faults.
 *
 * How the paranoid return restores CR3 is chosen at assembly time with
 * `--defsym VARIANT=n`:
 *   0  restore always            always write the saved CR3 (NOFLUSH when no
 *                                flush is pending), as the kernel did before
 *                                "x86/entry: Avoid redundant CR3 write on
 *                                paranoid returns"
 *   1  restore only a user CR3   write it only when a user CR3 was interrupted,
 *                                as after that change
 *   2  restore never             broken: never write CR3 on a paranoid return
 *   3  forget SWAPGS             broken: restores CR3 like 1, but does not swap
 *                                the user GSBASE back in
 */

	.ifndef VARIANT
	.set	VARIANT, 1
	.endif
	.if	VARIANT < 0 || VARIANT > 3
	.error	"VARIANT must be 0, 1, 2 or 3"
	.endif

/* CPU feature numbers (32 * word + bit), as the alternatives name them. */
	.set	FEATURE_PCID, 4 * 32 + 17
	.set	FEATURE_PTI, 7 * 32 + 11

/* CR3 with PTI: an 8 KiB PGD whose upper half maps user space. */
	.set	CR3_NOFLUSH_BIT, 63		/* keep the new PCID's TLB entries */
	.set	CR3_USER_PGD_BIT, 12		/* the user half of the PGD */
	.set	CR3_USER_PCID_BIT, 11		/* user PCID = kernel PCID | 0x800 */
	.set	CR3_USER_BITS, (1 << CR3_USER_PGD_BIT) | (1 << CR3_USER_PCID_BIT)
	.set	CR3_KERN_PCID_MASK, 0x7ff

/* Offsets into per-cpu variables. */
	.set	TSS_SP0, 4			/* cpu_tss_rw: top of the entry stack */
	.set	TSS_SP2, 20			/* cpu_tss_rw: scratch slot */
	.set	TLB_FLUSH_MASK, 22		/* cpu_tlbstate: user_pcid_flush_mask */
	.set	HOT_STACK_TOP, 24		/* pcpu_hot: top of the task stack */

	.set	MSR_GS_BASE, 0xc0000101
	.set	USER_CS, 0x33
	.set	USER_DS, 0x2b
	.set	ENOSYS, 38

/* struct pt_regs, lowest address first. */
	.set	PT_RDI, 14 * 8
	.set	PT_RSP, 19 * 8

/* The hardware exception frame (no error code), lowest address first. */
	.set	HW_CS, 1 * 8

/*
 * ALT_PATCH orig, repl, feature: `orig` runs unless the CPU has `feature`, in
 * which case `repl` is copied over it when the image is patched.  The site is
 * padded with NOPs to the longer of the two.
 */
.macro ALT_PATCH orig, repl, feature
.Lalt_site_\@:
	\orig
.Lalt_orig_end_\@:
	/* (a > b) is -1 when true in GNU as: pad by max(0, repl len - orig len) */
	.skip -((.Lalt_new_end_\@ - .Lalt_new_\@) > (.Lalt_orig_end_\@ - .Lalt_site_\@)) * ((.Lalt_new_end_\@ - .Lalt_new_\@) - (.Lalt_orig_end_\@ - .Lalt_site_\@)), 0x90
.Lalt_site_end_\@:
	.pushsection .altinstructions, "a"
	.long	.Lalt_site_\@ - .			/* the site */
	.long	.Lalt_new_\@ - .			/* its replacement */
	.word	\feature
	.byte	.Lalt_site_end_\@ - .Lalt_site_\@	/* site length */
	.byte	.Lalt_new_end_\@ - .Lalt_new_\@		/* replacement length */
	.popsection
	.pushsection .altinstr_replacement, "ax"
.Lalt_new_\@:
	\repl
.Lalt_new_end_\@:
	.popsection
.endm

/* Skip to `label` unless the CPU has `feature` (the jump is patched out). */
.macro SKIP_UNLESS feature:req, label:req
	ALT_PATCH "jmp \label", "", \feature
.endm

/* Save the registers of struct pt_regs, rsi downwards (rdi is already saved). */
.macro SAVE_REGS_BELOW_RDI rdx=%rdx, rax=%rax
	pushq	%rsi
	pushq	\rdx
	pushq	%rcx
	pushq	\rax
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%rbx
	pushq	%rbp
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
.endm

.macro SAVE_REGS rdx=%rdx, rax=%rax
	pushq	%rdi
	SAVE_REGS_BELOW_RDI rdx=\rdx, rax=\rax
.endm

/* Reload the registers saved by SAVE_REGS; with keep_rdi=1 rsp ends at the rdi slot. */
.macro LOAD_REGS keep_rdi=0
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbp
	popq	%rbx
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rax
	popq	%rcx
	popq	%rdx
	popq	%rsi
	.if \keep_rdi == 0
	popq	%rdi
	.endif
.endm

/*
 * CR3 switching (only with PTI).  The kernel's own PCID is never flushed on
 * these switches (NOFLUSH), because kernel mappings are flushed explicitly.
 */
.macro KERNEL_CR3_FROM reg:req
	ALT_PATCH "", "bts $CR3_NOFLUSH_BIT, \reg", FEATURE_PCID
	andq	$~CR3_USER_BITS, \reg
.endm

.macro SWITCH_TO_KERNEL_CR3 scratch:req
	SKIP_UNLESS FEATURE_PTI, .Lkcr3_done_\@
	movq	%cr3, \scratch
	KERNEL_CR3_FROM \scratch
	movq	\scratch, %cr3
.Lkcr3_done_\@:
.endm

/*
 * Switch to the user CR3.  With PCID, the user PCID gets a flushing write when
 * the kernel marked it in cpu_tlbstate.user_pcid_flush_mask (bit = kernel PCID),
 * and a NOFLUSH write otherwise.
 */
.macro SWITCH_TO_USER_CR3 scratch:req, pcid:req
	SKIP_UNLESS FEATURE_PTI, .Lucr3_done_\@
	movq	%cr3, \scratch
	SKIP_UNLESS FEATURE_PCID, .Lucr3_pgd_\@
	movq	\scratch, \pcid
	andq	$CR3_KERN_PCID_MASK, \pcid
	btr	\pcid, %gs:cpu_tlbstate + TLB_FLUSH_MASK
	jc	.Lucr3_flush_\@
	bts	$CR3_NOFLUSH_BIT, \scratch
.Lucr3_flush_\@:
	orq	$(1 << CR3_USER_PCID_BIT), \scratch
.Lucr3_pgd_\@:
	orq	$(1 << CR3_USER_PGD_BIT), \scratch
	movq	\scratch, %cr3
.Lucr3_done_\@:
.endm

/* Paranoid entry: remember the interrupted CR3 in `save`, then use the kernel's. */
.macro SAVE_CR3_AND_SWITCH scratch:req, save:req
	SKIP_UNLESS FEATURE_PTI, .Lscr3_done_\@
	movq	%cr3, \scratch
	movq	\scratch, \save
	bt	$CR3_USER_PGD_BIT, \scratch
	jnc	.Lscr3_done_\@			/* the kernel CR3 is already in use */
	KERNEL_CR3_FROM \scratch
	movq	\scratch, %cr3
.Lscr3_done_\@:
.endm

/*
 * Paranoid return: give the interrupted code its CR3 back.  The CR3 written is
 * the saved one; a saved user CR3 needs a flushing write when its PCID was
 * marked for flushing meanwhile.  Runs with the kernel CR3 and GSBASE.
 */
.macro RESTORE_SAVED_CR3 scratch:req, save:req
	SKIP_UNLESS FEATURE_PTI, .Lrcr3_done_\@
.if VARIANT == 0
	/* Always write: a saved kernel CR3 is written back with NOFLUSH. */
	SKIP_UNLESS FEATURE_PCID, .Lrcr3_write_\@
	bt	$CR3_USER_PGD_BIT, \save
	jnc	.Lrcr3_noflush_\@
	movq	\save, \scratch
	andq	$CR3_KERN_PCID_MASK, \scratch
	btr	\scratch, %gs:cpu_tlbstate + TLB_FLUSH_MASK
	jc	.Lrcr3_write_\@
.Lrcr3_noflush_\@:
	bts	$CR3_NOFLUSH_BIT, \save
.Lrcr3_write_\@:
	movq	\save, %cr3
.elseif VARIANT == 1 || VARIANT == 3
	/* Nothing to do when the kernel CR3 was interrupted: it is still in use. */
	bt	$CR3_USER_PGD_BIT, \save
	jnc	.Lrcr3_done_\@
	SKIP_UNLESS FEATURE_PCID, .Lrcr3_write_\@
	movq	\save, \scratch
	andq	$CR3_KERN_PCID_MASK, \scratch
	btr	\scratch, %gs:cpu_tlbstate + TLB_FLUSH_MASK
	jc	.Lrcr3_write_\@
	bts	$CR3_NOFLUSH_BIT, \save
.Lrcr3_write_\@:
	movq	\save, %cr3
.else
	/* VARIANT 2: "the paranoid return goes back to kernel code, so the kernel
	 * CR3 is right" - wrong in the windows around the CR3 switches. */
.endif
.Lrcr3_done_\@:
.endm

/*
 * An IST exception that interrupted user mode (CS has RPL 3): take the kernel
 * GSBASE and CR3, build pt_regs on the IST stack and let sync_regs() move them
 * to the task stack.  Until RSP has left the IST stack, no instruction touches
 * memory a hardware breakpoint could watch: a #DB there would reuse this stack.
 */
.macro ENTER_FROM_USER_ON_TASK_STACK
	swapgs
	pushq	$-1				/* orig_ax: not a system call */
	SAVE_REGS
	SWITCH_TO_KERNEL_CR3 scratch=%rax
	movq	%rsp, %rdi
	call	sync_regs			/* returns the pt_regs on the task stack */
	movq	%rax, %rsp
.endm

/*
 * IST_ENTRY name, handler, user_handler: an IST entry point.  From user mode it
 * moves to the task stack and calls `user_handler`; from kernel mode it stays on
 * the IST stack and calls `handler` between paranoid_entry and paranoid_exit.
 */
.macro IST_ENTRY name:req, handler:req, user_handler:req
	.globl	\name
	.type	\name, @function
\name:
	cld
	testb	$3, HW_CS(%rsp)
	jz	.List_kernel_\@
	ENTER_FROM_USER_ON_TASK_STACK
	movq	%rsp, %rdi			/* pt_regs */
	movq	$-1, %rsi
	call	\user_handler
	jmp	return_to_user_iret
.List_kernel_\@:
	pushq	$-1				/* orig_ax */
	call	paranoid_entry
	movq	%rsp, %rdi			/* pt_regs */
	movq	$-1, %rsi
	call	\handler
	jmp	paranoid_exit
	.size	\name, . - \name
.endm


	.section .entry.text, "ax"

/*
 * SYSCALL: RCX = user RIP, R11 = user RFLAGS, RSP and GSBASE still the user's.
 */
	.globl	entry_SYSCALL_64
	.type	entry_SYSCALL_64, @function
entry_SYSCALL_64:
	swapgs
	movq	%rsp, %gs:cpu_tss_rw + TSS_SP2	/* the user RSP, until pt_regs holds it */
	SWITCH_TO_KERNEL_CR3 scratch=%rsp
	movq	%gs:pcpu_hot + HOT_STACK_TOP, %rsp
	pushq	$USER_DS			/* ss */
	pushq	%gs:cpu_tss_rw + TSS_SP2	/* rsp */
	pushq	%r11				/* rflags */
	pushq	$USER_CS			/* cs */
	pushq	%rcx				/* rip */
	pushq	%rax				/* orig_ax: the system call number */
	SAVE_REGS rax=$-ENOSYS
	movq	%rsp, %rdi			/* pt_regs */
	movslq	%eax, %rsi			/* the system call number */
	call	do_syscall_64			/* true: SYSRET may return */
	testb	%al, %al
	jz	return_to_user_iret

	.globl	syscall_return_via_sysret
syscall_return_via_sysret:
	LOAD_REGS keep_rdi=1
	/* Leave the task stack for the entry stack, the only one the user CR3 maps. */
	movq	%rsp, %rdi
	movq	%gs:cpu_tss_rw + TSS_SP0, %rsp
	pushq	PT_RSP - PT_RDI(%rdi)		/* the user RSP */
	pushq	(%rdi)				/* the user RDI */
	pushq	%rax
	SWITCH_TO_USER_CR3 scratch=%rdi, pcid=%rax
	popq	%rax
	popq	%rdi
	popq	%rsp
	swapgs
	sysretq
	.size	entry_SYSCALL_64, . - entry_SYSCALL_64

/*
 * Return to user mode with IRET, from pt_regs on the task stack.
 */
	.globl	return_to_user_iret
	.type	return_to_user_iret, @function
return_to_user_iret:
	LOAD_REGS keep_rdi=1
	movq	%rsp, %rdi			/* rdi slot; orig_ax and the frame above */
	movq	%gs:cpu_tss_rw + TSS_SP0, %rsp
	pushq	6 * 8(%rdi)			/* ss */
	pushq	5 * 8(%rdi)			/* rsp */
	pushq	4 * 8(%rdi)			/* rflags */
	pushq	3 * 8(%rdi)			/* cs */
	pushq	2 * 8(%rdi)			/* rip */
	pushq	(%rdi)				/* the user RDI */
	pushq	%rax
	SWITCH_TO_USER_CR3 scratch=%rdi, pcid=%rax
	popq	%rax
	popq	%rdi
	swapgs
	iretq
	.size	return_to_user_iret, . - return_to_user_iret

/*
 * The IDT entries.  NMIs are blocked from delivery until the IRET that ends
 * the handler, so a second NMI waits (latched) instead of nesting.
 */
	IST_ENTRY asm_exc_nmi, exc_nmi, exc_nmi
	IST_ENTRY asm_exc_machine_check, exc_machine_check, noist_exc_machine_check
	IST_ENTRY asm_exc_debug, exc_debug, noist_exc_debug

/*
 * paranoid_entry: an IST exception interrupted kernel mode, where CR3 and
 * GSBASE may still (or already) be the user's: the entry and exit paths have
 * windows between their CR3 switch, their SWAPGS and SYSRET/IRET.
 *
 * On entry: return address, orig_ax, the hardware frame.  On return pt_regs
 * is complete, the kernel CR3 and GSBASE are in use, and
 *   r14 = the interrupted CR3 (with PTI),
 *   ebx = 1 when the kernel GSBASE was in use, 0 when SWAPGS is needed on exit.
 */
	.type	paranoid_entry, @function
paranoid_entry:
	xchgq	%rdi, (%rsp)			/* rdi into pt_regs, the return address out */
	SAVE_REGS_BELOW_RDI
	pushq	%rdi				/* the return address */

	SAVE_CR3_AND_SWITCH scratch=%rax, save=%r14

	/* A kernel GSBASE is a negative address, a user one is not. */
	movl	$1, %ebx
	movl	$MSR_GS_BASE, %ecx
	rdmsr
	testl	%edx, %edx
	js	.Lparanoid_kernel_gs
	xorl	%ebx, %ebx
	swapgs
.Lparanoid_kernel_gs:
	ret
	.size	paranoid_entry, . - paranoid_entry

/*
 * paranoid_exit: undo paranoid_entry (CR3 first: it needs the kernel GSBASE)
 * and return to the interrupted kernel code.
 */
	.type	paranoid_exit, @function
paranoid_exit:
	RESTORE_SAVED_CR3 scratch=%rax, save=%r14
	testl	%ebx, %ebx
	jnz	.Lparanoid_exit_regs
.if VARIANT != 3
	swapgs					/* the interrupted code had the user GSBASE */
.endif
.Lparanoid_exit_regs:
	LOAD_REGS
	addq	$8, %rsp			/* orig_ax */
	iretq
	.size	paranoid_exit, . - paranoid_exit
