"""`pool serve` socket-activated as systemd's pool.socket does it: the test binds and listens on the unix
socket and passes it as fd 3 with LISTEN_FDS=1 and LISTEN_PID = the service's pid. The service serves
spawns on it, leaves the socket file in place when it stops, and a client that connected while no
service ran is served by the next one."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from pool.client import Client
from tests.servicelab import ROOT, wait_until

# moves the socket to fd 3, sets LISTEN_PID to its own pid and execs the service: what systemd and
# systemd-socket-activate do
ACTIVATE = """
import os, sys
fd = int(os.environ.pop("SOCKET_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def start(listener: socket.socket, store, workdir, config) -> subprocess.Popen:
    fd = listener.fileno()
    env = {**os.environ, "SOCKET_FD": str(fd), "POOL_RUN_DIR": str(workdir / "run"),
           "POOL_STORE": str(store)}
    log = open(workdir / "serve.log", "ab")  # noqa: SIM115 (the child keeps it)
    with log:
        return subprocess.Popen([sys.executable, "-c", ACTIVATE, sys.executable, "-m", "pool.cli", "serve",
                                 "--config", str(config)], pass_fds=(fd,), env=env, cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def test_serve_takes_its_socket_from_systemd(session_store, py_hello, tmp_path):
    path = tmp_path / "pool.sock"
    config = tmp_path / "service.toml"
    config.write_text("[templates.py-hello]\nmin_warm = 1\nmax_live = 4\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    procs = []
    try:
        listener.bind(str(path))
        listener.listen(16)
        procs.append(start(listener, session_store.root, tmp_path, config))
        with Client(path, timeout=60) as c:
            assert c.ping()["pid"] == procs[0].pid
            assert c.stats()["socket"] == str(path)
            inst = c.spawn("py-hello", timeout=30)
            assert inst.info()["state"] == "running"
            inst.kill()
        assert stop(procs[0]) == 0
        assert path.is_socket()  # systemd's file: left in place for the next start

        # a client connecting between two services waits in the backlog and is served by the next
        answer = {}

        def ping_early():
            with Client(path, timeout=60) as early:
                answer["pid"] = early.ping()["pid"]

        waiting = threading.Thread(target=ping_early)
        waiting.start()
        procs.append(start(listener, session_store.root, tmp_path, config))
        waiting.join(90)
        assert answer == {"pid": procs[1].pid}
        assert stop(procs[1]) == 0
    finally:
        for p in procs:
            stop(p)
        listener.close()
    wait_until(lambda: not any(p.poll() is None for p in procs), what="services gone")
