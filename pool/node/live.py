"""Running instances: checkpoint, snapshots, rollback, suspend and resume (wake on connect),
restart on failure, and the source side of a migration. ops.py serves it (and ships a migrating
instance's snapshot; the coordinator drives the migration).

An instance keeps its Copy (pool/node/table.py: id, state, published port) for all of its life;
what changes is the process under it. `_swap` puts a restored process in place of the old one:
the supervisor watches the new pidfd (an exit event of the old process is ignored: events carry
the process they are about), the port proxy is re-pointed at the new network namespace (its host
port never closes), the journal names the new pid and run dir, and the old run dir goes (its log
files live on as hard links in the new one, snapshots.restore).

Suspended: the Copy stays LIVE and published; its RestoredCopy has exited (inst.state
"suspended") and a connection to the port waits on `wake` (the proxy's waker), which restores the
latest snapshot once, however many connections wait. Restarting (restart = "on-failure"): the
same, entered from the supervisor when the copy died by itself. Migrating: suspended, and
connections wait for the outcome: dropped if it moved, forwarded once it is resumed here if not.

One operation at a time per instance (`_busy`); automatic ones (idle suspend, periodic
checkpoints, restarts) run in the background and only log their failures.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pool.copies import fork, snapshots
from pool.copies.snapshots import Snapshot, Snapshots
from pool.errors import (BadRequest, CheckpointError, InstanceNotFound, PoolError, RestoreError,
                         SnapshotNotFound)
from pool.names import fork_name
from pool.node.table import Copy, CopyState
from pool.node.warm import KILLED
from pool.templates.store import write_problem
from pool.wire import control

if TYPE_CHECKING:
    from pool.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

RAN = "ran"
SUSPENDED, RESTARTING, RUNNING, MIGRATING = "suspended", "restarting", "running", "migrating"
# what a RestoredCopy takes from a restore of its snapshot (the rest is the instance's)
PROCESS_FIELDS = ("pid", "pidfd", "netns_fd", "run_dir", "restore_s", "exit_status", "ctl_w",
                  "ctl_r")
HOOK_TIMEOUT = 30.0   # the app's before/after_checkpoint hooks, each way


@dataclass(frozen=True)
class LiveSettings:
    """Per template: what happens to its running instances (service config [templates.NAME])."""

    keep_snapshots: int = 0        # newest snapshots kept per instance (0: all)
    idle_action: str = "kill"      # "kill" | "suspend": what idle_timeout does
    restart: str = "no"            # "no" | "on-failure"
    checkpoint_every: float = 0.0  # seconds between automatic checkpoints (0: none)
    max_restarts: int = 3          # restarts within restart_window before it is a crash loop
    restart_window: float = 60.0


class LiveOps:
    def __init__(self, runtime: "NodeRuntime") -> None:
        self.rt = runtime
        self.snapshots = Snapshots(runtime.settings.run_dir / "snapshots")
        self._waking: dict[str, asyncio.Future] = {}     # instance id -> its restore in progress
        self._busy: set[str] = set()                     # one operation at a time per instance
        self._cleaned: set[int] = set()                  # copies whose end removes their snapshots
        self._restarts: dict[str, list[float]] = {}      # instance id -> its recent restarts
        self._last_checkpoint: dict[str, float] = {}     # instance id -> monotonic time
        self._migrations: dict[str, asyncio.Future] = {}  # instance id -> stays here (True)?

    def settings(self, template: str) -> LiveSettings:
        return self.rt.settings.live_settings(template)

    # -- checkpoint and snapshots ------------------------------------------------------------------
    async def checkpoint(self, iid: str, tag: str | None = None, keep: bool = False,
                         timeout: float = 120.0) -> dict:
        c = self._running(iid, "checkpoint")
        with self._one_at_a_time(iid):
            s, hooks = await self._checkpoint(c, tag, timeout, leave_running=True)
        published = None
        if keep:
            name = fork_name(c.inst.template)
            try:
                await self.rt.run_blocking(lambda: snapshots.publish(s, self.rt.store, name))
            except OSError as e:
                raise CheckpointError("publishing the snapshot as a template",
                                      write_problem(e.errno)) from e
            published = name
        pruned = self._prune(c)
        return {"id": iid, "node": self.rt.name, "snapshot": s.describe(),
                "pre_dump": s.pre_dump, "hooks": hooks, "published": published,
                "pruned": pruned}

    async def _checkpoint(self, c: Copy, tag: str | None, timeout: float,
                          leave_running: bool) -> tuple[Snapshot, str]:
        """The snapshot, and what became of the app's hooks (before, dump, after)."""
        inst = c.inst
        hooks = await self._hook(inst, "before_checkpoint")
        if hooks.startswith("failed"):
            raise CheckpointError("running the app's before_checkpoint hooks", hooks)
        source = self._source_manifest(inst)
        s = await self.rt.run_blocking(lambda: snapshots.checkpoint(
            inst, self.snapshots, self.rt.criu, tag=tag, leave_running=leave_running,
            source_manifest=source, timeout=timeout))
        if id(c) not in self._cleaned:
            self._cleaned.add(id(c))
            c.on_end = _chain(c.on_end, lambda: self._ended(c))
        log.info("instance %s: snapshot %s (%.1f MB, frozen %s ms)", inst.id, s.id, s.bytes / 2**20,
                 s.freeze_ms)
        if hooks == RAN:
            hooks = (await self._hook(inst, "after_checkpoint", restored=False) if leave_running
                     else "before_checkpoint ran; after_checkpoint runs once it is restored")
        return s, hooks

    def _prune(self, c: Copy) -> list[str]:
        """Retention after each snapshot taken (checkpoint, suspend, periodic): the template's
        keep_snapshots newest stay. Returns the ids removed."""
        return self.snapshots.prune(c.inst.id, self.settings(c.inst.template).keep_snapshots)

    def _source_manifest(self, inst):
        """The manifest of the build inst was restored from, if the store still has that build."""
        with contextlib.suppress(PoolError):
            t = self.rt.store.get(inst.template)
            if t.build_id == inst.build_id:
                return t.manifest
        return None

    async def _hook(self, inst, name: str, **extra) -> str:
        """Run the app's `name` hooks over its control channel: RAN, "skipped: why" or
        "failed: the app's message". A channel that breaks is closed (hooks skipped from then)."""
        if inst.ctl_w is None or inst.ctl_r is None:
            return ("skipped: the app does not use the SDK" if not inst.sdk else
                    "skipped: the app's SDK does not serve checkpoint hooks, or its channel is gone "
                    "(the node restarted since)")
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await control.write_frame_async(inst.ctl_w, {"type": name, **extra})
                reply = await control.read_frame_async(inst.ctl_r)
        except (TimeoutError, control.ControlError, OSError) as e:
            for fd in ("ctl_w", "ctl_r"):
                with contextlib.suppress(OSError):
                    os.close(getattr(inst, fd))
                setattr(inst, fd, None)
            return f"skipped: the control channel broke during {name} ({e})"
        if reply.get("type") == "error":
            return f"failed: {name} in the app: {reply.get('message')}"
        return RAN

    def _ended(self, c: Copy) -> None:
        self._cleaned.discard(id(c))
        self.snapshots.remove_instance(c.inst.id)

    def list(self, iid: str) -> list[dict]:
        self.rt.find(iid)
        return [s.describe() for s in self.snapshots.list(iid)]

    # -- rollback ------------------------------------------------------------------------------------
    async def rollback(self, iid: str, snapshot: str | None = None, timeout: float = 60.0) -> dict:
        c = self._live(iid, "roll back")
        s = self.snapshots.get(iid, snapshot)
        with self._one_at_a_time(iid):
            t0 = time.perf_counter()
            hooks = await self._swap(c, s, timeout)
        return {**self._reply(c, s, t0), "hooks": hooks}

    # -- suspend and resume --------------------------------------------------------------------------
    async def suspend(self, iid: str, timeout: float = 120.0) -> dict:
        c = self._running(iid, "suspend")
        with self._one_at_a_time(iid):
            s = await self._suspend(c, timeout)
        return {"id": iid, "node": self.rt.name, "state": SUSPENDED, "address": c.inst.address,
                "snapshot": s.describe()}

    async def _suspend(self, c: Copy, timeout: float) -> Snapshot:
        """Checkpoint c and let CRIU end its process; its port stays open, to wake it."""
        self.rt.supervisor.unwatch(c)  # CRIU ends the process: not an exit to report
        try:
            s, _ = await self._checkpoint(c, "suspend", timeout, leave_running=False)
        except BaseException:
            if c.inst.poll() is None:
                self.rt.supervisor.watch(c)
            else:  # it died meanwhile: the supervisor reaps it as usual
                self.rt.supervisor.exited(c)
            raise
        await self.rt.run_blocking(c.inst.wait, 10)
        self._sleep(c, SUSPENDED)
        self._prune(c)  # the newest, this one, is always kept: it is what resume restores
        log.info("instance %s suspended (snapshot %s)", c.inst.id, s.id)
        return s

    async def resume(self, iid: str, timeout: float = 60.0) -> dict:
        c = self.rt.find(iid)
        if c.exited or c.inst.state != SUSPENDED:
            raise BadRequest(f"instance {iid} is not suspended (it is {c.inst.state})",
                             param="id", id=iid)
        t0 = time.perf_counter()
        s = await self.wake(c, timeout)
        return self._reply(c, s, t0)

    def _sleep(self, c: Copy, state: str) -> None:
        """c's process is gone (suspended, or died): connections wait for a wake."""
        c.inst.release_fds()
        c.inst.state = state
        if c.proxy is not None:
            c.proxy.waker = lambda: self.wake(c)

    async def wake(self, c: Copy, timeout: float = 60.0) -> Snapshot | None:
        """Restore c from its latest snapshot, once however many callers wait (the proxy's first
        connections, a resume)."""
        iid = c.inst.id
        fut = self._waking.get(iid)
        if fut is None:
            fut = self._waking[iid] = asyncio.get_running_loop().create_future()
            try:
                s = self.snapshots.get(iid)
                await self._swap(c, s, timeout)
                fut.set_result(s)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: callers re-raise it
                raise
            finally:
                del self._waking[iid]
            return s
        return await asyncio.shield(fut)

    # -- migration, source side (the coordinator drives it: pool/cluster/service.py) ----------------
    async def migrate_out(self, iid: str, timeout: float = 120.0) -> Snapshot:
        """Checkpoint iid and end its process, to be restored on another node. Until
        migrate_done, connections to its address here wait for the outcome."""
        c = self._running(iid, "migrate")
        self._claim(iid)  # until migrate_done
        try:
            s = await self._suspend(c, timeout)
        except BaseException:
            self._busy.discard(iid)
            raise
        self._migrating(c)
        return s

    async def migrate_out_lazy(self, iid: str, build_dir, page_server: tuple[str, int],
                               timeout: float) -> fork.LazyCheckpoint:
        """Lazy (post-copy): the small images into build_dir, the memory served at page_server
        while the process stays frozen here; CRIU ends it once the target has every page, or
        thaws it if the migration is aborted."""
        c = self._running(iid, "migrate")
        self._claim(iid)  # until migrate_done
        inst = c.inst
        try:
            hooks = await self._hook(inst, "before_checkpoint")
            if hooks.startswith("failed"):
                raise CheckpointError("running the app's before_checkpoint hooks", hooks)
            source = self._source_manifest(inst)
            try:
                ck = await self.rt.run_blocking(lambda: fork.checkpoint_instance_lazy(
                    inst, build_dir, self.rt.criu, page_server, leave_running=False,
                    name=fork_name(inst.template), source_manifest=source, timeout=timeout))
            except RestoreError as e:
                raise CheckpointError("dumping lazily (freeze, serve the memory)", e.problem) from e
        except BaseException:
            self._busy.discard(iid)
            raise
        self._migrating(c)
        return ck

    def _migrating(self, c: Copy) -> None:
        """Until migrate_done, connections here wait for the outcome."""
        iid = c.inst.id
        c.inst.state = MIGRATING
        self._migrations[iid] = asyncio.get_running_loop().create_future()
        if c.proxy is not None:
            c.proxy.waker = lambda: self._migration_outcome(iid)

    async def migrate_done(self, iid: str, moved: bool, timeout: float = 60.0) -> None:
        """The target has it running (moved: it ends here) or the migration failed (it runs
        here again, restored from the snapshot it was migrated with)."""
        c = self.rt.find(iid)
        fut = self._migrations.pop(iid, None)
        if fut is None:
            raise BadRequest(f"instance {iid} is not being migrated", param="id", id=iid)
        try:
            if moved and c.inst.exit_status is None:  # lazy: CRIU ends it once the pages are out
                c.cause = KILLED
            elif moved:
                self.rt.supervisor.kill(c, 0, KILLED)
            elif c.inst.exit_status is None:          # lazy, aborted: CRIU thawed it
                c.inst.state = RUNNING
                if c.proxy is not None:
                    c.proxy.repoint(c.inst.netns_fd)
            else:
                c.inst.state = SUSPENDED
                await self.wake(c, timeout)
        finally:
            fut.set_result(not moved)
            self._busy.discard(iid)

    async def _migration_outcome(self, iid: str) -> None:
        fut = self._migrations.get(iid)
        if fut is not None and not await asyncio.shield(fut):
            raise BadRequest(f"instance {iid} has moved to another node", param="id", id=iid)

    # -- the swap --------------------------------------------------------------------------------------
    async def _swap(self, c: Copy, s: Snapshot, timeout: float) -> str:
        """Restore s and make it c's process in place of the old one (killed, if it still runs).
        The RestoredCopy stays the same object (its pool, table and journal know it by that): it
        takes the new process's fields. A failed restore leaves c as it was."""
        inst = c.inst
        new = await self.rt.run_blocking(lambda: snapshots.restore(
            s, self.rt.criu, self.rt.instances_dir, logs_from=inst.run_dir, timeout=timeout))
        sup = self.rt.supervisor
        if c.state is not CopyState.LIVE:  # killed while it was being restored: not its process
            await self.rt.run_blocking(_discard, new)
            raise InstanceNotFound(inst.id)
        if inst.exit_status is None:
            sup.unwatch(c)
            await self.rt.run_blocking(inst.kill, 0)
        inst.release_fds()
        self.rt.forget_journal(inst)
        old_dir = inst.run_dir
        for name in PROCESS_FIELDS:
            setattr(inst, name, getattr(new, name))
        inst.state = RUNNING
        sup.watch(c)
        if c.proxy is not None:
            c.proxy.repoint(inst.netns_fd)
        self.rt.write_journal(c)
        shutil.rmtree(old_dir, ignore_errors=True)
        return await self.after_restore(inst)

    async def after_restore(self, inst) -> str:
        """A process restored from a snapshot finishes the checkpoint it was taken in: its
        after_checkpoint hooks run (logged if they fail)."""
        hooks = await self._hook(inst, "after_checkpoint", restored=True)
        if hooks.startswith("failed") or hooks.startswith("skipped: the control channel broke"):
            log.warning("instance %s: %s", inst.id, hooks)
        return hooks

    # -- automatic: restart on failure, suspend when idle, periodic checkpoints ---------------------
    def on_crash(self, c: Copy) -> bool:
        """The supervisor reaped c, dead by itself: restore its latest snapshot (True), unless its
        template does not restart, it has none, or it is crash-looping (False: it ends)."""
        inst = c.inst
        ls = self.settings(inst.template)
        if ls.restart != "on-failure" or not c.handed_out:
            return False
        now = time.monotonic()
        recent = [t for t in self._restarts.get(inst.id, []) if now - t < ls.restart_window]
        if len(recent) >= ls.max_restarts:
            log.warning("instance %s: died %d times within %gs: a crash loop, not restarted again",
                        inst.id, len(recent) + 1, ls.restart_window)
            c.crash_loop = True
            return False
        try:
            s = self.snapshots.get(inst.id)
        except SnapshotNotFound:
            log.warning("instance %s died (status %s) and has no checkpoint to restart from",
                        inst.id, inst.exit_status)
            return False
        self._restarts[inst.id] = [*recent, now]
        c.restarts += 1
        self.rt.metrics.restarted(inst.template)
        log.info("instance %s died (status %s): restarting it from snapshot %s", inst.id,
                 inst.exit_status, s.id)
        self._sleep(c, RESTARTING)
        self.rt.background(self._restart(c))
        return True

    async def _restart(self, c: Copy) -> None:
        try:
            await self.wake(c)
        except Exception as e:  # noqa: BLE001  it ends, as it would have without the restart
            log.warning("instance %s: restart failed: %s", c.inst.id, getattr(e, "message", e))
            if c.state is CopyState.LIVE:
                self.rt.supervisor.retire(c, c.inst.exit_status)

    def on_idle(self, c: Copy) -> bool:
        """idle_timeout reached: suspend it (True) if its template says so, else False (killed)."""
        if self.settings(c.inst.template).idle_action != "suspend":
            return False
        iid = c.inst.id
        if iid not in self._busy:
            self._busy.add(iid)
            self.rt.background(self._quietly("suspending", c, self._suspend(c, 120.0)))
        return True

    def tick(self) -> None:
        """Take the periodic checkpoints that are due (checkpoint_every)."""
        now = time.monotonic()
        seen = set()
        for c in self.rt.table.handed_out():
            iid = c.inst.id
            seen.add(iid)
            every = self.settings(c.inst.template).checkpoint_every
            if not every or c.state is not CopyState.LIVE or c.inst.state != RUNNING:
                continue
            last = self._last_checkpoint.setdefault(iid, now)
            if now - last >= every and iid not in self._busy:
                self._last_checkpoint[iid] = now
                self._busy.add(iid)
                self.rt.background(self._quietly("checkpointing", c, self._periodic(c)))
        for gone in set(self._last_checkpoint) - seen:
            del self._last_checkpoint[gone]
            self._restarts.pop(gone, None)

    async def _periodic(self, c: Copy) -> None:
        await self._checkpoint(c, "auto", 120.0, leave_running=True)
        self._prune(c)

    async def _quietly(self, what: str, c: Copy, job) -> None:
        """An automatic operation (its instance marked busy): logged if it fails, never raised."""
        try:
            await job
        except Exception as e:  # noqa: BLE001  nobody waits for it
            log.warning("instance %s: %s failed: %s", c.inst.id, what, getattr(e, "message", e))
        finally:
            self._busy.discard(c.inst.id)

    def clean_snapshots(self, keep: set[str]) -> None:
        if n := self.snapshots.clean(keep):
            log.info("removed the snapshots of %d instances a previous run left", n)

    # -- helpers -----------------------------------------------------------------------------------------
    def _live(self, iid: str, what: str) -> Copy:
        c = self.rt.find(iid)
        if c.exited or c.state is not CopyState.LIVE:
            raise BadRequest(f"cannot {what} instance {iid}: it has ended", param="id", id=iid)
        return c

    def _running(self, iid: str, what: str) -> Copy:
        c = self._live(iid, what)
        if c.inst.state != RUNNING:
            raise BadRequest(f"cannot {what} instance {iid}: it is {c.inst.state}", param="id",
                             id=iid, state=c.inst.state)
        return c

    def _claim(self, iid: str) -> None:
        if iid in self._busy:
            raise BadRequest(f"instance {iid} is busy with another checkpoint, rollback, suspend "
                             "or migration", param="id", id=iid)
        self._busy.add(iid)

    @contextlib.contextmanager
    def _one_at_a_time(self, iid: str):
        self._claim(iid)
        try:
            yield
        finally:
            self._busy.discard(iid)

    def _reply(self, c: Copy, s: Snapshot | None, t0: float) -> dict:
        return {"id": c.inst.id, "node": self.rt.name, "pid": c.inst.pid, "state": c.inst.state,
                "address": c.inst.address, "snapshot": s.id if s else None,
                "restore_ms": round((time.perf_counter() - t0) * 1000, 3)}


def _discard(copy) -> None:
    copy.kill(grace=0)
    copy.release_fds()
    shutil.rmtree(copy.run_dir, ignore_errors=True)  # its log files are links: the instance's stay


def _chain(first, then):
    if first is None:
        return then

    def both() -> None:
        try:
            first()
        finally:
            then()
    return both

