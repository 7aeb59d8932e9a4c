"""Soak: many spawn+kill cycles of py-hello through a real `pool serve`, at concurrency 1 and 8.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_soak_bench.py --benchmark-only \
        --benchmark-json=bench/results/soak.json && .venv/bin/python bench/report.py bench/results/soak.json

Each worker thread has its own client and loops spawn -> kill (grace 0) until the cycles are done. What
it reports (extra_info): cycles, errors (by code), spawns/s, spawn round trip p50/p99 and the paths
that served them, and the service's open fds, RSS, child processes and run-dir entries before the
first cycle and after the last (once the pool has settled back to min_warm). The goal is zero
errors and zero growth; the benchmark fails on an error, it never asserts a time.
SOAK_CYCLES overrides the count (default 10,000; BENCH_QUICK=1: 20).
"""
from __future__ import annotations

import os
import statistics

import psutil
import pytest

from conftest import QUICK
from cycles import spawn_kill_cycles
from pool.cli.demo import LocalService

NAME = "py-hello"
MIN_WARM = 2
CYCLES = 20 if QUICK else int(os.environ.get("SOAK_CYCLES", "10000"))
# The suite's per-test timeout (pyproject, 300 s) is for tests; a soak runs as long as its cycles take
# (a full restore each, ~20/s on 2 cores), so its own limit grows with them: generous, but not forever.
TIMEOUT_S = 300 + CYCLES


@pytest.fixture(scope="module")
def service(template, bench_store, bench_dir):
    template(NAME)
    workdir = bench_dir / "soak"
    workdir.mkdir(exist_ok=True)
    config = (f"[service]\ncapacity = 64\n[templates.{NAME}]\nmin_warm = {MIN_WARM}\n"
              f"max_warm = {MIN_WARM}\nmax_live = 32\n")  # fixed: growth is leaks, not demand
    with LocalService(bench_store.root, workdir, config) as svc:
        yield svc


def footprint(svc: LocalService) -> dict[str, int]:
    """What a leak would grow: the service's fds, RSS, child processes, run-dir entries."""
    proc = psutil.Process(svc.pid)
    instances = svc.workdir / "run" / "instances"
    return {"fds": proc.num_fds(), "rss_mb": round(proc.memory_info().rss / 2**20),
            "children": len(proc.children(recursive=True)),
            "run_dir_entries": len(os.listdir(instances)) if instances.is_dir() else 0}


def soak(svc: LocalService, cycles: int, concurrency: int) -> dict:
    run = spawn_kill_cycles(svc, NAME, cycles, concurrency, prefix="soak")
    lat = sorted(run.latencies)
    return {"cycles": cycles, "concurrency": concurrency, "errors": run.errors, "paths": run.paths,
            "seconds": round(run.seconds, 2), "spawns_per_s": round(len(lat) / run.seconds, 2),
            "p50_ms": round(statistics.median(lat) * 1000, 3) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3) if lat else None}


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("concurrency", [1, 8])
def test_soak_spawn_kill(benchmark, service, concurrency):
    service.wait_warm(NAME, MIN_WARM)
    before = footprint(service)
    result = benchmark.pedantic(soak, args=(service, CYCLES, concurrency), rounds=1, iterations=1)
    service.wait_warm(NAME, MIN_WARM, timeout=120)
    after = footprint(service)
    benchmark.extra_info.update(result)
    benchmark.extra_info["before"] = before
    benchmark.extra_info["after"] = after
    benchmark.extra_info["growth"] = {k: after[k] - before[k] for k in before}
    assert not result["errors"], result["errors"]
    with service.client() as c:
        assert c.list(NAME) == []  # every copy the soak spawned was killed and is gone
