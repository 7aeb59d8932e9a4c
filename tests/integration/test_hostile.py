"""Hostile input and floods against a real `pool serve` with real CRIU: what one caller sends never
harms the template or the other callers. After each scenario the template still spawns, is not
quarantined, `pool ls` tells the truth and the service's fds are back to where they were."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest
from servicelab import cli, wait_until

from pool.cli.demo import PROBES, ask
from pool.config import Limits
from pool.errors import BadRequest, NoCapacity
from pool.wire import protocol as P

pytestmark = pytest.mark.integration
ONE_WARM = "[templates.py-hello]\nmin_warm = 1\nmax_live = 8\n"


def fd_count(svc) -> int:
    """The service's open fds, less the files under /proc it opens for a moment to read a copy's stats."""
    fd_dir = f"/proc/{svc.pid}/fd"
    links = []
    for fd in os.listdir(fd_dir):
        try:
            links.append(os.readlink(f"{fd_dir}/{fd}"))
        except FileNotFoundError:  # closed while we looked
            pass
    return sum(not link.startswith("/proc/") for link in links)


def settled_fds(svc) -> int:
    """The service's fd count with its pool full and idle (one warm copy, nothing live) and unchanged
    for half a second (the connection wait_warm asked on is closed on the service's side soon after)."""
    svc.wait_warm("py-hello", 1)
    readings = [fd_count(svc)]
    while len(readings) < 5 or len(set(readings[-5:])) > 1:
        assert len(readings) < 200, f"the service's fd count does not settle: {readings[-10:]}"
        time.sleep(0.1)
        readings.append(fd_count(svc))
    return readings[-1]


def still_serves(svc, fds_before: int) -> None:
    """The template is healthy and spawns, `pool ls` shows exactly the live copy, and once it is gone
    the service holds the fds it held before the scenario."""
    with svc.client() as c:
        t = c.stats()["templates"]["py-hello"]
        assert not t["quarantined"] and t["failures_in_a_row"] == 0 and t["restore_failures"] == 0, t
        inst = c.spawn("py-hello")
        assert ask(inst.address, PROBES["py-hello"])["instance"] == inst.id
        assert [r["id"] for r in json.loads(cli(svc, "ls", "--json").stdout)] == [inst.id]
        inst.kill(grace=0)
        assert json.loads(cli(svc, "ls", "--json").stdout) == []
    wait_until(lambda: settled_fds(svc) == fds_before, what=f"the service back at {fds_before} fds")


def test_a_bad_hostname_three_times_is_refused_and_never_quarantines(service):
    svc = service(ONE_WARM)
    fds = settled_fds(svc)
    for _ in range(3):
        r = cli(svc, "spawn", "py-hello", "--hostname", "h" * 80, check=False)
        assert r.returncode != 0 and "parameter 'hostname'" in r.stderr, r.stderr
    with svc.client() as c:
        for hostname in ("-lead", "sp ace", "x" * 65):
            with pytest.raises(BadRequest) as e:
                c.spawn("py-hello", hostname=hostname)
            assert e.value.data["param"] == "hostname"
    still_serves(svc, fds)


def test_a_bad_env_name_three_times_is_refused_and_never_quarantines(service):
    svc = service(ONE_WARM)
    fds = settled_fds(svc)
    with svc.client() as c:
        for _ in range(3):
            with pytest.raises(BadRequest) as e:
                c.spawn("py-hello", env={"A=B": "1"})
            assert (e.value.data["param"], e.value.data["key"]) == ("env", "A=B")
        for env, key in (({"": "1"}, ""), ({"V": "nul\0inside"}, "V")):
            with pytest.raises(BadRequest) as e:
                c.spawn("py-hello", env=env)
            assert e.value.data["key"] == key
        with pytest.raises(BadRequest) as e:
            c.spawn("py-hello", args=["ok", "nul\0inside"])
        assert (e.value.data["param"], e.value.data["index"]) == ("args", 1)
    still_serves(svc, fds)


def warm_app(svc) -> psutil.Process:
    """The app process of the one warm copy (the copy's tini is the service's child)."""
    (tini,) = [p for p in psutil.Process(svc.pid).children() if p.name() == "tini"]
    (app,) = tini.children()
    return app


def test_a_huge_env_is_refused_and_a_big_one_never_stalls_the_service(service):
    svc = service(ONE_WARM)
    fds = settled_fds(svc)
    with svc.client() as c:
        with pytest.raises(BadRequest) as e:
            c.spawn("py-hello", env={"GREETING": "x" * (2 << 20)})
        assert e.value.data["param"] == "env" and e.value.data["limit"] == Limits().max_identity_bytes

    # An identity at the cap is four pipe buffers. The warm copy is stopped, so it cannot read it:
    # the service must go on serving others while the write waits.
    greeting = "g" * (Limits().max_identity_bytes - len("GREETING"))
    app = warm_app(svc)
    app.send_signal(signal.SIGSTOP)
    result = {}

    def spawn_big():
        with svc.client() as c:
            result["inst"] = c.spawn("py-hello", env={"GREETING": greeting})

    spawner = threading.Thread(target=spawn_big)
    try:
        spawner.start()
        with svc.client() as other:
            wait_until(lambda: other.stats()["templates"]["py-hello"]["warm"] == 0,
                       what="the spawn to take the stopped warm copy")
            assert other.ping()  # the loop is not blocked by the pending write
            assert other.stats()["templates"]["py-hello"]["live"] == 1
    finally:
        app.send_signal(signal.SIGCONT)
        spawner.join(60)
    inst = result["inst"]
    assert ask(inst.address, PROBES["py-hello"])["greeting"] == greeting
    with svc.client() as c:
        c.kill(inst.id, grace=0)
    still_serves(svc, fds)


def read_until_closed(s: socket.socket, timeout: float) -> list[dict]:
    """The frames the service sends on s until it closes it."""
    s.settimeout(timeout)
    dec = P.FrameDecoder(max_frame=1 << 20)
    frames = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return frames
        if not data:
            return frames
        frames += dec.feed(data)


def test_a_thousand_idle_connections_are_closed_by_their_timeouts(service):
    # The idle timeout (10 s) and the hello timeout (5 s) leave room to open all of them before any
    # is closed, also on a busy machine: the cap is checked with all 999 open.
    svc = service("[service]\nmax_connections = 1000\nidle_connection_timeout = 10\n" + ONE_WARM)
    fds = settled_fds(svc)
    hello = P.encode_frame(P.make_hello(None, "idle"))
    authenticated, silent = [], []
    try:
        for _ in range(499):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            authenticated.append(s)
            s.connect(str(svc.socket))
            s.sendall(hello)
        for s in authenticated:  # each hello answered: all 499 are in and past their hello
            s.settimeout(30)
            (size,) = P.HEADER.unpack(s.recv(4, socket.MSG_WAITALL))
            assert P.check_hello_reply(msgpack.unpackb(s.recv(size, socket.MSG_WAITALL)))
        for _ in range(500):  # connected, never a word
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(s)
            s.connect(str(svc.socket))
        wait_until(lambda: fd_count(svc) >= fds + 999, what="the service to accept all 999")
        with svc.client() as c:  # the 1000th connection: served
            with pytest.raises(NoCapacity, match="max_connections"):
                svc.client()     # the 1001st is turned away
            inst = c.spawn("py-hello")
            assert ask(inst.address, PROBES["py-hello"])["instance"] == inst.id
            inst.kill(grace=0)
        for group, says in ((silent, "no hello"), (authenticated, "idle")):
            for s in group:
                frames = read_until_closed(s, 30)
                assert [f["error"]["code"] for f in frames] == ["protocol_error"]
                assert says in frames[0]["error"]["message"]
    finally:
        for s in authenticated + silent:
            s.close()
    still_serves(svc, fds)


def not_a_map(obj) -> bytes:
    payload = msgpack.packb(obj)
    return P.HEADER.pack(len(payload)) + payload


def garbage(i: int) -> tuple[bool, bytes]:
    """(hello first?, one garbage frame) for connection i: random bytes, oversized length headers,
    msgpack that is not a map, maps that are not requests, requests with hostile params."""
    rnd = random.Random(i)
    kinds = [
        (False, rnd.randbytes(rnd.randint(1, 200))),
        (False, P.HEADER.pack(rnd.randint(P.HELLO_MAX_FRAME + 1, 2**32 - 1))),
        (True, P.HEADER.pack(rnd.randint(P.MAX_FRAME + 1, 2**32 - 1)) + rnd.randbytes(64)),
        (True, not_a_map(rnd.choice([[1, 2], "text", 7, None, b"bytes"]))),
        (True, P.HEADER.pack(4) + rnd.randbytes(4)),
        (True, P.encode_frame({"v": 1, "id": rnd.randint(1, 1 << 30), "method": "spawn",
                               "params": {"template": "py-hello", "hostname": "-" * 100,
                                          "env": {"A=B": "x" * rnd.randint(0, 1000)}}})),
        (True, P.encode_frame({"v": 1, "id": 1, "method": "set_warm",
                               "params": {"template": "py-hello", "min_warm": 10**9}})),
        (True, P.encode_frame({"v": 1, "id": "x", "method": "ping"})),
    ]
    return kinds[i % len(kinds)]


async def send_garbage(path: str, i: int) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        hello_first, junk = garbage(i)
        dec = P.FrameDecoder(max_frame=1 << 20)
        if hello_first:
            writer.write(P.encode_frame(P.make_hello(None, f"junk-{i}")))
            (size,) = P.HEADER.unpack(await reader.readexactly(4))
            await reader.readexactly(size)
        writer.write(junk)
        frames: list[dict] = []
        while not frames:  # the service's answer: an error, and for most kinds a close
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            frames += dec.feed(data)
        return frames
    finally:
        writer.close()


def test_five_hundred_garbage_frames_from_many_connections(service):
    svc = service(ONE_WARM)
    fds = settled_fds(svc)

    async def flood():
        answers = []
        for start in range(0, 500, 50):  # 50 connections at a time
            answers += await asyncio.gather(*(send_garbage(str(svc.socket), i)
                                              for i in range(start, start + 50)))
        return answers

    answers = asyncio.run(flood())
    assert len(answers) == 500
    for i, frames in enumerate(answers):
        assert frames and "error" in frames[0], (i, garbage(i), frames)
        assert frames[0]["error"]["code"] in ("protocol_error", "bad_request"), frames
    assert svc.proc.poll() is None
    still_serves(svc, fds)


def test_a_script_using_pool_spawn_exits_silently(service):
    svc = service(ONE_WARM)
    fds = settled_fds(svc)
    scripts = [
        "import pool\napp = pool.spawn('py-hello')\nprint(app.id)\n",
        # an explicit client, dropped without close() before the end
        "import gc, pool\nc = pool.Client()\nprint(c.spawn('py-hello').id)\ndel c\ngc.collect()\n",
    ]
    for script in scripts:
        r = subprocess.run([sys.executable, "-c", script], env=svc.env, capture_output=True, text=True,
                           timeout=60)
        if r.stdout.strip():
            with svc.client() as c:
                c.kill(r.stdout.strip(), grace=0)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        svc.wait_warm("py-hello", 1)
    still_serves(svc, fds)
