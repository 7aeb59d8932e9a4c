"""One restore of a template build, as a chain of small named steps over a RestoreJob.

    make the run dir -> open the log files -> open the control pipes (SDK templates only)
    -> restore with CRIU -> close what CRIU was handed -> take the copy over -> validate it
    -> drop CRIU's restore log

Each step that makes something (a dir, an fd, a process) pushes how to undo it onto the job's
undo stack (a contextlib.ExitStack). When a step fails, the stack unwinds in reverse order, so a
failed restore leaves no process, fd or dir behind; the template is only read, never touched.
Once the copy is taken over, it owns the process and fds, and undoing it is killing and closing it.

The lazy variant (post-copy: memory served by a page server, pool/copies/fork.py) is the same
chain with the CRIU step swapped for two: start the lazy-pages daemon, then restore lazily.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pool.copies import journal
from pool.copies.restored import STREAMS, RestoredCopy, open_handles
from pool.cr import hints
from pool.cr.criu import Criu, LazyPages, RestoreOptions, disown
from pool.errors import CriuError, RestoreError
from pool.templates.store import Template


@dataclass(eq=False)
class RestoreJob:
    """One restore in progress: what it is asked (first fields) and what its steps made so far."""

    template: Template
    instance_id: str
    run_dir: Path                  # the copy's private dir; must not exist yet
    criu: Criu
    timeout: float = 60.0          # for CRIU's restore
    page_server: tuple[str, int] | None = None   # lazy: where the memory is (None: the build's files)
    criu_lock: AbstractContextManager = field(default_factory=contextlib.nullcontext)
    undo: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    inherit: dict[str, int] = field(default_factory=dict)  # CRIU inherit-fd key -> fd it is handed
    ctl_w: int | None = None       # pool -> app, ours until the copy takes it
    ctl_r: int | None = None       # app -> pool
    lazy_pages: LazyPages | None = None
    pid: int = -1                  # the restored tree's root, ours until the copy takes it
    restore_s: float = 0.0
    copy: RestoredCopy | None = None


Step = Callable[[RestoreJob], None]


def run(job: RestoreJob, steps: tuple[Step, ...]) -> RestoredCopy:
    """Run the steps in order; if one fails, undo what the earlier ones made, newest first."""
    with job.undo:
        for step in steps:
            step(job)
        if job.copy is None:
            raise ValueError("a restore chain must take the copy over (take_over_copy)")
        job.undo.pop_all()  # success: the copy keeps what was made
    return job.copy


# --- the steps ---------------------------------------------------------------------------------------
def make_run_dir(job: RestoreJob) -> None:
    """The copy's private dir, marked as ours (a node recovering on this run dir leaves it be)."""
    job.run_dir.mkdir(mode=0o700)
    job.undo.callback(shutil.rmtree, job.run_dir, ignore_errors=True)
    journal.mark_owner(job.run_dir)


