"""Running instances through a real `pool serve`: checkpoint, rollback, suspend and wake on connect,
restart on failure; a copy with state (tests/apps/counter: an in-memory counter over HTTP)."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pool.errors import BadRequest, CheckpointError, SnapshotNotFound

COUNTER = "[templates.counter]\nmin_warm = 1\nmax_live = 4\n"


def ask(address: str, path: str = "/") -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as r:
        return json.loads(r.read())


def until(predicate, what: str) -> None:
    """Poll a state the service reports (not a duration: the bound only ends a hung test)."""
    for _ in range(600):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def app_pid(copy_pid: int) -> int:
    """The counter's python process: the child of the copy's PID 1 (tini)."""
    return psutil.Process(copy_pid).children()[0].pid


@pytest.fixture
def live(service, counter):
    def start(extra: str = ""):
        svc = service(COUNTER + extra)
        return svc, svc.client()
    return start


def test_checkpoint_then_rollback_returns_the_snapshots_state_at_the_same_address(live, tmp_path):
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        for _ in range(3):
            ask(inst.address, "/inc")
        r = c.checkpoint(inst.id, tag="three")
        snap = r["snapshot"]
        assert snap["tag"] == "three" and snap["bytes"] > 0 and snap["freeze_ms"] is not None
        assert r["hooks"] == "ran" and r["pre_dump"].startswith("skipped")
        after = ask(inst.address, "/inc")
        assert after["count"] == 4                              # not stopped by the checkpoint
        assert after["hooks"] == ["before", "before", "after"]  # the build's, then this one's
        ask(inst.address, "/inc")
        assert [s["id"] for s in c.snapshots(inst.id)] == [snap["id"]]

        # snapshots are the app's memory: private files in the node's run dir, counted in stats
        sdir = tmp_path / "run" / "snapshots" / inst.id
        files = [p for p in sdir.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        st = c.stats()["snapshots"]
        assert st["count"] == 1 and st["bytes"] == snap["bytes"]

        old_pid = c.info(inst.id)["pid"]
        rb = c.rollback(inst.id, "three")
        assert rb["address"] == inst.address and rb["snapshot"] == snap["id"] and rb["pid"] != old_pid
        assert rb["hooks"] == "ran"
        back = ask(inst.address)
        assert back["count"] == 3                               # the snapshot's state
        assert back["hooks"] == ["before", "before", "after"]   # it finished its checkpoint
        assert ask(inst.address, "/inc")["count"] == 4
        info = c.info(inst.id)
        assert info["state"] == "running" and info["pid"] == rb["pid"]
        assert not os.path.exists(f"/proc/{old_pid}")           # the old process is gone
        assert b"counter copy" in c.logs(inst.id)["data"]       # its log continues

        with pytest.raises(SnapshotNotFound):
            c.rollback(inst.id, "nope")
        c.kill(inst.id, grace=0)
        assert not sdir.exists()                                # removed with the instance
        assert c.stats()["snapshots"]["count"] == 0


def test_a_failed_checkpoint_leaves_the_instance_running(live, tmp_path):
    """The snapshot cannot be written (its directory's place is taken): a typed error, and the
    instance runs on, untouched."""
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        ask(inst.address, "/inc")
        snaps = tmp_path / "run" / "snapshots"
        snaps.mkdir(mode=0o700, exist_ok=True)
        (snaps / inst.id).write_text("not a directory")   # the snapshot cannot be written there
        with pytest.raises(CheckpointError) as e:
            c.checkpoint(inst.id)
        assert "still runs" in e.value.message
        assert ask(inst.address, "/inc")["count"] == 2
        assert c.info(inst.id)["state"] == "running"
        (snaps / inst.id).unlink()


def test_suspend_frees_the_process_and_a_connection_wakes_it(live):
    svc, c = live("keep_snapshots = 2\n")
    with c:
        inst = c.spawn("counter")
        for _ in range(2):
            ask(inst.address, "/inc")
        pid = c.info(inst.id)["pid"]
        r = c.suspend(inst.id)
        assert r["state"] == "suspended" and r["address"] == inst.address
        assert not os.path.exists(f"/proc/{pid}")
        rows = {row["id"]: row for row in c.list()}
        assert rows[inst.id]["state"] == "suspended"
        with pytest.raises(BadRequest):
            c.checkpoint(inst.id)
        assert ask(inst.address, "/inc")["count"] == 3          # the connection woke it
        info = c.info(inst.id)
        assert info["state"] == "running" and info["pid"] != pid

        c.suspend(inst.id)
        rs = c.resume(inst.id)
        assert rs["state"] == "running" and ask(inst.address)["count"] == 3
        last = c.suspend(inst.id)["snapshot"]["id"]
        # keep_snapshots = 2: three suspends, the two newest kept (the last is what resume needs)
        assert [s["id"] for s in c.snapshots(inst.id)][-1] == last
        assert len(c.snapshots(inst.id)) == 2
        assert c.kill(inst.id, grace=0)["state"] == "exited"     # a suspended one ends at once


def test_idle_action_suspend(live):
    svc, c = live("idle_timeout = 0.5\nidle_action = \"suspend\"\n")
    with c:
        inst = c.spawn("counter")
        ask(inst.address, "/inc")
        until(lambda: c.info(inst.id)["state"] == "suspended", "suspended when idle")
        assert ask(inst.address, "/inc")["count"] == 2


def test_restart_on_failure_restores_the_last_checkpoint(live):
    svc, c = live('restart = "on-failure"\n')
    with c:
        inst = c.spawn("counter")
        for _ in range(4):
            ask(inst.address, "/inc")
        c.checkpoint(inst.id)
        ask(inst.address, "/inc")                               # after the checkpoint: lost
        info = c.info(inst.id)
        os.kill(app_pid(info["pid"]), signal.SIGKILL)  # the app dies by itself
        # a connection before the supervisor has seen the death is refused: wait until it has
        until(lambda: c.info(inst.id)["restarts"] == 1, "restarted")
        assert ask(inst.address)["count"] == 4                  # waits for the restore
        info = c.info(inst.id)
        assert info["restarts"] == 1 and info["state"] == "running"
        rows = {row["id"]: row for row in c.list()}
        assert rows[inst.id]["restarts"] == 1

        # a crash loop: more than max_restarts within the window, and it ends, saying so
        for n in (2, 3):
            os.kill(app_pid(c.info(inst.id)["pid"]), signal.SIGKILL)
            until(lambda: c.info(inst.id)["restarts"] == n, f"restarted {n} times")
            ask(inst.address)
        os.kill(app_pid(c.info(inst.id)["pid"]), signal.SIGKILL)
        end = c.wait(inst.id, timeout=30)
        assert end["state"] == "exited" and end.get("crash_loop") is True
        assert end["restarts"] == 3 and end["end_cause"] == "exited"


def test_without_restart_a_dead_instance_stays_dead(live):
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        c.checkpoint(inst.id)
        os.kill(app_pid(c.info(inst.id)["pid"]), signal.SIGKILL)
        end = c.wait(inst.id, timeout=30)
        assert end["state"] == "exited" and end["restarts"] == 0


def test_checkpoint_keep_publishes_a_template(live, session_store):
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        for _ in range(2):
            ask(inst.address, "/inc")
        r = c.checkpoint(inst.id, keep=True)
        name = r["published"]
        try:
            assert name.startswith("counter+fork-")
            kept = session_store.get(name)
            assert Path(kept.build_dir).is_dir()
            c.kill(inst.id, grace=0)
            assert session_store.get(name).build_id == kept.build_id   # outlives its instance
        finally:
            session_store.remove(name)


def test_the_cli_verbs(live):
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        ask(inst.address, "/inc")

        def pool(*argv):
            out = subprocess.run([sys.executable, "-m", "pool.cli", *argv, "--socket",
                                  str(svc.socket), "--json"], env=svc.env, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        snap = pool("checkpoint", inst.id, "--tag", "one")["snapshot"]
        ask(inst.address, "/inc")
        assert [s["tag"] for s in pool("snapshots", inst.id)] == ["one"]
        assert pool("rollback", inst.id, "one")["snapshot"] == snap["id"]
        assert ask(inst.address)["count"] == 1
        assert pool("suspend", inst.id)["state"] == "suspended"
        assert [r["state"] for r in pool("ls") if r["id"] == inst.id] == ["suspended"]
        assert pool("resume", inst.id)["state"] == "running"
        assert pool("stats")["snapshots"]["count"] == 2


def test_a_checkpoint_onto_a_full_disk_fails_typed_and_the_instance_runs_on(live, tmp_path):
    """The snapshot area is a small tmpfs (mounted by the test, always unmounted): CRIU runs out
    of space mid-dump; CheckpointError, nothing left of the snapshot, the app answers as before."""
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        ask(inst.address, "/inc")
        area = tmp_path / "run" / "snapshots"
        area.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(area)],
                       check=True, capture_output=True, timeout=30)
        try:
            with pytest.raises(CheckpointError) as e:
                c.checkpoint(inst.id)
            assert "still runs" in e.value.message
            assert list(area.rglob("*")) in ([], [area / inst.id])  # no half-written snapshot
            assert ask(inst.address, "/inc")["count"] == 2
            assert c.info(inst.id)["state"] == "running"
            with pytest.raises(SnapshotNotFound):
                c.rollback(inst.id)
        finally:
            subprocess.run(["umount", str(area)], check=True, timeout=30)
        c.kill(inst.id, grace=0)


def test_checkpoint_every_with_keep_snapshots_feeds_restart(live):
    svc, c = live('restart = "on-failure"\ncheckpoint_every = 0.3\nkeep_snapshots = 2\n')
    with c:
        inst = c.spawn("counter")
        for _ in range(2):
            ask(inst.address, "/inc")
        until(lambda: len(c.snapshots(inst.id)) >= 1, "an automatic checkpoint")
        first = c.snapshots(inst.id)[0]["id"]
        until(lambda: first not in [s["id"] for s in c.snapshots(inst.id)], "retention")
        snaps = c.snapshots(inst.id)
        assert len(snaps) <= 2 and all(s["tag"] == "auto" for s in snaps)
        os.kill(app_pid(c.info(inst.id)["pid"]), signal.SIGKILL)
        until(lambda: c.info(inst.id)["restarts"] == 1, "restarted")
        assert ask(inst.address)["count"] == 2
        c.kill(inst.id, grace=0)


@pytest.fixture
def outside_listener(tmp_path):
    """A unix socket outside any copy: a copy connected to it cannot be dumped."""
    path = tmp_path / "outside.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)
    yield path
    srv.close()


def test_a_copy_criu_cannot_dump_fails_checkpoint_and_suspend_and_runs_on(live, tmp_path,
                                                                           outside_listener):
    svc, c = live()
    with c:
        inst = c.spawn("counter")
        ask(inst.address, "/inc")
        ask(inst.address, f"/hold?{outside_listener}")
        pid = c.info(inst.id)["pid"]
        with pytest.raises(CheckpointError) as e:
            c.checkpoint(inst.id)
        assert e.value.data["step"].startswith("dumping")
        with pytest.raises(CheckpointError):
            c.suspend(inst.id)                                 # CRIU thaws it: not suspended
        info = c.info(inst.id)
        assert info["state"] == "running" and info["pid"] == pid
        assert ask(inst.address, "/inc")["count"] == 2
        assert c.snapshots(inst.id) == []
        assert not list((tmp_path / "run" / "snapshots").rglob("*.img"))
        c.kill(inst.id, grace=0)
