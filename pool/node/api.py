"""The node API: the node-level RPC methods a coordinator (or its embedded local node) calls:
ping, spawn, kill, wait, list, info, logs, templates, stats, set_warm, facts. Fetch and fork are
beside it in ops.py.

A spawn served from the warm pool does no thread hop and no I/O but two pipe writes/reads: pop a warm
copy, write its identity, await the SDK's ack on the loop (restore.hand_over_async), reply.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from pool.copies.restore import Identity, hand_over_async
from pool.errors import BadRequest, PoolError, RestoreError, ShuttingDown
from pool.node.faults import handover_counts_against_template
from pool.node.table import Copy, CopyState
from pool.node.warm import FAILED, KILLED
from pool.templates.compat import node_facts
from pool.wire.replies import (CopyInfo, LogChunk, NodeStats, PoolFigures, Pong, SpawnReply,
                               TemplateInfo)

if TYPE_CHECKING:  # the runtime composes the API: a type only, no import cycle at run time
    from pool.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 1 << 20
KILL_SLACK_S = 15.0   # beyond a kill's grace: for the copy to be reaped


class NodeApi:
    def __init__(self, runtime: "NodeRuntime") -> None:
        self.rt = runtime
        self.inflight = 0                     # spawns not yet answered
        self._idle = asyncio.Event()

    async def handle(self, method: str, params: dict) -> Any:
        fn = getattr(self, f"rpc_{method}", None)
        if fn is None:
            raise BadRequest(f"{method} is not a node method", method=method)
        return await fn(**params)

    async def spawns_done(self) -> None:
        """Until no spawn is in flight."""
        while self.inflight:
            self._idle.clear()
            await self._idle.wait()

    def _refuse_if_draining(self) -> None:
        if self.rt.draining:
            raise ShuttingDown(f"node {self.rt.name} is shutting down", node=self.rt.name)

    def describe(self, c: Copy) -> CopyInfo:
        d = c.inst.describe()
        d.update(node=self.rt.name, exited_at=c.exited_at,
                 end_cause=c.cause if c.exited else None, restarts=c.restarts)
        if c.crash_loop:
            d["crash_loop"] = True
        if c.handed_out and not c.exited:
            d["uptime_s"] = round(self.rt.supervisor.clock() - c.handed_at, 3)
            if c.proxy is not None:
                d["idle_s"] = round(time.monotonic() - c.proxy.last_activity, 3)
        return d

    # -- the methods ----------------------------------------------------------------------------------
    async def rpc_ping(self) -> Pong:
        return {"pong": True, "pid": os.getpid(), "node": self.rt.name, "draining": self.rt.draining}

    async def rpc_spawn(self, template: str, env: dict, args: list, timeout: float,
                        node: str | None = None, hostname: str | None = None,
                        owner: int | None = None) -> SpawnReply:
        rt, metrics = self.rt, self.rt.metrics
        t0 = time.perf_counter()
        self._refuse_if_draining()
        try:
            pool = rt.pools.get(template)
            if pool.unbuilt:  # published a moment ago (a shipped template), before the next tick
                rt.pools.notice_build(template, pool)
            env = {**rt.pools.secrets.values(template), **env}  # the template's secrets, if any
        except PoolError as e:
            metrics.spawn_failed(template if template in rt.pools.by_name else "", e.code)
            raise
        self.inflight += 1
        try:
            try:
                inst, path = await pool.acquire(timeout)
            except PoolError as e:
                metrics.spawn_failed(template, e.code)
                raise
            c = rt.table.get(inst.id)
            inst.owner = owner
            await self._hand_over(c, template, env, args, hostname,
                                  max(1.0, timeout - (time.perf_counter() - t0)))
            rt.handed(c, path)
            spawn_s = time.perf_counter() - t0
            metrics.spawned(template, path, spawn_s)
            return {"id": inst.id, "template": template, "pid": inst.pid, "address": inst.address,
                    "path": path, "node": rt.name, "spawn_ms": round(spawn_s * 1000, 3)}
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def _hand_over(self, c: Copy, template: str, env: dict, args: list,
                         hostname: str | None, left: float) -> None:
        """Give c its identity; on any failure c is killed (FAILED if it was the template's
        fault, pool.node.faults) and the error raised."""
        sup, inst = self.rt.supervisor, c.inst
        c.move(CopyState.HANDING_OVER)
        sup.handover_begun()
        try:
            await hand_over_async(inst, Identity(inst.id, env=env, args=args, hostname=hostname),
                                  min(inst.identity_timeout, left))
        except BaseException as e:
            sup.kill(c, 0, FAILED if handover_counts_against_template(e) else KILLED)
            if c.state is CopyState.HANDING_OVER:  # the spawn lets go: the reaper closes its fds
                c.move(CopyState.KILLING)
            if not isinstance(e, asyncio.CancelledError):
                self.rt.metrics.spawn_failed(template, getattr(e, "code", "internal"))
            if isinstance(e, RestoreError):
                raise RestoreError(e.step, e.problem, output_tail=inst.output_tail()) from e
            raise
        finally:
            if c.exited:  # reaped while we held its fds: ours to close
                inst.close()
            sup.handover_ended()

    async def rpc_kill(self, id: str, grace: float) -> CopyInfo:  # noqa: A002
        c = self.rt.find(id)
        if not c.exited:
            self.rt.supervisor.kill(c, grace, KILLED)
            await asyncio.wait_for(asyncio.shield(c.done), grace + KILL_SLACK_S)
        return self.describe(c)

    async def rpc_wait(self, id: str, timeout: float | None) -> CopyInfo:  # noqa: A002
        c = self.rt.find(id)
        if not c.exited:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.done), timeout)
        return self.describe(c)

    async def rpc_list(self, template: str | None) -> list[CopyInfo]:
        return [self.describe(c) for c in self.rt.table.handed_out(template)]

    async def rpc_info(self, id: str) -> CopyInfo:  # noqa: A002
        c = self.rt.find(id)
        d = self.describe(c)
        if not c.exited:
            d["stats"] = c.inst.stats()
        return d

    async def rpc_logs(self, id: str, stream: str, offset: int, limit: int) -> LogChunk:  # noqa: A002
        c = self.rt.find(id)
        data, end, lost = c.inst.read_log_from(stream, offset, min(limit, MAX_LOG_CHUNK))
        return {"data": data, "offset": end, "exited": c.exited, "rotated_away": lost}

    async def rpc_templates(self) -> list[TemplateInfo]:
        out = []
        for t in self.rt.store.all():
            m = t.manifest
            pool = self.rt.pools.by_name.get(t.name)
            out.append({"name": t.name, "build_id": t.build_id, "image_bytes": t.image_bytes,
                        "sdk": m.sdk, "built_at": m.built_at, "port": m.port,
                        "pool": pool.snapshot() if pool else None, "node": self.rt.name})
        return out

    async def rpc_stats(self) -> NodeStats:
        rt = self.rt
        return {"node": rt.name, "store": str(rt.settings.store), "draining": rt.draining,
                "spawns_in_flight": self.inflight, "live": rt.table.live_count(),
                "copies": len(rt.table), "exited_kept": len(rt.table.history),
                "templates": rt.pools.snapshots(), "snapshots": self._snapshot_totals()}

    def _snapshot_totals(self) -> dict:
        count, size = self.rt.live.snapshots.totals()
        return {"count": count, "bytes": size}

    async def rpc_set_warm(self, template: str, min_warm: int) -> PoolFigures:
        rt = self.rt
        if rt.pools.winding_down:
            raise ShuttingDown(f"node {rt.name} is shutting down", node=rt.name)
        pool = rt.pools.get(template)
        pool.check_min_warm(min_warm)
        warm_elsewhere = rt.pools.warm_elsewhere(template)
        capacity = rt.settings.capacity
        if min_warm + warm_elsewhere > capacity:
            raise BadRequest(f"template {template!r}: min_warm {min_warm} would keep "
                             f"{min_warm + warm_elsewhere} copies warm on node {rt.name}, more "
                             f"than its capacity ({capacity})", param="min_warm",
                             min_warm=min_warm, capacity=capacity, warm_elsewhere=warm_elsewhere)
        pool.set_min_warm(min_warm)
        log.info("template %s: min_warm = %d", template, min_warm)
        return pool.snapshot()

    async def rpc_facts(self) -> dict:
        """What a coordinator schedules by: compatibility facts, cached builds, free capacity."""
        rt = self.rt
        # a lazy fork's build lacks its memory: it is never a template to restore again
        templates = {t.name: t.build_id for t in rt.store.all()
                     if not t.manifest.lazy_pages}
        return {"node": rt.name, "facts": node_facts(rt.criu).to_wire(),
                "templates": templates, "capacity": rt.settings.capacity,
                "free": rt.free(), "live": rt.table.live_count(), "draining": rt.draining}
