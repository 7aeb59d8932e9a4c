"""A full store disk, for real: the store is a small tmpfs mounted by the test (always unmounted).

Shown: a build that runs out of space fails with a BuildError naming the step and ENOSPC, its app is
not left running, nothing of it stays in the store, and the older build stays current, intact and
restorable; a transfer into a store that runs out of space fails with a TransferError naming ENOSPC,
publishes nothing, and a retry once space is freed completes and verifies.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.errors import BuildError, TemplateNotFound, TransferError
from pool.templates import transfer
from pool.templates.build import build
from pool.templates.spec import Spec, load_spec
from pool.templates.store import Store

pytestmark = pytest.mark.integration
COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"
DISK = 64 << 20         # a counter build (~10 MB) fits; the filler then leaves LEFT
LEFT = 1 << 20          # less than any counter image


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.fixture
def small_disk(tmp_path):
    """A DISK-byte tmpfs at tmp_path/disk, unmounted after the test whatever happened."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(disk)],
                   check=True, capture_output=True, text=True, timeout=30)
    try:
        yield disk
    finally:
        busy = subprocess.run(["umount", str(disk)], capture_output=True, text=True, timeout=30)
        if busy.returncode != 0:  # still detach it (no leaked mount), then say so
            subprocess.run(["umount", "--lazy", str(disk)], check=True, timeout=30)
    assert busy.returncode == 0, busy.stderr
    assert not mounted(disk)


def fill(disk: Path, leave: int = LEFT) -> Path:
    """Take all of disk's free space but `leave` bytes; delete the file returned to free it."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)
    return filler


def marked_counter() -> Spec:
    """counter with a marker in its environment, to find its processes among everyone else's."""
    spec = load_spec(COUNTER)
    return dataclasses.replace(spec, env=spec.env + (("DISK_FULL_MARK", secrets.token_hex(8)),))


def processes_with(mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            pass  # gone, or a kernel thread
    return found


def answer(store: Store, criu, run: Path, name: str) -> dict:
    inst = Restorer(store, criu, run).spawn(name, Identity("disk-full"))
    try:
        status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:{inst.port}/", timeout=10)
        assert status == 200, body[:300]
        return json.loads(body)
    finally:
        inst.kill(grace=0)
        inst.close()


def test_a_build_that_runs_out_of_space_fails_typed_and_the_older_build_stays(small_disk, criu,
                                                                              tmp_path):
    store = Store(small_disk / "store")
    spec = marked_counter()
    older = build(spec, store, criu).template
    filler = fill(small_disk)

    with pytest.raises(BuildError) as e:
        build(spec, store, criu)
    assert e.value.step == "checkpointing", e.value.message
    assert e.value.data["errno"] == errno.ENOSPC and "ENOSPC" in e.value.message, e.value.message
    assert processes_with(dict(spec.env)["DISK_FULL_MARK"]) == []      # the app is not left running
    assert list((store.root / ".staging").iterdir()) == []           # nothing partial in the store
    assert [p.name for p in (store.root / "counter" / "builds").iterdir()] == [older.build_id]
    current = store.get("counter")
    assert current.build_id == older.build_id
    current.verify(full=True)
    assert answer(store, criu, tmp_path / "run", "counter")["instance"] == "disk-full"

    filler.unlink()                                                    # space again: builds work
    assert build(spec, store, criu).template.build_id != older.build_id


def test_a_transfer_into_a_full_store_fails_typed_and_a_retry_after_freeing_space_works(
        small_disk, criu, tmp_path):
    source_store = Store(tmp_path / "source")
    sent = build(marked_counter(), source_store, criu).template
    store = Store(small_disk / "store")
    filler = fill(small_disk)

    async def fetch():
        src = transfer.TemplateSource(source_store)
        address = await src.start("127.0.0.1", 0)
        try:
            return await transfer.fetch(store, "counter", address)
        finally:
            await src.close()

    with pytest.raises(TransferError) as e:
        asyncio.run(fetch())
    assert e.value.data["errno"] == errno.ENOSPC and "ENOSPC" in e.value.message, e.value.message
    with pytest.raises(TemplateNotFound):                              # nothing half-installed
        store.get("counter")
    assert store.names() == []

    filler.unlink()
    got = asyncio.run(fetch())
    assert got.template.build_id == sent.build_id and got.files_sent >= 1
    store.get("counter").verify(full=True)
    assert not list((store.root / ".partial").glob("counter@*"))   # the partial became the build
    assert answer(store, criu, tmp_path / "run", "counter")["instance"] == "disk-full"
