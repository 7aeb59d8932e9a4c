"""The restore chain over a fake CRIU layer: real dirs, fds and processes (a `sleep` stands in for
the restored tree), so what a failing step must undo is really there to undo."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from pool.copies import fork, restore_chain
from pool.copies.fork import restore_lazy
from pool.copies.restore_chain import EAGER, LAZY, RestoreJob
from pool.errors import CriuFailed, RestoreError
from pool.templates.store import Template, seal


class FakeLazyPages:
    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class FakeCriu:
    """Restores a `sleep` whose stdout and stderr are the fds handed for the copy's stdio."""

    def __init__(self) -> None:
        self.fail_restore = False
        self.stdout_elsewhere = False   # the image's stdio keys matched nothing CRIU was handed
        self.calls: list[str] = []
        self.pids: list[int] = []
        self.daemons: list[FakeLazyPages] = []

    def restore(self, images_dir: Path, *, opts, timeout: float, log_dir: Path) -> int:
        self.calls.append("restore(lazy)" if opts.lazy_pages else "restore")
        (log_dir / "restore.log").write_text("restore log\n")
        if self.fail_restore:
            raise CriuFailed("restore", "exit status 1", log_tail="Error (criu/cr-restore.c): boom")
        if self.stdout_elsewhere:
            stdio = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
        else:
            stdio = [(os.POSIX_SPAWN_DUP2, opts.inherit_fds[self.stdio_keys[stream]], fd)
                     for fd, stream in ((1, "stdout"), (2, "stderr"))]
        pid = os.posix_spawnp("sleep", ["sleep", "60"], dict(os.environ), file_actions=stdio)
        self.pids.append(pid)
        return pid

    def lazy_pages(self, images_dir: Path, work_dir: Path, *, page_server=None,
                   log_faults=True) -> FakeLazyPages:
        self.calls.append(f"lazy_pages({page_server})")
        self.daemons.append(FakeLazyPages())
        return self.daemons[-1]


def fake_template(tmp_path: Path, *, sdk: bool = False) -> Template:
    build = tmp_path / "build"
    (build / "image").mkdir(parents=True)
    (build / "image" / "inventory.img").write_bytes(b"inventory")
    pipes = {"stdout": 11, "stderr": 12, **({"ctl_in": 13, "ctl_out": 14} if sdk else {})}
    return seal(build, "fake", {"build_id": "b1", "arch": "x86_64", "kernel": "6.18.0",
                                "criu_version": "4.2.1", "pipes": pipes, "spec_digest": None,
                                "spec": {"name": "fake", "network": {"port": 8080}}})


def open_fds() -> set[str]:
    """Our open fds, less the one listdir used (closed by the time it is read back)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.readlink(f"/proc/self/fd/{fd}")
            fds.add(fd)
    return fds


def gone(pid: int) -> bool:
    """pid is no child of ours any more (killed and reaped)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.fixture(autouse=True)
def not_a_subreaper(monkeypatch):
    """restore_lazy makes its process a child subreaper; this test process must not adopt the
    orphans of other tests (the fake copies are our children anyway)."""
    monkeypatch.setattr(fork, "become_subreaper", lambda: None)


@pytest.fixture
def criu():
    c = FakeCriu()
    yield c
    for pid in c.pids:  # a test that failed half-way must not leave its sleep behind
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def job_for(tmp_path: Path, criu: FakeCriu, sdk: bool = False, **kw) -> RestoreJob:
    template = fake_template(tmp_path, sdk=sdk)
    criu.stdio_keys = {s: template.manifest.stdio_key(s) for s in ("stdout", "stderr")}
    return RestoreJob(template=template, instance_id="i1", run_dir=tmp_path / "run" / "i1.x",
                      criu=criu, **kw)


def test_eager_chain_gives_a_warm_copy_that_owns_what_was_made(tmp_path, criu):
    (tmp_path / "run").mkdir()
    before = open_fds()
    job = job_for(tmp_path, criu, sdk=True)
    copy = restore_chain.run(job, EAGER)
    try:
        assert criu.calls == ["restore"]
        assert copy.id == "i1" and copy.build_id == "b1" and copy.port == 8080 and copy.sdk
        assert copy.poll() is None
        assert os.readlink(f"/proc/{copy.pid}/fd/1") == str(copy.log_path("stdout"))
        assert not (copy.run_dir / "restore.log").exists()
        assert (copy.run_dir / "owner").is_file()
        # ours now: pidfd, netns fd and the two control pipe ends; what CRIU was handed is closed
        kept = {str(fd) for fd in (copy.pidfd, copy.netns_fd, copy.ctl_w, copy.ctl_r)}
        assert open_fds() - before == kept
        assert job.inherit == {} and job.pid == -1 and job.ctl_w is None and job.ctl_r is None
    finally:
        copy.kill(grace=0)
        copy.close()
    assert open_fds() == before and not copy.run_dir.exists()


