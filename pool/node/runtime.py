"""One node's runtime: the parts that make a node, composed, and its phases.

Used twice: embedded in the coordinator (`pool serve`, node "local") and behind TCP in `pool agent`.
Neither the coordinator nor the agent reaches into copies directly: everything that touches a local
process is under pool/node.

Parts: the copy table (table.py: copies and their states, the exited ones' history), the supervisor
(supervisor.py: ONE task consuming events: exits, refills, ticks; reaping and the kill policy), the
warm pools wired to the restorer (pools.py, over warm.py's pure pool logic), the node API
(api.py: the rpc_* methods) and, beside it, ops.py (fetch, fork). Blocking CRIU work runs in a
small ThreadPoolExecutor; everything else on one event loop.

Phases: start (restorer, journal adoption of the copies a previous life handed out, pools of the
configured templates), serve (the API answers; the owner's signal handlers only set events), drain
(refuse spawns, finish those in flight, close pools, end or leave copies), stop (release the rest).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pool.copies import journal
from pool.copies.portproxy import PortProxy
from pool.copies.restore import Restorer
from pool.cr import cgroups
from pool.cr.criu import Criu
from pool.errors import RestoreError
from pool.node.api import NodeApi
from pool.node.live import LiveOps
from pool.node.pools import TemplatePools
from pool.node.settings import NodeSettings
from pool.node.supervisor import Supervisor, close_proxy
from pool.node.table import Copy, CopyState, CopyTable
from pool.node.warm import FAILED, WarmPool

log = logging.getLogger(__name__)

DRAIN_SLACK_S = 2.0  # after kill_grace: for SIGKILLed copies to be reaped


class NodeRuntime:
    """The copies of one node. start() and stop() bracket its life; drain() ends it gracefully.

    restorer: a Restorer (made by start() from the settings if not given; tests give a fake)."""

    def __init__(self, settings: NodeSettings, metrics: Any, *, name: str = "local",
                 publish_host: str = "127.0.0.1", restorer: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.name = name                      # what replies say in `node`
        self.publish_host = publish_host      # where copies' ports are published (PortProxy)
        self.restorer = restorer
        self.draining = False                 # new spawns are refused
        self.table = CopyTable(settings.capacity, settings.exited_history)
        self.supervisor: Supervisor | None = None
        self.pools: TemplatePools | None = None
        self.api: NodeApi | None = None
        self.live: LiveOps | None = None      # running instances: checkpoint, rollback, suspend
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- phase: start -------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.settings
        self._loop = asyncio.get_running_loop()
        if self.restorer is None:
            self.restorer = Restorer(cfg.open_store(), Criu.locate(), cfg.run_dir,
                                     restore_timeout=cfg.restore_timeout,
                                     copy_limits=cfg.copy_limits)
        # before any restore of ours starts: what a previous life left in the run dir
        found = journal.recover(self.restorer.instances_dir, self.name, cgroups.node_hierarchy())
        self._executor = ThreadPoolExecutor(cfg.restore_concurrency, thread_name_prefix="restore")
        self.supervisor = Supervisor(self.table, {}, self.metrics, kill_grace=cfg.kill_grace,
                                     max_log_bytes=cfg.max_log_bytes,
                                     on_tick=self._tick)
        self.pools = TemplatePools(self.name, cfg, self.restorer, self.table, self.supervisor,
                                   self.metrics, self._executor, self.adopt)
        self.api = NodeApi(self)
        self.live = LiveOps(self)
        self.supervisor.on_crash, self.supervisor.on_idle = self.live.on_crash, self.live.on_idle
        self.metrics.watch_node(self.name, lambda: cfg.capacity, self.free)
        self.supervisor.start()
        for name in cfg.templates:
            self.pools.get(name, must_exist=False)
        adopted = [await self._adopt_again(run_dir, rec) for run_dir, rec in found.live]
        self.live.clean_snapshots({rec.id for _, rec in found.live})
        if found.live or found.removed:
            log.info("recovered from a previous run: %d live copies adopted again, %d copies or "
                     "restores killed, %d dirs removed", sum(adopted), found.killed, found.removed)

    def _tick(self) -> None:
        self.pools.tick()
        self.live.tick()

    async def _adopt_again(self, run_dir, rec: journal.Record) -> bool:
        """Watch and publish again a live copy a previous life of this node handed out."""
        try:
            inst = journal.reopen(run_dir, rec, cgroups.node_hierarchy())
        except OSError as e:
            log.warning("instance %s (pid %d) is gone: %s", rec.id, rec.pid, e.strerror)
            shutil.rmtree(run_dir, ignore_errors=True)
            return False
        pool = self.pools.get(rec.template, must_exist=False)
        try:
            c = await self.adopt(inst, pool, host_port=journal.host_port(rec.address))
        except RestoreError as e:  # its port cannot be published: it was killed
            log.warning("instance %s: %s", rec.id, e.message)
            return False
        pool.take_live(inst)
        self.handed(c, rec.path, since=time.time() - (rec.handed_at or time.time()))
        log.info("adopted instance %s (pid %d) again at %s", rec.id, rec.pid, inst.address)
        return True

    # -- copies -------------------------------------------------------------------------------------
    async def adopt(self, inst, pool: WarmPool, on_end=None, host_port: int = 0) -> Copy:
        """Make a restored copy ours: watched, reaped, its port published (on host_port if it is
        free, else on any), recorded in the journal."""
        c = Copy(inst, pool, self._loop.create_future(), on_end=on_end)
        self.table.add(c)
        self.supervisor.watch(c)
        if inst.port:
            try:
                c.proxy = PortProxy(inst.netns_fd, inst.port, host=self.publish_host)
                inst.address = await c.proxy.start_on(host_port)
            except OSError as e:
                c.proxy = None
                self.supervisor.kill(c, 0, FAILED)
                raise RestoreError("publishing the copy's port", str(e)) from e
        self.write_journal(c)
        return c

    async def adopt_handed(self, inst, template: str, path: str, on_end=None) -> Copy:
        """A copy restored outside the pools (a lazy fork), handed out at once."""
        c = await self.adopt(inst, self.pools.get(template), on_end=on_end)
        self.handed(c, path)
        return c

    def handed(self, c: Copy, path: str, since: float = 0.0) -> None:
        """c was handed out since seconds ago. Its journal record says so before the reply is
        sent: a node killed right after a spawn finds the copy live, not warm."""
        c.inst.path = path
        c.handed_at = self.supervisor.clock() - since
        if c.state in (CopyState.WARM, CopyState.HANDING_OVER):
            c.move(CopyState.LIVE)
        self.write_journal(c)

    def forget_journal(self, inst) -> None:
        journal.forget(inst.run_dir)

    def write_journal(self, c: Copy) -> None:
        if not c.watched:
            return
        handed = None if c.handed_at is None else \
            time.time() - (self.supervisor.clock() - c.handed_at)
        rec = journal.Record.of(c.inst, self.name, journal.WARM if handed is None else journal.LIVE,
                                handed)
        try:
            journal.write(c.inst.run_dir, rec)
        except OSError as e:
            log.warning("instance %s: cannot write its journal record: %s", c.inst.id, e.strerror)

    def find(self, iid: str) -> Copy:
        """A handed-out copy (running or recently exited); InstanceNotFound if none."""
        return self.table.find(iid)

    def free(self) -> int:
        return self.table.free()

    def run_blocking(self, fn, *args):
        """fn(*args) in the restore executor (CRIU work that must not block the loop)."""
        return self._loop.run_in_executor(self._executor, fn, *args)

    def background(self, coro) -> None:
        """Run coro beside the node; stop() waits for it."""
        self.supervisor.background(coro)

    @property
    def store(self):
        return self.restorer.store

    @property
    def criu(self):
        return self.restorer.criu

    @property
    def instances_dir(self):
        return self.restorer.instances_dir

    # -- phase: drain -------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Shutdown began: no refills but for spawns already in flight (which still get served;
        drain() refuses new ones)."""
        if self.pools is None or self.pools.winding_down:
            return
        cancelled = self.pools.begin_drain()
        log.info("shutdown: refills stopped, %d restore(s) cancelled", cancelled)

    async def drain(self, force: asyncio.Event, deadline: float | None = None) -> None:
        """Finish in-flight spawns (until deadline, a loop time; default drain_timeout from now),
        cancel restores, end or leave copies: within drain_timeout + kill_grace + a few seconds,
        whatever is queued."""
        cfg = self.settings
        if deadline is None:
            deadline = self._loop.time() + cfg.drain_timeout
        self.draining = self.pools.closed = True
        self.begin_drain()
        log.info("draining: %d spawn(s) in flight, %d copies", self.api.inflight, len(self.table))
        if self.api.inflight:
            await until(self.api.spawns_done(), max(0.0, deadline - self._loop.time()), force)
        await self.pools.close()
        self.end_live(force=force.is_set())
        await until(self.supervisor.all_reaped(), cfg.kill_grace + DRAIN_SLACK_S, force)
        if self.table.watched():  # forced, or a copy outlived its grace
            self.end_live(force=True)
            await until(self.supervisor.all_reaped(), DRAIN_SLACK_S, None)

    def end_live(self, force: bool) -> None:
        """Kill every copy (live ones with kill_grace unless force), or leave live ones running
        (on_shutdown = "leave"). Safe from a signal handler's event: it only sends signals."""
        if self.supervisor is not None:
            self.supervisor.end_copies(force, leave_live=self.settings.on_shutdown == "leave")

    # -- phase: stop --------------------------------------------------------------------------------
    async def stop(self) -> None:
        if self.pools is not None:  # already closed by drain(), unless start() failed
            await self.pools.close()
        if self.supervisor is not None:
            if self.table.watched():  # still ours (a restore that finished late): kill, reap
                self.end_live(force=True)
                await until(self.supervisor.all_reaped(), 10, None)
            if self.pools is not None:  # after the copies: a zygote's death would end its forks
                await self.pools.close_zygotes(leave_children=self.settings.on_shutdown == "leave")
            await self.supervisor.stop()
        for c in self.table:  # left running (or unkillable): release our side only
            await close_proxy(c)
            c.inst.release_fds()
        self.table.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


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