def open_logs(job: RestoreJob) -> None:
    """The copy's stdout.log and stderr.log, handed to CRIU in place of the image's stdio."""
    m = job.template.manifest
    for stream in STREAMS:
        key = m.stdio_key(stream)
        fd = os.open(job.run_dir / f"{stream}.log",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        _hand_to_criu(job, key, fd)


def open_control_pipes(job: RestoreJob) -> None:
    """SDK templates: two fresh pipes in place of the builder's, to hand the copy its identity."""
    m = job.template.manifest
    if not m.sdk:
        return
    key_in, key_out = m.pipe_key("ctl_in"), m.pipe_key("ctl_out")
    r, job.ctl_w = os.pipe2(os.O_CLOEXEC)     # pool -> app
    job.undo.callback(_close_ours, job, "ctl_w")
    _hand_to_criu(job, key_in, r)
    job.ctl_r, w = os.pipe2(os.O_CLOEXEC)     # app -> pool
    job.undo.callback(_close_ours, job, "ctl_r")
    _hand_to_criu(job, key_out, w)


def restore_with_criu(job: RestoreJob) -> None:
    """CRIU restores the tree, detached; its root becomes our child."""
    _criu_restore(job, "restoring with CRIU", lazy=False)


def start_lazy_pages(job: RestoreJob) -> None:
    """Lazy variant: the daemon that feeds the copy its memory (exits once every page is in)."""
    try:
        job.lazy_pages = job.criu.lazy_pages(job.template.image_dir, job.run_dir,
                                             page_server=job.page_server)
    except CriuError as e:
        raise RestoreError("restoring lazily with CRIU", e.message) from e
    job.undo.callback(job.lazy_pages.kill)


def restore_lazily_with_criu(job: RestoreJob) -> None:
    """Lazy variant of restore_with_criu: the copy runs before its memory is all in."""
    _criu_restore(job, "restoring lazily with CRIU", lazy=True)


def close_handed_fds(job: RestoreJob) -> None:
    """CRIU gave the copy its own copies of what it was handed: ours go."""
    for key in list(job.inherit):
        os.close(job.inherit.pop(key))


def take_over_copy(job: RestoreJob) -> None:
    """The RestoredCopy takes the process and our fds; undoing it kills and closes it."""
    m = job.template.manifest
    pidfd, netns_fd = open_handles(job.pid)
    job.copy = RestoredCopy(
        id=job.instance_id, template=job.template.name, build_id=job.template.build_id,
        pid=job.pid, pidfd=pidfd, run_dir=job.run_dir, netns_fd=netns_fd, sdk=m.sdk, port=m.port,
        restore_s=job.restore_s, ctl_w=job.ctl_w, ctl_r=job.ctl_r,
        identity_timeout=float(m.restore_spec.get("identity_timeout") or 10.0),
        hostname_pattern=m.restore_spec.get("hostname"))
    job.pid, job.ctl_w, job.ctl_r = -1, None, None  # the copy owns them now
    job.undo.callback(_discard, job.copy)


def validate_copy(job: RestoreJob) -> None:
    """CRIU ignores an inherit-fd key that matches nothing: make sure stdio really is the copy's own."""
    copy = job.copy
    assert copy is not None, "validate_copy runs after take_over_copy"
    if copy.poll() is not None:
        raise RestoreError("validating the copy", f"it exited at once with status {copy.exit_status}",
                           output_tail=copy.output_tail())
    try:
        target = os.readlink(f"/proc/{copy.pid}/fd/1")
    except OSError as e:
        raise RestoreError("validating the copy", f"cannot read its stdout: {e.strerror}") from e
    if target != str(copy.log_path("stdout")):
        raise RestoreError("validating the copy",
                           f"its stdout is {target}, not its own log: the image's stdio pipes do not "
                           "match the manifest")


def drop_restore_log(job: RestoreJob) -> None:
    """CRIU's log of a restore that worked is noise in the copy's dir."""
    with contextlib.suppress(OSError):
        os.unlink(job.run_dir / "restore.log")


EAGER: tuple[Step, ...] = (make_run_dir, open_logs, open_control_pipes, restore_with_criu,
                           close_handed_fds, take_over_copy, validate_copy, drop_restore_log)


def swap(steps: tuple[Step, ...], old: Step, *new: Step) -> tuple[Step, ...]:
    """steps with old replaced by new (a variant of a chain, not a second chain)."""
    if old not in steps:
        raise ValueError(f"{old.__name__} is not a step of this chain")
    i = steps.index(old)
    return steps[:i] + new + steps[i + 1:]


LAZY = swap(EAGER, restore_with_criu, start_lazy_pages, restore_lazily_with_criu)


# --- helpers -----------------------------------------------------------------------------------------
def _hand_to_criu(job: RestoreJob, key: str, fd: int) -> None:
    job.inherit[key] = fd
    job.undo.callback(_close_handed, job, key)


def _close_handed(job: RestoreJob, key: str) -> None:
    fd = job.inherit.pop(key, None)  # None: close_handed_fds closed it already
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_ours(job: RestoreJob, name: str) -> None:
    fd = getattr(job, name)  # None: the copy took it over
    if fd is not None:
        setattr(job, name, None)
        with contextlib.suppress(OSError):
            os.close(fd)


def _criu_restore(job: RestoreJob, step: str, *, lazy: bool) -> None:
    t0 = time.monotonic()
    try:
        with job.criu_lock:
            job.pid = job.criu.restore(
                job.template.image_dir, log_dir=job.run_dir, timeout=job.timeout,
                opts=RestoreOptions(inherit_fds=dict(job.inherit), lazy_pages=lazy,
                                    tcp_close=job.template.manifest.tcp_close))
    except CriuError as e:
        hint = hints.explain(hints.RESTORE, e.message)
        raise RestoreError(step, f"{hint}\n{e.message}" if hint else e.message) from e
    job.restore_s = time.monotonic() - t0
    job.undo.callback(_kill_restored, job)


def _kill_restored(job: RestoreJob) -> None:
    """A restored tree no copy took over: SIGKILL to its PID 1 ends its pid namespace."""
    pid, job.pid = job.pid, -1
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    disown(pid)


def _discard(copy: RestoredCopy) -> None:
    copy.kill(grace=0)
    copy.close()
