"""The benchmarks in bench/ must keep running: each suite is run on reduced counts (BENCH_QUICK=1)
and its JSON read back. No timing is asserted here; benchmarks show speed, tests show it works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(suite: str, out: Path, timeout: float = 600) -> dict[str, dict]:
    """Run bench/SUITE with BENCH_QUICK=1; the benchmarks it reported, by name."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"bench/{suite}",
         "--benchmark-only", f"--benchmark-json={out}"],
        cwd=ROOT, env={**os.environ, "BENCH_QUICK": "1"}, capture_output=True, text=True,
        timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    return {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}


def report(out: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(out)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def test_restore_bench_runs(tmp_path):
    names = set(run_quick("test_restore_bench.py", tmp_path / "out.json"))
    assert "test_restore_to_ready_py_hello" in names
    assert {f"test_restore_throughput[{c}]" for c in (1, 2, 4, 8)} <= names


def test_spawn_bench_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    assert set(run_quick("test_spawn_bench.py", out)) == {
        "test_spawn_warm", "test_spawn_restore_on_miss", "test_cold_start"}
    report(out)
    assert "| test_spawn_warm | warm | 2 |" in out.with_suffix(".md").read_text()


def test_transfer_bench_runs(tmp_path):
    data = {name: b["extra_info"] for name, b in run_quick("test_transfer_bench.py",
                                                          tmp_path / "bench.json").items()}
    assert set(data) == {"test_transfer_throughput[zstd]", "test_transfer_throughput[zlib]",
                         "test_transfer_throughput[none]", "test_migrate_eager",
                         "test_migrate_lazy"}
    assert data["test_transfer_throughput[zstd]"]["ratio"] > 1.5
    assert data["test_migrate_lazy"]["shipped_mb"] < data["test_migrate_eager"]["shipped_mb"] / 4


def test_remote_bench_runs(tmp_path):
    data = run_quick("test_remote_bench.py", tmp_path / "bench.json")
    assert set(data) == {"test_remote_spawn_cached", "test_remote_spawn_first_ship"}
    ship = data["test_remote_spawn_first_ship"]["extra_info"]
    assert ship["wire_mb"] < ship["raw_mb"]  # shipped compressed


def test_soak_bench_runs_and_reports(tmp_path):
    out = tmp_path / "soak.json"
    data = run_quick("test_soak_bench.py", out)
    assert set(data) == {"test_soak_spawn_kill[1]", "test_soak_spawn_kill[8]"}
    for b in data.values():
        x = b["extra_info"]
        assert x["errors"] == {} and sum(x["paths"].values()) == x["cycles"] == 20
        assert set(x["growth"]) == {"fds", "rss_mb", "children", "run_dir_entries"}
    report(out)
    assert "## Soak: spawn + kill cycles" in out.with_suffix(".md").read_text()
