"""The journal of copies (pool/copies/journal.py) and the capped logs of a copy (RestoredCopy.rotate_logs),
on real files and real (sleep) processes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pool.copies import journal
from pool.copies.restored import RestoredCopy


@pytest.fixture
def sleepers():
    """start() -> a `sleep` process; all are killed and reaped at the end."""
    procs = []

    def start():
        p = subprocess.Popen(["sleep", "60"])
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def instance(run_dir: Path, pid: int = 0) -> RestoredCopy:
    return RestoredCopy(id=run_dir.name.split(".")[0], template="t", build_id="b1", pid=pid, pidfd=-1,
                    run_dir=run_dir, netns_fd=-1, sdk=False, port=8080, address="127.0.0.1:4321")


def copy_dir(root: Path, iid: str, pid: int | None = None, state: str = journal.WARM,
             node: str = "local") -> Path:
    d = root / f"{iid}.x"
    d.mkdir(parents=True)
    if pid is not None:
        journal.write(d, journal.Record.of(instance(d, pid), node, state))
    return d


def test_a_record_round_trips_and_a_bad_one_is_none(tmp_path):
    d = copy_dir(tmp_path, "a1", os.getpid(), journal.LIVE)
    rec = journal.read(d)
    assert rec.id == "a1" and rec.pid == os.getpid() and rec.state == journal.LIVE
    assert rec.start_time == journal.start_time(os.getpid()) and journal.still_running(rec)
    assert journal.host_port(rec.address) == 4321 and journal.host_port(None) == 0
    assert not list(d.glob(".*.tmp"))
    (d / journal.RECORD).write_text("{not json")
    assert journal.read(d) is None
    (d / journal.RECORD).write_text('{"id": "a1"}')
    assert journal.read(d) is None
    journal.forget(d)
    journal.forget(d)  # idempotent
    assert journal.read(d) is None


def test_a_record_keeps_env_names_only_and_reads_older_records(tmp_path):
    d = tmp_path / "e1.x"
    d.mkdir()
    inst = instance(d, os.getpid())
    inst.env_keys = ["API_KEY", "MODE"]
    journal.write(d, journal.Record.of(inst, "local", journal.LIVE))
    assert journal.read(d).env_keys == ["API_KEY", "MODE"]
    # a record written before env_keys held the values: read as names, values dropped
    raw = json.loads((d / journal.RECORD).read_text())
    del raw["env_keys"]
    raw["env"] = {"MODE": "x", "API_KEY": "s3cret"}
    (d / journal.RECORD).write_text(json.dumps(raw))
    assert journal.read(d).env_keys == ["API_KEY", "MODE"]


def test_recover_adopts_live_kills_warm_and_cleans_the_rest(tmp_path, sleepers):
    live, warm, other_owner, other_node = sleepers(), sleepers(), sleepers(), sleepers()
    dead = subprocess.Popen(["true"])
    dead.wait()
    copy_dir(tmp_path, "live", live.pid, journal.LIVE)
    copy_dir(tmp_path, "warm", warm.pid, journal.WARM)
    copy_dir(tmp_path, "dead", dead.pid, journal.LIVE)
    copy_dir(tmp_path, "norecord")
    held = copy_dir(tmp_path, "held")                      # a restore in flight: its CRIU holds a file
    holder = subprocess.Popen(["sleep", "60"], stdout=open(held / "stdout.log", "wb"))  # noqa: SIM115
    mine = copy_dir(tmp_path, "restoring")                 # a running `pool restore` made this one
    (mine / journal.OWNER).write_text(f"{other_owner.pid} {journal.start_time(other_owner.pid)}\n")
    copy_dir(tmp_path, "remote", other_node.pid, journal.LIVE, node="n2")

    found = journal.recover(tmp_path, "local")

    assert [rec.id for _, rec in found.live] == ["live"]
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["live", "remote",
                                                                          "restoring"]
    assert warm.wait(10) == -9 and holder.wait(10) == -9
    assert live.poll() is None and other_owner.poll() is None and other_node.poll() is None
    assert found.removed == 4


def test_reopen_pins_the_copy_or_says_it_is_gone(tmp_path, sleepers):
    p = sleepers()
    d = copy_dir(tmp_path, "c1", p.pid, journal.LIVE)
    rec = journal.read(d)
    inst = journal.reopen(d, rec)
    try:
        assert inst.pid == p.pid and inst.state == "running" and inst.poll() is None
    finally:
        inst.release_fds()
    rec.start_time += 1  # as if the pid had been recycled
    with pytest.raises(ProcessLookupError):
        journal.reopen(d, rec)


def test_logs_are_capped_and_offsets_stay_valid(tmp_path):
    inst = instance(tmp_path)
    log = inst.log_path("stdout")
    with open(log, "wb") as f:          # the copy writes at its own offset, without O_APPEND
        f.write(b"a" * 10000)
        f.flush()
        inst.rotate_logs(100_000)       # under the cap: untouched
        assert inst.read_log_from("stdout", 0, 1 << 20) == (b"a" * 10000, 10000, 0)
        f.write(b"b" * 100_000)
        f.flush()
        inst.rotate_logs(16384)
        assert log.stat().st_blocks * 512 <= 16384 + 4096
        data, end, cut = inst.read_log_from("stdout", 0, 1 << 20)
        assert end == 110_000 and cut == 110_000 - len(data) and set(data) == {ord("b")}
        assert 8192 <= len(data) <= 8192 + 4096
        f.write(b"c" * 10)
        f.flush()
        assert inst.read_log_from("stdout", end, 100) == (b"c" * 10, 110_010, 0)
    assert inst.read_log_from("stdout", 110_010, 100) == (b"", 110_010, 0)
    assert inst.read_log_from("stderr", 0, 100) == (b"", 0, 0)
