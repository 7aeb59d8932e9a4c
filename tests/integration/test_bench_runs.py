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


def run_report(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(out), *flags],
                          capture_output=True, text=True, timeout=120, check=False)


def report(out: Path) -> None:
    """--allow-dirty: these runs happen on whatever tree is checked out, often mid-change."""
    res = run_report(out, "--allow-dirty")
    assert res.returncode == 0, res.stderr[-3000:]


def test_restore_bench_runs(tmp_path):
    names = set(run_quick("test_restore_bench.py", tmp_path / "out.json"))
    assert "test_restore_to_ready_py_hello" in names
    assert {f"test_restore_throughput[{c}]" for c in (1, 2, 4, 8)} <= names


def test_spawn_bench_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    data = run_quick("test_spawn_bench.py", out)
    assert set(data) == {"test_first_answer", "test_client_round_trip"}
    modes = data["test_first_answer"]["extra_info"]["modes"]
    assert set(modes) == {"cold", "criu-cli", "spawn-miss", "spawn-warm", "lazy"}
    assert all(len(m["answer_s"]) == 2 for m in modes.values())  # BENCH_QUICK: 2 cycles, each mode once
    assert len(modes["spawn-warm"]["spawn_call_s"]) == len(modes["spawn-warm"]["service_spawn_ms"]) == 2
    rtt = data["test_client_round_trip"]["extra_info"]
    assert len(rtt["spawn_call_s"]) == len(rtt["service_spawn_ms"]) == len(rtt["ping_s"]) == 20
    report(out)
    md = out.with_suffix(".md").read_text()
    assert "| py-hello | spawn, warm pool | 2 |" in md and "| py-hello | bare ping round trip | 20 |" in md


def test_report_refuses_a_dirty_tree(tmp_path):
    """Figures from a dirty tree (or with no commit recorded) are refused unless --allow-dirty, which
    stamps them; a clean one is reported with its commit. JSON made by hand: the tree this test runs
    on may be clean or not."""
    results = {"machine_info": {"git": {"commit": "c0ffee", "clean": False, "changes": [" M pool/x.py"]}},
               "benchmarks": []}
    out = tmp_path / "dirty.json"
    out.write_text(json.dumps(results))
    refused = run_report(out)
    assert refused.returncode == 3 and "dirty tree" in refused.stderr and "pool/x.py" in refused.stderr
    assert not out.with_suffix(".md").exists()
    assert run_report(out, "--allow-dirty").returncode == 0
    assert "**From a dirty tree** (commit `c0ffee`" in out.with_suffix(".md").read_text()

    del results["machine_info"]["git"]
    out.write_text(json.dumps(results))
    assert run_report(out).returncode == 3

    results["machine_info"]["git"] = {"commit": "c0ffee", "clean": True, "changes": []}
    out.write_text(json.dumps(results))
    assert run_report(out).returncode == 0
    assert "Commit `c0ffee`, clean tree." in out.with_suffix(".md").read_text()


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


def test_lazy_bench_runs(tmp_path):
    data = run_quick("test_lazy_bench.py", tmp_path / "bench.json", timeout=900)
    assert set(data) == {"test_lazy_vs_full_miss[jvm-app]", "test_lazy_vs_full_miss[node-app]"}
    for bench in data.values():
        modes = bench["extra_info"]["modes"]
        assert set(modes) == {"full", "lazy"} and all(modes[m]["answer_s"] for m in modes)
        assert bench["extra_info"]["working_set_pages"] > 0


def test_fork_bench_runs(tmp_path):
    data = run_quick("test_fork_bench.py", tmp_path / "fork.json")
    assert set(data) == {"test_fork_miss", "test_fork_memory", "test_embed_fork"}
    modes = data["test_fork_miss"]["extra_info"]["modes"]
    assert set(modes) == {"fork-miss", "criu-miss"}
    assert all(len(m["answer_s"]) == 2 for m in modes.values())  # BENCH_QUICK: 2 kept cycles
    for name in ("test_fork_memory", "test_embed_fork"):
        info = data[name]["extra_info"]
        assert len(info["pss_bytes"]) == info["copies"] and info["copies_in_20_gib"] > 0
    report(tmp_path / "fork.json")


