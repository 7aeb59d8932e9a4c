"""`make demo`: build the example templates, run a private `pool serve`, and time one app three ways:

    cold     boot the app from scratch (no CRIU) until its first HTTP answer
    restore  a spawn on a miss: the service restores a copy with CRIU, then hands over its identity
    warm     a spawn served from the warm pool: a copy restored ahead of time gets its identity

Everything lives under one temp dir (store, run dir, socket) and is removed at the end, copies
included. LocalService is also what the tests and benchmarks use to run a service subprocess.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pool.client import Client
from pool.cr import netns, sandbox
from pool.cr.criu import Criu
from pool.errors import NodeUnavailable
from pool.templates.build import app_environment, build
from pool.templates.spec import load_spec
from pool.templates.store import Store

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this is pool/cli/demo.py)
TEMPLATES = ROOT / "templates"
RUNS = {"cold": 3, "restore": 5, "warm": 9}
DEMO_TEMPLATES = ("py-hello", "java-hello", "jvm-app", "node-app", "py-embed")


# --- what a correct answer is, per template (the benchmarks use these too) -------------------------
@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    body: bytes | None
    check: Callable[[dict], bool]


def _hello_ok(r: dict) -> bool:
    return bool(r.get("instance"))

def _jvm_ok(r: dict) -> bool:
    i = 123457  # DataGen.score(i), the generator's own formula
    return r.get("key") == f"k{i:07d}" and r.get("score") == (i * 2654435761) % 1000003 \
        and r.get("category") == f"c{i % 211}" and 1 <= r.get("rank", 0) <= r.get("categorySize", 0)


def _embed_ok(r: dict) -> bool:
    v = r.get("embedding") or []
    return r.get("dim") == 384 and len(v) == 384 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3


def _ts_ok(r: dict) -> bool:
    js = r.get("js", "")
    return "const total = 1 + 2;" in js and ": number" not in js and "exports.default = total" in js


PROBES = {
    "py-hello": Probe("GET", "/", None, _hello_ok),
    "java-hello": Probe("GET", "/", None, _hello_ok),
    "jvm-app": Probe("GET", "/lookup?key=k0123457", None, _jvm_ok),
    "py-embed": Probe("POST", "/embed", b'{"text": "A warm pool answers in milliseconds."}', _embed_ok),
    "node-app": Probe("POST", "/transpile",
                      b'{"code": "const total: number = 1 + 2;\\nexport default total;\\n"}', _ts_ok),
}


class LocalService:
    """`pool serve` as a subprocess on private paths; a context manager that stops it (SIGTERM, then
    SIGKILL) and waits for it. Its log is in `log`."""

    def __init__(self, store: Path, workdir: Path, config: str = "", extra: tuple[str, ...] = (),
                 ready_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.socket = self.workdir / "pool.sock"
        self.log = self.workdir / "serve.log"
        self.config = self.workdir / "service.toml"
        self.config.write_text(config)
        self.env = {**os.environ, "POOL_RUN_DIR": str(self.workdir / "run"),
                    "POOL_SOCKET": str(self.socket), "POOL_STORE": str(store)}
        argv = [sys.executable, "-m", "pool.cli", "--store", str(store), "serve",
                "--socket", str(self.socket), "--config", str(self.config), *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self):
        return Client(self.socket)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pool serve exited with status {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if self.socket.exists():
                try:
                    with self.client() as c:
                        c.ping()
                    return
                except NodeUnavailable:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool serve did not answer within {timeout}s:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def wait_warm(self, template: str, n: int, timeout: float = 60.0, idle: bool = True) -> dict:
        """Until template has n (or more) warm copies; n = 0 means none. With idle, also no restore
        or kill under way."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                t = c.stats()["templates"].get(template)
                enough = t and (t["warm"] >= n if n else t["warm"] == 0)
                if enough and (not idle or (t["restoring"] == 0 and t["dying"] == 0)):
                    return t
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{template}: not {n} warm copies within {timeout}s: {t}")
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the three paths ----------------------------------------------------------------------------------
def cold_start(spec, timeout: float = 180.0) -> float:
    """Seconds from booting the app (own namespaces, no CRIU, no SDK channel) to its first correct
    answer."""

    probe, port = PROBES[spec.name], spec.network.port
    t0 = time.perf_counter()
    app = sandbox.boot(list(spec.command), cwd=spec.cwd, env=app_environment(spec), sdk=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = netns.http_in(app.netns, f"http://127.0.0.1:{port}{probe.path}",
                                             method=probe.method, body=probe.body, timeout=30.0)
                if status == 200 and probe.check(json.loads(body)):
                    return time.perf_counter() - t0
            except Exception:  # noqa: BLE001  not listening yet
                pass
            if app.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} did not answer on port {port}:\n{app.output.text()}")
            time.sleep(0.002)
    finally:
        app.kill()


