"""pool/cr/criu.py against the real CRIU: dump and restore a real process, and the error paths."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pool.cr.criu import Criu, CriuVersion, RestoreOptions, become_subreaper
from pool.errors import CriuFailed, CriuUnavailable

# Counts in memory and prints each value: a restored copy must continue from where the dump left it.
COUNTER = "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.05)\n"


def start_counter(stdout_fd: int) -> tuple[subprocess.Popen, int]:
    """The counter as PID 1 of its own pid namespace, under tini, in a session of its own."""
    launcher = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--", "setsid", "tini", "-s", "--", "python3", "-c", COUNTER],
        stdout=stdout_fd, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    import psutil

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = psutil.Process(launcher.pid).children()
        if kids and kids[0].children():  # tini and the counter are up
            return launcher, kids[0].pid
        time.sleep(0.01)
    launcher.kill()
    raise RuntimeError("counter did not start")


def read_numbers(fd: int, at_least: int, timeout: float = 5.0) -> list[int]:
    import select

    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < at_least and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return [int(x) for x in buf.split()]


def test_version_and_check(criu: Criu):
    v = criu.version()
    assert v.at_least(4, 2), v
    assert criu.check().ok


def test_version_parse():
    assert CriuVersion.parse("Version: 4.2.1\nGitID: x\n") == CriuVersion(4, 2, 1)
    assert str(CriuVersion.parse("Version: 4.2")) == "4.2.0"
    with pytest.raises(ValueError):
        CriuVersion.parse("criu, the tool")


def test_dump_then_restore_keeps_memory(criu: Criu, tmp_path):
    become_subreaper()
    r, w = os.pipe()
    launcher, root = start_counter(w)
    os.close(w)
    try:
        before = read_numbers(r, 3)
        criu.dump(root, tmp_path / "img", log_dir=tmp_path)
        launcher.wait(5)  # the dump killed the tree, so unshare returns
        last = read_numbers(r, 10 ** 6, timeout=0.3)
        seen = max(before + last)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        os.close(r)
    assert (tmp_path / "img" / "pstree.img").exists()
    # The copy's stdout is the template's pipe: give it a fresh one through inherit_fd.
    import pycriu.images as images

    files = images.load(open(tmp_path / "img" / "files.img", "rb"))["entries"]
    pipe_ids = {e["pipe"]["pipe_id"] for e in files if e["type"] == "PIPE"}
    assert len(pipe_ids) == 1
    ino = pipe_ids.pop()
    r2, w2 = os.pipe()
    pid = criu.restore(tmp_path / "img", log_dir=tmp_path,
                       opts=RestoreOptions(inherit_fds={f"pipe:[{ino}]": w2}))
    os.close(w2)
    try:
        after = read_numbers(r2, 3)
        assert after, "the restored copy printed nothing"
        assert after[0] == seen + 1, (seen, after)  # memory intact: the count continues
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # alive, and our child (subreaper)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r2)


def test_dump_of_missing_process_fails_and_leaves_no_images(criu: Criu, tmp_path):
    with pytest.raises(CriuFailed) as info:
        criu.dump(4_000_000, tmp_path / "img", log_dir=tmp_path)
    err = info.value
    assert err.op == "dump"
    assert err.log_tail, "the CRIU log excerpt must travel with the error"
    assert "4000000" in err.log_tail or "No such" in err.log_tail or err.errno
    assert not (tmp_path / "img").exists()
    assert (tmp_path / "dump.log").exists()


def test_restore_of_garbage_image_is_criu_failed(criu: Criu, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "inventory.img").write_bytes(b"not an image")
    with pytest.raises(CriuFailed) as info:
        criu.restore(img, log_dir=tmp_path)
    assert info.value.op == "restore"
    assert info.value.log_tail


def test_missing_binary_is_unavailable(tmp_path):
    with pytest.raises(CriuUnavailable, match="does not exist"):
        Criu(tmp_path / "no-criu").version()


def test_pool_criu_wrong_path_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("POOL_CRIU", str(tmp_path / "nope"))
    with pytest.raises(CriuUnavailable) as info:
        Criu.locate()
    assert "POOL_CRIU=" in info.value.message and "\n" not in info.value.message


def test_pool_criu_too_old(monkeypatch, tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("POOL_CRIU", str(fake))
    with pytest.raises(CriuUnavailable, match="older than 4.2"):
        Criu.locate()


def test_swrk_that_dies_is_unavailable_not_failed(tmp_path):
    """A binary that answers --version but dies in swrk: "could not talk to CRIU"."""
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version: 4.2.1' && exit 0\nexit 1\n")
    fake.chmod(0o755)
    img = tmp_path / "img"
    img.mkdir()
    with pytest.raises(CriuUnavailable, match="could not talk to CRIU"):
        Criu(fake).restore(img, log_dir=tmp_path)
