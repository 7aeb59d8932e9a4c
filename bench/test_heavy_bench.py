"""What the pool is worth for three genuinely heavy apps (templates/jvm-app, py-embed, node-app).

Time to the first *correct* answer, six ways, interleaved round-robin in one run per template
(bench/interleave.py; the ways are in bench/firstanswer.py), so every figure has the same end point
and ratios compare like with like:

    cold        boot the app from scratch in the same sandbox (own pid/net namespaces, tini), no CRIU
    criu-cli    plain `criu restore -D IMAGE -d` on the template's image, identity sent by hand
    spawn-miss  pool.Client.spawn with no warm copy: the service restores one (path "restore")
    spawn-warm  pool.Client.spawn served from the warm pool (path "warm")
    peer        the runtime's own start-up aid: AppCDS (JVM), a forkserver with the model preloaded
                (Python), a V8 start-up snapshot (Node)
    lazy        criu-cli with post-copy memory (`criu lazy-pages` serving the image's pages through
                userfaultfd): not what the pool does today; measured to show what a miss could cost

plus image size (raw and zstd -1), RSS/PSS per copy with 1, 4, 8 copies alive, restore throughput at
concurrency 1, 2, 4, 8 and the first restore after dropping the page cache. Every figure lands in
benchmark.extra_info; bench/report.py turns them into tables and charts.
BENCH_QUICK=1 cuts every count to a couple of rounds. No timed asserts; wrong answers do fail.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import QUICK, ROOT
from firstanswer import (ask, boot_cold, criu_cli_restore, first_answer, free_port, in_ns,
                         lazy_restore, on_host, service_modes, spawn_to_answer)
from interleave import Mode, Sample, measure_interleaved

from pool.cli.demo import PROBES, LocalService
from pool.copies.restore import Identity, Restorer, new_instance_id
from pool.cr.criu import become_subreaper
from pool.templates.build import app_environment
from pool.templates.spec import load_spec

TEMPLATES = ("jvm-app", "py-embed", "node-app")
CYCLES, WARMUP = (2, 0) if QUICK else (20, 1)   # one discarded cycle: first-touch effects
MEMORY_COPIES = (1, 4) if QUICK else (1, 4, 8)
CONCURRENCY = (1, 2, 4, 8)


def record(benchmark, template: str, kind: str, **info) -> None:
    benchmark.extra_info.update(heavy=True, template=template, kind=kind, **info)


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heavy(template):
    """heavy(name): the image built once (its dependencies come with `make setup`)."""
    return template


@pytest.fixture(scope="module")
def restorer(bench_store, criu, bench_dir):
    return Restorer(bench_store, criu, bench_dir / "heavy-run")


@pytest.fixture(scope="module")
def service(heavy, bench_store, bench_dir):
    for name in TEMPLATES:
        heavy(name)
    workdir = bench_dir / "heavy-svc"
    workdir.mkdir(exist_ok=True)
    config = "[service]\nrestore_concurrency = 2\n" + "".join(
        f"[templates.{t}]\nmin_warm = 0\nmax_warm = 0\nmax_live = 16\n" for t in TEMPLATES)
    with LocalService(bench_store.root, workdir, config) as svc, svc.client() as client:
        yield svc, client


# --- the runtimes' own start-up aids (the "peer" mode) ------------------------------------------------
class AppCdsPeer:
    """AppCDS: a dynamic archive (-XX:ArchiveClassesAtExit) written by a training run that serves the
    benchmark's own request before it exits, so the archive holds the classes that request loads
    (HTTP server, Jackson writing), not only the start-up's; then cold boots with
    -XX:SharedArchiveFile=... -Xshare:on (fail rather than run without it) in the same sandbox."""

    def __init__(self, tmp: Path) -> None:
        spec = load_spec(ROOT / "templates/jvm-app")
        self.jsa = tmp / "jvm-app.jsa"
        self.jsa.unlink(missing_ok=True)
        java, *rest = spec.command
        port, log = free_port(), tmp / "appcds-training.log"
        with open(log, "wb") as out:
            train = subprocess.Popen([java, f"-XX:ArchiveClassesAtExit={self.jsa}", *rest], cwd=spec.cwd,
                                     env={**app_environment(spec), "PORT": str(port)}, stdout=out,
                                     stderr=subprocess.STDOUT)
        try:
            first_answer(on_host(f"127.0.0.1:{port}"), PROBES["jvm-app"], time.perf_counter(),
                         alive=lambda: train.poll() is None,
                         why=lambda: log.read_text(errors="replace")[-2000:])
        finally:
            train.terminate()  # SIGTERM: the JVM's orderly exit, which writes the dynamic archive
            train.wait(120)
        assert self.jsa.exists() and self.jsa.stat().st_size > 0, log.read_text(errors="replace")
        self.command = [java, f"-XX:SharedArchiveFile={self.jsa}", "-Xshare:on", *rest]
        self.info = {"peer": "AppCDS dynamic archive, trained on the benchmark's request",
                     "archive_bytes": self.jsa.stat().st_size}

    def start(self) -> Sample:
        return boot_cold("jvm-app", self.command)

    def close(self) -> None:
        pass


class NodeSnapshotPeer:
    """V8 start-up snapshot of the warmed-up heap (templates/node-app/snapshot-entry.js)."""

    def __init__(self, tmp: Path) -> None:
        spec = load_spec(ROOT / "templates/node-app")
        blob = tmp / "node-app.blob"
        subprocess.run(["node", "--snapshot-blob", str(blob), "--build-snapshot", "snapshot-entry.js"],
                       cwd=spec.cwd, env=app_environment(spec), check=True, capture_output=True,
                       timeout=300)
        self.command = ["node", "--snapshot-blob", str(blob)]
        self.info = {"peer": "node --snapshot-blob (V8 start-up snapshot)",
                     "archive_bytes": blob.stat().st_size}

    def start(self) -> Sample:
        return boot_cold("node-app", self.command)

    def close(self) -> None:
        pass


def copies_torch_threads(spec) -> int:
    """The intra-op thread count a py-embed copy runs with: the template sets none, so torch's default
    in the template's environment at build time (this machine)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         cwd=spec.cwd, env=app_environment(spec), check=True, capture_output=True,
                         text=True, timeout=300).stdout
    return int(out.split()[-1])


