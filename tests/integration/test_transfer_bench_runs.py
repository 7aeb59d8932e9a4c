"""CI check that bench/test_transfer_bench.py still runs (BENCH_QUICK: 2 rounds, small ballast)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_transfer_bench_runs_on_reduced_counts(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "bench/test_transfer_bench.py", f"--benchmark-json={out}"],
                       cwd=ROOT, env={**os.environ, "BENCH_QUICK": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(data) == {"test_transfer_throughput[zstd]", "test_transfer_throughput[zlib]",
                         "test_transfer_throughput[none]", "test_migrate_eager",
                         "test_migrate_lazy"}
    assert data["test_transfer_throughput[zstd]"]["ratio"] > 1.5
    assert data["test_migrate_lazy"]["shipped_mb"] < data["test_migrate_eager"]["shipped_mb"] / 4
