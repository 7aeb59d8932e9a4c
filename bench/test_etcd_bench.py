"""Spawns per second through 1 and 2 coordinators on etcd onto 3 agents (tests/poollab.py with
etcd=, tests/etcdlab.py: a real etcd in lab host n1, agents that joined through it).

A round: BATCH spawns of py-hello at once, spread over the coordinators (one client thread per
coordinator, each spawning its share one after another); every spawn writes its route to etcd.
The copies are killed between rounds (not timed). The agents keep no warm copies (min_warm 0), so
each spawn is a restore on its agent: what two coordinators add is parallel scheduling and routing,
not faster restores.

    BENCH_QUICK=1 pytest bench/test_etcd_bench.py   # 2 rounds each: just check that it runs

No timed asserts. extra_info: spawns_per_s (median round), coordinators, batch.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time

import pytest

from conftest import QUICK, ROOT, rounds

sys.path.insert(0, str(ROOT / "tests"))
from etcdlab import in_lab  # noqa: E402
from netlab import NetLab  # noqa: E402
from poollab import PoolLab  # noqa: E402

NAME = "py-hello"
BATCH = 6 if QUICK else 24
ROUNDS = rounds(8)


@pytest.fixture(scope="module")
def cluster(template, bench_store, bench_dir):
    template(NAME)
    with NetLab(3) as lab:
        server = in_lab(lab, "n1", bench_dir / "etcd-bench-etcd")
        try:
            server.start()
            with PoolLab(lab, bench_store.root, bench_dir / "etcd-bench", etcd=server.url,
                         agent_config="[service]\ncapacity = 64\n") as pl:
                pl.start()
                pl.start_coordinator("c2")
                pl.wait_nodes_up(*lab.hosts, coordinator="c2")
                with pl.client() as c:
                    for h in lab.hosts:   # shipped before timing: rounds measure spawns only
                        c.push(NAME, h)
                yield pl
        finally:
            server.stop()


class Batch:
    def __init__(self, pl: PoolLab, coordinators: list[str]) -> None:
        self.pl, self.coordinators = pl, coordinators
        self.ids: list[tuple[str, str]] = []
        self.rates: list[float] = []

    def cleanup(self):
        with self.pl.client() as c:
            for _co, iid in self.ids:
                c.kill(iid, grace=0)
        self.ids.clear()

    def run(self):
        share = BATCH // len(self.coordinators)
        errors: list = []

        def spawn_through(co: str) -> None:
            try:
                with self.pl.client(co) as c:
                    for _ in range(share):
                        self.ids.append((co, c.spawn(NAME, timeout=60).id))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=spawn_through, args=(co,)) for co in self.coordinators]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.rates.append(BATCH / (time.perf_counter() - t0))
        if errors:
            raise errors[0]
        assert len({iid for _co, iid in self.ids}) == BATCH


@pytest.mark.parametrize("coordinators", [1, 2])
def test_etcd_spawns_per_second(benchmark, cluster, coordinators):
    b = Batch(cluster, ["coordinator", "c2"][:coordinators])
    try:
        benchmark.pedantic(b.run, setup=b.cleanup, rounds=ROUNDS, iterations=1)
    finally:
        b.cleanup()
    benchmark.extra_info.update(coordinators=coordinators, batch=BATCH, agents=3,
                                spawns_per_s=round(statistics.median(b.rates), 1))
