"""A small network lab for multi-node tests: N "hosts" as network namespaces on one bridge.

    with NetLab(3) as lab:
        lab.address("n2")                      # 10.231.X.2
        lab.popen("n2", ["python3", "-m", "http.server", "--bind", lab.address("n2"), "8000"])
        s = lab.connect("n1", "n2", 8000)      # a TCP connection made from inside n1
        lab.link_down("n2"); lab.link_up("n2") # fault injection: n2's cable out and back in

Layout: one hub namespace holds a bridge; each host namespace has `eth0` (10.231.X.i/24) whose veth
peer `hI` sits on the bridge. Every link is created inside a lab namespace, never in the caller's,
so nothing appears in the host's `ip link` even for a moment. Only 10.231.0.0/16 is used.

Cleanup is idempotent and always runs: on leaving the context, at interpreter exit (atexit), and
for labs of dead processes (names carry the creator's pid) whenever a new lab starts. It kills the
processes the lab started and any other process left in its namespaces, then deletes the namespaces,
which destroys their veths.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
import weakref

from pool.cr import netns as pnetns

PREFIX = "pool-test-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]{{4}}-")
_live: "weakref.WeakSet[NetLab]" = weakref.WeakSet()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def list_netns() -> list[str]:
    return [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.strip()]


def _kill_netns(name: str) -> None:
    """SIGKILL every process in namespace name, then delete it (both idempotent)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    _ip("netns", "del", name, check=False)


def sweep_stale() -> list[str]:
    """Remove lab namespaces whose creating process is gone (a crashed or killed test run)."""
    removed = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns(name)
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetLab:
    def __init__(self, hosts: int = 3, *, subnet: int | None = None) -> None:
        if not 1 <= hosts <= 50:
            raise ValueError("a lab has 1 to 50 hosts")
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.subnet = subnet if subnet is not None else 1 + secrets.randbelow(254)
        self.hosts = [f"n{i}" for i in range(1, hosts + 1)]
        self.hub = f"{self.tag}-hub"
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._made: list[str] = []   # namespaces created, in order
        self.closed = False

    # -- names ----------------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this lab ({', '.join(self.hosts)})")
        return f"{self.tag}-{host}"

    def ns_path(self, host: str) -> str:
        return f"/var/run/netns/{self.ns(host)}"

    def address(self, host: str) -> str:
        return f"10.231.{self.subnet}.{self.hosts.index(host) + 1}"

    # -- life -----------------------------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        sweep_stale()
        _live.add(self)
        try:
            self._make()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _make(self) -> None:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts, start=1):
            ns = self.ns(host)
            self._add_ns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}",
                "netns", self.hub)
            _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def cleanup(self) -> None:
        """Kill what the lab started, delete its namespaces (and so its veths). Idempotent."""
        with self._lock:
            for p in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.wait(10)
                for stream in (p.stdout, p.stderr):
                    if stream is not None:
                        stream.close()
            self._procs.clear()
            names = set(self._made) | {n for n in list_netns() if n.startswith(self.tag + "-")}
            for name in sorted(names):
                _kill_netns(name)
            self._made.clear()
            self.closed = True
        _live.discard(self)

    # -- acting inside a host -------------------------------------------------------------------
    def run(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], check=False, **kw)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv in host; it is killed (with its process group) by cleanup()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                             start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def socket(self, host: str, type_: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket that lives in host's network namespace (usable from this process)."""
        return pnetns.run_in(self.ns_path(host), pnetns.CLONE_NEWNET,
                             lambda: socket.socket(socket.AF_INET, type_, proto))

    def connect(self, src: str, dst: str, port: int, timeout: float = 1.0) -> socket.socket:
        s = self.socket(src)
        try:
            s.settimeout(timeout)
            s.connect((self.address(dst), port))
        except OSError:
            s.close()
            raise
        return s

    def ping(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """One ICMP echo from src to dst (raw socket: no ping binary needed)."""
        s = self.socket(src, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            ident, seq = secrets.randbelow(0xFFFF), 1
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            payload = b"netlab"
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
            s.sendto(packet, (self.address(dst), 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, _ = s.recvfrom(2048)
                except (TimeoutError, socket.timeout):
                    return False
                ihl = (data[0] & 0x0F) * 4
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if typ == 0 and rid == ident and rseq == seq:
                    return True
            return False
        except OSError:
            return False  # e.g. ENETUNREACH
        finally:
            s.close()

    # -- fault injection ------------------------------------------------------------------------
    def link_down(self, host: str) -> None:
        """Unplug host: its port on the bridge goes down (host's eth0 loses carrier)."""
        _ip("-n", self.hub, "link", "set", f"h{self.hosts.index(host) + 1}", "down")

    def link_up(self, host: str) -> None:
        _ip("-n", self.hub, "link", "set", f"h{self.hosts.index(host) + 1}", "up")

    def stall_after(self, host: str, burst: int) -> None:
        """Let `burst` more bytes through towards host, then next to nothing (1 kbit/s): a transfer
        to host surely starts and surely cannot finish, whatever the machine's speed."""
        self._tc(host, "add", "tbf", "rate", "1kbit", "burst", str(burst), "latency", "60s")

    def unstall(self, host: str) -> None:
        self._tc(host, "del")

    def _tc(self, host: str, verb: str, *qdisc: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.hub, "tc", "qdisc", verb, "dev",
                        f"h{self.hosts.index(host) + 1}", "root", *qdisc],
                       check=True, capture_output=True, text=True, timeout=30)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


@atexit.register
def _cleanup_all() -> None:
    for lab in list(_live):
        with contextlib.suppress(Exception):
            lab.cleanup()


def wait_until(fn, timeout: float = 5.0, interval: float = 0.05):
    """fn() until it returns something truthy (returned) or timeout (returns the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


__all__ = ["NetLab", "sweep_stale", "list_netns", "wait_until"]