def test_demand_bench_runs_and_reports(tmp_path):
    out = tmp_path / "demand.json"
    data = run_quick("test_demand_bench.py", out)
    assert set(data) == {"test_warm_round_trip", "test_burst[autoscale]", "test_burst[fixed]",
                         "test_burst[fork]"}
    assert len(data["test_warm_round_trip"]["extra_info"]["spawn_call_s"]) == 20
    for config in ("autoscale", "fixed", "fork"):
        x = data[f"test_burst[{config}]"]["extra_info"]
        assert x["errors"] == {} and x["hits"] + x["misses"] == x["spawns"] == 40
    assert data["test_burst[fixed]"]["extra_info"]["target_after"] == 2  # the floor, no waiters left
    assert data["test_burst[autoscale]"]["extra_info"]["target_before"] == 0
    report(out)
    md = out.with_suffix(".md").read_text()
    assert "## Warm pools that follow demand" in md and "| autoscale | py-hello | 40 | 8 |" in md
    assert "## Goals: misses in milliseconds" in md and "py-hello copies per second" in md


def test_crypt_bench_runs(tmp_path):
    data = run_quick("test_crypt_bench.py", tmp_path / "crypt.json", timeout=900)
    assert set(data) == {"test_encrypted_restore[py-hello]", "test_encrypted_restore[jvm-app]"}
    for bench in data.values():
        info = bench["extra_info"]
        assert set(info["modes"]) == {"plain", "sealed-cached", "sealed-decrypt"}
        assert all(len(m["answer_s"]) == 2 for m in info["modes"].values())
        assert info["ram_cache_bytes"] == info["image_bytes"] < info["sealed_bytes"]
        assert len(info["decrypt_s"]) == 2


def test_etcd_bench_runs(tmp_path):
    data = run_quick("test_etcd_bench.py", tmp_path / "bench.json")
    assert {b["extra_info"]["coordinators"] for b in data.values()} == {1, 2}
    assert all(b["extra_info"]["spawns_per_s"] > 0 for b in data.values())


def test_live_bench_runs_and_reports(tmp_path):
    out = tmp_path / "live.json"
    data = run_quick("test_live_bench.py", out, timeout=900)
    live = ("counter", "py-embed", "jvm-app")
    assert set(data) == {*(f"test_wake_to_first_answer[{t}]" for t in live),
                         *(f"test_live_checkpoint[{t}]" for t in live),
                         *(f"test_migrate[{t}-{m}]" for t in ("counter", "py-embed")
                           for m in ("eager", "lazy")), "test_rollback"}
    for t in live:
        modes = data[f"test_wake_to_first_answer[{t}]"]["extra_info"]["modes"]
        assert set(modes) == {"wake", "cold", "spawn-miss"}
        assert all(len(m["answer_s"]) == 2 for m in modes.values())  # BENCH_QUICK: 2 cycles
        ckpt = data[f"test_live_checkpoint[{t}]"]["extra_info"]
        assert len(ckpt["freeze_ms"]) == 2 and all(f > 0 for f in ckpt["freeze_ms"])
    for name, b in data.items():
        if name.startswith("test_migrate["):
            x = b["extra_info"]
            assert len(x["call_ms"]) == len(x["first_answer_after_ms"]) == 2
            assert all(f is None for f in x["freeze_ms"]) if x["lazy"] else \
                all(f > 0 for f in x["freeze_ms"])
    report(out)
    md = out.with_suffix(".md").read_text()
    assert "## Running instances: wake on request" in md
    assert "| jvm-app | wake on request (suspended instance) | 2 |" in md
    assert "| counter | lazy | 2 |" in md
