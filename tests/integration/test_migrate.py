"""Migrating a running instance between two lab nodes (`pool agent`s in their own network
namespaces, mutual TLS; tests/poollab.py): it keeps its id and its memory state, the coordinator
routes to its new node; a target that dies mid-migration leaves it running on its source."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from replyshape import assert_shape

from pool.errors import CheckpointError, NodeUnavailable
from pool.wire import replies as R

pytestmark = pytest.mark.integration


def test_migrate_keeps_the_id_and_the_state_and_routes_to_the_new_node(pool_lab):
    pl = pool_lab()
    with pl.client() as c:
        inst = c.spawn("counter", node="n2")
        for _ in range(3):
            pl.get(inst.address, "/inc")
        r = assert_shape(c.migrate(inst.id, "n3"), R.MigrateReply)
        assert r["id"] == inst.id and r["node"] == "n3" and r["from_node"] == "n2"
        assert r["address"] != inst.address and r["freeze_ms"] is not None
        assert pl.get(r["address"])["count"] == 3                   # its memory came along
        assert pl.get(r["address"], "/inc")["count"] == 4
        info = c.info(inst.id)                                      # routed to n3
        assert info["node"] == "n3" and info["template"] == "counter"
        assert [row["node"] for row in c.list() if row["id"] == inst.id] == ["n3"]
        c.kill(inst.id, grace=0)


def test_a_target_that_dies_mid_migration_leaves_it_running_on_the_source(pool_lab):
    pl = pool_lab()
    with pl.client() as c:
        c.push("counter", "n3")
        inst = c.spawn("counter", node="n2")
        for _ in range(2):
            pl.get(inst.address, "/inc")
        os.kill(pl.agents["n3"].pid, signal.SIGSTOP)   # the migration below waits on it
        out: dict = {}

        def migrate():
            with pl.client() as c2:
                try:
                    out["reply"] = c2.migrate(inst.id, "n3", timeout=30)
                except Exception as e:  # noqa: BLE001  checked below
                    out["error"] = e
        t = threading.Thread(target=migrate)
        t.start()
        # once the source has suspended it, the target is the one in the way: kill it
        for _ in range(600):
            if c.info(inst.id)["state"] == "migrating":
                break
            time.sleep(0.05)
        pl.kill_agent("n3")
        t.join(60)
        assert isinstance(out.get("error"), NodeUnavailable), out
        info = c.info(inst.id)
        assert info["node"] == "n2" and info["state"] == "running"
        assert pl.get(inst.address, "/inc")["count"] == 3          # where it was, as it was
        c.kill(inst.id, grace=0)


PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")


@pytest.fixture(scope="module")
def pipe_max_size():
    """criu-notes: CRIU cannot grow its pipes here, so lazy pages need fs.pipe-max-size >= 4 MiB."""
    old = PIPE_MAX.read_text().strip()
    if int(old) < 4 << 20:
        PIPE_MAX.write_text(str(4 << 20))
    yield
    PIPE_MAX.write_text(old)


def test_lazy_migrate_runs_on_the_target_at_once_with_its_state(pool_lab, pipe_max_size):
    pl = pool_lab()
    with pl.client() as c:
        inst = c.spawn("counter", node="n1")
        for _ in range(5):
            pl.get(inst.address, "/inc")
        r = assert_shape(c.migrate(inst.id, "n2", lazy=True), R.MigrateReply)
        assert r["lazy"] and r["node"] == "n2" and r["id"] == inst.id
        assert pl.get(r["address"], "/inc", timeout=30)["count"] == 6   # memory came on demand
        info = c.info(inst.id)
        assert info["node"] == "n2" and info["template"] == "counter"
        wait_left(c, inst.id, "n1")  # the source ends once the target has every page
        assert [row["node"] for row in c.list() if row["id"] == inst.id] == ["n2"]
        # there and back again: n2 once held this instance, and takes it in anew
        for source, target, count in (("n2", "n1", 7), ("n1", "n2", 8)):
            r = c.migrate(inst.id, target, lazy=True)
            assert r["node"] == target and pl.get(r["address"], "/inc", timeout=30)["count"] == count
            wait_left(c, inst.id, source)
        c.kill(inst.id, grace=0)


def wait_left(c, iid: str, node: str) -> None:
    """Until the lazy migration's source, node, has ended its copy (the target has every page)."""
    for _ in range(600):
        if not [row for row in c.list() if row["id"] == iid and row["node"] == node]:
            return
        time.sleep(0.05)
    raise AssertionError(f"instance {iid} never left {node}")


def test_a_copy_criu_cannot_dump_is_not_migrated_and_runs_on_its_source(pool_lab, tmp_path):
    path = tmp_path / "outside.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(4)
        pl = pool_lab()
        with pl.client() as c:
            inst = c.spawn("counter", node="n2")
            pl.get(inst.address, "/inc")
            pl.get(inst.address, f"/hold?{path}")   # a connection CRIU cannot dump
            with pytest.raises(CheckpointError):
                c.migrate(inst.id, "n3")
            info = c.info(inst.id)
            assert info["node"] == "n2" and info["state"] == "running"
            assert pl.get(inst.address, "/inc")["count"] == 2
            c.kill(inst.id, grace=0)