def ask(address: str, probe: Probe, timeout: float = 30.0) -> dict:
    """One request to a published copy; raises if the answer is not correct."""
    req = urllib.request.Request(f"http://{address}{probe.path}", data=probe.body,
                                 method=probe.method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer = json.loads(r.read())
    if not probe.check(answer):
        raise RuntimeError(f"wrong answer from {address}{probe.path}: {str(answer)[:200]}")
    return answer


def timed_spawn(client, name: str) -> tuple[float, float, str]:
    """(spawn seconds, spawn-to-first-correct-answer seconds, path) of one spawn; killed after."""
    t0 = time.perf_counter()
    inst = client.spawn(name)
    t1 = time.perf_counter()
    try:
        ask(inst.address, PROBES[name])
        t2 = time.perf_counter()
    finally:
        inst.kill(grace=0)
    return t1 - t0, t2 - t0, inst.path


def build_templates(store_root: Path) -> list:
    criu, store, specs = Criu.locate(), Store(store_root), []
    for name in DEMO_TEMPLATES:
        folder = TEMPLATES / name
        if (folder / "build.sh").exists():  # compiles the app (its dependencies: setup-heavy.sh)
            subprocess.run([str(folder / "build.sh")], check=True)
        spec = load_spec(folder)
        print(f"building {name} ...", flush=True)
        build(spec, store, criu, progress=lambda m, n=name: print(f"  [{n}] {m}", flush=True))
        specs.append(spec)
    return specs


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="prewarm-demo-"))
    try:
        specs = build_templates(tmp / "store")
        # fixed pools (max_warm 0): the demo shows a miss and a warm spawn, not demand
        config = "".join(f"[templates.{s.name}]\nmin_warm = 2\nmax_warm = 0\nmax_live = 8\n\n"
                         for s in specs)
        rows = []
        with LocalService(tmp / "store", tmp, config) as svc, svc.client() as c:
            for spec in specs:
                name = spec.name
                print(f"\n{name}: cold starts ...", flush=True)
                cold = [cold_start(spec) for _ in range(RUNS["cold"])]
                print(f"{name}: spawns on a miss (min_warm 0) ...", flush=True)
                c.set_warm(name, 0)
                restore = []
                for _ in range(RUNS["restore"]):
                    svc.wait_warm(name, 0)
                    restore.append(timed_spawn(c, name))
                print(f"{name}: spawns from the warm pool (min_warm 2) ...", flush=True)
                c.set_warm(name, 2)
                warm = []
                for _ in range(RUNS["warm"]):
                    svc.wait_warm(name, 1)
                    warm.append(timed_spawn(c, name))
                cold_p50 = statistics.median(cold)
                rows.append((name, "cold", None, cold_p50, 1.0, len(cold)))
                for path, runs in (("restore", restore), ("warm", warm)):
                    assert all(r[2] == path for r in runs), f"expected every spawn on the {path} path"
                    sp, first = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                    rows.append((name, path, sp, first, cold_p50 / first, len(runs)))
        print()
        print(f"{'TEMPLATE':<12} {'PATH':<8} {'SPAWN p50':>10} {'FIRST ANSWER p50':>17} "
              f"{'vs COLD':>8} {'RUNS':>5}")
        for name, path, sp, first, x, n in rows:
            sp_text = "-" if sp is None else f"{sp * 1000:.2f} ms"
            print(f"{name:<12} {path:<8} {sp_text:>10} {first * 1000:>14.2f} ms {x:>7.1f}x {n:>5}")
        print("\nspawn: the client's round trip for pool.spawn(); first answer: from the request "
              "(or boot) to the app's first HTTP reply.")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
