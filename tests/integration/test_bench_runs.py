"""The benchmarks in bench/ must keep running: run them on reduced counts (no timing asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_restore_bench_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_restore_bench.py",
         "--benchmark-json", str(tmp_path / "out.json")],
        cwd=ROOT, env={**os.environ, "BENCH_QUICK": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    data = json.loads((tmp_path / "out.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert "test_restore_to_ready_py_hello" in names
    assert {f"test_restore_throughput[{c}]" for c in (1, 2, 4, 8)} <= names
