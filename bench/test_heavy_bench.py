"""What the pool is worth for three genuinely heavy apps (templates/jvm-app, py-embed, node-app).

Time to the first *correct* answer, five ways, each in the same run so ratios compare like with like:

    cold        boot the app from scratch in the same sandbox (own pid/net namespaces, tini), no CRIU;
                SDK apps run without a control channel, so checkpoint() returns at once
    criu-cli    plain `criu restore -D IMAGE -d` on the template's image, stdio and the SDK control
                pipes given with --inherit-fd, identity sent by hand: what you get with CRIU alone
    spawn-miss  pool.Client.spawn with no warm copy: the service restores one (path "restore")
    spawn-warm  pool.Client.spawn served from the warm pool (path "warm")
    peer        the runtime's own start-up aid: AppCDS (JVM), a forkserver with the model preloaded
                (Python), a V8 start-up snapshot (Node)
    lazy        criu-cli with post-copy memory (`criu lazy-pages` serving the image's pages through
                userfaultfd): not what the pool does today; measured to show what a miss could cost

plus image size (raw and zstd -1), RSS/PSS per copy with 1, 4, 8 copies alive, restore throughput at
concurrency 1, 2, 4, 8 and the first restore after dropping the page cache. Every figure lands in
benchmark.extra_info (kind, template, mode, samples); bench/report.py turns them into tables and charts.
BENCH_QUICK=1 cuts every count to a couple of rounds. No timed asserts; wrong answers do fail.
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import QUICK, ROOT

from pool.wire import control

from pool.cr import netns

from pool.cr import sandbox
from pool.templates.build import app_environment
from pool.cr.criu import RestoreOptions, become_subreaper
from pool.cli.demo import LocalService
from pool.copies.restore import Identity, Restorer, new_instance_id
from pool.templates.spec import load_spec

TEMPLATES = ("jvm-app", "py-embed", "node-app")
N = {"cold": 2, "criu-cli": 2, "spawn-miss": 2, "spawn-warm": 3, "peer": 2, "lazy": 2} if QUICK else \
    {"cold": 10, "criu-cli": 20, "spawn-miss": 20, "spawn-warm": 30, "peer": 10, "lazy": 20}
WARMUP_ROUNDS = 0 if QUICK else 1     # one discarded round per mode: first-touch effects
MEMORY_COPIES = (1, 4) if QUICK else (1, 4, 8)
CONCURRENCY = (1, 2, 4, 8)
POLL_S = 0.005
ANSWER_TIMEOUT = 300.0


# What a correct answer is, per template: shared with `make demo` (pool/cli/demo.py).
from pool.cli.demo import PROBES, Probe  # noqa: E402


class NotReady(Exception):
    pass


# nothing listens yet: refused; loopback not up yet in a just-made namespace; namespace not there yet
NOT_LISTENING = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.ENOENT}


def ask(connect: Callable[[], socket.socket], probe: Probe, timeout: float = 30.0) -> None:
    """One request; NotReady if nothing listens yet; AssertionError on a wrong answer."""
    try:
        sock = connect()
    except OSError as e:
        if e.errno not in NOT_LISTENING:
            raise
        raise NotReady(str(e)) from e
    conn = http.client.HTTPConnection("127.0.0.1", timeout=timeout)
    conn.sock = sock
    try:
        sock.settimeout(timeout)
        conn.request(probe.method, probe.path, body=probe.body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError) as e:
        raise NotReady(str(e)) from e  # a port proxy whose copy is not listening yet
    finally:
        conn.close()
    assert resp.status == 200, f"{probe.path}: HTTP {resp.status}: {body[:300]!r}"
    assert probe.check(json.loads(body)), f"{probe.path}: wrong answer {body[:300]!r}"


def first_answer(connect, probe: Probe, t0: float, alive: Callable[[], bool] = lambda: True,
                 why: Callable[[], str] = lambda: "") -> float:
    """Poll until the first correct answer; seconds since t0."""
    deadline = t0 + ANSWER_TIMEOUT
    while True:
        try:
            ask(connect, probe)
            return time.perf_counter() - t0
        except NotReady:
            pass
        if not alive():
            raise RuntimeError(f"the app died before answering:\n{why()}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no answer within {ANSWER_TIMEOUT}s:\n{why()}")
        time.sleep(POLL_S)


def in_ns(ns, port: int):
    return lambda: netns.connect_in(ns, port, timeout=5)


def on_host(address: str):
    host, _, port = address.rpartition(":")
    return lambda: socket.create_connection((host, int(port)), timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 30 samples is the maximum: say so, do not interpolate)."""
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def record(benchmark, template: str, kind: str, mode: str | None = None, **info) -> None:
    benchmark.extra_info.update(heavy=True, template=template, kind=kind, **info)
    if mode:
        benchmark.extra_info["mode"] = mode


