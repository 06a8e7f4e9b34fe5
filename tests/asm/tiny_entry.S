/*
 * The smallest object entrycheck accepts: an .entry.text with a function in it.
 * Valid for both `as --64` and `as --32`.
 */
	.text
	.globl	tiny_text
tiny_text:
	ret

	.section .entry.text, "ax"
	.globl	tiny_entry
	.type	tiny_entry, @function
tiny_entry:
	nop
	call	tiny_helper
	jmp	tiny_text
	.size	tiny_entry, . - tiny_entry
