/* A valid x86-64 object, but not the kernel's entry code: no .entry.text. */
	.text
	.globl	not_entry
not_entry:
	call	somewhere
	ret
