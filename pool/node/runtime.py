"""One node's runtime: its template store, Restorer, warm pools and copies, and the node-level RPC
methods over them (spawn, kill, wait, list, info, logs, templates, stats, set_warm, facts).

Used twice: embedded in the coordinator (`pool serve`, node "local") and behind TCP in `pool agent`
(agent.py). Neither the coordinator nor the agent reaches into copies directly: everything that
touches a local process is here.

Concurrency model. Everything runs on one event loop. ONE supervisor task consumes events: a copy
exited (its pidfd became readable), a pool wants a refill, a tick (ttl, idle, quarantine outcomes).
Blocking CRIU restores run in a small ThreadPoolExecutor. The Restorer makes this process a child
subreaper, so every copy is our child: we reap only pids we know (RestoredCopy.poll:
waitpid(pid, WNOHANG)), never waitpid(-1), which would steal exit statuses from subprocess/CRIU.

A spawn served from the warm pool does no thread hop and no I/O but two pipe writes/reads: pop a warm
copy, write its identity, await the SDK's ack on the loop (restore.hand_over_async), reply.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pool.cr import criu

from pool.copies import journal
from pool.errors import InstanceNotFound, NodeUnavailable, PoolError, RestoreError, TemplateNotFound
from pool.node.faults import handover_counts_against_template
from pool.cluster.config import ServiceConfig
from pool.node.warm import EXITED, FAILED, KILLED, WarmPool

log = logging.getLogger(__name__)

TICK_S = 0.25
SWEEP_TICKS = 4            # every second: rotate copies' logs, look for stray children
MAX_LOG_CHUNK = 1 << 20
DRAIN_SLACK_S = 2.0  # after kill_grace: for SIGKILLed copies to be reaped


# --- one copy, as the node sees it --------------------------------------------------------------------
@dataclass(eq=False)
class Copy:
    inst: Any                              # pool.copies.restored.RestoredCopy
    pool: WarmPool
    done: asyncio.Future                   # exit status once reaped
    proxy: Any = None                      # PortProxy publishing its port, if any
    cause: str = EXITED                    # why it ended: set to KILLED/FAILED by us
    handed_at: float | None = None         # loop time of its spawn
    handing_over: bool = False
    ending: bool = False                   # a kill is under way (ttl, idle, request, shutdown)
    kill_timer: asyncio.TimerHandle | None = None
    exited_at: float | None = None
    left: bool = False                     # on_shutdown = "leave": not ours to kill or clean
    on_end: Any = None                     # callable run once it is reaped (e.g. a lazy daemon)


class NodeRuntime:
    """The copies of one node. start() and stop() bracket its life; drain() ends it gracefully."""

    def __init__(self, cfg: ServiceConfig, metrics: Any, *, name: str = "local",
                 publish_host: str = "127.0.0.1") -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.name = name                      # what replies say in `node`
        self.publish_host = publish_host      # where copies' ports are published (PortProxy)
        self.pools: dict[str, WarmPool] = {}
        self.copies: dict[str, Copy] = {}                  # restored and not yet reaped
        self.history: collections.OrderedDict[str, Copy] = collections.OrderedDict()
        self.restorer = None
        self.draining = False                 # new spawns are refused
        self.winding_down = False             # refills stopped (shutdown began)
        self.inflight = 0
        self._idle = asyncio.Event()
        self._events: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._handovers = 0                      # spawns between acquire and reply
        self._deferred_refills: set[str] = set()
        self._orphans = 0                        # cancelled restores still running in a thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticks = 0
        self._strays_seen: set[int] = set()

    # -- life ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        from pool.cr.criu import Criu  # noqa: PLC0415
        from pool.copies.restore import Restorer  # noqa: PLC0415
        from pool.templates.store import Store  # noqa: PLC0415

        self._loop = loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self.restorer = Restorer(Store(self.cfg.store), Criu.locate(), self.cfg.run_dir,
                                 restore_timeout=self.cfg.restore_timeout)
        # before any restore of ours starts: what a previous life left in the run dir
        found = journal.recover(self.restorer.instances_dir, self.name)
        self._executor = ThreadPoolExecutor(self.cfg.restore_concurrency,
                                            thread_name_prefix="restore")
        self._tasks = [loop.create_task(self._supervise(), name="supervisor"),
                       loop.create_task(self._ticker(), name="ticker")]
        for name in self.cfg.templates:
            self._pool(name, must_exist=False)
        adopted = [await self._adopt_again(run_dir, rec) for run_dir, rec in found.live]
        if found.live or found.removed:
            log.info("recovered from a previous run: %d live copies adopted again, %d copies or "
                     "restores killed, %d dirs removed", sum(adopted), found.killed, found.removed)

    async def _adopt_again(self, run_dir, rec: journal.Record) -> bool:
        """Watch and publish again a live copy a previous life of this node handed out."""
        try:
            inst = journal.reopen(run_dir, rec)
        except OSError as e:
            log.warning("instance %s (pid %d) is gone: %s", rec.id, rec.pid, e.strerror)
            shutil.rmtree(run_dir, ignore_errors=True)
            return False
        pool = self._pool(rec.template, must_exist=False)
        try:
            c = await self.adopt(inst, pool, host_port=journal.host_port(rec.address))
        except RestoreError as e:  # its port cannot be published: it was killed
            log.warning("instance %s: %s", rec.id, e.message)
            return False
        pool.take_live(inst)
        self.handed(c, rec.path, since=time.time() - (rec.handed_at or time.time()))
        log.info("adopted instance %s (pid %d) again at %s", rec.id, rec.pid, inst.address)
        return True

    def run_blocking(self, fn, *args):
        """fn(*args) in the restore executor (CRIU work that must not block the loop)."""
        return self._loop.run_in_executor(self._executor, fn, *args)

    def begin_drain(self) -> None:
        """Shutdown began: no refills but for spawns already in flight (which still get served;
        drain() refuses new ones)."""
        if self.winding_down:
            return
        self.winding_down = True
        cancelled = sum(p.begin_drain() for p in self.pools.values())
        log.info("shutdown: refills stopped, %d restore(s) cancelled", cancelled)

    async def drain(self, force: asyncio.Event, deadline: float | None = None) -> None:
        """Finish in-flight spawns (until deadline, a loop time; default drain_timeout from now),
        cancel restores, end or leave copies: within drain_timeout + kill_grace + a few seconds,
        whatever is queued."""
        cfg = self.cfg
        if deadline is None:
            deadline = self._loop.time() + cfg.drain_timeout
        self.draining = True
        self.begin_drain()
        log.info("draining: %d spawn(s) in flight, %d copies", self.inflight, len(self.copies))
        if self.inflight:
            self._idle.clear()
            await until(self._idle.wait(), max(0.0, deadline - self._loop.time()), force)
        await asyncio.gather(*(p.close() for p in self.pools.values()))
        self.end_live(force=force.is_set())
        await until(self._all_reaped(), cfg.kill_grace + DRAIN_SLACK_S, force)
        if any(not c.left for c in self.copies.values()):  # forced, or a copy outlived its grace
            self.end_live(force=True)
            await until(self._all_reaped(), DRAIN_SLACK_S, None)

    def end_live(self, force: bool) -> None:
        for c in list(self.copies.values()):
            if c.handed_at is not None and self.cfg.on_shutdown == "leave":
                self._leave(c)
            else:
                self._kill(c, 0 if force or c.handed_at is None else self.cfg.kill_grace, KILLED)

    async def _all_reaped(self) -> None:
        while any(not c.left for c in self.copies.values()):
            await asyncio.gather(*(asyncio.shield(c.done) for c in list(self.copies.values())
                                   if not c.left), return_exceptions=True)

    async def stop(self) -> None:
        if self.copies:  # whatever is still ours (a restore that finished late): kill, reap
            self.end_live(force=True)
            await until(self._all_reaped(), 10, None)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
        for c in list(self.copies.values()):  # left running (or unkillable): release our side only
            await self._close_proxy(c)
            c.inst.release_fds()
        self.copies.clear()
        for c in self.history.values():
            c.inst.close()
        self.history.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- the supervisor ---------------------------------------------------------------------------
    async def _supervise(self) -> None:
        assert self._events is not None
        while True:
            event = await self._events.get()
            try:
                kind = event[0]
                if kind == "exited":
                    self._reap(event[1])
                elif kind == "refill":
                    # A restore starting in a worker thread competes for the GIL (and the CPU)
                    # with a warm spawn's handshake and reply: start it once those are out.
                    if self._handovers:
                        self._deferred_refills.add(event[1])
                    elif event[1] in self.pools:
                        self.pools[event[1]].refill()
                elif kind == "tick":
                    self._tick()
            except Exception:  # noqa: BLE001  one bad event must not stop the supervisor
                log.exception("supervisor: handling %r failed", event[0])

    async def _ticker(self) -> None:
        assert self._events is not None
        while True:
            await asyncio.sleep(TICK_S)
            self._events.put_nowait(("tick",))

    def _tick(self) -> None:
        now = self._loop.time()
        self._ticks += 1
        if self._ticks % SWEEP_TICKS == 0:
            self._sweep()
        for pool in self.pools.values():
            pool.tick()
        self._notice_builds()
        for c in list(self.copies.values()):
            if c.handed_at is None or c.ending:
                continue
            s = c.pool.settings
            if s.ttl and now - c.handed_at >= s.ttl:
                log.info("instance %s: ttl of %gs reached", c.inst.id, s.ttl)
                self._kill(c, self.cfg.kill_grace, KILLED)
            elif s.idle_timeout and c.proxy is not None \
                    and time.monotonic() - max(c.proxy.last_activity, _mono(c.handed_at, now)) \
                    >= s.idle_timeout:
                log.info("instance %s: idle for %gs", c.inst.id, s.idle_timeout)
                self._kill(c, self.cfg.kill_grace, KILLED)

    def _sweep(self) -> None:
        """Cap copies' logs; kill and reap stray children (the half-restored tree of a CRIU that
        died) seen on two sweeps in a row."""
        for c in self.copies.values():
            c.inst.rotate_logs(self.cfg.max_log_bytes)
        strays = criu.stray_children({c.inst.pid for c in self.copies.values()})
        doomed = strays & self._strays_seen
        if doomed:
            log.warning("killing %d stray processes (left by a CRIU that died): %s",
                        len(doomed), sorted(doomed))
            self._background(asyncio.to_thread(criu.kill_strays, doomed))
        self._strays_seen = strays - doomed

    def _reap(self, c: Copy) -> None:
        inst = c.inst
        if c.done.done():
            return
        status = inst.poll()
        if status is None:  # pidfd readable means it has exited; reapable a moment later
            self._loop.call_later(0.01, self._events.put_nowait, ("exited", c))
            return
        if c.kill_timer is not None:
            c.kill_timer.cancel()
        if c.cause == FAILED:
            inst.state = "failed"
        c.exited_at = time.time()
        detail = f"a copy exited with status {status} " + (
            "while warm" if c.handed_at is None else
            f"{self._loop.time() - c.handed_at:.2f}s after its spawn")
        c.pool.exited(inst, c.cause, detail)
        self.metrics.exited(inst.template, c.cause)
        self.copies.pop(inst.id, None)
        journal.forget(inst.run_dir)
        self._background(self._close_proxy(c))
        if c.on_end is not None:
            with contextlib.suppress(Exception):
                c.on_end()
        if not c.handing_over:  # else the spawn closes them once its handshake has let go
            inst.release_fds()
        if c.handed_at is None or self.cfg.exited_history == 0:
            inst.close()
        else:
            self.history[inst.id] = c
            while len(self.history) > self.cfg.exited_history:
                _, old = self.history.popitem(last=False)
                old.inst.close()
        c.done.set_result(status)

    def _watch(self, c: Copy) -> None:
        fd = c.inst.pidfd
        def ready() -> None:
            self._loop.remove_reader(fd)
            self._events.put_nowait(("exited", c))
        self._loop.add_reader(fd, ready)

    def _kill(self, c: Copy, grace: float, cause: str) -> None:
        """SIGTERM then SIGKILL after grace (0: SIGKILL now); the supervisor reaps it."""
        if c.done.done() or c.left:
            return
        if c.cause != FAILED:
            c.cause = cause
        inst = c.inst
        if grace <= 0 or c.ending and c.kill_timer is None:
            inst.signal(signal.SIGKILL)
        else:
            inst.signal(signal.SIGTERM)
            if c.kill_timer is None:
                c.kill_timer = self._loop.call_later(grace, inst.signal, signal.SIGKILL)
        c.ending = True

    def _leave(self, c: Copy) -> None:
        """on_shutdown = "leave": stop watching a live instance; it outlives the service."""
        if c.left or c.done.done():
            return
        c.left = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(c.inst.pidfd)
        log.info("leaving instance %s (pid %d) running", c.inst.id, c.inst.pid)

    async def _close_proxy(self, c: Copy) -> None:
        if c.proxy is not None:
            proxy, c.proxy = c.proxy, None
            await proxy.close()

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- pools ------------------------------------------------------------------------------------
    def _pool(self, name: str, must_exist: bool = True) -> WarmPool:
        """name's pool, made on first use; a configured template not built yet gets an unbuilt pool
        (must_exist False) that comes to life when its build is published (_notice_builds)."""
        pool = self.pools.get(name)
        if pool is not None:
            return pool
        if self.draining:
            raise NodeUnavailable(f"node {self.name} is shutting down", node=self.name)
        image_bytes = None
        try:
            image_bytes = self.restorer.store.get(name).image_bytes
        except TemplateNotFound:
            if must_exist:
                raise
            log.info("template %s is configured but not built yet: its pool starts when a build "
                     "is published", name)
        except PoolError as e:
            if must_exist:
                raise
            log.warning("template %s: %s", name, e.message)
        build = self.restorer.store.current_build_id(name)
        settings = self.cfg.templates.get(name, self.cfg.defaults)
        pool = WarmPool(name, settings, lambda: self._restore_copy(name), self._discard,
                        request_refill=lambda: self._events.put_nowait(("refill", name)),
                        quarantine_after=self.cfg.quarantine_after,
                        early_death_s=self.cfg.early_death_s, node_room=self.room,
                        build_of=lambda inst: inst.build_id, build=build, unbuilt=build is None)
        self.pools[name] = pool
        if self.winding_down:
            pool.begin_drain()
        self.metrics.watch_pool(name, lambda: pool.warm, lambda: pool.live,
                                lambda: 1.0 if pool.quarantined else 0.0)
        if image_bytes is not None:
            self.metrics.image_bytes.labels(name).set(image_bytes)
        self._events.put_nowait(("refill", name))
        return pool

    def room(self) -> int:
        """Copies the node may still add: its capacity minus every copy it has or is restoring
        (a restored copy counts twice for a moment, between adopt and its pool taking it)."""
        restoring = sum(p.restoring for p in self.pools.values())
        return self.cfg.capacity - len(self.copies) - restoring - self._orphans

    def free(self) -> int:
        """What a scheduler may still place here: capacity minus the copies handed out (a warm copy
        is there to serve a spawn; one that must make room waits in its pool, then NoCapacity)."""
        return max(0, self.cfg.capacity - self.live_count())

    def _notice_builds(self) -> None:
        """A build published (or removed) since the last tick: one readlink per pool."""
        for name, pool in self.pools.items():
            self._notice_build(name, pool)

    def _notice_build(self, name: str, pool: WarmPool) -> None:
        try:
            build = self.restorer.store.current_build_id(name)
        except OSError as e:  # the store is unreadable right now: keep what we have
            log.warning("template %s: reading its current build: %s", name, e.strerror)
            return
        if build != pool.build:
            if build is None:
                log.info("template %s: its build was removed from the store", name)
                pool.build_removed()
            else:
                log.info("template %s: build %s published; using it", name, build)
                pool.new_build(build)
                with contextlib.suppress(PoolError, OSError):  # only a metric
                    self.metrics.image_bytes.labels(name).set(
                        self.restorer.store.get(name).image_bytes)

    async def _restore_copy(self, name: str):
        """One warm copy of name for its pool. Safe to cancel at any point (the pool cancels
        restores it no longer wants): a restore still queued never runs; a running one's copy is
        discarded when it is done."""
        t0 = time.perf_counter()
        pool = self.pools[name]
        inst = await self._restore_in_thread(name)
        self.metrics.restored(name, time.perf_counter() - t0)
        try:
            await self.adopt(inst, pool)
        except asyncio.CancelledError:
            c = self.copies.get(inst.id)
            if c is not None:
                self._kill(c, 0, KILLED)
            raise
        if not pool.waiting:  # it will wait warm: spend that time on its first faults, not a spawn's
            self._background(self._prefault(inst.pid))
        return inst

    async def _restore_in_thread(self, name: str):
        job = self._executor.submit(self.restorer.restore, name)
        try:
            return await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            if not job.cancel():  # already running: its copy is nobody's; end it once made
                log.info("template %s: a cancelled restore was already running; its copy will "
                         "be discarded", name)
                self._orphans += 1
                job.add_done_callback(self._discard_orphan)
            raise

    def _discard_orphan(self, job) -> None:
        """Runs in the restore thread (or at once if the job was already done)."""
        try:
            if job.exception() is None:
                inst = job.result()
                inst.kill(grace=0)
                inst.close()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to count
                self._loop.call_soon_threadsafe(self._orphan_done)

    def _orphan_done(self) -> None:
        self._orphans -= 1

    async def _prefault(self, pid: int) -> None:
        await self.run_blocking(prefault_code, pid)

    async def adopt(self, inst, pool: WarmPool, on_end=None, host_port: int = 0) -> Copy:
        """Make a restored copy ours: watched, reaped, its port published (on host_port if it is
        free, else on any), recorded in the journal."""
        from pool.copies.portproxy import PortProxy  # noqa: PLC0415

        c = Copy(inst, pool, self._loop.create_future(), on_end=on_end)
        self.copies[inst.id] = c
        self._watch(c)
        if inst.port:
            try:
                c.proxy = PortProxy(inst.netns_fd, inst.port, host=self.publish_host)
                inst.address = await c.proxy.start_on(host_port)
            except OSError as e:
                c.proxy = None
                self._kill(c, 0, FAILED)
                raise RestoreError("publishing the copy's port", str(e)) from e
        self._journal(c)
        return c

    def _journal(self, c: Copy) -> None:
        if c.done.done() or c.left:
            return
        handed = None if c.handed_at is None else time.time() - (self._loop.time() - c.handed_at)
        rec = journal.Record.of(c.inst, self.name, journal.WARM if handed is None else journal.LIVE,
                                handed)
        try:
            journal.write(c.inst.run_dir, rec)
        except OSError as e:
            log.warning("instance %s: cannot write its journal record: %s", c.inst.id, e.strerror)

    def _discard(self, inst) -> None:
        c = self.copies.get(inst.id)
        if c is not None:
            self._kill(c, 0, KILLED)

    def find(self, iid: str) -> Copy:
        """A handed-out copy (running or recently exited)."""
        c = self.copies.get(iid)
        if c is not None and c.handed_at is not None:
            return c
        c = self.history.get(iid)
        if c is None:
            raise InstanceNotFound(iid)
        return c

    def handed(self, c: Copy, path: str, since: float = 0.0) -> None:
        """c was handed out since seconds ago. Its journal record says so before the reply is
        sent: a node killed right after a spawn finds the copy live, not warm."""
        c.inst.path = path
        c.handed_at = self._loop.time() - since
        self._journal(c)

    def _describe(self, c: Copy) -> dict:
        d = c.inst.describe()
        d.update(node=self.name, exited_at=c.exited_at,
                 end_cause=c.cause if c.done.done() else None)
        if c.handed_at is not None and not c.done.done():
            d["uptime_s"] = round(self._loop.time() - c.handed_at, 3)
            if c.proxy is not None:
                d["idle_s"] = round(time.monotonic() - c.proxy.last_activity, 3)
        return d

    def live_count(self) -> int:
        return sum(1 for c in self.copies.values() if c.handed_at is not None)

    # -- node-level RPC methods -------------------------------------------------------------------
    async def handle(self, method: str, params: dict) -> Any:
        fn = getattr(self, f"rpc_{method}", None)
        if fn is None:
            from pool.errors import BadRequest  # noqa: PLC0415
            raise BadRequest(f"{method} is not a node method", method=method)
        return await fn(**params)

    async def rpc_ping(self) -> dict:
        return {"pong": True, "pid": os.getpid(), "node": self.name, "draining": self.draining}

    async def rpc_spawn(self, template: str, env: dict, args: list, timeout: float,
                        node: str | None = None, hostname: str | None = None) -> dict:
        from pool.copies.restore import Identity, hand_over_async  # noqa: PLC0415

        t0 = time.perf_counter()
        if self.draining:
            raise NodeUnavailable(f"node {self.name} is shutting down", node=self.name)
        try:
            pool = self._pool(template)
            if pool.unbuilt:  # published a moment ago (a shipped template), before the next tick
                self._notice_build(template, pool)
        except PoolError as e:
            self.metrics.spawn_failed(template if template in self.pools else "", e.code)
            raise
        self.inflight += 1
        try:
            try:
                inst, path = await pool.acquire(timeout)
            except PoolError as e:
                self.metrics.spawn_failed(template, e.code)
                raise
            c = self.copies[inst.id]
            c.handing_over = True
            self._handovers += 1
            try:
                left = max(1.0, timeout - (time.perf_counter() - t0))
                await hand_over_async(inst, Identity(inst.id, env=env, args=args,
                                                     hostname=hostname),
                                      min(inst.identity_timeout, left))
            except BaseException as e:
                cancelled = isinstance(e, asyncio.CancelledError)
                # only the template's own failures count toward its quarantine (pool.node.faults)
                self._kill(c, 0, FAILED if handover_counts_against_template(e) else KILLED)
                if not cancelled:
                    self.metrics.spawn_failed(template, getattr(e, "code", "internal"))
                if isinstance(e, RestoreError):
                    raise RestoreError(e.step, e.problem, output_tail=inst.output_tail()) from e
                raise
            finally:
                c.handing_over = False
                if c.done.done():
                    inst.release_fds()
                self._handovers -= 1
                if not self._handovers:  # queued now, run after this reply is written
                    for name in self._deferred_refills:
                        self._events.put_nowait(("refill", name))
                    self._deferred_refills.clear()
            self.handed(c, path)
            spawn_s = time.perf_counter() - t0
            self.metrics.spawned(template, path, spawn_s)
            return {"id": inst.id, "template": template, "pid": inst.pid, "address": inst.address,
                    "path": path, "node": self.name, "spawn_ms": round(spawn_s * 1000, 3)}
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def rpc_kill(self, id: str, grace: float) -> dict:  # noqa: A002
        c = self.find(id)
        if not c.done.done():
            self._kill(c, grace, KILLED)
            await asyncio.wait_for(asyncio.shield(c.done), grace + 15)
        return self._describe(c)

    async def rpc_wait(self, id: str, timeout: float | None) -> dict:  # noqa: A002
        c = self.find(id)
        if not c.done.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.done), timeout)
        return self._describe(c)

    async def rpc_list(self, template: str | None) -> list:
        return [self._describe(c) for c in self.copies.values()
                if c.handed_at is not None and (template is None or c.inst.template == template)]

    async def rpc_info(self, id: str) -> dict:  # noqa: A002
        c = self.find(id)
        d = self._describe(c)
        if not c.done.done():
            d["stats"] = c.inst.stats()
        return d

    async def rpc_logs(self, id: str, stream: str, offset: int, limit: int) -> dict:  # noqa: A002
        c = self.find(id)
        data, end, lost = c.inst.read_log_from(stream, offset, min(limit, MAX_LOG_CHUNK))
        return {"data": data, "offset": end, "exited": c.done.done(), "rotated_away": lost}

    async def rpc_templates(self) -> list:
        out = []
        for t in self.restorer.store.all():
            m = t.manifest
            pool = self.pools.get(t.name)
            out.append({"name": t.name, "build_id": t.build_id, "image_bytes": t.image_bytes,
                        "sdk": m.sdk, "built_at": m.built_at, "port": m.port,
                        "pool": pool.snapshot() if pool else None, "node": self.name})
        return out

    async def rpc_stats(self) -> dict:
        return {"node": self.name, "store": str(self.cfg.store), "draining": self.draining,
                "spawns_in_flight": self.inflight, "live": self.live_count(),
                "copies": len(self.copies), "exited_kept": len(self.history),
                "templates": {n: p.snapshot() for n, p in sorted(self.pools.items())}}

    async def rpc_set_warm(self, template: str, min_warm: int) -> dict:
        from pool.errors import BadRequest  # noqa: PLC0415

        if self.winding_down:
            raise NodeUnavailable(f"node {self.name} is shutting down", node=self.name)
        pool = self._pool(template)
        pool.check_min_warm(min_warm)
        warm_elsewhere = sum(p.settings.min_warm for n, p in self.pools.items() if n != template)
        if min_warm + warm_elsewhere > self.cfg.capacity:
            raise BadRequest(f"template {template!r}: min_warm {min_warm} would keep "
                             f"{min_warm + warm_elsewhere} copies warm on node {self.name}, more "
                             f"than its capacity ({self.cfg.capacity})", param="min_warm",
                             min_warm=min_warm, capacity=self.cfg.capacity,
                             warm_elsewhere=warm_elsewhere)
        pool.set_min_warm(min_warm)
        log.info("template %s: min_warm = %d", template, min_warm)
        return pool.snapshot()

    async def rpc_facts(self) -> dict:
        """What a coordinator schedules by: compatibility facts, cached builds, free capacity."""
        from pool.templates.compat import node_facts  # noqa: PLC0415

        # a lazy fork's build lacks its memory: it is never a template to restore again
        templates = {t.name: t.build_id for t in self.restorer.store.all()
                     if not t.manifest.lazy_pages}
        return {"node": self.name, "facts": node_facts(self.restorer.criu).to_wire(),
                "templates": templates, "capacity": self.cfg.capacity,
                "free": self.free(),
                "live": self.live_count(), "draining": self.draining}


async def until(aw, timeout: float, force: asyncio.Event | None) -> None:
    """Await aw for up to timeout seconds, or until force is set (a second signal)."""
    task = asyncio.ensure_future(aw)
    waits = {task}
    if force is not None:
        waits.add(asyncio.ensure_future(force.wait()))
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for t in waits:
        if not t.done():
            t.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


PREFAULT_LIMIT = 32 << 20  # bytes of code per copy: the interpreter's own, not all of libtorch


def prefault_code(root_pid: int, limit: int = PREFAULT_LIMIT) -> None:
    """Map the code pages of a restored copy's processes into their page tables.

    CRIU maps the copy's executable files afresh, so the first instructions it runs after restore
    fault each code page in: ~60 minor faults and ~0.25 ms on the first (warm) spawn's handshake.
    Reading the pages through /proc/PID/mem faults them into the copy's page tables now, while it
    waits warm; only the first `limit` bytes of code (the executable and the first libraries
    mapped), since a big library's pages would cost far more than they save. Best effort: a copy
    that went away or a mapping we cannot read is skipped."""
    import psutil  # noqa: PLC0415

    try:
        procs = [root_pid, *(p.pid for p in psutil.Process(root_pid).children(recursive=True))]
    except psutil.Error:
        return
    for pid in procs:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                for line in maps:
                    fields = line.split()
                    if fields[1] != "r-xp" or len(fields) < 6 or not fields[5].startswith("/"):
                        continue
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    end = min(end, start + limit)
                    limit -= end - start
                    if end <= start:
                        return
                    for addr in range(start, end, 4096):
                        try:
                            os.pread(mem.fileno(), 1, addr)
                        except OSError:
                            break
        except OSError:
            continue


def _mono(loop_time: float, loop_now: float) -> float:
    """A loop.time() value on the time.monotonic() scale (asyncio and uvloop both use monotonic
    clocks, but not necessarily the same origin)."""
    return time.monotonic() - (loop_now - loop_time)
