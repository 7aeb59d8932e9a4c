"""One restore of a template build, as a chain of small named steps over a RestoreJob.

    make the run dir -> make the copy's cgroup -> open the log files -> open the control pipes
    (SDK templates only) -> restore with CRIU -> close what CRIU was handed -> take the copy over
    -> validate it -> drop CRIU's restore log

The copy's cgroup (pool/cr/cgroups.py: the template's [limits], unset ones from the node's
defaults) exists before CRIU runs, and CRIU is moved into it before it is asked to restore: the
tree it forks is born there, so every page restored is charged to the copy (docs/limits.md).

Each step that makes something (a dir, an fd, a process) pushes how to undo it onto the job's
undo stack (a contextlib.ExitStack). When a step fails, the stack unwinds in reverse order, so a
failed restore leaves no process, fd or dir behind; the template is only read, never touched.
Once the copy is taken over, it owns the process and fds, and undoing it is killing and closing it.

The lazy variant (post-copy: memory served by a page server, pool/copies/fork.py) is the same
chain with the CRIU step swapped for two: start the lazy-pages daemon, then restore lazily.
LAZY_LOCAL (templates with `[restore] method = "lazy"`) reads the pages from the build's own image
and adds two steps: fetch the build's recorded working set before the copy is handed out, and
hand the daemon to a watcher that reaps it once every page is in (and kills the copy if the
daemon dies first: its missing pages would read as zeros).

run() times every step (job.step_s, and job.on_step(name, seconds) for a metric).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pool.copies import journal, prefetch
from pool.copies.restored import STREAMS, RestoredCopy, open_handles
from pool.cr import cgroups, hints
from pool.cr.cgroups import CopyCgroup, Hierarchy, Limits
from pool.cr.criu import Criu, LazyPages, RestoreOptions, disown, reap_strays
from pool.errors import CriuError, RestoreError
from pool.templates.store import Template
from pool.templates.workingset import Run

log = logging.getLogger(__name__)


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
    working_set: list[Run] | None = None    # lazy: pages to fetch before the copy is handed out
    pages_timeout: float = 300.0            # lazy: all pages in by then, or the copy is killed
    step_s: dict[str, float] = field(default_factory=dict)   # step name -> seconds it took
    on_step: Callable[[str, float], None] | None = None
    confine: bool = False                   # give the copy its cgroup (the node's restores do)
    cgroups: Hierarchy | None = None        # where copies' cgroups go (None: none on this node)
    default_limits: Limits = Limits()       # the node's, for what the template leaves unset
    cgroup: CopyCgroup | None = None        # the copy's, until the copy takes it


Step = Callable[[RestoreJob], None]


def run(job: RestoreJob, steps: tuple[Step, ...]) -> RestoredCopy:
    """Run the steps in order; if one fails, undo what the earlier ones made, newest first."""
    with job.undo:
        for step in steps:
            t0 = time.perf_counter()
            step(job)
            took = job.step_s[step.__name__] = time.perf_counter() - t0
            if job.on_step is not None:
                job.on_step(step.__name__, took)
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


def make_cgroup(job: RestoreJob) -> None:
    """The copy's own cgroup with its limits; removed again if the restore fails."""
    if not job.confine:
        return
    limits = template_limits(job.template).or_defaults(job.default_limits)
    if job.cgroups is None:
        if limits.to_dict():
            raise RestoreError("confining the copy", "this node mounts no cgroup memory "
                               f"controller, so it cannot apply the limits {limits.to_dict()}")
        return
    try:
        job.cgroup = job.cgroups.make(job.run_dir.name, limits)
    except OSError as e:
        raise RestoreError("confining the copy",
                           f"cannot make its cgroup: {e.strerror or e}") from e
    job.undo.callback(_remove_cgroup, job)


def template_limits(template: Template) -> Limits:
    """The build's [limits] (unset ones None)."""
    return Limits.from_dict(template.manifest.spec.get("limits"))


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
                                             page_server=job.page_server, log_faults=False)
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
        hostname_pattern=m.restore_spec.get("hostname"), cgroup=job.cgroup)
    job.pid, job.ctl_w, job.ctl_r, job.cgroup = -1, None, None, None  # the copy owns them now
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


