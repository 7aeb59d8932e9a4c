"""CI check that bench/test_remote_bench.py still runs (BENCH_QUICK: 2 rounds each)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_remote_bench_runs_on_reduced_counts(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "bench/test_remote_bench.py", f"--benchmark-json={out}"],
                       cwd=ROOT, env={**os.environ, "BENCH_QUICK": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(data) == {"test_remote_spawn_cached", "test_remote_spawn_first_ship"}
    ship = data["test_remote_spawn_first_ship"]["extra_info"]
    assert ship["wire_mb"] < ship["raw_mb"]
    assert data["test_remote_spawn_cached"]["stats"]["median"] \
        < data["test_remote_spawn_first_ship"]["stats"]["median"]
