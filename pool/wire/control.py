"""The control channel between pool and an app: blocking, length-prefixed msgpack frames on pipe fds.

Used by both sides: the in-app SDK (pool.runtime, pool/java/PoolRuntime.java) and the builder/restorer.
Standard library and msgpack only, because applications import it.

Messages: app -> pool `{"type": "ready", "pid", "runtime"}` then, in each restored copy,
pool -> app `{"type": "identity", "instance_id", "env", "args", "hostname", "seed", "deadline"}`
(Identity.to_message) and
app -> pool `{"type": "ack", "instance_id", "pid"}` or `{"type": "error", "message"}`.

Fork mode (pool/copies/zygote.py, the SDK's zygote loop): instead of an identity the zygote gets
`{"type": "zygote", "socket"}` and connects to that unix seqpacket socket, where each message is one
packet, file descriptors riding along (send_packet/recv_packet): app -> pool `{"type": "serving",
"pid"}`; pool -> app `{"type": "fork"}` with the child's stdout, stderr and control socket; app -> pool
`{"type": "forked"}`, `{"type": "refused", "rule", "message"}` or `{"type": "error", "message"}`. The
child says `{"type": "hello"}` on its control socket with a pidfd of itself, then waits for its
identity there like any restored copy (frames work on a stream socket as on a pipe).
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pool import fds

ENV_VAR = "POOL_CONTROL_FDS"  # "R,W": R read by the app, W written by the app
MAX_CONTROL_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class ControlError(Exception):
    """The control channel broke: closed early, timed out or carried garbage."""


@dataclass(frozen=True)
class Identity:
    """What makes one copy itself: what the pool hands each restored copy, and what the app's
    checkpoint() returns (the hostname is set by the pool, for SDK and transparent copies alike)."""

    instance_id: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    hostname: str | None = None
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    restored: bool = False  # the app's side: this process is a restored copy

    def to_message(self, deadline: float) -> dict[str, Any]:
        """The identity frame; deadline (time.time()) is when the pool stops waiting for the ack.
        Key order is the frame's bytes, which the Java SDK reads too: keep it."""
        return {"type": "identity", "instance_id": self.instance_id, "env": self.env,
                "args": self.args, "hostname": self.hostname, "seed": self.seed,
                "deadline": deadline}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> "Identity":
        """The identity frame as the restored app got it."""
        return cls(instance_id=str(msg["instance_id"]), env=dict(msg.get("env") or {}),
                   args=list(msg.get("args") or []), hostname=msg.get("hostname"),
                   seed=int(msg.get("seed") or 0), restored=True)


def _encode(msg: dict[str, Any]) -> bytes:
    data = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(data)) + data


MAX_PACKET_FDS = 4


def send_packet(sock: socket.socket, msg: dict[str, Any], fds: list[int] = ()) -> None:
    """One message as one packet (or one write, on a stream socket), with fds (SCM_RIGHTS)."""
    socket.send_fds(sock, [_encode(msg)], list(fds))


def recv_packet(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One packet sent by send_packet: its message and the fds that came with it (ours to close).
    Honours the socket's timeout; ControlError if the other side closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_CONTROL_FRAME, MAX_PACKET_FDS)
    try:
        if not data:
            raise ControlError("control channel closed by the other side")
        if len(data) < _LEN.size or _parse_length(data[:_LEN.size]) != len(data) - _LEN.size:
            raise ControlError("control packet is not one whole frame")
        return _parse_message(data[_LEN.size:]), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def write_frame(fd: int, msg: dict[str, Any]) -> None:
    buf = memoryview(_encode(msg))
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


async def write_frame_async(fd: int, msg: dict[str, Any]) -> None:
    """write_frame for asyncio callers: a frame larger than the pipe's buffer waits with
    loop.add_writer for the other side to read, instead of blocking the loop.

    The fd is switched to non-blocking. Bound it with asyncio.timeout().
    """
    import asyncio  # noqa: PLC0415  (applications using the SDK never pay for it)

    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = memoryview(_encode(msg))
    while buf:
        try:
            buf = buf[os.write(fd, buf):]
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
            try:
                await writable
            finally:
                loop.remove_writer(fd)


def read_frame(fd: int, deadline: float | None = None) -> dict[str, Any]:
    """Read one frame; deadline is a time.monotonic() value (None: wait for ever)."""
    length = _parse_length(_read_exact(fd, _LEN.size, deadline))
    return _parse_message(_read_exact(fd, length, deadline))


async def read_frame_async(fd: int) -> dict[str, Any]:
    """read_frame for asyncio callers: waits with loop.add_reader instead of blocking a thread.

    The fd is switched to non-blocking. Bound it with asyncio.timeout().
    """
    import asyncio  # noqa: PLC0415  (applications using the SDK never pay for it)

    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        async def read_exact(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                try:
                    chunk = os.read(fd, n - len(out))
                except BlockingIOError:
                    readable.clear()
                    await readable.wait()
                    continue
                if not chunk:
                    raise ControlError("control channel closed by the other side")
                out += chunk
            return bytes(out)

        length = _parse_length(await read_exact(_LEN.size))
        return _parse_message(await read_exact(length))
    finally:
        loop.remove_reader(fd)


def _parse_length(header: bytes) -> int:
    (length,) = _LEN.unpack(header)
    if length > MAX_CONTROL_FRAME:
        raise ControlError(f"control frame of {length} bytes is over the {MAX_CONTROL_FRAME} limit")
    return length


def _parse_message(payload: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ControlError("control frame is not valid msgpack") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ControlError(f"control message is not a map with a type: {msg!r:.80}")
    return msg


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not fds.readable(fd, left):
                raise ControlError("timed out waiting on the control channel")
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise ControlError("control channel closed by the other side")
        out += chunk
    return bytes(out)
