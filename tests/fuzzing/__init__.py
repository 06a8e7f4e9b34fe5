"""Fuzzing the command line: mutated ELF objects, argument vectors, patch texts, --finding files.

Every case is made by a generator from an integer seed alone (``random.Random`` seeded
with the kind and the seed), so a case is reproduced by its kind and seed.  A case of the
command line runs in this process (``entrycheck.cli.main`` with ``sys.argv`` patched and
standard output and error captured), in a scratch directory of its own; a patch text goes
through the patch layer (``parse_patch``/``apply_patches``) on a small source tree.

What every case must hold to (anything else is a *problem*):

* the exit code is 0, 1 or 2 (3 is an internal error, anything else a crash);
* no Python traceback on standard output or error;
* with exit code 2, standard error is exactly one line starting "entrycheck: error: ";
* it ends within the timeout (SIGALRM; a case that does not is a hang);
* it leaves no file behind: the outputs it named only when it succeeded (0 or 1), never a
  temporary file, and nothing in the temporary directory.

The patch layer either applies a patch or raises ``InputError`` with a one-line message;
it never modifies the source tree, and a rejected patch leaves the destination as it was.

Used by tests/test_fuzz.py (a small budget) and benchmarks/fuzz.py (a large one).

The parts: case.py (the cases and the rules), runner.py (running one case), files.py (the
file system around a case), workspace.py (the scratch tree and the objects mutated), elf.py
and mutations.py (mutating objects, patches and JSON), arguments.py (argument vectors, from
click's own definitions of the commands and options read in commandline.py, with values.py's
values), generators.py (the four kinds from a seed), fuzzer.py (driving a run).
"""

from .case import (ALLOWED_EXIT, DEFAULT_TIMEOUT, KINDS, MARK, Case, CaseResult, PatchCase, _shell_quote, marked,
                   problems, report, signature)
from .elf import ElfSeed, mutate_elf
from .fuzzer import Fuzzer
from .generators import Generators
from .runner import Runner
from .workspace import Workspace, have_assembler

__all__ = ["ALLOWED_EXIT", "Case", "CaseResult", "DEFAULT_TIMEOUT", "ElfSeed", "Fuzzer", "Generators", "KINDS",
           "MARK", "PatchCase", "Runner", "Workspace", "_shell_quote", "have_assembler", "marked", "mutate_elf",
           "problems", "report", "signature"]
