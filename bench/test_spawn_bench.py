"""py-hello, the small template: time to the first correct answer (GET / names the instance) five
ways, interleaved round-robin in one run (bench/interleave.py, bench/firstanswer.py):

    cold        boot the app from scratch in the pool's sandbox, no CRIU
    criu-cli    plain `criu restore` of the template's image, identity sent by hand
    spawn-miss  pool.Client.spawn with min_warm 0: the service restores a copy (path "restore")
    spawn-warm  pool.Client.spawn from the warm pool (path "warm")
    lazy        criu-cli with post-copy memory (not what the pool does)

The spawn modes also record the spawn call alone at the client and the service's own spawn_ms.
test_client_round_trip: warm spawns measured at the client over the unix socket next to the service's
spawn_ms, and a bare `ping` round trip, >= 200 each in a full run.

    make bench                                      # full counts, JSON + bench/results/latest.md
    BENCH_QUICK=1 pytest bench/test_spawn_bench.py  # a couple of cycles: just check that it runs

No timed asserts: the numbers are for the report; a wrong answer fails.
"""
from __future__ import annotations

import time

import pytest

from conftest import QUICK
from firstanswer import boot_cold, criu_cli_restore, lazy_restore, service_modes, spawn_to_answer
from interleave import Mode, measure_interleaved
from pool.cli.demo import LocalService
from pool.cr.criu import become_subreaper

NAME = "py-hello"
CYCLES, WARMUP = (2, 0) if QUICK else (30, 1)
ROUND_TRIPS = 20 if QUICK else 300


@pytest.fixture(scope="module")
def service(template, bench_store, bench_dir):
    template(NAME)
    workdir = bench_dir / "svc"
    workdir.mkdir(exist_ok=True)
    # a fixed pool of none (max_warm 0): every spawn a miss, whatever the demand
    fixed_none = f"[templates.{NAME}]\nmin_warm = 0\nmax_warm = 0\n"
    with LocalService(bench_store.root, workdir, fixed_none) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with service.client() as c:
        yield c


def test_first_answer(benchmark, template, service, client, criu, bench_dir, lazy_pages_ok):
    tpl = template(NAME)
    become_subreaper()  # criu-cli and lazy reap their copies themselves
    idle, one_warm = service_modes(service, client, NAME)
    modes = [
        Mode("cold", lambda: boot_cold(NAME), idle),
        Mode("criu-cli", lambda: criu_cli_restore(criu, tpl, bench_dir / "criu-cli" / NAME), idle),
        Mode("spawn-miss", lambda: spawn_to_answer(client, NAME, "restore"), idle),
        Mode("spawn-warm", lambda: spawn_to_answer(client, NAME, "warm"), one_warm),
        Mode("lazy", lambda: lazy_restore(criu, tpl, bench_dir / "lazy" / NAME), idle),
    ]
    try:
        measure_interleaved(benchmark, NAME, modes, CYCLES, WARMUP)
    finally:
        idle()


def test_client_round_trip(benchmark, service, client):
    """A warm spawn timed at the client (request written to reply parsed, over the unix socket) next
    to the service's own spawn_ms for the same spawn, and a bare ping before each. Each round starts
    with two idle warm copies and nothing restoring: the RPC alone, no refill competing."""
    client.set_warm(NAME, 2)
    ping_s: list[float] = []
    spawn_s: list[float] = []
    service_ms: list[float] = []
    last = []

    def kill_last() -> None:
        while last:
            last.pop().kill(grace=0)

    def setup() -> None:
        kill_last()
        service.wait_warm(NAME, 2, timeout=60)
        t0 = time.perf_counter()
        client.ping()
        ping_s.append(time.perf_counter() - t0)

    def spawn() -> None:
        t0 = time.perf_counter()
        inst = client.spawn(NAME)
        spawn_s.append(time.perf_counter() - t0)
        last.append(inst)
        service_ms.append(inst.spawn_ms)
        assert inst.path == "warm", inst.path

    try:
        benchmark.pedantic(spawn, setup=setup, rounds=ROUND_TRIPS, warmup_rounds=0 if QUICK else 5)
    finally:
        kill_last()
        client.set_warm(NAME, 0)
    keep = -ROUND_TRIPS  # the warm-up rounds are the first ones
    benchmark.extra_info.update(kind="client-round-trip", template=NAME,
                                spawn_call_s=[round(x, 6) for x in spawn_s[keep:]],
                                service_spawn_ms=[round(x, 3) for x in service_ms[keep:]],
                                ping_s=[round(x, 6) for x in ping_s[keep:]])