def test_criu_refusing_undoes_the_dir_and_every_fd(tmp_path, criu):
    (tmp_path / "run").mkdir()
    criu.fail_restore = True
    before = open_fds()
    job = job_for(tmp_path, criu, sdk=True)
    with pytest.raises(RestoreError, match="restoring with CRIU") as e:
        restore_chain.run(job, EAGER)
    assert isinstance(e.value.__cause__, CriuFailed)
    assert open_fds() == before
    assert list((tmp_path / "run").iterdir()) == []
    assert (job.template.image_dir / "inventory.img").read_bytes() == b"inventory"


def fail(job: RestoreJob) -> None:
    raise RestoreError("a later step", "it failed")


def test_failure_after_criu_kills_and_reaps_the_restored_tree(tmp_path, criu):
    (tmp_path / "run").mkdir()
    before = open_fds()
    steps = restore_chain.swap(EAGER, restore_chain.close_handed_fds,
                               restore_chain.close_handed_fds, fail)
    with pytest.raises(RestoreError, match="it failed"):
        restore_chain.run(job_for(tmp_path, criu), steps)
    assert len(criu.pids) == 1 and gone(criu.pids[0])
    assert open_fds() == before and list((tmp_path / "run").iterdir()) == []


def test_failing_validation_kills_and_closes_the_copy(tmp_path, criu):
    (tmp_path / "run").mkdir()
    before = open_fds()
    criu.stdout_elsewhere = True
    with pytest.raises(RestoreError, match="not its own log"):
        restore_chain.run(job_for(tmp_path, criu), EAGER)
    assert gone(criu.pids[0])
    assert open_fds() == before and list((tmp_path / "run").iterdir()) == []


def test_undo_runs_in_reverse_order_of_what_was_made(tmp_path, criu):
    (tmp_path / "run").mkdir()
    before = open_fds()
    seen: list[tuple[str, bool, int]] = []  # (mark, run dir there?, fds the chain still holds)

    def mark(name: str):
        def step(job: RestoreJob) -> None:
            job.undo.callback(lambda: seen.append(
                (name, job.run_dir.exists(), len(open_fds() - before))))
        step.__name__ = f"mark_{name}"
        return step

    steps = (restore_chain.make_run_dir, mark("a"), restore_chain.open_logs, mark("b"),
             restore_chain.open_control_pipes, mark("c"), fail)
    with pytest.raises(RestoreError, match="it failed"):
        restore_chain.run(job_for(tmp_path, criu, sdk=True), steps)
    # c: logs and both pipes still open; b: the pipes closed, the logs not yet; a: only the dir
    assert seen == [("c", True, 6), ("b", True, 2), ("a", True, 0)]
    assert open_fds() == before and list((tmp_path / "run").iterdir()) == []
    assert criu.calls == []


def test_lazy_variant_swaps_the_criu_step(tmp_path, criu):
    assert LAZY == restore_chain.swap(EAGER, restore_chain.restore_with_criu,
                                      restore_chain.start_lazy_pages,
                                      restore_chain.restore_lazily_with_criu)
    template = job_for(tmp_path, criu).template
    before = open_fds()
    copy, daemon = restore_lazy(template, criu, tmp_path / "lazy", ("10.0.0.1", 7000),
                                instance_id="l1")
    try:
        assert criu.calls == ["lazy_pages(('10.0.0.1', 7000))", "restore(lazy)"]
        assert daemon is criu.daemons[0] and not daemon.killed
        assert copy.id == "l1" and copy.run_dir == tmp_path / "lazy" and copy.poll() is None
        assert open_fds() - before == {str(copy.pidfd), str(copy.netns_fd)}
    finally:
        copy.kill(grace=0)
        copy.close()


def test_lazy_restore_failing_kills_the_daemon_it_started(tmp_path, criu):
    template = job_for(tmp_path, criu).template
    criu.fail_restore = True
    before = open_fds()
    with pytest.raises(RestoreError, match="restoring lazily with CRIU"):
        restore_lazy(template, criu, tmp_path / "lazy", None, instance_id="l2")
    assert criu.daemons[0].killed and criu.calls == ["lazy_pages(None)", "restore(lazy)"]
    assert open_fds() == before and not (tmp_path / "lazy").exists()


def test_lazy_restore_refuses_an_sdk_template_before_making_anything(tmp_path, criu):
    template = job_for(tmp_path, criu, sdk=True).template
    with pytest.raises(ValueError, match="SDK control channel"):
        restore_lazy(template, criu, tmp_path / "lazy", None, instance_id="l3")
    assert criu.calls == [] and not (tmp_path / "lazy").exists()


def test_swap_names_a_step_that_is_not_there():
    with pytest.raises(ValueError, match="fail is not a step"):
        restore_chain.swap(EAGER, fail)
