"""What cannot go into a template (docs/limits.md), shown with real CRIU: for each limit this machine
can show, the error the user gets from our code, and where there is one, the workaround working.
Not shown here: GPUs (none on this machine); the rest of limits.md is about behaviour, not errors."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from test_build_failures import NAME, TCP_CLIENT_APP, assert_rolled_back, builds_of, write_template

from pool.copies.restore import Restorer
from pool.errors import BuildError, RestoreError
from pool.templates.build import build
from pool.templates.spec import load_spec


def build_app(tmp_path, store, criu, app: str, **kw):
    return build(load_spec(write_template(tmp_path, app, **kw)), store, criu).template


def refused(tmp_path, store, criu, app: str, **kw) -> BuildError:
    """Build app, expecting CRIU to refuse the checkpoint; check nothing was left behind."""
    with pytest.raises(BuildError) as info:
        build_app(tmp_path, store, criu, app, **kw)
    assert info.value.step == "checkpointing", info.value.message
    assert_rolled_back(store)
    assert not builds_of(store)
    return info.value


def wait_for_line(inst, words: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = inst.read_log().decode(errors="replace")
        if words in out:
            return out
        time.sleep(0.02)
    raise AssertionError(f"{words!r} not in the copy's output: {inst.output_tail()!r}")


@pytest.fixture
def restorer(store, criu, tmp_path):  # the per-test store, not the session one
    return Restorer(store, criu, tmp_path / "run")


def test_established_tcp_connection(tmp_path, store, criu, restorer):
    app = TCP_CLIENT_APP.format(ready="pool.runtime.checkpoint()")
    err = refused(tmp_path, store, criu, app, ready="sdk = true")
    assert "established TCP connection" in err.problem and "tcp_close = true" in err.problem
    assert "Connected TCP socket" in err.problem  # CRIU's words, for the curious

    # With tcp_close the dump closes it, and each copy finds it closed: writes fail, reads get EOF.
    build_app(tmp_path, store, criu, app, ready="sdk = true", extra="[checkpoint]\ntcp_close = true")
    inst = restorer.spawn(NAME)
    try:
        out = wait_for_line(inst, "recv ->")
        assert "send -> [Errno 32] Broken pipe" in out and "recv -> b''" in out, out
    finally:
        inst.kill(grace=0)
        inst.close()


# Connects to a unix socket of a server outside its tree (the test's), and keeps the connection.
UNIX_CLIENT_APP = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "in-backlog"])
def test_unix_socket_connected_outside_the_tree(tmp_path, store, criu, accepted):
    path = tmp_path / "server.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        peers: list[socket.socket] = []
        if accepted:  # CRIU says "External socket is used"; before accept(), "Dangling connection"
            threading.Thread(target=lambda: peers.append(server.accept()[0]), daemon=True).start()
        try:
            err = refused(tmp_path, store, criu, UNIX_CLIENT_APP,
                          command=f'["python3", "app.py", "{path}"]')
        finally:
            for p in peers:
                p.close()
    assert "connected to something outside its tree" in err.problem, err.message


# Opens a file at boot (mode argv[2]) and keeps it open.
OPEN_FILE_APP = """
import sys, time
f = open(sys.argv[1], sys.argv[2])
if f.writable():
    f.write("booted\\n")
    f.flush()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def build_file_holder(tmp_path, store, criu, mode: str):
    data = tmp_path / "data.log"
    data.write_text("made before the build\n")
    template = build_app(tmp_path, store, criu, OPEN_FILE_APP,
                         command=f'["python3", "app.py", "{data}", "{mode}"]')
    size = data.stat().st_size  # as CRIU recorded it
    with open(data, "a") as f:  # anyone, a copy of the template included, adding to it later
        f.write("one more line\n")
    return template, data, size


# CRIU records the size of every regular file the app holds open, read-only ones too.
@pytest.mark.parametrize("mode", ["w", "r"])
def test_open_file_that_grows_after_the_checkpoint(tmp_path, store, criu, restorer, mode):
    template, data, size = build_file_holder(tmp_path, store, criu, mode)
    for _ in range(2):  # the same error every time: trying neither repairs nor damages anything
        with pytest.raises(RestoreError) as info:
            restorer.spawn(NAME)
        assert info.value.step == "restoring with CRIU"
        assert f"data.log has bad size {data.stat().st_size} (expect {size})" in info.value.problem
        assert "open growing files with O_APPEND" in info.value.problem  # the advice comes first
    store.get(NAME).verify(full=True)  # the template itself is intact
    assert store.get(NAME).build_id == template.build_id

    data.write_bytes(data.read_bytes()[:size])  # back to the size CRIU recorded: restores again
    inst = restorer.spawn(NAME)
    inst.kill(grace=0)
    inst.close()


