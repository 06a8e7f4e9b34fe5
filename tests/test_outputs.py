"""Output files: checked before any work, written together (all or none)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from entrycheck.errors import InputError
from entrycheck.report.outputs import Outputs


def test_outputs_are_written_together_and_replace_old_files(tmp_path) -> None:
    (tmp_path / "r.json").write_text("old")
    out = Outputs()
    out.want("--json", str(tmp_path / "r.json"), stdout_ok=True)
    out.want("--html", str(tmp_path / "r.html"))
    out.stage("--json", "{}\n")
    out.stage("--html", "<p>x</p>")
    assert out.commit() == {}
    assert (tmp_path / "r.json").read_text() == "{}\n" and (tmp_path / "r.html").read_text() == "<p>x</p>"
    assert sorted(os.listdir(tmp_path)) == ["r.html", "r.json"]


def test_standard_output_is_handed_back_not_written(tmp_path) -> None:
    out = Outputs()
    out.want("--json", "-", stdout_ok=True)
    out.stage("--json", "{}\n")
    assert out.commit() == {"--json": "{}\n"}


@pytest.mark.parametrize("dest, message", [
    ("", "needs a file path"),
    ("-", "needs a file path"),                      # --html cannot go to standard output
    ("/", "is a directory"),
    ("/nonexistent-dir/r.html", "no such directory"),
    ("/dev/null", "not a regular file"),
    ("/proc/x.html", "cannot write"),
    ("x" * 5000, "longer than 255"),
])
def test_bad_paths_are_one_line_input_errors(dest, message) -> None:
    with pytest.raises(InputError, match=message) as err:
        Outputs().want("--html", dest)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_one_file_for_two_outputs_is_refused(tmp_path) -> None:
    out = Outputs()
    out.want("--json", str(tmp_path / "r"), stdout_ok=True)
    with pytest.raises(InputError, match="same file"):
        out.want("--html", str(tmp_path / "." / "r"))


def test_a_failing_write_leaves_no_output_at_all(tmp_path, monkeypatch) -> None:
    """The second rename fails: the first file, already in place, is removed again, and no
    temporary file is left."""
    out = Outputs()
    out.want("--json", str(tmp_path / "r.json"), stdout_ok=True)
    out.want("--html", str(tmp_path / "r.html"))
    out.stage("--json", "{}\n")
    out.stage("--html", "<p>x</p>")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(InputError, match="No space left"):
        out.commit()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as (binutils) is not installed")
def test_the_same_check_and_diff_give_the_same_html_bytes(tmp_path) -> None:
    from entrycheck.demo import VARIANTS, assemble, find_assembler

    a = assemble(find_assembler(), VARIANTS[0], tmp_path)
    b = assemble(find_assembler(), VARIANTS[1], tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    for command in (["check", str(a)], ["diff", str(a), str(b)]):
        pages = []
        for n in range(2):
            dest = tmp_path / f"{command[0]}.html"          # the page shows its command line
            proc = subprocess.run([sys.executable, "-m", "entrycheck.cli", *command, "--depth", "1", "--features",
                                   "pti", "--html", str(dest)], capture_output=True, text=True, env=env, check=False)
            assert proc.returncode in (0, 1), proc.stderr
            pages.append(dest.read_bytes())
            time.sleep(1.1 if n == 0 else 0)       # a clock in the page would differ now
        assert pages[0] == pages[1]
