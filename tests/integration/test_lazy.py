"""Lazy (post-copy) migration of a running copy on one machine: the dump writes only the small
images and serves the memory from a page server; the target restores at once and gets its pages
on demand. The copy's memory state continues; a failed lazy restore ends by its deadline and the
source copy keeps running."""
from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

import pytest

from pool.copies.fork import checkpoint_instance_lazy, restore_lazy
from pool.copies.restore import Identity
from pool.cr import netns
from pool.errors import RestoreError
from pool.templates.build import build
from pool.templates.spec import load_spec

COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"
PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE_MAX = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def pipe_max_size():
    """criu-notes: CRIU cannot grow its pipes here, so lazy pages need fs.pipe-max-size >= 4 MiB."""
    old = PIPE_MAX.read_text().strip()
    if int(old) < LAZY_PIPE_MAX:
        PIPE_MAX.write_text(str(LAZY_PIPE_MAX))
    yield
    PIPE_MAX.write_text(old)


@pytest.fixture(scope="module")
def counter_big(session_store, criu):
    spec = load_spec(COUNTER)
    spec = dataclasses.replace(spec, name="counter-big", env=spec.env + (("BALLAST_MB", "64"),))
    return build(spec, session_store, criu).template


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(inst, path: str = "/") -> dict:
    status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:8080{path}", timeout=20)
    assert status == 200
    return json.loads(body)


def test_lazy_migration_continues_the_state(pipe_max_size, counter_big, criu, restorer, tmp_path):
    orig = restorer.spawn("counter-big", Identity("source"))
    moved = daemon = lazy = None
    try:
        for _ in range(3):
            ask(orig, "/inc")
        checksum = ask(orig, "/sum")["sum"]
        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "build", criu, server)
        shipped = lazy.template.image_bytes
        assert shipped < counter_big.image_bytes / 4  # the memory stays behind, served on demand
        lazy.template.verify(full=True)

        t0 = time.monotonic()
        moved, daemon = restore_lazy(lazy.template, criu, tmp_path / "run-moved", server,
                                     instance_id="moved")
        assert ask(moved, "/inc")["count"] == 4          # continues from the source's state
        first_answer = time.monotonic() - t0
        assert ask(moved, "/sum")["sum"] == checksum      # every page arrived intact
        assert daemon.wait(60) == 0                       # all pages in: the daemon is done
        lazy.wait(60)                                     # and the source's page server too
        assert orig.wait(10) is not None                  # the source copy is gone (migrated)
        assert ask(moved)["count"] == 4
        print(f"lazy restore: first answer {first_answer * 1000:.0f} ms, images shipped "
              f"{shipped / 2**20:.1f} MB of {counter_big.image_bytes / 2**20:.0f} MB")
    finally:
        for inst in (moved, orig):
            if inst is not None:
                inst.kill(grace=0)
                inst.close()
        if daemon is not None:
            daemon.kill()
        if lazy is not None:
            lazy.abort()


def test_failed_lazy_restore_ends_by_deadline_and_the_source_runs_on(pipe_max_size, counter_big,
                                                                     criu, restorer, tmp_path):
    orig = restorer.spawn("counter-big", Identity("source2"))
    try:
        ask(orig, "/inc")
        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "build", criu, server)
        lazy.abort()  # the page server dies before the target asked for a single page
        t0 = time.monotonic()
        with pytest.raises(RestoreError):
            moved, daemon = restore_lazy(lazy.template, criu, tmp_path / "run-moved", server,
                                         instance_id="never", timeout=8)
            try:  # if CRIU got as far as a process, it must not answer: its memory is missing
                ask(moved)
            finally:
                moved.kill(grace=0)
                moved.close()
                daemon.kill()
        assert time.monotonic() - t0 < 20
        assert not (tmp_path / "run-moved").exists()
        assert ask(orig, "/inc")["count"] == 2  # the source was resumed when its CRIU died
    finally:
        orig.kill(grace=0)
        orig.close()