def fetch_working_set(job: RestoreJob) -> None:
    """Lazy: the pages the build's warm-up touched, in before the copy is handed out (the rest
    keeps coming in the background). Bounded: a daemon that stops serving is killed, which ends
    the wait, and the restore fails."""
    assert job.copy is not None and job.lazy_pages is not None, "runs after the lazy restore"
    if job.working_set:
        done = threading.Event()
        worker = threading.Thread(target=lambda: (prefetch.fetch(job.copy.pid, job.working_set),
                                                  done.set()), name="prefetch", daemon=True)
        worker.start()
        if not done.wait(job.timeout):
            job.lazy_pages.kill()  # its uffd closes: the blocked reads return
            worker.join(10)
            raise RestoreError("fetching the working set",
                               f"the lazy-pages daemon did not serve it within {job.timeout:g}s")
    why = job.lazy_pages.failed()
    if why is not None:
        raise RestoreError("fetching the working set", why,
                           output_tail=job.lazy_pages.log_tail())


def watch_lazy_pages(job: RestoreJob) -> None:
    """Lazy: a watcher reaps the daemon once every page is in or the copy has exited; if the daemon
    dies first or overruns pages_timeout, the copy is killed (its owner sees it exit)."""
    assert job.copy is not None and job.lazy_pages is not None, "runs after the lazy restore"
    copy = job.copy
    job.lazy_pages.watch(job.pages_timeout, lambda why: _kill_unfed(copy, why))


def drop_restore_log(job: RestoreJob) -> None:
    """CRIU's log of a restore that worked is noise in the copy's dir."""
    with contextlib.suppress(OSError):
        os.unlink(job.run_dir / "restore.log")


EAGER: tuple[Step, ...] = (make_run_dir, make_cgroup, open_logs, open_control_pipes,
                           restore_with_criu, close_handed_fds, take_over_copy, validate_copy,
                           drop_restore_log)


def swap(steps: tuple[Step, ...], old: Step, *new: Step) -> tuple[Step, ...]:
    """steps with old replaced by new (a variant of a chain, not a second chain)."""
    if old not in steps:
        raise ValueError(f"{old.__name__} is not a step of this chain")
    i = steps.index(old)
    return steps[:i] + new + steps[i + 1:]


LAZY = swap(EAGER, restore_with_criu, start_lazy_pages, restore_lazily_with_criu)
LAZY_LOCAL = swap(swap(LAZY, validate_copy, validate_copy, fetch_working_set),
                  drop_restore_log, drop_restore_log, watch_lazy_pages)


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
                                    tcp_close=job.template.manifest.tcp_close,
                                    before_restore=_join_cgroup(job)))
    except CriuError as e:
        oom = _out_of_memory(job)
        if oom:  # CRIU's helpers forked in the group were killed too: their zombies are ours now
            reap_strays()
        hint = oom or hints.explain(hints.RESTORE, e.message)
        raise RestoreError(step, f"{hint}\n{e.message}" if hint else e.message) from e
    job.restore_s = time.monotonic() - t0
    job.undo.callback(_kill_restored, job)


def _join_cgroup(job: RestoreJob) -> Callable[[int], None] | None:
    """CRIU's pid -> moved into the copy's cgroup (its restored tree is then born there)."""
    group = job.cgroup
    if group is None:
        return None

    def join(pid: int) -> None:
        try:
            group.add(pid)
        except OSError as e:
            raise RestoreError("confining the copy",
                               f"cannot move CRIU into its cgroup: {e.strerror or e}") from e
    return join


def _out_of_memory(job: RestoreJob) -> str | None:
    if job.cgroup is None or not job.cgroup.oom_kills():
        return None
    limit = template_limits(job.template).or_defaults(job.default_limits).memory
    return (f"the copy ran out of memory while it was restored: its memory limit "
            f"({limit} bytes) is below what the image needs; raise [limits] memory")


def _remove_cgroup(job: RestoreJob) -> None:
    """A failed restore's group goes, with whatever is still in it (a half-restored tree)."""
    group, job.cgroup = job.cgroup, None  # None: the copy took it over (and removes it itself)
    if group is not None:
        group.kill()
        cgroups.remove_quietly(group)


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


def _kill_unfed(copy: RestoredCopy, why: str) -> None:
    """The copy's lazy-pages daemon failed: what it had not delivered would read as zeros."""
    copy.signal(signal.SIGKILL)  # its owner reaps it and sees it gone
    log.warning("copy %s killed: %s", copy.id, why)


def _discard(copy: RestoredCopy) -> None:
    copy.kill(grace=0)
    copy.close()
