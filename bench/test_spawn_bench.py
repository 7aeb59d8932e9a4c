"""Spawn latency of py-hello through the real client over the unix socket, three ways:

    warm     served from the warm pool (a copy restored ahead of time gets its identity)
    restore  a miss (min_warm 0): the service restores a copy with CRIU, then hands it over
    cold     no pool at all: boot the app from scratch until its first HTTP answer

    make bench                                  # full rounds, JSON + bench/results/latest.md
    BENCH_QUICK=1 pytest bench/test_spawn_bench.py  # 2 rounds each: just check that it runs

No timed asserts: the numbers are for the report. Copies are killed outside the timed part, and a warm
round starts only once the pool is full and idle, so a round measures one path and nothing else.
"""
from __future__ import annotations

import pytest

from conftest import ROOT, rounds
from pool.cli.demo import LocalService, cold_start
from pool.templates.spec import load_spec

NAME = "py-hello"
ROUNDS = {"warm": rounds(50), "restore": rounds(10), "cold": rounds(5)}


@pytest.fixture(scope="module")
def service(template, bench_store, bench_dir):
    template(NAME)
    workdir = bench_dir / "svc"
    workdir.mkdir(exist_ok=True)
    with LocalService(bench_store.root, workdir, f"[templates.{NAME}]\nmin_warm = 2\n") as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with service.client() as c:
        yield c


class Spawner:
    """One spawn per round; the previous round's copy is killed in the (untimed) setup."""

    def __init__(self, client, service, warm: int):
        self.client, self.service, self.warm, self.last = client, service, warm, None

    def setup(self):
        self.cleanup()
        self.service.wait_warm(NAME, self.warm)

    def cleanup(self):
        if self.last is not None:
            self.last.kill(grace=0)
            self.last = None

    def spawn(self):
        self.last = self.client.spawn(NAME)
        return self.last


def test_spawn_warm(benchmark, client, service):
    client.set_warm(NAME, 2)
    s = Spawner(client, service, warm=1)
    benchmark.extra_info["path"] = "warm"
    try:
        inst = benchmark.pedantic(s.spawn, setup=s.setup, rounds=ROUNDS["warm"], iterations=1)
        assert inst.path == "warm"
    finally:
        s.cleanup()


def test_spawn_restore_on_miss(benchmark, client, service):
    client.set_warm(NAME, 0)
    s = Spawner(client, service, warm=0)
    benchmark.extra_info["path"] = "restore"
    try:
        inst = benchmark.pedantic(s.spawn, setup=s.setup, rounds=ROUNDS["restore"], iterations=1)
        assert inst.path == "restore"
    finally:
        s.cleanup()
        client.set_warm(NAME, 2)


def test_cold_start(benchmark):
    spec = load_spec(ROOT / "templates" / NAME)
    benchmark.extra_info["path"] = "cold"
    benchmark.pedantic(cold_start, args=(spec,), rounds=ROUNDS["cold"], iterations=1)
