"""The iterative checkpoint of a running instance (pre-dump -> dump with a parent image) over a
fake CRIU layer: the real process whose stdio CRIU would key, real snapshot dirs, sealing,
verification, a real transfer to another store and a real publish.

The kernels this project is tested on have no soft-dirty tracking, so real CRIU cannot pre-dump
there (tests/integration/test_live.py covers the path without it); the fake stands in for what
CRIU does: the pre-dump writes pages into its dir, the dump writes its images and, given
parent_img, the `parent` symlink to it (criu/image.c)."""
from __future__ import annotations

import asyncio
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from pool.copies import snapshots
from pool.copies.restored import RestoredCopy
from pool.copies.snapshots import Snapshots
from pool.cr.criu import CheckResult, Criu, CriuVersion, DumpOptions
from pool.errors import CriuFailed
from pool.templates import transfer
from pool.templates.imagecrypt import ImageKey
from pool.templates.manifest import PARENT
from pool.templates.store import Store, load_build


class FakeCriu:
    """Records each request it gets, in order, and writes placeholder images as CRIU would."""

    binary = "fake-criu"

    def __init__(self, *, dirty_tracking: bool = True, fail_pre_dump: bool = False) -> None:
        self.dirty_tracking = dirty_tracking
        self.fail_pre_dump = fail_pre_dump
        self.requests: list[tuple[str, dict]] = []

    def feature(self, name: str) -> CheckResult:
        self.requests.append(("feature", {"name": name}))
        return CheckResult(ok=self.dirty_tracking and name == "mem_dirty_track", output="")

    def pre_dump(self, pid: int, images_dir: Path, *, opts: DumpOptions | None = None,
                 timeout: float, log_dir: Path) -> Path:
        self.requests.append(("pre_dump", {"pid": pid, "images_dir": images_dir}))
        images_dir.mkdir(mode=0o700)
        (images_dir / "pagemap-1.img").write_bytes(b"pre pagemap")
        (images_dir / "pages-1.img").write_bytes(b"p" * 8192)
        if self.fail_pre_dump:  # a half-written pre-dump is left behind: the caller removes it
            raise CriuFailed("pre-dump", "CRIU stopped answering",
                             log_tail="Error (criu/mem.c:46): BUG at criu/mem.c:46")
        return log_dir / "pre-dump.log"

    def dump(self, pid: int, images_dir: Path, *, opts: DumpOptions, timeout: float,
             log_dir: Path) -> Path:
        self.requests.append(("dump", {"pid": pid, "images_dir": images_dir,
                                       "track_mem": opts.track_mem, "parent_img": opts.parent_img,
                                       "leave_running": opts.leave_running}))
        images_dir.mkdir(mode=0o700)
        (images_dir / "inventory.img").write_bytes(b"inventory")
        (images_dir / "pagemap-1.img").write_bytes(b"dump pagemap")
        (images_dir / "pages-1.img").write_bytes(b"d" * 4096)
        if opts.parent_img is not None:
            os.symlink(opts.parent_img, images_dir / PARENT)
        return log_dir / "dump.log"

    def cpuinfo_dump(self, images_dir: Path) -> None:
        (images_dir / "cpuinfo.img").write_bytes(b"cpuinfo")

    def version(self) -> CriuVersion:
        return CriuVersion(4, 2, 1)

    def ops(self) -> list[str]:
        return [op for op, _ in self.requests if op != "feature"]

    def request(self, op: str) -> dict:
        return next(r for o, r in self.requests if o == op)


@pytest.fixture(autouse=True)
def no_cached_feature_check(monkeypatch):
    monkeypatch.setattr(snapshots, "_dirty_tracking", {})


