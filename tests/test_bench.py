"""The benchmark harness still builds, runs and reports (a smoke test, not a timed one)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, program


@pytest.mark.slow
def test_quick_benchmark_runs_and_writes_its_figures(tmp_path):
    """``python -m bench --quick`` builds the load generator, runs workloads, writes JSON."""
    program("gcc", "apt-get install gcc: it builds the load generator")
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "W1,W4", "--repeat", "1",
         "--dir", str(tmp_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["limits"]["loopback_mib_s"] > 0
    assert figures["W1"]["replay_mib_s"] > 0 and figures["W4"]["stored_seconds"] > 0
    assert "W1 replay" in result.stdout and "W4 server memory growth" in result.stdout
