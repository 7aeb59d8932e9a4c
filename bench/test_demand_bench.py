"""Warm pools that follow demand (py-hello, a real `pool serve`), two pool configurations side by side in
one run, each on a service of its own that starts idle:

    autoscale   min_warm 0 (the default floor): the target follows the spawns' arrival rate
    fixed       min_warm 2, max_warm 2: what a pool was before (the issue's measurement)
    fork        templates/py-fork (the same app, `[restore] method = "fork"`) autoscaled: a miss
                and a refill are forks from its zygote, not CRIU restores

test_warm_round_trip: a warm spawn timed at the client (request written to reply parsed), from two
idle warm copies with nothing restoring; its p50 is the issue's "warm spawn, client round trip".
test_burst[CONFIG]: BURST spawns (400; BENCH_QUICK=1: 40) at concurrency 8 from an idle pool, each
worker looping spawn -> kill: p50/p99 of the spawn call, copies per second, hits and misses (from
the service's stats), the highest target seen while it ran (stats polled every 50 ms).

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_demand_bench.py --benchmark-only \
        --benchmark-json=bench/results/demand.json && .venv/bin/python bench/report.py bench/results/demand.json

No timed asserts: a wrong answer (an error, a count that does not add up) fails, times are reported.
"""
from __future__ import annotations

import threading
import time

import pytest

from conftest import QUICK
from cycles import spawn_kill_cycles
from interleave import nearest_rank
from pool.cli.demo import LocalService

NAME = "py-hello"
BURST = 40 if QUICK else 400
CONCURRENCY = 8
ROUND_TRIPS = 20 if QUICK else 300
CONFIGS = {  # config -> (template, its pool's settings)
    "autoscale": (NAME, f"[templates.{NAME}]\nmax_live = 32\n"),
    "fixed": (NAME, f"[templates.{NAME}]\nmin_warm = 2\nmax_warm = 2\nmax_live = 32\n"),
    "fork": ("py-fork", "[templates.py-fork]\nmax_live = 32\n"),
}
SERVICE = "[service]\ncapacity = 64\n"


@pytest.fixture
def start(template, bench_store, bench_dir, request):
    """start(config) -> a LocalService of its own (a fresh, idle pool); stopped after the test."""
    for name, _ in CONFIGS.values():
        template(name)
    started = []

    def go(config: str) -> LocalService:
        workdir = bench_dir / f"demand-{request.node.name}-{len(started)}".replace("[", "-").strip("]")
        workdir.mkdir()
        svc = LocalService(bench_store.root, workdir, SERVICE + config)
        started.append(svc)
        return svc

    yield go
    for svc in started:
        svc.stop()


def test_warm_round_trip(benchmark, start):
    svc = start(CONFIGS["fixed"][1])
    spawn_s: list[float] = []
    service_ms: list[float] = []
    last = []
    with svc.client() as c:
        def setup() -> None:
            while last:
                last.pop().kill(grace=0)
            svc.wait_warm(NAME, 2, timeout=60)

        def spawn() -> None:
            t0 = time.perf_counter()
            inst = c.spawn(NAME)
            spawn_s.append(time.perf_counter() - t0)
            last.append(inst)
            service_ms.append(inst.spawn_ms)
            assert inst.served_by == "warm", inst.served_by

        try:
            benchmark.pedantic(spawn, setup=setup, rounds=ROUND_TRIPS, warmup_rounds=0 if QUICK else 5)
        finally:
            while last:
                last.pop().kill(grace=0)
    keep = -ROUND_TRIPS  # the warm-up rounds are the first ones
    benchmark.extra_info.update(kind="demand-round-trip", template=NAME,
                                spawn_call_s=[round(x, 6) for x in spawn_s[keep:]],
                                service_spawn_ms=[round(x, 3) for x in service_ms[keep:]])


def burst(svc: LocalService, name: str, spawns: int, concurrency: int) -> dict:
    """spawns spawn -> kill cycles over concurrency workers, the pool's stats polled meanwhile."""
    done = threading.Event()
    targets: list[int] = []

    def watch() -> None:
        with svc.client() as c:
            while not done.wait(0.05):
                targets.append(c.stats()["templates"][name]["target"])

    with svc.client() as c:
        before = c.stats()["templates"][name]
    watcher = threading.Thread(target=watch, name="demand-watch")
    watcher.start()
    try:
        run = spawn_kill_cycles(svc, name, spawns, concurrency, prefix="demand")
    finally:
        done.set()
    watcher.join()
    with svc.client() as c:
        after = c.stats()["templates"][name]
    lat_ms = [x * 1000 for x in run.latencies]
    return {"spawns": spawns, "concurrency": concurrency, "errors": run.errors,
            "seconds": round(run.seconds, 3), "copies_per_s": round(len(lat_ms) / run.seconds, 2),
            "p50_ms": round(nearest_rank(lat_ms, 50), 3) if lat_ms else None,
            "p99_ms": round(nearest_rank(lat_ms, 99), 3) if lat_ms else None,
            "hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"],
            "warm_before": before["warm"], "target_before": before["target"],
            "peak_target": max(targets, default=after["target"]), "target_after": after["target"],
            "demand_per_s_after": after["demand_per_s"], "refill_ms_after": after["refill_ms"]}


@pytest.mark.timeout(300 + BURST)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_burst(benchmark, start, config):
    name, settings = CONFIGS[config]
    svc = start(settings)
    svc.wait_warm(name, 2 if config == "fixed" else 0)  # idle: the floor, nothing restoring
    result = benchmark.pedantic(burst, args=(svc, name, BURST, CONCURRENCY), rounds=1, iterations=1)
    benchmark.extra_info.update(kind="demand-burst", template=name, config=config, **result)
    assert not result["errors"], result["errors"]
    assert result["hits"] + result["misses"] == BURST
