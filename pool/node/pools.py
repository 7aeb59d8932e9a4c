"""The node's warm pools, one per template, made on first use and wired to the restorer: a pool's
restore() is a CRIU restore in the node's executor (for a fork-mode template, `[restore] method =
"fork"`: a fork from the template's zygote, pool/copies/zygote.py), its discard() a kill through the
supervisor. Also: noticing builds published to (or removed from) the store, restores cancelled while
a worker thread was already running them (their copies are discarded once made), and the zygotes:
watched by their pidfd, reaped when they die (the next fork restores a new one), each counted as
one copy against the node's capacity. An encrypted store's builds are decrypted into RAM for
restores (Store.readable): a replaced build's plaintext is dropped, and all of it when the node
stops."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

from pool.copies.zygote import Zygote, Zygotes
from pool.errors import PoolError, ShuttingDown, TemplateNotFound
from pool.node.demand import MemoryBudget
from pool.node.prefault import prefault_code
from pool.node.secrets import SecretEnv
from pool.node.settings import NodeSettings
from pool.node.supervisor import Supervisor
from pool.node.table import Copy, CopyTable
from pool.node.warm import KILLED, WarmPool

log = logging.getLogger(__name__)


class TemplatePools:
    """by_name: the pools. adopt(inst, pool) makes a restored copy the node's (runtime.adopt)."""

    def __init__(self, node: str, settings: NodeSettings, restorer: Any, table: CopyTable,
                 supervisor: Supervisor, metrics: Any, executor: Any,
                 adopt: Callable[[Any, WarmPool], Awaitable[Copy]]) -> None:
        self.node = node
        self.settings = settings
        self.restorer = restorer
        self.table = table
        self.supervisor = supervisor
        self.metrics = metrics
        self.by_name: dict[str, WarmPool] = supervisor.pools
        self._executor = executor
        self._adopt = adopt
        self._loop = asyncio.get_running_loop()
        self.closed = False                      # the node is shutting down: no new pools
        self.winding_down = False                # refills stopped
        self._orphans = 0                        # cancelled restores still running in a thread
        self.secrets = SecretEnv()               # each template's secret env, as of its build
        self.methods: dict[str, str] = {}        # template -> its current build's restore method
        self.zygotes = Zygotes(restorer, node, on_start=lambda z: self._loop.call_soon_threadsafe(
            self._watch_zygote, z))
        self.memory = MemoryBudget(settings.memory_budget)  # shared by the pools' targets

    def get(self, name: str, must_exist: bool = True) -> WarmPool:
        """name's pool, made on first use; a configured template not built yet gets an unbuilt pool
        (must_exist False) that comes to life when its build is published (notice_builds)."""
        pool = self.by_name.get(name)
        if pool is not None:
            return pool
        if self.closed:
            raise ShuttingDown(f"node {self.node} is shutting down", node=self.node)
        image_bytes = None
        try:
            template = self.restorer.store.get(name)
            image_bytes = template.image_bytes
            self.secrets.load(name, template.manifest.spec)
            self.methods[name] = template.manifest.restore_method
            self.memory.set_copy_bytes(name, template.manifest.rss_bytes or image_bytes)
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
        cfg = self.settings
        pool = WarmPool(name, cfg.warm_settings(name), lambda: self._restore_copy(name),
                        self._discard,
                        request_refill=lambda: self.supervisor.request_refill(name),
                        quarantine_after=cfg.quarantine_after, early_death_s=cfg.early_death_s,
                        node_room=self.room, build_of=lambda inst: inst.build_id, build=build,
                        unbuilt=build is None, miss_path=self._miss_path(name), memory=self.memory)
        self.by_name[name] = pool
        if self.winding_down:
            pool.begin_drain()
        self.metrics.watch_pool(name, lambda: pool.warm, lambda: pool.live,
                                lambda: 1.0 if pool.quarantined else 0.0, lambda: pool.target)
        if image_bytes is not None:
            self.metrics.image_bytes.labels(name).set(image_bytes)
        self.supervisor.request_refill(name)
        return pool

    def _miss_path(self, name: str) -> str:
        """The reply's path for a copy made on a miss: "fork" or "restore"."""
        return "fork" if self.methods.get(name) == "fork" else "restore"

    def room(self) -> int:
        """Copies the node may still add (a cancelled restore still running counts too, and so
        does each zygote: it holds the template's memory, which its forks share)."""
        restoring = sum(p.restoring for p in self.by_name.values())
        return self.table.room(restoring + self._orphans + self.zygotes.count())

    def warm_elsewhere(self, template: str) -> int:
        """The min_warm of every pool but template's."""
        return sum(p.settings.min_warm for n, p in self.by_name.items() if n != template)

    def snapshots(self) -> dict[str, dict]:
        out = {n: p.snapshot() for n, p in sorted(self.by_name.items())}
        for n, snap in out.items():
            if self.methods.get(n) == "fork":
                snap["zygote"] = self.zygotes.describe(n)
        return out

    def begin_drain(self) -> int:
        """No refills but for spawns already waiting; returns the restores cancelled."""
        self.winding_down = True
        return sum(p.begin_drain() for p in self.by_name.values())

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.by_name.values()))
        self.restorer.store.close()  # decrypted builds leave RAM (a restore in flight: once done)

    # -- ticks: outcomes, backoffs, builds ------------------------------------------------------------
    def tick(self) -> None:
        for pool in self.by_name.values():
            pool.tick()
        for name, pool in self.by_name.items():  # one readlink per pool
            self.notice_build(name, pool)

    def notice_build(self, name: str, pool: WarmPool) -> None:
        """A build of name published (or removed) since the pool last looked."""
        try:
            build = self.restorer.store.current_build_id(name)
        except OSError as e:  # the store is unreadable right now: keep what we have
            log.warning("template %s: reading its current build: %s", name, e.strerror)
            return
        if build == pool.build:
            return
        self.zygotes.retire(name)  # forks of the new build come from a zygote of it
        self.restorer.store.drop_readable(name, keep_build=build)  # old plaintext leaves RAM
        if build is None:
            log.info("template %s: its build was removed from the store", name)
            pool.build_removed()
            self.secrets.forget(name)
            return
        log.info("template %s: build %s published; using it", name, build)
        with contextlib.suppress(PoolError, OSError):  # else the next restore says what is wrong
            template = self.restorer.store.get(name)
            self.methods[name] = template.manifest.restore_method
            self.secrets.load(name, template.manifest.spec)
            pool.miss_path = self._miss_path(name)
            self.metrics.image_bytes.labels(name).set(template.image_bytes)
            self.memory.set_copy_bytes(name, template.manifest.rss_bytes or template.image_bytes)
        pool.new_build(build)

    # -- restores -------------------------------------------------------------------------------------
    async def _restore_copy(self, name: str):
        """One warm copy of name for its pool. Safe to cancel at any point (the pool cancels
        restores it no longer wants): a restore still queued never runs; a running one's copy is
        discarded when it is done."""
        t0 = time.perf_counter()
        pool = self.by_name[name]
        try:
            inst = await self._restore_in_thread(name)
        except PoolError as e:
            self.metrics.restore_failed(name, e.code)
            raise
        except OSError:
            self.metrics.restore_failed(name, "os_error")
            raise
        self.metrics.restored(name, time.perf_counter() - t0)
        try:
            await self._adopt(inst, pool)
        except asyncio.CancelledError:
            self._discard(inst)
            raise
        if not pool.waiting:  # it will wait warm: spend that time on its first faults, not a spawn's
            self.supervisor.background(self._prefault(inst.pid))
        return inst

    async def _prefault(self, pid: int) -> None:
        await self._loop.run_in_executor(self._executor, prefault_code, pid)

    async def _restore_in_thread(self, name: str):
        make = self.zygotes.fork if self.methods.get(name) == "fork" else self.restorer.restore
        job = self._executor.submit(make, name)
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

    def _discard(self, inst) -> None:
        c = self.table.get(inst.id)
        if c is not None:
            self.supervisor.kill(c, 0, KILLED)

    # -- zygotes --------------------------------------------------------------------------------------
    def _watch_zygote(self, z: Zygote) -> None:
        fd = z.copy.pidfd

        def ready() -> None:
            self._loop.remove_reader(fd)
            self._reap_zygote(z)
        self._loop.add_reader(fd, ready)

    def _reap_zygote(self, z: Zygote) -> None:
        if z.copy.exit_status is not None and z not in self.zygotes.all:
            return  # closed at stop meanwhile
        status = z.reap()
        if status is None:  # a readable pidfd means exited; reapable a moment later
            self._loop.call_later(0.01, self._reap_zygote, z)
            return
        self.zygotes.ended(z)
        if z.killed:
            log.info("template %s: zygote %s (pid %d) ended", z.template.name, z.id, z.pid)
        else:
            log.warning("template %s: zygote %s (pid %d) died with status %s; its forked copies "
                        "ended with it; the next fork restores a new zygote", z.template.name,
                        z.id, z.pid, status)
        if z.template.name in self.by_name:  # its room changed; a min_warm may want a new zygote
            self.supervisor.request_refill(z.template.name)

    async def close_zygotes(self, leave_children: bool) -> None:
        """At stop, once the copies are reaped: end the zygotes (or leave those whose forked
        copies are left running)."""
        for z in list(self.zygotes.all):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(z.copy.pidfd)
        await asyncio.to_thread(self.zygotes.close, leave_children)