def measure(benchmark, template: str, mode: str, start: Callable[[], tuple[Callable, float]],
            setup: Callable[[], None] | None = None, **info) -> list[float]:
    """Run start() N[mode] times (+ warm-up rounds); start returns (cleanup, seconds to first answer).
    pytest-benchmark times start() itself; cleanup (killing the copy) runs untimed in teardown."""
    live: list[Callable] = []
    samples: list[float] = []

    def target():
        cleanup, took = start()
        live.append(cleanup)
        samples.append(took)

    def teardown():
        while live:
            live.pop()()

    try:
        before = (lambda: setup() and None) if setup else None  # a value returned would become args
        benchmark.pedantic(target, setup=before, teardown=teardown, rounds=N[mode],
                           warmup_rounds=WARMUP_ROUNDS)
    finally:
        teardown()
    kept = samples[WARMUP_ROUNDS:]
    record(benchmark, template, "latency", mode, samples_s=[round(x, 5) for x in kept],
           p50_s=round(statistics.median(kept), 5), p99_s=round(pct(kept, 99), 5), **info)
    return kept


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
        f"[templates.{t}]\nmin_warm = 0\nmax_live = 16\n" for t in TEMPLATES)
    with LocalService(bench_store.root, workdir, config) as svc, svc.client() as client:
        yield svc, client


def boot_cold(name: str, command: list[str] | None = None, env: dict | None = None):
    """(cleanup, seconds) for one cold boot to first correct answer, in the pool's own sandbox."""
    spec = load_spec(ROOT / "templates" / name)
    t0 = time.perf_counter()
    app = sandbox.boot(command or list(spec.command), cwd=spec.cwd,
                       env={**app_environment(spec), **(env or {})}, sdk=False)
    try:
        took = first_answer(in_ns(app.netns, spec.network.port), PROBES[name], t0,
                            alive=lambda: app.exited() is None, why=app.output.text)
    except BaseException:
        app.kill()
        raise
    return app.kill, took


# --- (a) cold -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_cold(benchmark, heavy, name):
    heavy(name)
    measure(benchmark, name, "cold", lambda: boot_cold(name))


