"""The pool service (`pool serve`): the coordinator. RPC API, scheduling across nodes, metrics.

Its nodes: the embedded local node (node.runtime.NodeRuntime + node.ops.NodeOps, unless `local_node =
false`) and the `pool agent`s of `[nodes.NAME]` (cluster.RemoteNode). A spawn picks a node with
scheduler.choose_node (healthy, compatible, template cached first, then free capacity), ships the
template there first if it lacks it, and is answered by that node; the reply names the node. Calls
about an instance (kill, wait, info, logs) go to the node it lives on (cluster.routes).

Phases, each an explicit method: start() (local node, cluster, RPC listeners, metrics), serve()
(until SIGTERM/SIGINT), drain() (stop accepting, finish in-flight spawns, then the local node drains:
refills stop, warm copies and live instances are killed or left), stop() (close listeners, nodes,
metrics). run() is all four. Remote nodes keep their instances when the coordinator stops.
Signals are handled on the loop (loop.add_signal_handler): a first one drains, a second forces.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from pool.cluster.access import OWN_COPY_METHODS, USER
from pool.cluster.config import ServiceConfig, read_token
from pool.cluster.metrics import Metrics, MetricsServer
from pool.cluster.etcd import Etcd
from pool.cluster.nodes import CALL_SLACK, Cluster, LocalNode, RemoteNode
from pool.cluster.registry import EtcdRegistry, StaticRegistry
from pool.cluster.scheduler import choose_node
from pool.cluster.shutdown import ShutdownSignals
from pool.errors import BadRequest, NodeUnavailable, PoolError, ShuttingDown, SpecError
from pool.fds import raise_nofile_limit
from pool.node.ops import NodeOps
from pool.node.runtime import NodeRuntime, until
from pool.wire.protocol import COORDINATOR_METHODS
from pool.wire.replies import (CheckpointReply, CopyInfo, FetchResult, ForkReply, InstanceRestored,
                               LogChunk, MigrateReply, NodeView, PoolFigures, Pong, ServiceStats, SnapshotInfo,
                               SpawnReply, SuspendReply, TemplateInfo)
from pool.wire.rpc import RpcServer, systemd_listen_socket

log = logging.getLogger(__name__)


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.runtime = None                    # node.NodeRuntime of the local node, if any
        self.cluster = None                    # cluster.Cluster
        self.metrics = None
        self.metrics_server = None
        self.socket_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._rpcs: list = []
        self.signals = ShutdownSignals(on_force=self._end_live_now)
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- phase 1: start ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        self.signals.install()
        tokens = {read_token(cfg.token_file)} if cfg.tcp and cfg.token_file else None
        node_tokens = {n.name: read_token(n.token_file) for n in cfg.nodes.values()}
        if cfg.etcd is not None:   # agents that join present this token (and fetch with it)
            if cfg.etcd.agent_token_file is None:
                raise SpecError("[etcd]", "agent_token_file", "a coordinator on etcd needs the "
                                "token its agents were started with (--agent-token-file)")
            node_tokens[""] = read_token(cfg.etcd.agent_token_file)
        tls = cfg.tls(tcp=bool(cfg.tcp or cfg.nodes or cfg.etcd))
        self.metrics = Metrics(CollectorRegistry())
        activated = systemd_listen_socket()  # before the node starts: no child may see LISTEN_*
        try:
            if cfg.metrics:
                self.metrics_server = MetricsServer(self.metrics.exposed, *cfg.metrics)
            local = None
            if cfg.local_node:
                self.runtime = NodeRuntime(cfg.node_settings(), self.metrics)
                await self.runtime.start()
                local = LocalNode(NodeOps(self.runtime, host=self._source_host(), tls=tls))
            self.cluster = Cluster(cfg.open_store(), local, self._registry(node_tokens, tls),
                                   self._source_host(), tls)
            await self.cluster.start(set(node_tokens.values()),
                                     cfg.source[1] if cfg.source else 0)
            unix = RpcServer(self.handle, name="prewarm-pool", **cfg.connection_limits())
            self._rpcs.append(unix)
            if activated is not None:  # systemd's pool.socket: its SocketMode= says who may connect
                self.socket_path = await unix.serve_unix_socket(activated)
                activated = None
                if cfg.access.shared and self.socket_path.stat().st_mode & 0o006 != 0o006:
                    log.warning("%s is not open to all: admin_group/users_group need SocketMode=0666 "
                                "in pool.socket", self.socket_path)
            else:  # shared with admin/users groups: open to all, the access policy decides per request
                self.socket_path = await unix.start_unix(cfg.socket,
                                                         mode=0o666 if cfg.access.shared else 0o660)
            if cfg.tcp:
                tcp = RpcServer(self.handle, tokens=tokens, name="prewarm-pool", **cfg.connection_limits())
                self._rpcs.append(tcp)
                self.tcp_address = await tcp.start_tcp(*cfg.tcp, tls=tls,
                                                       insecure_plain_tcp=cfg.insecure_plain_tcp)
        except BaseException:
            if activated is not None:
                activated.close()
            await self.stop()
            raise
        log.info("serving on %s%s%s; store %s; nodes: %s", self.socket_path,
                 f", tcp {self.tcp_address[0]}:{self.tcp_address[1]}" if self.tcp_address else "",
                 f", metrics http://{self.metrics_server.address}/metrics" if self.metrics_server else "",
                 cfg.store, ", ".join(self.cluster.nodes) or "none")

    def _registry(self, node_tokens: dict[str, str], tls):
        """The config's [nodes.*], or the agents that register in etcd ([etcd])."""
        cfg = self.cfg
        if cfg.etcd is None:
            return StaticRegistry([RemoteNode(n.name, n.address, node_tokens[n.name],
                                              cfg.heartbeat_s, tls) for n in cfg.nodes.values()])
        return EtcdRegistry(
            Etcd(cfg.etcd.endpoints), cfg.etcd.cluster, cfg.etcd.ttl,
            lambda name, address: RemoteNode(name, address, node_tokens[""], cfg.heartbeat_s, tls),
            {"tcp": f"{cfg.tcp[0]}:{cfg.tcp[1]}" if cfg.tcp else None})

    def _source_host(self) -> str:
        """Where agents fetch templates from us: [service] source, else the TCP listener's host."""
        if self.cfg.source:
            return self.cfg.source[0]
        return self.cfg.tcp[0] if self.cfg.tcp else "127.0.0.1"

    # -- phase 2: serve ---------------------------------------------------------------------------
    async def serve(self) -> None:
        await self.signals.stop.wait()

    def request_stop(self) -> None:
        """What a first SIGTERM does; a second one (or force=True) skips the graceful parts."""
        self.signals.received()

    def _end_live_now(self) -> None:
        if self.runtime is not None:
            self.runtime.end_live(force=True)

    # -- phase 3: drain ---------------------------------------------------------------------------
    async def drain(self) -> None:
        self._draining = True
        for rpc in self._rpcs:
            rpc.stop_accepting()
        # One deadline for the whole drain, and the local node stops refilling now, not after the
        # spawns in flight are done: nothing is restored for copies that would only be killed.
        deadline = self._loop.time() + self.cfg.drain_timeout
        if self.runtime is not None:
            self.runtime.begin_drain()
        if self._inflight:  # spawns routed to any node; the local node then drains its own
            self._idle.clear()
            await until(self._idle.wait(), self.cfg.drain_timeout, self.signals.force)
        if self.runtime is not None:
            await self.runtime.drain(self.signals.force, deadline)

    # -- phase 4: stop ----------------------------------------------------------------------------
    async def stop(self) -> None:
        for rpc in self._rpcs:
            await rpc.close()  # cancels connections; a spawn cut short kills its copy
        self._rpcs.clear()
        if self.cluster is not None:
            if self.cluster.local is not None:
                await self.cluster.local.ops.close()
            await self.cluster.close()
        if self.runtime is not None:
            await self.runtime.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.signals.remove()
        log.info("stopped")

    async def run(self) -> int:
        await self.start()
        try:
            await self.serve()
            await self.drain()
        finally:
            await self.stop()
        return 0

    # -- RPC --------------------------------------------------------------------------------------
    async def handle(self, method: str, params: dict, ctx) -> Any:
        if method not in COORDINATOR_METHODS:
            raise BadRequest(f"{method} is a node method; the coordinator does not serve it",
                             method=method)
        role = self.cfg.access.check(method, ctx)
        if method == "spawn":  # the owner is who is asking, never what the request says
            params["owner"] = ctx.uid if ctx.transport == "unix" else None
        elif role == USER and method in OWN_COPY_METHODS:
            self.cfg.access.check_owner(await self._on_node("info", params["id"], {}, 30), ctx, method)
        rows = await getattr(self, f"rpc_{method}")(**params)
        if role == USER and method == "list":
            rows = [r for r in rows if r.get("owner") == ctx.uid]
        return rows

    async def rpc_ping(self) -> Pong:
        return {"pong": True, "pid": os.getpid(), "node": "coordinator",
                "draining": self._draining}

    async def rpc_spawn(self, template: str, env: dict, args: list, timeout: float,
                        node: str | None, hostname: str | None, owner: int | None = None) -> SpawnReply:
        if self._draining:
            raise ShuttingDown("the pool service is shutting down")
        t0 = time.perf_counter()
        self._inflight += 1
        try:
            choice = choose_node(self.cluster.views(template), template,
                                 prefer=None if node in (None, "") else node)
            n = self.cluster.node(choice.node)
            shipped = None
            if not choice.cached:  # a first spawn on a node that lacks the template ships it
                shipped = await self.cluster.ensure_template(n, template, max(timeout, 60.0))
            left = max(1.0, timeout - (time.perf_counter() - t0))
            if n.remote:
                n.spawning += 1
            try:
                r = await n.call("spawn", {"template": template, "env": env, "args": args,
                                           "timeout": left, "hostname": hostname, "owner": owner},
                                 left + CALL_SLACK)
            finally:
                if n.remote:
                    n.spawning -= 1
            if n.remote:
                n.placed += 1
            await self._route_or_undo(r["id"], n)
            r["node"] = n.name
            r["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            if shipped is not None:
                r["shipped"] = shipped
            if choice.skipped:
                r["skipped"] = choice.skipped
            return r
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _route_or_undo(self, iid: str, n) -> None:
        """Record where a new copy lives; if that cannot be recorded (etcd is down), the copy is
        killed and the error raised: no copy is left that no coordinator can route to."""
        try:
            await self.cluster.set_route(iid, n.name)
        except PoolError:
            try:
                await n.call("kill", {"id": iid, "grace": 0.0}, 30)
            except PoolError as e:
                log.warning("%s: could not be routed, nor killed: %s", iid, e.message)
            raise

    async def _on_node(self, method: str, iid: str, params: dict, timeout: float | None) -> Any:
        n = await self.cluster.locate(iid)
        r = await n.call(method, {"id": iid, **params}, timeout)
        if isinstance(r, dict):
            r["node"] = n.name
        return r

    async def rpc_kill(self, id: str, grace: float) -> CopyInfo:  # noqa: A002
        r = await self._on_node("kill", id, {"grace": grace}, grace + 30)
        await self.cluster.drop_route(id)
        return r

    async def rpc_wait(self, id: str, timeout: float | None) -> CopyInfo:  # noqa: A002
        return await self._on_node("wait", id, {"timeout": timeout},
                                   None if timeout is None else timeout + 5)

    async def rpc_info(self, id: str) -> CopyInfo:  # noqa: A002
        return await self._on_node("info", id, {}, 30)

    async def rpc_logs(self, id: str, stream: str, offset: int, limit: int) -> LogChunk:  # noqa: A002
        return await self._on_node("logs", id, {"stream": stream, "offset": offset,
                                                "limit": limit}, 30)

    # -- running instances: on the node that runs them (pool/node/live.py) -------------------------
    async def rpc_checkpoint(self, id: str, tag: str | None, keep: bool,  # noqa: A002
                             timeout: float) -> CheckpointReply:
        return await self._on_node("checkpoint", id, {"tag": tag, "keep": keep, "timeout": timeout},
                                   timeout + CALL_SLACK)

    async def rpc_snapshots(self, id: str) -> list[SnapshotInfo]:  # noqa: A002
        n = await self.cluster.locate(id)
        return await n.call("snapshots", {"id": id}, 30)

    async def rpc_rollback(self, id: str, snapshot: str | None,  # noqa: A002
                           timeout: float) -> InstanceRestored:
        return await self._on_node("rollback", id, {"snapshot": snapshot, "timeout": timeout},
                                   timeout + CALL_SLACK)

    async def rpc_suspend(self, id: str, timeout: float) -> SuspendReply:  # noqa: A002
        return await self._on_node("suspend", id, {"timeout": timeout}, timeout + CALL_SLACK)

    async def rpc_resume(self, id: str, timeout: float) -> InstanceRestored:  # noqa: A002
        return await self._on_node("resume", id, {"timeout": timeout}, timeout + CALL_SLACK)

    async def rpc_migrate(self, id: str, node: str, lazy: bool,  # noqa: A002
                          timeout: float) -> MigrateReply:
        """Move a running instance to node: checkpoint it and end its process on its node, ship
        the snapshot, restore it on node with the same id; then it ends on the source. Any
        failure on the way and it is restored where it was."""
        t0 = time.perf_counter()
        src = await self.cluster.locate(id)
        dst = self.cluster.up_node(node)
        if dst is src:
            raise BadRequest(f"instance {id} already runs on node {node}", param="node", node=node)
        out = await src.call("migrate_out", {"id": id, "lazy": lazy, "timeout": timeout},
                             timeout + CALL_SLACK)
        moved = False
        try:
            r = await dst.call("migrate_in", {
                "id": id, "template": out["template"], "source": out["source"],
                "build_id": out["build_id"], "token": out["token"], "instance": out["instance"],
                "source_name": out.get("source_name"), "page_server": out.get("page_server"),
                "timeout": timeout}, timeout * 2 + CALL_SLACK)
            moved = True
        finally:
            try:
                await src.call("migrate_done", {"id": id, "moved": moved, "template": out["template"],
                                                "timeout": timeout}, timeout + CALL_SLACK)
            except PoolError as e:
                log.warning("migration of %s: finishing on node %s failed: %s", id, src.name,
                            e.message)
        self.cluster.routes[id] = dst.name
        return {"id": id, "node": dst.name, "from_node": src.name, "pid": r["pid"],
                "address": r["address"], "template": r["template"],
                "freeze_ms": out["freeze_ms"], "image_bytes": out["image_bytes"], "lazy": lazy,
                "migrate_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def rpc_list(self, template: str | None) -> list[CopyInfo]:
        """Instances on every reachable node (a node that is down is left out)."""
        nodes = [n for n in self.cluster.nodes.values() if n.healthy]
        replies = await asyncio.gather(*(n.call("list", {"template": template}, 10) for n in nodes),
                                       return_exceptions=True)
        out = []
        for n, rows in zip(nodes, replies, strict=True):
            if isinstance(rows, PoolError):
                log.warning("list: node %s: %s", n.name, rows.message)
                continue
            if isinstance(rows, BaseException):
                raise rows
            for row in rows:
                row["node"] = n.name
                self.cluster.routes.setdefault(row["id"], n.name)
            out.extend(rows)
        return out

    async def rpc_templates(self) -> list[TemplateInfo]:
        rows = await self.cluster.local.call("templates") if self.cluster.local else [
            {"name": t.name, "build_id": t.build_id, "image_bytes": t.image_bytes, "pool": None}
            for t in self.cluster.store.all()]
        for row in rows:
            row["nodes"] = sorted(n.name for n in self.cluster.nodes.values()
                                  if n.cached().get(row["name"]) == row["build_id"])
        return rows

    async def rpc_stats(self) -> ServiceStats:
        local = await self.cluster.local.call("stats") if self.cluster.local else {
            "live": 0, "copies": 0, "exited_kept": 0, "templates": {}}
        return {**local, "pid": os.getpid(), "node": "coordinator",
                "uptime_s": round(time.time() - self._started, 3),
                "socket": str(self.socket_path), "store": str(self.cfg.store),
                "metrics": self.metrics_server.address if self.metrics_server else None,
                "draining": self._draining, "spawns_in_flight": self._inflight,
                "nodes": {n.name: n.describe() for n in self.cluster.nodes.values()},
                "cluster": await self.cluster.registry.view()}

    async def rpc_set_warm(self, template: str, min_warm: int) -> PoolFigures:
        """On the local node, and on every up node that holds the template."""
        targets = [n for n in self.cluster.nodes.values()
                   if n.healthy and (not n.remote or template in n.cached())]
        if not targets:
            raise NodeUnavailable(f"no node holds {template!r} to keep warm", template=template)
        replies = [await n.call("set_warm", {"template": template, "min_warm": min_warm}, 10)
                   for n in targets]
        return replies[0]

    async def rpc_nodes(self) -> list[NodeView]:
        rows = [n.describe() for n in self.cluster.nodes.values()]
        if self.cluster.registry.joins:   # the etcd view: each agent's registration lease
            view = await self.cluster.registry.view()
            for row in rows:
                lease = self.cluster.registry.lease(row["name"])
                if lease is not None:
                    lease["ttl"] = view["leases"].get(row["name"])
                row["lease"] = lease
        return rows

    async def rpc_push(self, template: str, node: str, timeout: float) -> FetchResult:
        n = self.cluster.up_node(node)
        r = await self.cluster.ensure_template(n, template, timeout)
        return r or {"name": template, "already_current": True, "node": node}

    async def rpc_fork(self, id: str, node: str | None, lazy: bool, hostname: str | None,  # noqa: A002
                       timeout: float) -> ForkReply:
        """Checkpoint a running instance without stopping it and restore a copy on node."""

        src = await self.cluster.locate(id)
        if node is None:
            up = [n for n in self.cluster.nodes.values() if n.healthy]
            if not up:
                raise NodeUnavailable("no node is up to fork onto")
            node = max(up, key=lambda n: (n is not src, n.free(), n.name)).name
        dst = self.cluster.up_node(node)
        ck = await src.call("fork_checkpoint", {"id": id, "lazy": lazy, "timeout": timeout},
                            timeout + CALL_SLACK)
        ok = False
        try:
            r = await dst.call("fork_restore", {
                "template": ck["template"], "source": ck["source"], "build_id": ck["build_id"],
                "token": ck["token"], "page_server": ck.get("page_server"),
                "source_name": ck.get("source_name"),
                "hostname": hostname, "timeout": timeout}, timeout * 2 + CALL_SLACK)
            ok = True
        finally:
            try:
                await src.call("fork_release", {"template": ck["template"], "abort": not ok},
                               60 + CALL_SLACK)
            except PoolError as e:
                log.warning("fork of %s: releasing the source failed: %s", id, e.message)
        await self._route_or_undo(r["id"], dst)
        r.update(node=dst.name, forked_from={**ck["forked_from"], "node": src.name},
                 image_bytes=ck["image_bytes"], lazy=lazy)
        return r


def serve(cfg: ServiceConfig) -> int:
    """Run a service on uvloop until SIGTERM/SIGINT; returns the exit code."""

    raise_nofile_limit()
    return uvloop.run(Service(cfg).run())
