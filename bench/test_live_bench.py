"""Running instances through a real `pool serve`, on tests/apps/counter (a small Python HTTP app with
in-memory state) and the heavy templates py-embed and jvm-app:

    test_wake_to_first_answer[T]  a suspended instance: from the connect to its address to its first
                                  correct answer (the service restores it in between), interleaved
                                  round-robin (bench/interleave.py) with the template's cold start
                                  and a spawn that restores (min_warm 0), both to the same answer
                                  (bench/firstanswer.py), so the report divides like by like
    test_live_checkpoint[T]       `pool checkpoint` of a running instance: the time the app stood
                                  frozen (CRIU's own stats-dump measure: freeze_ms), the whole dump,
                                  and the whole call at the client
    test_migrate[T-eager|lazy]    `pool migrate` between two agents in their own network namespaces
                                  (tests/poollab.py): the reply's freeze_ms and migrate_ms, the whole
                                  call at the client, and the first answer on the new node after it
    test_rollback                 `pool rollback` of counter to its latest snapshot, the call

    BENCH_QUICK=1 pytest bench/test_live_bench.py   # a couple of samples: just check that it runs

No timed asserts: the figures are for the report; a wrong answer fails.
"""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request

import pytest

from conftest import QUICK, ROOT, rounds
from firstanswer import ask, boot_cold, first_answer, on_host, service_modes, spawn_to_answer
from interleave import Mode, Sample, measure_interleaved
from pool.cli.demo import PROBES, LocalService, Probe
from pool.templates.build import build
from pool.templates.spec import load_spec

sys.path.insert(0, str(ROOT / "tests"))
from netlab import NetLab  # noqa: E402
from poollab import PoolLab  # noqa: E402

COUNTER = ROOT / "tests" / "apps" / "counter"
LIVE = ("counter", "py-embed", "jvm-app")
FOLDERS = {"counter": COUNTER}
CYCLES, WARMUP = (2, 0) if QUICK else (20, 1)   # one discarded cycle: first-touch effects
MIGRATE = ("counter", "py-embed")


def counter_probe(count: int) -> Probe:
    """counter has no entry in PROBES (it is a test app): its answer is its count, which a wake
    must have kept and a fresh copy starts at 0."""
    return Probe("GET", "/", None, lambda r: r.get("count") == count)


def probe(name: str, count: int = 0) -> Probe:
    return counter_probe(count) if name == "counter" else PROBES[name]


def get(address: str, path: str = "/") -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=60) as r:
        return json.loads(r.read())


def elapsed_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


@pytest.fixture(scope="module")
def live_templates(template, bench_store, criu):
    """counter built here (it lives in tests/apps), the heavy ones through the session's cache."""
    build(load_spec(COUNTER), bench_store, criu)
    for name in LIVE[1:]:
        template(name)
    return LIVE


@pytest.fixture(scope="module")
def service(live_templates, bench_store, bench_dir):
    workdir = bench_dir / "live-svc"
    workdir.mkdir(exist_ok=True)
    # keep_snapshots: a checkpoint prunes the older ones, so 20 of py-embed do not pile up on disk
    config = "[service]\nrestore_concurrency = 2\n" + "".join(
        f"[templates.{t}]\nmin_warm = 0\nmax_warm = 0\nmax_live = 8\nkeep_snapshots = 2\n"
        for t in live_templates)
    svc = LocalService(bench_store.root, workdir, config)
    yield svc
    svc.stop()


@pytest.fixture
def instance(service):
    with service.client() as c:
        inst = c.spawn("counter")
        get(inst.address, "/inc")
        yield c, inst
        c.kill(inst.id, grace=0)


# --- wake on request against cold start ----------------------------------------------------------
class Suspended:
    """The wake mode: prepare (untimed) spawns a copy, has it answer once (counter: count 1) and
    suspends it; start times the connect to its address to the first correct answer. Each sample
    has its own instance, killed after it, so its snapshots go with it."""

    def __init__(self, client, name: str, idle) -> None:
        self.client, self.name, self.idle = client, name, idle
        self.inst = None
        self.suspend_ms = 0.0

    def prepare(self) -> None:
        self.idle()
        self.inst = self.client.spawn(self.name, timeout=120)
        try:
            if self.name == "counter":
                assert get(self.inst.address, "/inc")["count"] == 1
            ask(on_host(self.inst.address), probe(self.name, 1))
            t0 = time.perf_counter()
            reply = self.client.suspend(self.inst.id)
            self.suspend_ms = elapsed_ms(t0)
            assert reply["state"] == "suspended" and reply["address"] == self.inst.address, reply
        except BaseException:
            self.kill()
            raise

    def start(self) -> Sample:
        inst = self.inst
        t0 = time.perf_counter()
        try:
            took = first_answer(on_host(inst.address), probe(self.name, 1), t0)
            assert self.client.info(inst.id)["state"] == "running"
        except BaseException:
            self.kill()
            raise
        return Sample(took, self.kill, {"suspend_call_ms": self.suspend_ms})

    def kill(self) -> None:
        if self.inst is not None:
            self.client.kill(self.inst.id, grace=0)
            self.inst = None


