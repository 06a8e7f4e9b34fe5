"""The explorer finds exactly what the previous engine found, at depth 2 on both kernels.

The previous engine (the commit before the explorer was rewritten around shared handler
runs, path tables and the closed machine boundary) is installed from this repository's
history into a scratch venv by benchmarks/bench.py and runs the same workload
(benchmarks/workload.py) as this tree.  Every finding before deduplication is compared:
invariant, scenario, feature set, injection chain and site — as the previous engine could
report them (``--as-before``: symptoms not folded under the ist-reentered root cause it
did not know; that root cause is tested on its own in test_root_causes.py).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_ENGINE = "9261deb48206fdd85234655881f9dc2ecc1c343d"

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench():
    have = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_ENGINE}^{{commit}}"],
                          capture_output=True, check=False)
    if have.returncode:
        pytest.skip("the previous engine's commit is not in this checkout's history (shallow clone?)")
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("features", ["pti,pcid", "pti,pcid,fsgsbase,kernel_ibrs"])
@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_depth_2_findings_are_the_previous_engines(bench, built_kernels, series: str, features: str) -> None:
    old, new = bench.both(PREVIOUS_ENGINE, [f"debian:{series}", features, "2", "all", "2", "--as-before"])
    assert old["findings"] > 0, "the comparison needs findings"
    assert new["raw_findings_keys"] == old["raw_findings_keys"]
    assert new["findings_keys"] == old["findings_keys"]
    # The same paths are explored; only paths that never return may be cut shorter now.
    assert new["runs"] == old["runs"]
