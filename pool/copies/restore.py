"""Restore copies of a published template, each with its own identity.

    check the build (compatible here, intact) -> the restore chain (pool/copies/restore_chain.py)
    -> [later] hand over the identity

A failed restore leaves no process, fd or file behind, and never touches the template.
`restore()` returns a *warm* copy: restored and waiting for its identity; `hand_over()` gives it
one. A spawn is both.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pool.copies import restore_chain
from pool.copies.restored import RestoredCopy
from pool.cr import cgroups, netns
from pool.cr.cgroups import Limits
from pool.cr.criu import Criu, become_subreaper
from pool.errors import CriuFailed, Incompatible, RestoreError
from pool.templates import compat, workingset
from pool.templates.store import Store, Template
from pool.templates.workingset import Run
from pool.wire import control
from pool.wire.control import Identity


def new_instance_id() -> str:
    return secrets.token_hex(6)


class Restorer:
    """Restores templates from one store on this node. Thread-safe; restores may run concurrently."""

    def __init__(self, store: Store, criu: Criu, run_dir: Path, *, restore_timeout: float = 60.0,
                 verify: bool = True,
                 on_step: Callable[[str, float], None] | None = None,
                 copy_limits: Limits = Limits()) -> None:
        """on_step(step name, seconds) is called after every step of every restore (a metric).
        Every copy gets a cgroup of its own: its template's [limits], unset ones copy_limits."""
        self.store = store
        self.on_step = on_step
        self.criu = criu
        self.instances_dir = Path(run_dir) / "instances"
        self.restore_timeout = restore_timeout
        self.verify = verify
        self.copy_limits = copy_limits
        self._checked: set[str] = set()  # build ids known compatible and intact on this node
        self._lock = threading.Lock()
        self._ghost_locks: dict[str, threading.Lock] = {}  # build id -> lock (see _one_at_a_time)
        self._working_sets: dict[str, list[Run] | None] = {}  # build id -> its working set
        become_subreaper()  # every copy becomes our child, to reap and to count

    # -- is this image fit to restore here? ----------------------------------------------------------
    def check_compatible(self, template: Template) -> None:
        """Architecture, CRIU and kernel (pool/templates/compat.py), then CPU features via CRIU's cpuinfo check."""
        compat.check(template.manifest, compat.node_facts(self.criu))
        try:
            self.criu.cpuinfo_check(template.image_dir)
        except CriuFailed as e:
            raise Incompatible(f"this node's CPU lacks features the image uses: {e.log_tail}",
                               template=template.name) from e

    def prepare(self, name: str) -> Template:
        """The template's current build, checked once per build id (sha256 of every file; an
        encrypted store's are checked as the build is decrypted into RAM, Store.readable)."""
        template = self.store.get(name)
        if template.build_id not in self._checked:
            with self.store.readable(template) as plain:
                self.check_compatible(plain)
            if self.verify and not self.store.encrypted:
                template.verify(full=True)
            with self._lock:
                self._checked.add(template.build_id)
        else:
            template.verify(full=False)  # cheap: catches a truncated or replaced file
        return template

    def _one_at_a_time(self, template: Template):
        """A lock for templates whose restores must not overlap, else a no-op.

        A deleted file the app held (a "ghost file", e.g. a multiprocessing semaphore in /dev/shm)
        is recreated at its old path by every restore and unlinked when the restore ends, so two
        restores at once collide on that path. Only the CRIU call is serialized.
        """
        if not template.manifest.has_ghost_files:
            return contextlib.nullcontext()
        with self._lock:
            return self._ghost_locks.setdefault(template.build_id, threading.Lock())

    # -- the restore chain ---------------------------------------------------------------------------
    def restore(self, name: str, instance_id: str | None = None) -> RestoredCopy:
        """Restore one warm copy of template name (identity not yet given)."""
        template = self.prepare(name)
        iid = instance_id or new_instance_id()
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lazy = template.manifest.restore_method == "lazy"
        with self.store.readable(template) as plain:  # the image CRIU reads (RAM if encrypted)
            job = restore_chain.RestoreJob(
                template=plain, instance_id=iid, criu=self.criu, timeout=self.restore_timeout,
                run_dir=self.instances_dir / f"{iid}.{secrets.token_hex(4)}",
                criu_lock=self._one_at_a_time(template), on_step=self.on_step,
                working_set=self._working_set(plain) if lazy else None,
                confine=True, cgroups=cgroups.node_hierarchy(), default_limits=self.copy_limits)
            return restore_chain.run(job, restore_chain.LAZY_LOCAL if lazy else restore_chain.EAGER)

    def _working_set(self, template: Template) -> list[Run] | None:
        """The build's recorded working set, read once per build (TemplateCorrupt if unreadable;
        None if the build has none: the lazy restore then fetches nothing first)."""
        if template.build_id not in self._working_sets:
            runs = workingset.read(template.image_dir, template.name)
            with self._lock:
                self._working_sets[template.build_id] = runs
        return self._working_sets[template.build_id]

    # -- the identity ----------------------------------------------------------------------------------
    def hand_over(self, inst: RestoredCopy, identity: Identity, timeout: float | None = None) -> None:
        """Give a warm copy its identity; the copy is killed and RestoreError raised if it fails.

        timeout defaults to the template's restore.identity_timeout; the hostname to its
        restore.hostname pattern ("{id}" is the instance id), else the template's own.
        """
        identity, timeout = _resolve(inst, identity, timeout)
        try:
            _set_hostname(inst, identity)
            if inst.sdk:
                deadline = time.monotonic() + timeout
                control.write_frame(inst.ctl_w, identity.to_message(time.time() + timeout))
                try:
                    reply = control.read_frame(inst.ctl_r, deadline)
                except control.ControlError as e:
                    raise _no_ack(inst, timeout, time.monotonic() >= deadline) from e
                _accept_ack(inst, identity, reply)
        except BaseException as e:
            output = _tail_after_exit(inst)
            inst.kill(grace=0)
            inst.state = "failed"
            inst.close()
            if isinstance(e, RestoreError):
                raise RestoreError(e.step, e.problem, output_tail=output) from e
            if isinstance(e, OSError):
                raise RestoreError(HANDOVER, str(e), output_tail=output) from e
            raise
        _record(inst, identity)

    def spawn(self, name: str, identity: Identity | None = None,
              timeout: float | None = None) -> RestoredCopy:
        identity = identity or Identity(new_instance_id())
        inst = self.restore(name, instance_id=identity.instance_id)
        self.hand_over(inst, identity, timeout)
        return inst


