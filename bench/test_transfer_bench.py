"""Moving templates and copies between nodes, on one machine:

- transfer throughput of py-hello's image between two lab "nodes" (network namespaces joined by
  veth, tests/netlab.py) with zstd, zlib and no compression;
- migrating a running copy (counter app with 128 MB of ballast): eager (full dump to disk, restore)
  against lazy (small dump, restore at once, memory on demand), timed from the start of the restore
  to the copy's first answer; extra_info has the whole pause (dump start to first answer) and
  the bytes that had to be shipped before the restore could start.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, ROOT, rounds
from pool.cr import netns
from pool.templates import transfer
from pool.templates.build import build
from pool.copies.fork import checkpoint_instance, checkpoint_instance_lazy, restore_lazy
from pool.copies.restore import Identity, Restorer
from pool.templates.spec import load_spec
from pool.templates.store import Store

sys.path.insert(0, str(ROOT / "tests"))
from netlab import NetLab  # noqa: E402

BALLAST_MB = 32 if QUICK else 128
PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")


# --- transfer throughput -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    with NetLab(2) as lab:
        yield lab


async def _fetch_over_lab(lab: NetLab, src: Store, dst: Store, codec: str):
    listener = lab.socket("n1")
    listener.bind((lab.address("n1"), 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    source = transfer.TemplateSource(src)
    await source.start(sock=listener)
    loop = asyncio.get_running_loop()

    async def connect():
        s = lab.socket("n2")
        s.setblocking(False)
        await loop.sock_connect(s, (lab.address("n1"), port))
        return await asyncio.open_connection(sock=s)

    try:
        return await transfer.fetch(dst, "py-hello", connect=connect, codecs=(codec,))
    finally:
        await source.close()


@pytest.mark.parametrize("codec", ["zstd", "zlib", "none"])
def test_transfer_throughput(benchmark, template, bench_store, bench_dir, lab, codec):
    t = template("py-hello")
    results = []

    def once():
        dst = Store(bench_dir / f"recv-{codec}")
        try:
            results.append(asyncio.run(_fetch_over_lab(lab, bench_store, dst, codec)))
        finally:
            shutil.rmtree(dst.root, ignore_errors=True)

    benchmark.pedantic(once, rounds=rounds(5), warmup_rounds=0 if QUICK else 1)
    best = min(results, key=lambda r: r.seconds)
    benchmark.extra_info.update(
        codec=codec, image_mb=round(t.image_bytes / 2**20, 1),
        wire_mb=round(best.bytes_wire / 2**20, 1),
        ratio=round(best.bytes_raw / max(best.bytes_wire, 1), 2),
        mb_per_s=round(t.image_bytes / 2**20 / best.seconds, 1),
        what="fetch of py-hello between two netns nodes over veth, verified and published")


# --- lazy against eager migration ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe_max():
    old = PIPE_MAX.read_text().strip()
    PIPE_MAX.write_text(str(max(int(old), 4 << 20)))
    yield
    PIPE_MAX.write_text(old)


@pytest.fixture(scope="module")
def big(bench_store, criu, bench_dir):
    spec = load_spec(ROOT / "tests" / "apps" / "counter")
    spec = dataclasses.replace(spec, name="counter-big",
                               env=spec.env + (("BALLAST_MB", str(BALLAST_MB)),))
    t = build(spec, bench_store, criu).template
    r = Restorer(bench_store, criu, bench_dir / "run-migrate")
    r.prepare("counter-big")
    return t, r


def _first_answer(inst) -> dict:
    status, body = netns.http_in(inst.netns_fd, "http://127.0.0.1:8080/inc", timeout=30)
    assert status == 200
    return json.loads(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rounds:
    """Per-round state: made in setup, cleaned before the next round and at the end."""

    def __init__(self) -> None:
        self.cleanups: list = []
        self.pauses: list[float] = []
        self.shipped: list[int] = []

    def clean(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001  best effort between rounds
                pass


def _kill(inst) -> None:
    inst.kill(grace=0)
    inst.close()


def test_migrate_eager(benchmark, big, bench_store, criu, bench_dir):
    _, restorer = big
    state = Rounds()
    n = iter(range(1000))

    def setup():
        state.clean()
        i = next(n)
        orig = restorer.spawn("counter-big", Identity(f"eager-src-{i}"))
        state.cleanups.append(lambda: _kill(orig))
        _first_answer(orig)
        t0 = time.perf_counter()
        fork = checkpoint_instance(orig, bench_store, criu, name="counter-big-eager",
                                   leave_running=False)
        state.shipped.append(fork.image_bytes)
        return (t0,), {}

    def restore_and_answer(t0):
        inst = restorer.spawn("counter-big-eager", Identity(f"eager-{time.monotonic_ns()}"))
        state.cleanups.append(lambda: _kill(inst))
        assert _first_answer(inst)["count"] == 2
        state.pauses.append(time.perf_counter() - t0)

    try:
        benchmark.pedantic(restore_and_answer, setup=setup, rounds=rounds(5))
    finally:
        state.clean()
        bench_store.remove("counter-big-eager")
    benchmark.extra_info.update(
        mode="eager", ballast_mb=BALLAST_MB, shipped_mb=round(min(state.shipped) / 2**20, 1),
        pause_s=round(min(state.pauses), 4),
        what="restore start to first answer; pause_s: dump start to first answer")


def test_migrate_lazy(benchmark, big, criu, bench_dir, pipe_max):
    _, restorer = big
    state = Rounds()
    n = iter(range(1000))

    def setup():
        state.clean()
        i = next(n)
        orig = restorer.spawn("counter-big", Identity(f"lazy-src-{i}"))
        state.cleanups.append(lambda: _kill(orig))
        _first_answer(orig)
        build_dir = bench_dir / f"lazy-build-{i}"
        t0 = time.perf_counter()
        lazy = checkpoint_instance_lazy(orig, build_dir, criu, ("127.0.0.1", _free_port()))
        state.cleanups.append(lambda: shutil.rmtree(build_dir, ignore_errors=True))
        state.cleanups.append(lazy.abort)
        state.shipped.append(lazy.template.image_bytes)
        return (lazy, t0, bench_dir / f"lazy-run-{i}"), {}

    def restore_and_answer(lazy, t0, run_dir):
        inst, daemon = restore_lazy(lazy.template, criu, run_dir, lazy.page_server,
                                    instance_id=f"lazy-{time.monotonic_ns()}")
        state.cleanups.append(lambda: _kill(inst))
        state.cleanups.append(daemon.kill)
        assert _first_answer(inst)["count"] == 2
        state.pauses.append(time.perf_counter() - t0)
        state.cleanups.append(lambda: (daemon.wait(60), lazy.wait(60)))  # runs first: LIFO

    try:
        benchmark.pedantic(restore_and_answer, setup=setup, rounds=rounds(5))
    finally:
        state.clean()
    benchmark.extra_info.update(
        mode="lazy", ballast_mb=BALLAST_MB, shipped_mb=round(min(state.shipped) / 2**20, 1),
        pause_s=round(min(state.pauses), 4),
        what="restore start to first answer; pause_s: dump start to first answer")
