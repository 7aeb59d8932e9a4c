"""Act inside another process's namespaces (network, UTS) from this process.

setns(2) moves only the calling thread, so each action runs in a short-lived thread that joins the
target namespace, acts and ends. A socket belongs to the namespace it was created in, so one made that
way reaches the copy's loopback from anywhere in this process afterwards.
"""
from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from typing import Callable, TypeVar
from urllib.parse import urlsplit

CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")
Namespace = int | str  # an open namespace fd, or a path such as /proc/PID/ns/net


def run_in(ns: Namespace, nstype: int, fn: Callable[[], T]) -> T:
    """Run fn() in a thread that has joined namespace ns; return its result or raise its error."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC) if isinstance(ns, str) else ns
            try:
                if _libc.setns(fd, nstype) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                if isinstance(ns, str):
                    os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised in the caller
            result["error"] = e

    t = threading.Thread(target=target, name="in-namespace", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def socket_in(ns: Namespace, family: int = socket.AF_INET,
              type_: int = socket.SOCK_STREAM) -> socket.socket:
    return run_in(ns, CLONE_NEWNET, lambda: socket.socket(family, type_))


def set_hostname(uts_ns: Namespace, hostname: str) -> None:
    run_in(uts_ns, CLONE_NEWUTS, lambda: socket.sethostname(hostname))


def connect_in(ns: Namespace, port: int, timeout: float = 1.0,
               host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to host:port as seen from inside the namespace."""
    s = socket_in(ns)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
    except OSError:
        s.close()
        raise
    return s


def http_in(ns: Namespace, url: str, *, method: str = "GET", body: bytes | None = None,
            timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request to a loopback URL inside the namespace; returns (status, body)."""
    u = urlsplit(url)
    port = u.port or 80
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", port, timeout=timeout)
    conn.sock = connect_in(ns, port, timeout=timeout)
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