def test_file_opened_with_o_append_may_grow(tmp_path, store, criu, restorer):
    build_file_holder(tmp_path, store, criu, "a")
    inst = restorer.spawn(NAME)  # CRIU does not size-check write-only O_APPEND files
    inst.kill(grace=0)
    inst.close()


JAVA_APP = """
public class Idle {
    public static void main(String[] args) throws Exception {
        System.out.println("ready");
        Thread.sleep(Long.MAX_VALUE);
    }
}
"""


def test_jvm_perf_data(tmp_path, store, criu, restorer):
    # The JVM maps /tmp/hsperfdata_USER/PID and deletes it when it exits: the first copy that ends
    # takes the file every later restore needs. Hence -XX:-UsePerfData (templates/java-hello).
    build_app(tmp_path, store, criu, JAVA_APP, app_file="Idle.java",  # source launcher: no javac
              command='["java", "-XX:+UsePerfData", "-XX:+UseSerialGC", "Idle.java"]')
    first = restorer.spawn(NAME)
    first.kill(grace=5)  # SIGTERM: the JVM shuts down normally, removing its perf data file
    first.close()
    assert first.exit_status is not None
    with pytest.raises(RestoreError) as info:
        restorer.spawn(NAME)
    assert "hsperfdata_" in info.value.problem and "No such file or directory" in info.value.problem
    assert "-XX:-UsePerfData" in info.value.problem


# Reads a file the libuv way: with io_uring when UV_USE_IO_URING=1.
NODE_APP = """
require('fs').readFile(__filename, () => {
  console.log('ready');
  setInterval(() => {}, 1000);
});
"""


@pytest.mark.parametrize("uring", ["1", None], ids=["UV_USE_IO_URING=1", "builder-default"])
def test_node_io_uring(tmp_path, store, criu, uring):
    d = write_template(tmp_path, NODE_APP, app_file="app.js", command='["node", "app.js"]',
                       extra=f'[env]\nUV_USE_IO_URING = "{uring}"' if uring else "")
    if uring:
        with pytest.raises(BuildError) as info:
            build(load_spec(d), store, criu)
        assert "io_uring" in info.value.problem and "UV_USE_IO_URING=0" in info.value.problem
        assert "anon_inode:[io_uring]" in info.value.problem
        assert_rolled_back(store)
    else:  # the builder sets UV_USE_IO_URING=0 unless the template says otherwise
        build(load_spec(d), store, criu)


# Holds a 2 MiB file that has no name any more (O_TMPFILE): CRIU must copy it into the image.
DELETED_FILE_APP = """
import tempfile, time
scratch = tempfile.TemporaryFile()
scratch.write(b"x" * (2 << 20))
scratch.flush()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_deleted_file_over_the_ghost_limit(tmp_path, store, criu, restorer):
    err = refused(tmp_path, store, criu, DELETED_FILE_APP)
    assert "ghost_limit" in err.problem, err.message
    assert "Can't dump ghost file" in err.problem

    build_app(tmp_path, store, criu, DELETED_FILE_APP, extra=f"[checkpoint]\nghost_limit = {4 << 20}")
    inst = restorer.spawn(NAME)
    inst.kill(grace=0)
    inst.close()


# A multiprocessing lock is a POSIX semaphore: a file in /dev/shm, unlinked at once and kept mapped.
# CRIU saves it as a "ghost file" and recreates it at the same path during every restore.
SEMAPHORE_APP = """
import multiprocessing, time
lock = multiprocessing.Lock()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def spawn_at_once(restorer, n: int) -> list:
    """n restores started together: each result is an Instance or the RestoreError."""
    results: list = [None] * n

    def spawn(i: int) -> None:
        try:
            results[i] = restorer.spawn(NAME)
        except RestoreError as e:
            results[i] = e
    threads = [threading.Thread(target=spawn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_ghost_files_are_restored_one_at_a_time(tmp_path, store, criu, restorer):
    """A template holding a deleted file: its ghost is recreated at the same path by every restore,
    so concurrent restores of it collided here (`Can't create ghost regfile: File exists`) in
    nearly every round of 4 until the restorer serialized them. Now every copy comes up."""
    t = build_app(tmp_path, store, criu, SEMAPHORE_APP)
    assert any(f.startswith("ghost-file") for f in t.manifest.files)
    for _ in range(3):
        results = spawn_at_once(restorer, 4)
        for r in results:
            if not isinstance(r, RestoreError):
                r.kill(grace=0)
                r.close()
        assert not [r for r in results if isinstance(r, RestoreError)], results
