"""The multi-node test lab itself: three hosts reach each other (ICMP and TCP to a server started
inside a host), unplugging a host cuts it off, plugging it back restores it, and nothing is left."""
from __future__ import annotations

import subprocess
import sys

import pytest
from netlab import NetLab, list_netns, sweep_stale, wait_until

ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(socket.gethostname().encode() + b" " + sys.argv[1].encode() + b" " + c.recv(64))
    c.close()
"""
PORT = 7000


def ask(lab: NetLab, src: str, dst: str) -> bytes | None:
    try:
        with lab.connect(src, dst, PORT, timeout=0.5) as s:
            s.sendall(b"hi")
            return s.recv(128)
    except OSError:
        return None


def root_links() -> set[str]:
    return set(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.split())


def test_three_hosts_talk_fail_and_recover():
    links_before = root_links()
    with NetLab(3) as lab:
        names = {lab.ns(h) for h in lab.hosts} | {lab.hub}
        assert names <= set(list_netns())
        for h in lab.hosts:
            p = lab.popen(h, [sys.executable, "-c", ECHO, lab.address(h), str(PORT)],
                          stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "listening"
        for src in lab.hosts:
            for dst in lab.hosts:
                if src != dst:
                    assert lab.ping(src, dst), f"{src} cannot ping {dst}"
                    assert ask(lab, src, dst).endswith(f" {lab.address(dst)} hi".encode())
        assert ask(lab, "n1", "n2") is not None

        lab.link_down("n2")
        assert ask(lab, "n1", "n2") is None and not lab.ping("n1", "n2", timeout=0.3)
        assert ask(lab, "n3", "n2") is None
        assert ask(lab, "n1", "n3") is not None  # only n2 is cut off

        lab.link_up("n2")
        assert wait_until(lambda: ask(lab, "n1", "n2"), timeout=10) is not None
        assert lab.ping("n3", "n2")
    assert not names & set(list_netns())
    assert root_links() == links_before  # no veth ever showed up in the host's namespace


def test_cleanup_after_a_failure_and_twice():
    lab = NetLab(2)
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            lab.popen("n1", ["sleep", "60"])
            raise RuntimeError("boom")
    assert lab.closed and not [n for n in list_netns() if n.startswith(lab.tag)]
    lab.cleanup()  # idempotent


def test_labs_of_dead_processes_are_swept():
    dead = _dead_pid()
    name = f"pool-test-{dead}-abcd-n1"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in sweep_stale()
        assert name not in list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: no process has this pid now (pids are not reused that fast)
