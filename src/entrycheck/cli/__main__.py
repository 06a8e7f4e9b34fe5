"""python -m entrycheck.cli"""

from entrycheck.cli import main

main()
