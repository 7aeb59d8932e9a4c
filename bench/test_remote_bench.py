"""Remote spawn latency through a coordinator and `pool agent`s on lab hosts (tests/poollab.py:
three network namespaces on one bridge, real TCP between them), measured by the client:

    cached      the template is in the node's cache: coordinator -> agent -> restore on a miss
    first_ship  the node lacks it: the coordinator ships the image (zstd, sha256-verified) first,
                then the same restore; each round starts with the node's copy removed

    BENCH_QUICK=1 pytest bench/test_remote_bench.py   # 2 rounds each: just check that it runs

No timed asserts. extra_info has the wire size and the agent's own restore time.
"""
from __future__ import annotations

import statistics
import sys

import pytest

from conftest import ROOT, rounds
from pool.templates.store import Store

sys.path.insert(0, str(ROOT / "tests"))
from netlab import NetLab  # noqa: E402
from poollab import PoolLab  # noqa: E402

NAME = "py-hello"
ROUNDS = {"cached": rounds(10), "first_ship": rounds(5)}


@pytest.fixture(scope="module")
def cluster(template, bench_store, bench_dir):
    template(NAME)
    with NetLab(3) as lab, PoolLab(lab, bench_store.root, bench_dir / "remote") as pl:
        yield pl.start()


class Round:
    def __init__(self, pl: PoolLab, client, node: str, cold: bool) -> None:
        self.pl, self.client, self.node, self.cold = pl, client, node, cold
        self.last = None
        self.replies: list[dict] = []

    def setup(self):
        self.cleanup()
        if self.cold:  # the node forgets the template; wait until the coordinator knows
            store = Store(self.pl.agent_store(self.node))
            if NAME in store.names():
                store.remove(NAME)
            self.pl.wait_nodes(lambda r: NAME not in r[self.node]["templates"], 10, "forgotten")

    def cleanup(self):
        if self.last is not None:
            self.client.kill(self.last["id"], grace=0)
            self.last = None

    def spawn(self):
        self.last = self.client.call("spawn", {"template": NAME, "node": self.node,
                                               "timeout": 60.0}, 90)
        self.replies.append(self.last)
        return self.last


def _run(benchmark, pl, node: str, cold: bool, n: int) -> list[dict]:
    with pl.client() as c:
        if not cold:
            c.push(NAME, node)
        r = Round(pl, c, node, cold)
        try:
            benchmark.pedantic(r.spawn, setup=r.setup, rounds=n, iterations=1)
        finally:
            r.cleanup()
    return r.replies


def test_remote_spawn_cached(benchmark, cluster):
    replies = _run(benchmark, cluster, "n2", False, ROUNDS["cached"])
    assert all("shipped" not in x and x["node"] == "n2" for x in replies)
    benchmark.extra_info.update(path="cached", agent_spawn_ms=statistics.median(
        x["spawn_ms"] for x in replies))


def test_remote_spawn_first_ship(benchmark, cluster):
    replies = _run(benchmark, cluster, "n3", True, ROUNDS["first_ship"])
    assert all(x["shipped"]["files_sent"] > 0 and x["node"] == "n3" for x in replies)
    shipped = replies[-1]["shipped"]
    benchmark.extra_info.update(
        path="first_ship", agent_spawn_ms=statistics.median(x["spawn_ms"] for x in replies),
        ship_s=statistics.median(x["shipped"]["seconds"] for x in replies),
        wire_mb=round(shipped["bytes_wire"] / 2**20, 2), raw_mb=round(shipped["bytes_raw"] / 2**20, 2))
