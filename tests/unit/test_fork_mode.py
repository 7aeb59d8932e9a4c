"""Fork mode's small parts, without CRIU: the fd-carrying packets (pool.wire.control), the SDK's fork
rules (pool.runtime.fork_rule_broken, in a fresh interpreter), a non-child's exit status from its pidfd
(pool.copies.zygote), a miss served by a fork-mode pool (path "fork"), and the journal never adopting
a forked copy. The real thing, with CRIU and a service, is tests/integration/test_zygote.py."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest

from pool.copies import journal
from pool.copies.restored import RestoredCopy
from pool.copies.zygote import pid_of, reaped_status
from pool.node.warm import WarmPool, WarmSettings
from pool.wire import control


# -- packets ------------------------------------------------------------------------------------------
def test_a_packet_carries_its_message_and_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        control.send_packet(a, {"type": "fork", "n": 1}, [w])
        os.close(w)
        msg, fds = control.recv_packet(b)
        assert msg == {"type": "fork", "n": 1} and len(fds) == 1
        os.write(fds[0], b"x")                 # the same pipe, a new fd of ours
        os.close(fds[0])
        assert os.read(r, 1) == b"x"
        os.close(r)
        a.close()
        with pytest.raises(control.ControlError, match="closed"):
            control.recv_packet(b)


def test_a_packet_that_is_not_one_frame_is_refused_and_its_fds_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        socket.send_fds(a, [b"\x00\x00\x00\x09abc"], [w])   # says 9 bytes, carries 3
        os.close(w)
        with pytest.raises(control.ControlError, match="not one whole frame"):
            control.recv_packet(b)
        assert os.read(r, 1) == b""          # the passed write end was closed: end of file
        os.close(r)


# -- the SDK's fork rules -----------------------------------------------------------------------------
RULES = {
    "": None,
    "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()":
        "one thread",
    "import socket\nlistener = socket.create_server(('127.0.0.1', 0))": "no listening socket",
    "import subprocess\nchild = subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL)\n"
    "import atexit\natexit.register(child.kill)": "no child process",
}
CHECK = "import pool.runtime\nbroken = pool.runtime.fork_rule_broken()\nprint(broken[0] if broken else 'none')\n"


@pytest.mark.parametrize("setup,rule", list(RULES.items()), ids=["none", "thread", "listener", "child"])
def test_fork_rules_name_what_a_process_breaks(setup, rule):
    out = subprocess.run([sys.executable, "-c", setup + "\n" + CHECK], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.strip() == (rule or "none")


# -- a non-child's exit status ------------------------------------------------------------------------
def test_a_grandchilds_exit_status_is_read_from_its_pidfd_once_reaped():
    """A middle process forks the grandchild (the one we watch) and reaps it, as a zygote's init
    reaps a forked copy: we are not its parent, yet we learn its status."""
    go_r, go_w = os.pipe()
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        grandchild = os.fork()
        if grandchild == 0:
            os.read(go_r, 1)
            os._exit(7)
        os.write(pid_w, str(grandchild).encode())
        os.waitpid(grandchild, 0)
        os._exit(0)
    os.close(go_r)
    os.close(pid_w)
    grandchild = int(os.read(pid_r, 32))
    pidfd = os.pidfd_open(grandchild)
    try:
        assert pid_of(pidfd) == grandchild
        assert reaped_status(pidfd) is None      # still running
        os.write(go_w, b"x")
        os.waitpid(middle, 0)                    # the middle one reaped it before it exited
        status = reaped_status(pidfd)
        assert status is not None and os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(pidfd)
        os.close(go_w)
        os.close(pid_r)


# -- a fork-mode pool's miss ----------------------------------------------------------------------------
def test_a_fork_mode_pool_serves_a_miss_as_fork_and_counts_it_so():
    async def main():
        made = []

        async def restore():
            made.append(object())
            return made[-1]

        pool = WarmPool("t", WarmSettings(min_warm=0), restore, lambda c: None, backoff_s=0.0,
                        miss_path="fork")
        copy, path = await pool.acquire(5)
        assert path == "fork" and copy is made[0]
        pool.set_min_warm(1)
        for _ in range(10):
            await asyncio.sleep(0)
        assert (await pool.acquire(5))[1] == "warm"
        assert pool.snapshot()["spawns"] == {"warm": 1, "fork": 1}
        await pool.close()

    asyncio.run(asyncio.wait_for(main(), 5))


# -- the journal ----------------------------------------------------------------------------------------
def test_a_live_forked_copy_is_ended_at_recovery_not_adopted(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        d = tmp_path / "f1.x"
        d.mkdir()
        inst = RestoredCopy(id="f1", template="t", build_id="b1", pid=proc.pid, pidfd=-1, run_dir=d,
                            netns_fd=-1, sdk=True, zygote_id="zygote-1")
        journal.write(d, journal.Record.of(inst, "local", journal.LIVE, handed_at=1.0))
        assert journal.read(d).zygote_id == "zygote-1"
        found = journal.recover(tmp_path, "local")
        assert found.live == [] and found.killed == 1 and not d.exists()
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
