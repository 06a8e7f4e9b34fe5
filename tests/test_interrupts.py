"""Ctrl-C and SIGTERM end a check at once: one line, exit 130, no worker left, no output
file written or left half-written.  On the demo fixture (GNU as at test time), no kernel."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from entrycheck.demo import VARIANTS, assemble, find_assembler
from fuzzing import MARK, marked

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as (binutils) is not installed")


@needs_as
@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.6), (signal.SIGINT, 2.5), (signal.SIGTERM, 1.5)])
def test_an_interrupt_ends_a_check_within_two_seconds_and_leaves_nothing(sig, delay, tmp_path) -> None:
    obj = assemble(find_assembler(), VARIANTS[0], tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    proc = subprocess.Popen([sys.executable, "-m", "entrycheck.cli", "check", str(obj), "--depth", "2",
                             "--workers", "2", "--json", str(out / "r.json"), "--html", str(out / "r.html")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    time.sleep(delay + random.uniform(0, 0.3))
    assert proc.poll() is None, "the check ended before the signal"
    # Ctrl-C in a terminal reaches the whole process group; SIGTERM only the command.
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130, stderr
    assert took < 2.0
    assert stderr.decode().splitlines() == ["entrycheck: error: interrupted"]
    assert os.listdir(out) == []
    deadline = time.monotonic() + 2
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marked(mark) == []
