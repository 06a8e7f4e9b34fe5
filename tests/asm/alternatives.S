/*
 * Hand-written alternatives in the 12-byte .altinstructions layout of 6.1:
 * s32 instr, s32 repl, u16 cpuid (bit 15 = ALT_NOT), u8 instrlen, u8 replacementlen.
 * Feature numbers are the kernel's (word * 32 + bit).
 */
	.equ	FEATURE_PCID, 4*32+17
	.equ	FEATURE_PTI, 7*32+11
	.equ	FEATURE_XENPV, 8*32+16
	.equ	ALT_NOT, 0x8000

	.macro	altentry site, site_end, repl, repl_end, feature
	.pushsection .altinstructions, "a"
	.long	\site - .
	.long	\repl - .
	.word	\feature
	.byte	\site_end - \site
	.byte	\repl_end - \repl
	.popsection
	.endm

	.section .entry.text, "ax"
	.globl	alt_demo
	.type	alt_demo, @function
alt_demo:
	/* site A: a short jmp padded with one-byte NOPs, as gas pads an ALTERNATIVE */
site_a:
	jmp	after_a
	.skip	18, 0x90
site_a_end:
	/* site C: replaced unless xenpv (ALT_NOT) */
site_c:
	ud2
	.skip	3, 0x90
site_c_end:
	/* site D: skipped unless pti, which NOPs the jmp out */
site_d:
	jmp	after_d
site_d_end:
	mov	%rdi, %cr3
after_d:
	.globl	target_in_entry
target_in_entry:
	nop
after_a:
	ret
	.size	alt_demo, . - alt_demo

	.section .altinstr_replacement, "ax"
repl_a:
	call	ext_function
	jmp	target_in_entry
	movq	ext_data(%rip), %rax
repl_a_end:
repl_b:
	movl	$1, %eax
	jmp	1f
1:
repl_b_end:
repl_c:
	lfence
repl_c_end:
repl_d:
repl_d_end:

	altentry site_a, site_a_end, repl_a, repl_a_end, FEATURE_PTI
	altentry site_a, site_a_end, repl_b, repl_b_end, FEATURE_PCID
	altentry site_c, site_c_end, repl_c, repl_c_end, FEATURE_XENPV | ALT_NOT
	altentry site_d, site_d_end, repl_d, repl_d_end, FEATURE_PTI