class ForkserverPeer:
    """templates/py-embed/forkserver_peer.py: a forkserver that preloaded the model (on one thread, so
    no OpenMP pool exists to be broken by fork); each start forks a worker that sets the copies' torch
    thread count and serves on its own host port. (Host network: the peer has no sandbox to pay for.)"""

    def __init__(self, tmp: Path) -> None:
        spec = load_spec(ROOT / "templates/py-embed")
        self.threads = copies_torch_threads(spec)
        # the forkserver only preloads modules it can import: the template folder on PYTHONPATH
        env = {**app_environment(spec), "PYTHONPATH": str(spec.cwd), "EMBED_THREADS": "1"}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "forkserver_peer.py", "--threads", str(self.threads)],
                                     cwd=spec.cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        hello = self.proc.stdout.readline().split()
        if hello != ["ready", "preloaded", "yes"]:
            self.close()
            raise AssertionError(f"forkserver peer: {hello}")
        self.info = {"peer": "multiprocessing forkserver, model preloaded",
                     "peer_first_start_s": round(time.perf_counter() - t0, 3),
                     "torch_threads": self.threads}

    def start(self) -> Sample:
        port = free_port()
        t0 = time.perf_counter()
        self.proc.stdin.write(f"spawn {port}\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()   # "pid N threads T"
        assert reply[:1] == ["pid"] and reply[2:] == ["threads", str(self.threads)], f"peer: {reply}"
        pid = reply[1]

        def stop() -> None:
            self.proc.stdin.write(f"stop {pid}\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().split() == ["stopped", pid]

        try:
            took = first_answer(on_host(f"127.0.0.1:{port}"), PROBES["py-embed"], t0)
        except BaseException:
            stop()
            raise
        return Sample(took, stop)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


PEERS = {"jvm-app": AppCdsPeer, "node-app": NodeSnapshotPeer, "py-embed": ForkserverPeer}


# --- time to first correct answer, all modes interleaved --------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_first_answer(benchmark, heavy, service, criu, bench_dir, lazy_pages_ok, name):
    template = heavy(name)
    svc, client = service
    become_subreaper()  # criu-cli and lazy reap their copies themselves
    idle, one_warm = service_modes(svc, client, name)
    tmp = bench_dir / "peer"
    tmp.mkdir(exist_ok=True)
    peer = PEERS[name](tmp)
    try:
        modes = [
            Mode("cold", lambda: boot_cold(name), idle),
            Mode("criu-cli", lambda: criu_cli_restore(criu, template, bench_dir / "criu-cli" / name), idle),
            Mode("spawn-miss", lambda: spawn_to_answer(client, name, "restore"), idle),
            Mode("spawn-warm", lambda: spawn_to_answer(client, name, "warm"), one_warm),
            Mode("peer", peer.start, idle),
            Mode("lazy", lambda: lazy_restore(criu, template, bench_dir / "lazy" / name), idle),
        ]
        measure_interleaved(benchmark, name, modes, CYCLES, WARMUP, heavy=True, **peer.info)
    finally:
        peer.close()
        idle()


# --- image size -------------------------------------------------------------------------------------
def compressed_size(folder: Path) -> tuple[int, str]:
    """Bytes of every image file compressed with zstd -1 (or gzip -1 without zstandard)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    try:
        import zstandard  # noqa: PLC0415

        cctx, how = zstandard.ZstdCompressor(level=1, threads=-1), "zstd -1"
        compress = cctx.compress
    except ImportError:
        import gzip  # noqa: PLC0415

        how = "gzip -1 (python zstandard not installed)"
        compress = lambda b: gzip.compress(b, compresslevel=1)  # noqa: E731
    return sum(len(compress(p.read_bytes())) for p in files), how


@pytest.mark.parametrize("name", TEMPLATES)
def test_image(benchmark, heavy, name):
    template = heavy(name)
    result = {}

    def compress():
        t0 = time.perf_counter()
        result["bytes"], result["how"] = compressed_size(template.image_dir)
        result["s"] = time.perf_counter() - t0

    benchmark.pedantic(compress, rounds=1)
    m = template.manifest.to_dict()
    record(benchmark, name, "image", image_bytes=template.image_bytes,
           compressed_bytes=result["bytes"], compression=result["how"],
           compress_s=round(result["s"], 3), dump_s=m.get("dump_s"),
           build_boot_to_ready_s=m.get("boot_to_ready_s"), rss_at_dump_bytes=m.get("rss_bytes"))


# --- memory per copy ----------------------------------------------------------------------------------
def spawn_answered(restorer: Restorer, name: str):
    inst = restorer.spawn(name, Identity(new_instance_id()))
    try:
        ask(in_ns(inst.netns_fd, inst.port), PROBES[name])
    except BaseException:
        inst.kill(grace=0)
        inst.close()
        raise
    return inst


def kill_all(instances) -> None:
    for inst in instances:
        inst.kill(grace=0)
        inst.close()


@pytest.mark.parametrize("copies", MEMORY_COPIES)
@pytest.mark.parametrize("name", TEMPLATES)
def test_memory(benchmark, heavy, restorer, name, copies):
    """RSS and PSS per copy with `copies` restored copies alive, each having answered once."""
    heavy(name)
    alive: list = []

    def restore_all():
        with ThreadPoolExecutor(min(copies, 4)) as ex:
            alive.extend(ex.map(lambda _: spawn_answered(restorer, name), range(copies)))

    try:
        benchmark.pedantic(restore_all, rounds=1)
        stats = [inst.stats() for inst in alive]
    finally:
        kill_all(alive)
    record(benchmark, name, "memory", copies=copies,
           rss_per_copy_bytes=int(statistics.mean(s["rss_bytes"] for s in stats)),
           pss_per_copy_bytes=int(statistics.mean(s["pss_bytes"] for s in stats)),
           pss_total_bytes=sum(s["pss_bytes"] for s in stats))


# --- throughput -------------------------------------------------------------------------------------
def restore_answer_kill(restorer: Restorer, name: str) -> None:
    kill_all([spawn_answered(restorer, name)])


@pytest.mark.parametrize("concurrency", CONCURRENCY)
@pytest.mark.parametrize("name", TEMPLATES)
def test_throughput(benchmark, heavy, restorer, name, concurrency):
    """Copies restored to a correct answer per second with `concurrency` restores at once."""
    heavy(name)
    batch = concurrency * (1 if QUICK else 3)
    rates: list[float] = []

    def run_batch():
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(lambda _: restore_answer_kill(restorer, name), range(batch)))
        rates.append(batch / (time.perf_counter() - t0))

    benchmark.pedantic(run_batch, rounds=1 if QUICK else 2)
    record(benchmark, name, "throughput", concurrency=concurrency, copies_per_batch=batch,
           copies_per_second=round(statistics.median(rates), 3))


# --- page cache: first restore after drop_caches versus warm ------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.mark.parametrize("name", TEMPLATES)
def test_page_cache(benchmark, heavy, restorer, name):
    heavy(name)

    def once() -> float:
        t0 = time.perf_counter()
        restore_answer_kill(restorer, name)
        return time.perf_counter() - t0

    restorer.prepare(name)
    once()  # an earlier test's drop_caches may have emptied the cache: fill it first
    warm = [once() for _ in range(2 if QUICK else 5)]
    cold_cache: list[float] = []
    benchmark.pedantic(lambda: cold_cache.append(once()), setup=drop_caches,
                       rounds=1 if QUICK else 3)
    record(benchmark, name, "page-cache", warm_cache_p50_s=round(statistics.median(warm), 4),
           dropped_cache_p50_s=round(statistics.median(cold_cache), 4),
           dropped_cache_samples_s=[round(x, 4) for x in cold_cache])
