"""The ways to get a template's app to its first correct answer, each returning an interleave.Sample:

    boot_cold         boot the app from scratch in the pool's sandbox (own namespaces, tini), no CRIU;
                      SDK apps run without a control channel, so checkpoint() returns at once
    criu_cli_restore  plain `criu restore -D IMAGE -d`, stdio and SDK control pipes given with
                      --inherit-fd, the identity sent by hand: CRIU alone, no pool
    lazy_restore      the same with post-copy memory (`criu lazy-pages` through userfaultfd)
    spawn_to_answer   pool.Client.spawn, then the first request through the published host port

The clock starts before the path's first action and stops when an HTTP request has returned 200 with
a body the template's Probe (pool.cli.demo.PROBES) accepts. Refused/unreachable/reset means "not
listening yet": poll again after 5 ms. A wrong status or body fails the benchmark.
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT
from interleave import Sample

from pool.cli.demo import PROBES, Probe
from pool.copies.restore import new_instance_id
from pool.cr import netns, sandbox
from pool.cr.criu import RestoreOptions
from pool.templates.build import app_environment
from pool.templates.spec import load_spec
from pool.wire import control

POLL_S = 0.005
ANSWER_TIMEOUT = 300.0


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


# --- cold ---------------------------------------------------------------------------------------------
def boot_cold(name: str, command: list[str] | None = None, env: dict | None = None, *,
              folder: Path | None = None, probe: Probe | None = None) -> Sample:
    """One boot (the template's command, or `command`) to its first correct answer, in the sandbox.
    folder: the template's folder when it is not templates/NAME; probe: when it has none in PROBES."""
    spec = load_spec(folder or ROOT / "templates" / name)
    t0 = time.perf_counter()
    app = sandbox.boot(command or list(spec.command), cwd=spec.cwd,
                       env={**app_environment(spec), **(env or {})}, sdk=False)
    try:
        took = first_answer(in_ns(app.netns, spec.network.port), probe or PROBES[name], t0,
                            alive=lambda: app.exited() is None, why=app.output.text)
    except BaseException:
        app.kill()
        raise
    return Sample(took, app.kill)


# --- plain criu restore, eager or lazy ----------------------------------------------------------------
def sdk_handshake(ctl_w: int, ctl_r: int) -> None:
    control.write_frame(ctl_w, {"type": "identity", "instance_id": new_instance_id(), "env": {},
                                "args": [], "hostname": None, "seed": 1, "deadline": time.time() + 30})
    ack = control.read_frame(ctl_r, time.monotonic() + 30)
    assert ack.get("type") == "ack", ack


def _stdio_and_control(template, workdir: Path) -> tuple[dict[str, int], list[int]]:
    """Fresh stdio files and, for SDK apps, control pipes to stand in for the template's (by pipe
    inode): ({manifest pipe key: fd the copy gets}, [our ends: ctl_w, ctl_r])."""
    fds = {s: os.open(workdir / f"{s}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
           for s in ("stdout", "stderr")}
    ours: list[int] = []
    if template.manifest.sdk:
        fds["ctl_in"], ctl_w = os.pipe()     # we write the identity, the copy reads
        ctl_r, fds["ctl_out"] = os.pipe()    # the copy acks
        ours = [ctl_w, ctl_r]
    return fds, ours


def _answer_from_restored(template, pid: int, ours: list[int], workdir: Path, t0: float,
                          cleanup: Callable[[], None]) -> Sample:
    m = template.manifest.to_dict()
    try:
        if ours:
            sdk_handshake(*ours)
        took = first_answer(in_ns(f"/proc/{pid}/ns/net", m["spec"]["network"]["port"]),
                            PROBES[template.name], t0,
                            why=lambda: (workdir / "stderr.log").read_text(errors="replace")[-2000:])
    except BaseException:
        cleanup()
        raise
    return Sample(took, cleanup)


def _kill_restored(pid: int, ours: list[int], daemon=None) -> Callable[[], None]:
    def cleanup() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)      # ours: the bench process is a child subreaper
        if daemon is not None:
            daemon.kill()
        for fd in ours:
            os.close(fd)
    return cleanup


def criu_cli_restore(criu, template, workdir: Path) -> Sample:
    """`criu restore -d` by hand (the caller must be a child subreaper), then the identity frame."""
    m = template.manifest.to_dict()
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "pid"
    pidfile.unlink(missing_ok=True)          # must not exist, or the restore fails
    t0 = time.perf_counter()
    # one fd per key: CRIU consumes an inherited fd, so two keys cannot share one
    fds, ours = _stdio_and_control(template, workdir)
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
    return _answer_from_restored(template, pid, ours, workdir, t0, _kill_restored(pid, ours))


def lazy_restore(criu, template, workdir: Path) -> Sample:
    """Post-copy: a `criu lazy-pages` daemon reads the image's pages and hands each to the copy on its
    first touch (userfaultfd); the restore itself maps no memory. Needs fs.pipe-max-size >= 4 MiB."""
    m = template.manifest.to_dict()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    fds, ours = _stdio_and_control(template, workdir)
    daemon = None
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
    return _answer_from_restored(template, pid, ours, workdir, t0, _kill_restored(pid, ours, daemon))


# --- through the pool service ---------------------------------------------------------------------------
def spawn_to_answer(client, name: str, want_path: str, probe: Probe | None = None) -> Sample:
    """pool.Client.spawn to the first correct answer through the published port. Also records the
    spawn call alone at the client (spawn_call_s) and the service's own spawn_ms (request in to reply
    out): the first answer minus the spawn call is the app's first request. probe: for a template
    with none in PROBES."""
    t0 = time.perf_counter()
    inst = client.spawn(name, timeout=120)
    spawn_call_s = time.perf_counter() - t0

    def kill() -> None:
        inst.kill(grace=0)

    try:
        assert inst.path == want_path, f"expected a {want_path} spawn, got {inst.path}"
        took = first_answer(on_host(inst.address), probe or PROBES[name], t0)
    except BaseException:
        kill()
        raise
    return Sample(took, kill, {"spawn_call_s": spawn_call_s, "service_spawn_ms": inst.spawn_ms})


def service_modes(svc, client, name: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(idle, one_warm): prepare steps. idle: no warm copy and nothing restoring or dying, for every
    mode but the warm one, so no refill competes with it; one_warm: exactly the warm pool's copy."""
    def idle() -> None:
        client.set_warm(name, 0)
        svc.wait_warm(name, 0, timeout=120)

    def one_warm() -> None:
        client.set_warm(name, 1)
        svc.wait_warm(name, 1, timeout=120)

    return idle, one_warm