@pytest.mark.parametrize("name", LIVE)
def test_wake_to_first_answer(benchmark, service, name):
    with service.client() as client:
        idle, _ = service_modes(service, client, name)
        wake = Suspended(client, name, idle)
        modes = [
            Mode("wake", wake.start, wake.prepare),
            Mode("cold", lambda: boot_cold(name, folder=FOLDERS.get(name), probe=probe(name)), idle),
            Mode("spawn-miss", lambda: spawn_to_answer(client, name, "restore", probe(name)), idle),
        ]
        try:
            measure_interleaved(benchmark, name, modes, CYCLES, WARMUP, kind="wake-first-answer")
        finally:
            wake.kill()
            idle()


# --- live checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", LIVE)
def test_live_checkpoint(benchmark, service, name):
    """Each round checkpoints the same running instance; before each (untimed) it must still give
    the correct answer, counter with its count kept."""
    freeze, dump, call, size, pre_dump = [], [], [], [], set()
    with service.client() as c:
        inst = c.spawn(name, timeout=120)
        try:
            if name == "counter":
                get(inst.address, "/inc")

            def still_answers():
                ask(on_host(inst.address), probe(name, 1))
                return (), {}

            def one():
                t0 = time.perf_counter()
                r = c.checkpoint(inst.id)
                call.append(elapsed_ms(t0))
                s = r["snapshot"]
                assert s["freeze_ms"] is not None, r
                freeze.append(s["freeze_ms"])
                dump.append(s["dump_ms"])
                size.append(s["bytes"])
                pre_dump.add(r["pre_dump"])

            benchmark.pedantic(one, setup=still_answers, rounds=rounds(20), iterations=1)
            still_answers()
        finally:
            c.kill(inst.id, grace=0)
    benchmark.extra_info.update(kind="live-checkpoint", template=name, freeze_ms=freeze,
                                dump_ms=dump, call_ms=call, snapshot_bytes=size,
                                pre_dump=sorted(pre_dump))


# --- migration between two nodes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes(live_templates, bench_store, bench_dir, lazy_pages_ok):
    """Agents n1 and n2 (network namespaces on one bridge, mutual TLS), the coordinator in n1."""
    with NetLab(2) as lab, PoolLab(lab, bench_store.root, bench_dir / "live-lab") as pl:
        yield pl.start()


def lab_connect(pl: PoolLab, address: str):
    """A connection to address made from inside n1 (the lab's addresses exist only there)."""
    host, _, port = address.rpartition(":")

    def connect() -> socket.socket:
        s = pl.lab.socket("n1")
        try:
            s.settimeout(5)
            s.connect((host, int(port)))
        except BaseException:
            s.close()
            raise
        return s
    return connect


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("name", MIGRATE)
def test_migrate(benchmark, two_nodes, name, lazy):
    """One instance moved n1 -> n2 -> n1 ... Before each round (untimed) it has left the node it
    came from (lazy: once the target has every page) and answers; counter's count goes up by one
    per round, so a lost state fails."""
    pl = two_nodes
    calls, freeze, moved, shipped, answer_after = [], [], [], [], []
    with pl.client() as c:
        inst = c.spawn(name, node="n1", timeout=180)
        where = {"node": "n1", "address": inst.address, "count": 0}

        def answers() -> None:
            if name == "counter":
                where["count"] += 1
                assert pl.get(where["address"], "/inc")["count"] == where["count"]
            else:
                ask(lab_connect(pl, where["address"]), PROBES[name])

        def settled():
            deadline = time.monotonic() + 120
            while [row["node"] for row in c.list() if row["id"] == inst.id] != [where["node"]]:
                assert time.monotonic() < deadline, f"{inst.id} still on two nodes: {c.list()}"
                time.sleep(0.05)
            answers()
            return (), {}

        def one():
            target = "n2" if where["node"] == "n1" else "n1"
            t0 = time.perf_counter()
            r = c.migrate(inst.id, target, lazy=lazy, timeout=120)
            calls.append(elapsed_ms(t0))
            assert r["id"] == inst.id and r["node"] == target and r["lazy"] == lazy, r
            where.update(node=target, address=r["address"])
            t1 = time.perf_counter()
            first_answer(lab_connect(pl, r["address"]), probe(name, where["count"]), t1)
            answer_after.append(elapsed_ms(t1))
            freeze.append(r["freeze_ms"])
            moved.append(r["migrate_ms"])
            shipped.append(r["image_bytes"])

        try:
            benchmark.pedantic(one, setup=settled, rounds=rounds(10), iterations=1)
            settled()
        finally:
            c.kill(inst.id, grace=0)
    benchmark.extra_info.update(kind="migrate", template=name, lazy=lazy, call_ms=calls,
                                freeze_ms=freeze, migrate_ms=moved, image_bytes=shipped,
                                first_answer_after_ms=answer_after)


# --- rollback ---------------------------------------------------------------------------------
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
