"""A real etcd (Debian's etcd-server) for tests and benchmarks: one member, a data dir of its own,
started and always stopped by its owner.

    with EtcdServer(tmp_path / "etcd") as etcd:                 # on 127.0.0.1, free ports
        etcd.url                                                 # http://127.0.0.1:PORT
    with EtcdServer(dir, host=lab.address("n1"), popen=lambda argv, **kw: lab.popen("n1", argv, **kw)):
        ...                                                      # inside a NetLab host

restart() stops it (SIGTERM) and starts it again on the same ports and data, as an operator's
restart would: its keys and leases survive. stop(kill=True) is a crash.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", client_port: int | None = None,
                 peer_port: int | None = None, popen=None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._popen = popen or (lambda argv, **kw: subprocess.Popen(argv, **kw))
        self._probe = self._probe_here    # () -> bool: does etcd answer? (in_lab: from inside)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 30) -> "EtcdServer":
        peer = f"http://{self.host}:{self.peer_port}"
        log = open(self.workdir / "etcd.log", "ab")  # noqa: SIM115  closed below
        try:
            self.proc = self._popen(
                [ETCD, "--name", "test", "--data-dir", str(self.workdir / "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._probe():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError("etcd did not start:\n" + self.log()[-2000:])
            time.sleep(0.1)
        return self

    def _probe_here(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        p = self.workdir / "etcd.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)


def in_lab(lab, host: str, workdir: Path) -> EtcdServer:
    """An etcd in a NetLab host, on its lab address (agents in the other hosts reach it there)."""
    def probe(server: EtcdServer) -> bool:
        s = lab.socket(host)
        try:
            s.settimeout(1)
            s.connect((server.host, server.client_port))
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            return s.recv(64).split(b" ")[1:2] == [b"200"]
        except OSError:
            return False
        finally:
            s.close()

    server = EtcdServer(workdir, host=lab.address(host), client_port=2379, peer_port=2380,
                        popen=lambda argv, **kw: lab.popen(host, argv, **kw))
    server._probe = lambda: probe(server)
    return server
