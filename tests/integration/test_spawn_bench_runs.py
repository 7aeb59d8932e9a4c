"""CI check that the benchmark suite still runs (BENCH_QUICK: 2 rounds each) and that the report
generator reads pytest-benchmark's JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_spawn_bench_runs_on_reduced_counts(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "bench/test_spawn_bench.py",
                        "--benchmark-only", f"--benchmark-json={out}"],
                       cwd=ROOT, env={**os.environ, "BENCH_QUICK": "1"},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = {b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert names == {"test_spawn_warm", "test_spawn_restore_on_miss", "test_cold_start"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(out)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    md = out.with_suffix(".md").read_text()
    assert "| test_spawn_warm | warm | 2 |" in md
