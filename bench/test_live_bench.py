"""Running instances through a real `pool serve`, on tests/apps/counter (a small Python HTTP app
with in-memory state, 13 MB image; BALLAST_MB adds memory):

    test_live_checkpoint    `pool checkpoint` of a running instance: the time the app stood frozen
                            (CRIU's own stats-dump measure: freeze_ms) and the whole call
    test_wake_on_connect    a suspended instance: from the connect to its address to the first
                            answer (the restore happens in between), against a spawn that
                            restores (min_warm 0) to its first answer
    test_rollback           `pool rollback` to the latest snapshot, the call

    BENCH_QUICK=1 pytest bench/test_live_bench.py   # a couple of samples: just check that it runs

No timed asserts: the figures are for the report; a wrong answer fails.
"""
from __future__ import annotations

import json
import statistics
import time
import urllib.request

import pytest

from conftest import ROOT, rounds
from pool.cli.demo import LocalService
from pool.templates.build import build
from pool.templates.spec import load_spec

COUNTER = ROOT / "tests" / "apps" / "counter"


def get(address: str, path: str = "/") -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def service(bench_store, criu, bench_dir):
    build(load_spec(COUNTER), bench_store, criu)
    workdir = bench_dir / "live-svc"
    workdir.mkdir(exist_ok=True)
    svc = LocalService(bench_store.root, workdir, "[templates.counter]\nmin_warm = 0\nmax_live = 8\n")
    yield svc
    svc.stop()


@pytest.fixture
def instance(service):
    with service.client() as c:
        inst = c.spawn("counter")
        get(inst.address, "/inc")
        yield c, inst
        c.kill(inst.id, grace=0)


def test_live_checkpoint(benchmark, instance):
    c, inst = instance
    freezes = []

    def one():
        r = c.checkpoint(inst.id)
        freezes.append(r["snapshot"]["freeze_ms"])
        get(inst.address, "/inc")          # running on, state kept

    benchmark.pedantic(one, rounds=rounds(20), iterations=1)
    benchmark.extra_info.update(kind="live-checkpoint", freeze_ms_p50=statistics.median(freezes),
                                freeze_ms_max=max(freezes))


def test_wake_on_connect(benchmark, instance, service):
    c, inst = instance
    count = get(inst.address)["count"]

    def setup():
        c.suspend(inst.id)
        return (), {}

    def wake():
        assert get(inst.address)["count"] == count   # the connect waits for the restore

    benchmark.pedantic(wake, setup=setup, rounds=rounds(15), iterations=1)
    cold = []
    for _ in range(rounds(10)):
        t0 = time.perf_counter()
        other = c.spawn("counter")
        get(other.address)
        cold.append((time.perf_counter() - t0) * 1000)
        c.kill(other.id, grace=0)
    benchmark.extra_info.update(kind="wake-on-connect",
                                spawn_restore_to_first_answer_ms_p50=statistics.median(cold))


def test_rollback(benchmark, instance):
    c, inst = instance
    c.checkpoint(inst.id, tag="base")
    count = get(inst.address)["count"]

    def one():
        get(inst.address, "/inc")
        c.rollback(inst.id, "base")
        assert get(inst.address)["count"] == count

    benchmark.pedantic(one, rounds=rounds(15), iterations=1)
    benchmark.extra_info.update(kind="rollback")
