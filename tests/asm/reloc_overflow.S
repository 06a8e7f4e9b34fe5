/*
 * An R_X86_64_32S relocation against an absolute symbol whose value comes from
 * the command line: `as --defsym FAR_VALUE=...`.  It fits only when FAR_VALUE is
 * a sign-extended 32-bit number.
 */
	.section .entry.text, "ax"
	.globl	tiny_entry
tiny_entry:
	movq	$far_away, %rax
	ret

	.globl	far_away
	.set	far_away, FAR_VALUE