# --- (b) plain criu restore --------------------------------------------------------------------------
def criu_cli_restore(criu, template, workdir: Path):
    """`criu restore -d` by hand: fresh stdio files and, for SDK apps, control pipes in place of the
    template's (by pipe inode), then the identity frame; (cleanup, seconds to first answer)."""
    m, name = template.manifest.to_dict(), template.name
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "pid"
    pidfile.unlink(missing_ok=True)          # must not exist, or the restore fails
    t0 = time.perf_counter()
    # one fd per key: CRIU consumes an inherited fd, so two keys cannot share one
    fds = {s: os.open(workdir / f"{s}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
           for s in ("stdout", "stderr")}
    ours: list[int] = []
    sdk = "ctl_in" in m["pipes"]
    if sdk:
        fds["ctl_in"], ctl_w = os.pipe()     # we write the identity, the copy reads
        ctl_r, fds["ctl_out"] = os.pipe()    # the copy acks
        ours = [ctl_w, ctl_r]
    argv = [criu.binary, "restore", "-D", str(template.image_dir), "-d", "--pidfile", str(pidfile),
            "-W", str(workdir), "-o", "restore.log", "--file-locks"]
    for key, fd in fds.items():
        argv += ["--inherit-fd", f"fd[{fd}]:pipe:[{m['pipes'][key]}]"]
    try:
        subprocess.run(argv, pass_fds=sorted(fds.values()), check=True, timeout=120,
                       capture_output=True)
    except subprocess.CalledProcessError as e:
        for fd in ours:
            os.close(fd)
        log = (workdir / "restore.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"criu restore failed: {e.stderr[-500:]!r}\n{log}") from e
    finally:
        for fd in fds.values():
            os.close(fd)
    pid = int(pidfile.read_text())

    def cleanup():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)      # ours: the bench process is a child subreaper
        for fd in ours:
            os.close(fd)

    try:
        if sdk:
            sdk_handshake(ctl_w, ctl_r)
        port = m["spec"]["network"]["port"]
        took = first_answer(in_ns(f"/proc/{pid}/ns/net", port), PROBES[name], t0,
                            why=lambda: (workdir / "stderr.log").read_text(errors="replace")[-2000:])
    except BaseException:
        cleanup()
        raise
    return cleanup, took


def sdk_handshake(ctl_w: int, ctl_r: int) -> None:
    control.write_frame(ctl_w, {"type": "identity", "instance_id": new_instance_id(), "env": {},
                                "args": [], "hostname": None, "seed": 1, "deadline": time.time() + 30})
    ack = control.read_frame(ctl_r, time.monotonic() + 30)
    assert ack.get("type") == "ack", ack


def lazy_restore(criu, template, workdir: Path):
    """Post-copy: a `criu lazy-pages` daemon reads the image's pages and hands each to the copy on its
    first touch (userfaultfd); the restore itself maps no memory. (cleanup, seconds to first answer)"""
    m, name = template.manifest.to_dict(), template.name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    fds = {s: os.open(workdir / f"{s}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
           for s in ("stdout", "stderr")}
    ours: list[int] = []
    if "ctl_in" in m["pipes"]:
        fds["ctl_in"], ctl_w = os.pipe()
        ctl_r, fds["ctl_out"] = os.pipe()
        ours = [ctl_w, ctl_r]
    daemon = pid = None
    try:
        daemon = criu.lazy_pages(template.image_dir, workdir)
        pid = criu.restore(template.image_dir, log_dir=workdir, timeout=60, opts=RestoreOptions(
            inherit_fds={f"pipe:[{m['pipes'][k]}]": fd for k, fd in fds.items()}, lazy_pages=True))
    except BaseException:
        for fd in ours:
            os.close(fd)
        if daemon is not None:
            daemon.kill()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)

    def cleanup():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        daemon.kill()
        for fd in ours:
            os.close(fd)

    try:
        if ours:
            sdk_handshake(*ours)
        took = first_answer(in_ns(f"/proc/{pid}/ns/net", m["spec"]["network"]["port"]), PROBES[name],
                            t0, why=lambda: (workdir / "stderr.log").read_text(errors="replace"))
    except BaseException:
        cleanup()
        raise
    return cleanup, took


@pytest.fixture(scope="module")
def lazy_ok():
    """criu-notes: CRIU cannot grow its pipes here, so lazy pages need fs.pipe-max-size >= 4 MiB."""
    knob = Path("/proc/sys/fs/pipe-max-size")
    old = knob.read_text().strip()
    if int(old) < 4 << 20:
        knob.write_text(str(4 << 20))
    yield
    knob.write_text(old)


@pytest.mark.parametrize("name", TEMPLATES)
def test_lazy(benchmark, heavy, criu, bench_dir, lazy_ok, name):
    template = heavy(name)
    become_subreaper()
    measure(benchmark, name, "lazy", lambda: lazy_restore(criu, template, bench_dir / "lazy" / name))


@pytest.mark.parametrize("name", TEMPLATES)
def test_criu_cli(benchmark, heavy, criu, bench_dir, name):
    template = heavy(name)
    become_subreaper()
    measure(benchmark, name, "criu-cli",
            lambda: criu_cli_restore(criu, template, bench_dir / "criu-cli" / name))


# --- (c), (d) through the pool service --------------------------------------------------------------
def spawn_once(client, name: str, want_path: str, service_ms: list[float]):
    t0 = time.perf_counter()
    inst = client.spawn(name, timeout=120)
    service_ms.append(inst.spawn_ms)  # the service's own view: request in to reply out
    try:
        assert inst.path == want_path, f"expected a {want_path} spawn, got {inst.path}"
        took = first_answer(on_host(inst.address), PROBES[name], t0)
    except BaseException:
        inst.kill(grace=0)
        raise
    return (lambda: inst.kill(grace=0)), took


@pytest.mark.parametrize("name", TEMPLATES)
def test_spawn_miss(benchmark, service, name):
    svc, client = service
    client.set_warm(name, 0)
    service_ms: list[float] = []
    measure(benchmark, name, "spawn-miss", lambda: spawn_once(client, name, "restore", service_ms),
            setup=lambda: svc.wait_warm(name, 0, timeout=120))
    benchmark.extra_info["service_spawn_p50_ms"] = round(statistics.median(service_ms[WARMUP_ROUNDS:]), 2)


@pytest.mark.parametrize("name", TEMPLATES)
def test_spawn_warm(benchmark, service, name):
    svc, client = service
    client.set_warm(name, 1)
    try:
        # each round starts with a full, idle pool: it measures the warm path and nothing else
        service_ms: list[float] = []
        measure(benchmark, name, "spawn-warm", lambda: spawn_once(client, name, "warm", service_ms),
                setup=lambda: svc.wait_warm(name, 1, timeout=120))
        benchmark.extra_info["service_spawn_p50_ms"] = round(statistics.median(service_ms[WARMUP_ROUNDS:]), 2)
    finally:
        client.set_warm(name, 0)
        svc.wait_warm(name, 0, timeout=120)


# --- (e) the runtime's own start-up aid --------------------------------------------------------------
def _jvm_appcds(tmp: Path):
    """AppCDS: a dynamic archive of every class the start-up loads (-XX:ArchiveClassesAtExit), then
    cold boots with -XX:SharedArchiveFile. Returns the start function."""
    spec = load_spec(ROOT / "templates/jvm-app")
    jsa = tmp / "jvm-app.jsa"
    cmd = list(spec.command)
    subprocess.run([cmd[0], f"-XX:ArchiveClassesAtExit={jsa}", *cmd[1:], "--exit-after-start"],
                   cwd=spec.cwd, env={**app_environment(spec), "PORT": str(free_port())},
                   check=True, capture_output=True, timeout=300)
    assert jsa.stat().st_size > 0
    with_cds = [cmd[0], f"-XX:SharedArchiveFile={jsa}", "-Xshare:on", *cmd[1:]]  # on: fail if unusable
    return (lambda: boot_cold("jvm-app", with_cds)), {"peer": "AppCDS dynamic archive",
                                                      "archive_bytes": jsa.stat().st_size}


def _node_snapshot(tmp: Path):
    """V8 start-up snapshot of the warmed-up heap (templates/node-app/snapshot-entry.js)."""
    spec = load_spec(ROOT / "templates/node-app")
    blob = tmp / "node-app.blob"
    subprocess.run(["node", "--snapshot-blob", str(blob), "--build-snapshot", "snapshot-entry.js"],
                   cwd=spec.cwd, env=app_environment(spec), check=True, capture_output=True,
                   timeout=300)
    return (lambda: boot_cold("node-app", ["node", "--snapshot-blob", str(blob)])), \
        {"peer": "node --snapshot-blob (V8 start-up snapshot)", "archive_bytes": blob.stat().st_size}


class ForkserverPeer:
    """templates/py-embed/forkserver_peer.py: a forkserver that preloaded the model; each spawn forks a
    worker serving on its own host port. (Host network: the peer has no sandbox to pay for.)"""

    def __init__(self) -> None:
        spec = load_spec(ROOT / "templates/py-embed")
        # the forkserver only preloads modules it can import: the template folder on PYTHONPATH
        env = {**app_environment(spec), "PYTHONPATH": str(spec.cwd), "EMBED_THREADS": "1"}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "forkserver_peer.py"], cwd=spec.cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self.proc.stdout.readline().split()
        assert hello == ["ready", "preloaded", "yes"], f"forkserver peer: {hello}"
        self.first_start_s = time.perf_counter() - t0

    def start(self):
        port = free_port()
        t0 = time.perf_counter()
        self.proc.stdin.write(f"spawn {port}\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()   # "pid N"
        assert reply[:1] == ["pid"], f"peer: {reply}"
        pid = int(reply[1])
        took = first_answer(on_host(f"127.0.0.1:{port}"), PROBES["py-embed"], t0)

        def cleanup():
            self.proc.stdin.write(f"stop {pid}\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().startswith("stopped")
        return cleanup, took

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("name", TEMPLATES)
def test_peer(benchmark, heavy, bench_dir, name):
    heavy(name)
    tmp = bench_dir / "peer"
    tmp.mkdir(exist_ok=True)
    if name == "py-embed":
        peer = ForkserverPeer()
        try:
            measure(benchmark, name, "peer", peer.start,
                    peer="multiprocessing forkserver, model preloaded",
                    peer_first_start_s=round(peer.first_start_s, 3))
        finally:
            peer.close()
        return
    start, info = (_jvm_appcds if name == "jvm-app" else _node_snapshot)(tmp)
    measure(benchmark, name, "peer", start, **info)


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
