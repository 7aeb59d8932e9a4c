"""Restore-to-ready latency (restore + identity handshake + first HTTP answer) and restore throughput
at concurrency 1, 2, 4 and 8, for py-hello, through pool.copies.restore directly (no service)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import QUICK, rounds
from pool.cr import netns
from pool.copies.restore import Identity, Restorer, new_instance_id


@pytest.fixture(scope="module")
def restorer(template, bench_store, criu, bench_dir):
    template("py-hello")
    r = Restorer(bench_store, criu, bench_dir / "run")
    r.prepare("py-hello")  # first-use checks (sha256 of the image) are not part of a restore
    return r


def restore_to_first_answer(restorer: Restorer) -> float:
    t0 = time.perf_counter()
    inst = restorer.spawn("py-hello", Identity(new_instance_id()))
    try:
        status, _ = netns.http_in(inst.netns_fd, "http://127.0.0.1:8080/", timeout=10)
        assert status == 200
        return time.perf_counter() - t0
    finally:
        inst.kill(grace=0)
        inst.close()


def test_restore_to_ready_py_hello(benchmark, restorer):
    benchmark.extra_info["what"] = "restore + identity + first HTTP answer, one copy at a time"
    benchmark.pedantic(restore_to_first_answer, args=(restorer,), rounds=rounds(30),
                       warmup_rounds=0 if QUICK else 1)


@pytest.mark.parametrize("concurrency", [1, 2, 4, 8])
def test_restore_throughput(benchmark, restorer, concurrency):
    """Copies per second when `concurrency` restores run at once (each answered once, then killed)."""
    batch = concurrency * (1 if QUICK else 3)

    def run_batch() -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda _: restore_to_first_answer(restorer), range(batch)))
        return batch / (time.perf_counter() - t0)

    rates = []
    benchmark.pedantic(lambda: rates.append(run_batch()), rounds=rounds(3))
    benchmark.extra_info.update(concurrency=concurrency, copies_per_batch=batch,
                                copies_per_second=round(max(rates), 2))