@pytest.fixture
def inst(tmp_path):
    """A running copy: a real process whose stdout and stderr are its run dir's log files."""
    run = tmp_path / "instances" / "i1"
    run.mkdir(parents=True)
    stdio = [(os.POSIX_SPAWN_OPEN, fd, str(run / f"{s}.log"), os.O_WRONLY | os.O_CREAT, 0o600)
             for fd, s in ((1, "stdout"), (2, "stderr"))]
    pid = os.posix_spawnp("sleep", ["sleep", "60"], dict(os.environ), file_actions=stdio)
    copy = RestoredCopy(id="i1", template="app", build_id="b1", pid=pid, pidfd=os.pidfd_open(pid),
                        run_dir=run, netns_fd=-1, sdk=False, port=8080, state="running")
    try:
        yield copy
    finally:
        if copy.poll() is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(copy.pidfd)


def tree(d: Path) -> dict[str, os.stat_result]:
    """Every entry under d, links not followed, by path relative to d."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p.relative_to(d))] = os.lstat(p)
    return out


def test_with_dirty_tracking_the_dump_is_iterative_over_a_pre_dump_in_the_snapshot(tmp_path, inst):
    criu = FakeCriu()
    s = snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), criu)

    assert criu.ops() == ["pre_dump", "dump"]
    assert criu.request("pre_dump") == {"pid": inst.pid, "images_dir": s.dir / "pre"}
    dump = criu.request("dump")
    assert dump["track_mem"] is True and dump["leave_running"] is True
    parent_img = dump["parent_img"]
    assert not os.path.isabs(parent_img)
    image = s.dir / "build" / "image"
    assert (image / parent_img).resolve() == (s.dir / "pre").resolve()
    assert os.readlink(image / PARENT) == parent_img
    assert s.pre_dumped and s.pre_dump.startswith("ran:")
    assert inst.poll() is None  # the app kept running through both

    # the pre-dump's images belong to the build: listed, verified, counted, private
    t = s.template
    assert {"parent/pagemap-1.img", "parent/pages-1.img", "pages-1.img"} <= set(t.manifest.files)
    t.verify(full=True)
    entries = tree(s.dir)
    assert s.bytes == sum(st.st_size for st in entries.values() if stat.S_ISREG(st.st_mode))
    assert s.bytes > t.image_bytes  # snapshot.json and manifest.json on top of every image file
    for rel, st in entries.items():
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == (0o700 if stat.S_ISDIR(st.st_mode) else 0o600), rel
    assert snapshots.Snapshots(tmp_path / "snaps").get("i1").pre_dumped

    # self-contained: moved elsewhere, the link still finds the pre-dump
    moved = tmp_path / "elsewhere"
    os.rename(s.dir, moved)
    assert (moved / "build" / "image" / PARENT / "pages-1.img").read_bytes() == b"p" * 8192
    load_build(moved / "build").verify(full=True)


def test_a_failing_pre_dump_falls_back_to_a_full_dump(tmp_path, inst):
    criu = FakeCriu(fail_pre_dump=True)
    s = snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), criu)

    assert criu.ops() == ["pre_dump", "dump"]
    dump = criu.request("dump")
    assert dump["track_mem"] is False and dump["parent_img"] is None
    assert not s.pre_dumped
    assert s.pre_dump.startswith("failed") and "BUG at criu/mem.c:46" in s.pre_dump
    assert not (s.dir / "pre").exists() and not os.path.lexists(s.dir / "build" / "image" / PARENT)
    assert not any(rel.startswith("parent/") for rel in s.template.manifest.files)
    s.template.verify(full=True)
    assert inst.poll() is None


def test_without_dirty_tracking_no_pre_dump_is_asked_for(tmp_path, inst):
    criu = FakeCriu(dirty_tracking=False)
    s = snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), criu)
    snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), criu)

    assert criu.ops() == ["dump", "dump"]
    assert [r for op, r in criu.requests if op == "feature"] == [{"name": "mem_dirty_track"}]
    assert criu.request("dump")["track_mem"] is False and criu.request("dump")["parent_img"] is None
    assert not s.pre_dumped and s.pre_dump.startswith("skipped: this kernel has no soft-dirty")
    assert not (s.dir / "pre").exists()


class OneBuild:
    """A store-like view of one unpublished build, as a migrating node serves its snapshot."""

    def __init__(self, template) -> None:
        self.template = template

    def get(self, name: str):
        assert name == self.template.name
        return self.template


def test_a_migration_ships_the_pre_dump_with_the_build(tmp_path, inst):
    s = snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), FakeCriu(),
                             leave_running=False)
    target = Store(tmp_path / "target")

    async def ship():
        src = transfer.TemplateSource(OneBuild(s.template))
        addr = await src.start("127.0.0.1", 0)
        try:
            return await transfer.fetch(target, s.template.name, addr)
        finally:
            await src.close()

    res = asyncio.run(ship())
    got = target.get(s.template.name)
    assert res.files_sent == len(s.template.manifest.files)
    got.verify(full=True)
    assert (got.image_dir / PARENT / "pages-1.img").read_bytes() == b"p" * 8192
    assert (got.image_dir / "pages-1.img").read_bytes() == b"d" * 4096
    assert stat.S_IMODE(os.stat(got.image_dir / PARENT).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(got.image_dir / PARENT / "pages-1.img").st_mode) == 0o600


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_kept_snapshot_publishes_the_pre_dump_with_it(tmp_path, inst, encrypted):
    s = snapshots.checkpoint(inst, Snapshots(tmp_path / "snaps"), FakeCriu())
    key = ImageKey.load_or_create(tmp_path / "image.key", tmp_path / "store") if encrypted else None
    (tmp_path / "ram").mkdir()
    store = Store(tmp_path / "store", key=key, ram_root=tmp_path / "ram")
    try:
        t = snapshots.publish(s, store, "kept")
        assert "parent/pages-1.img" in t.manifest.files
        t.verify(full=True)
        with store.readable(t) as plain:
            assert (plain.image_dir / PARENT / "pages-1.img").read_bytes() == b"p" * 8192
            assert not (plain.image_dir / PARENT).is_symlink()  # a copy, not a link out of the store
    finally:
        store.close()


@contextmanager
def recording_swrk(requests: list):
    """Criu._swrk's stand-in: a pycriu client whose requests are recorded, answered with success."""
    import pycriu  # noqa: PLC0415  (as pool.cr.criu imports it)

    class Client:
        opts = pycriu.rpc.criu_opts(images_dir_fd=-1)

        def _send_req_and_recv_resp(self, req):
            requests.append(req)
            resp = pycriu.rpc.criu_resp()
            resp.type, resp.success = req.type, True
            return resp

        def dump(self):
            req = pycriu.rpc.criu_req(type=pycriu.rpc.DUMP)
            req.opts.MergeFrom(self.opts)
            return self._send_req_and_recv_resp(req)

    class Proc:
        pid = -1

    yield Client(), Proc()


def test_the_wrapper_asks_criu_for_a_one_shot_pre_dump_then_an_iterative_dump(tmp_path,
                                                                            monkeypatch):
    import pycriu  # noqa: PLC0415

    requests: list = []
    monkeypatch.setattr(Criu, "_swrk", lambda self, fds: recording_swrk(requests))
    criu = Criu("criu")
    logs = tmp_path / "logs"
    logs.mkdir()
    criu.pre_dump(1234, tmp_path / "pre", log_dir=logs)
    criu.dump(1234, tmp_path / "image", log_dir=logs,
              opts=DumpOptions(leave_running=True, track_mem=True, parent_img="../pre"))

    pre, dump = requests
    assert pre.type == pycriu.rpc.SINGLE_PRE_DUMP  # PRE_DUMP would hold CRIU for a next request
    assert pre.opts.pid == 1234 and pre.opts.track_mem and pre.opts.log_file == "pre-dump.log"
    assert dump.type == pycriu.rpc.DUMP
    assert dump.opts.track_mem and dump.opts.parent_img == "../pre" and dump.opts.leave_running
    assert (tmp_path / "pre").is_dir() and stat.S_IMODE(os.stat(tmp_path / "pre").st_mode) == 0o700