HANDOVER = "handing over the identity"


def _resolve(inst: RestoredCopy, identity: Identity, timeout: float | None) -> tuple[Identity, float]:
    """Fill in the template's defaults: identity_timeout and the hostname pattern."""
    if identity.hostname is None and inst.hostname_pattern:
        identity = replace(identity,
                           hostname=inst.hostname_pattern.replace("{id}", identity.instance_id))
    return identity, inst.identity_timeout if timeout is None else timeout


def _set_hostname(inst: RestoredCopy, identity: Identity) -> None:
    if identity.hostname:
        netns.set_hostname(f"/proc/{inst.pid}/ns/uts", identity.hostname)


def _no_ack(inst: RestoredCopy, timeout: float, timed_out: bool) -> RestoreError:
    if not timed_out:
        inst.wait(0.5)  # the channel broke: the copy is most likely dying; let its PID 1 finish
    if inst.poll() is not None:
        return RestoreError(HANDOVER, f"the copy exited with status {inst.exit_status} before it acked")
    if timed_out:
        return RestoreError(HANDOVER, f"the copy did not ack its identity within {timeout:g}s")
    return RestoreError(HANDOVER, "the copy broke its control channel")


def _accept_ack(inst: RestoredCopy, identity: Identity, reply: dict) -> None:
    if reply["type"] == "error":
        raise RestoreError(HANDOVER, f"the copy's after_restore failed: {reply.get('message')}")
    if reply["type"] != "ack" or reply.get("instance_id") != identity.instance_id:
        raise RestoreError(HANDOVER, f"unexpected reply {reply!r:.120}")
    if "checkpoint" in (reply.get("serves") or ()) and _pipes(inst.ctl_w, inst.ctl_r):
        return  # kept: the app runs its checkpoint hooks when told (pool/node/live.py)
    for name in ("ctl_w", "ctl_r"):  # the channel's job is done; do not hold fds per copy
        os.close(getattr(inst, name))
        setattr(inst, name, None)


def _pipes(*fds: int) -> bool:
    """Pipes, not a fork-mode child's socket (a snapshot keys its channel by pipe inodes)."""
    return all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds)


def _record(inst: RestoredCopy, identity: Identity) -> None:
    # the env's values may be secrets: the copy has them, the service keeps only their names
    inst.env_keys, inst.args, inst.hostname = sorted(identity.env), list(identity.args), identity.hostname
    inst.state = "running"


async def hand_over_async(inst: RestoredCopy, identity: Identity, timeout: float | None = None) -> None:
    """hand_over() for asyncio callers (the service's warm path): the identity is written and the
    ack awaited with loop.add_writer/add_reader, so neither a large identity nor a slow copy blocks
    the loop, and no thread hop. On failure the copy is killed, as by hand_over(), but only
    signalled (SIGKILL): the caller, who may be watching its pidfd, reaps and closes it."""
    identity, timeout = _resolve(inst, identity, timeout)
    try:
        await _hand_over_async(inst, identity, timeout)
    except BaseException:
        with contextlib.suppress(OSError):  # already gone
            inst.signal(signal.SIGKILL)
        raise
    _record(inst, identity)


async def _hand_over_async(inst: RestoredCopy, identity: Identity, timeout: float) -> None:
    import asyncio  # noqa: PLC0415  (only async callers pay for it)

    try:
        _set_hostname(inst, identity)  # one short thread
        if inst.sdk:
            try:
                async with asyncio.timeout(timeout):  # a copy that does not read times out too
                    await control.write_frame_async(inst.ctl_w, identity.to_message(time.time() + timeout))
                    reply = await control.read_frame_async(inst.ctl_r)
            except TimeoutError as e:
                raise _no_ack(inst, timeout, True) from e
            except control.ControlError as e:
                raise _no_ack(inst, timeout, False) from e
            _accept_ack(inst, identity, reply)
    except OSError as e:
        raise RestoreError(HANDOVER, str(e)) from e


def _tail_after_exit(inst: RestoredCopy) -> str:
    inst.wait(0.2)  # a crashing copy's last words reach its log just before it dies
    return inst.output_tail()
