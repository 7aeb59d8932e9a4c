"""What the SDK tests (Java: test_java_sdk.py, Node: test_node_sdk_unit.py) share: the control
channel's framing as the pool speaks it, the codec's test values, and an app started the way a
template's app is (POOL_CONTROL_FDS on two inherited pipes)."""
from __future__ import annotations

import os
import select
import struct
import subprocess
import time
from contextlib import contextmanager

import msgpack

TIMEOUT = 30.0


def frame(obj, **pack_opts) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True, **pack_opts)
    return struct.pack(">I", len(body)) + body


def split_frames(data: bytes) -> list[bytes]:
    bodies = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        bodies.append(data[4:4 + n])
        assert len(bodies[-1]) == n, "truncated frame"
        data = data[4 + n:]
    return bodies


def unpack(body: bytes):
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def send(fd: int, obj) -> None:
    data = frame(obj)
    while data:
        data = data[os.write(fd, data):]


def read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no frame from the app within {TIMEOUT}s")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("app closed the control channel")
        buf += chunk
    return buf


def recv(fd: int, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    (n,) = struct.unpack(">I", read_exact(fd, 4, deadline))
    return unpack(read_exact(fd, n, deadline))


# ---------------------------------------------------------------- codec

IDENTITY = {
    "type": "identity",
    "instance_id": "inst-ünïcødé-✓-🚀",
    "env": {"GREETING": "héllo wörld 日本", "EMPTY": ""},
    "args": ["--flag", "a b", "", "ü"],
    "hostname": None,
    "seed": 2**63 - 1,
    "deadline": 1767225600.125,
}

CASES = [
    IDENTITY,
    {"ints": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
              -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]},
    {"floats": [0.0, -0.0, 1.5, -2.25, 3.141592653589793, 1e300, -1e-300, float("inf")]},
    {"nested": [[1, [2, [3, []]]], {"k": {"deep": [None, True, False]}}], "empty": {}, "none": None},
    {"strings": ["", "x" * 31, "x" * 32, "y" * 255, "y" * 256, "z" * 65535, "z" * 65536, "é" * 40]},
    {"bin": b"\x00\x01\xff" * 100, "bin16": bytes(300), "bin32": bytes(70000)},
    {"array16": list(range(20)), "map16": {f"k{i}": i for i in range(20)}, 7: "int key"},
    {"array32": [None] * 70000, "map32": {str(i): i for i in range(70000)}},
    [1, "top-level array", -5],
    "top-level string",
]


@contextmanager
def control_app(cmd: list[str], env_extra: dict[str, str] | None = None):
    """Start cmd as a template app would be: POOL_CONTROL_FDS=R,W on two inherited pipes."""
    app_r, pool_w = os.pipe()  # pool -> app
    pool_r, app_w = os.pipe()  # app -> pool
    env = dict(os.environ, POOL_CONTROL_FDS=f"{app_r},{app_w}", **(env_extra or {}))
    try:
        proc = subprocess.Popen(cmd, env=env, pass_fds=(app_r, app_w), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(app_r)
        os.close(app_w)
    fds = [pool_r, pool_w]
    try:
        yield proc, pool_r, pool_w, fds
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def parse_output(stdout: str) -> tuple[dict[str, str], list[str]]:
    values, args = {}, []
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "arg":
            args.append(value)
        else:
            values[key] = value
    return values, args



CHECKPOINT_FRAMES = [{"type": "before_checkpoint"}, {"type": "after_checkpoint", "restored": False},
                     {"type": "bogus"}]


def drive_checkpoint_hooks(cmd: list[str], identity: dict, env_extra: dict[str, str]):
    """A running copy, minus CRIU: ready -> identity -> ack, then what the pool sends around a
    checkpoint (CHECKPOINT_FRAMES, one reply each); then the channel closes and stdin ends the app.
    Returns the ack, the replies, the app's report, its stderr and its exit status."""
    with control_app(cmd, env_extra) as (proc, pool_r, pool_w, fds):
        assert recv(pool_r)["type"] == "ready"
        send(pool_w, identity)
        ack = recv(pool_r)
        replies = []
        for message in CHECKPOINT_FRAMES:
            send(pool_w, message)
            replies.append(recv(pool_r))
        os.close(pool_w)  # the pool lets the copy go: the SDK's reader ends, quietly
        fds[1] = -1
        out, err = proc.communicate(timeout=TIMEOUT)
    return ack, replies, parse_output(out)[0], err, proc.returncode


def assert_failed_hook_reported(replies: list[dict], out: dict, events: str) -> None:
    """What drive_checkpoint_hooks gets back when the app's after-checkpoint hook throws: the
    before hooks ran, the failure is the app's error reply, and the SDK reads on after it."""
    assert replies[0] == {"type": "ok"} and replies[1]["type"] == "error"
    assert "after-checkpoint hook failed" in replies[1]["message"]
    assert "checkpoint hook asked to fail" in replies[1]["message"]
    assert replies[2]["type"] == "error"                   # still reading after the failure
    assert out["events"] == events
