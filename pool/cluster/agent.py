"""`pool agent`: one node's runtime (template cache, restorer, warm pools, copies) behind TCP, for a
coordinator (`pool serve` with `[nodes.NAME]`) to schedule onto.

It speaks the same msgpack protocol as the service; every connection must authenticate with the
node's token before anything else is read (rpc.RpcServer). It answers the node methods
(protocol.NODE_METHODS): spawn and the instance calls, `facts`, `fetch_template` (it pulls from the
coordinator's TemplateSource, with its own token) and the fork methods (pool/node/ops.py).

Copies' ports are published on the agent's listen address, so clients on other machines reach them.
Phases as in the service: start, serve (until SIGTERM/SIGINT), drain, stop.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from pool.cluster.config import ServiceConfig, read_token
from pool.cluster.metrics import Metrics, MetricsServer
from pool.cluster.shutdown import ShutdownSignals
from pool.errors import BadRequest
from pool.fds import raise_nofile_limit
from pool.node.ops import NodeOps
from pool.node.runtime import NodeRuntime
from pool.wire.protocol import NODE_METHODS
from pool.wire.rpc import RpcServer

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: ServiceConfig, listen: tuple[str, int], token: str,
                 name: str = "agent") -> None:
        self.cfg = cfg
        self.listen = listen
        self.token = token
        self.name = name
        self.runtime = None
        self.ops = None
        self.address: tuple[str, int] | None = None
        self._rpc = None
        self.metrics_server: MetricsServer | None = None
        self.signals = ShutdownSignals(on_force=self._end_live_now)

    async def start(self) -> None:
        self.signals.install()
        host = self.listen[0]
        metrics = Metrics(CollectorRegistry())
        self.runtime = NodeRuntime(self.cfg.node_settings(), metrics, name=self.name, publish_host=host)
        try:
            if self.cfg.metrics:   # this node's own /metrics (the coordinator serves only its own)
                self.metrics_server = MetricsServer(metrics.registry, *self.cfg.metrics)
            await self.runtime.start()
            self.ops = NodeOps(self.runtime, host=host, token=self.token)
            self._rpc = RpcServer(self.handle, tokens={self.token}, name=f"pool-agent {self.name}",
                                  **self.cfg.connection_limits())
            self.address = await self._rpc.start_tcp(*self.listen)
        except BaseException:
            await self.stop()
            raise
        log.info("agent %s listening on %s:%d; store %s%s", self.name, *self.address, self.cfg.store,
                 f"; metrics on {self.metrics_server.address}" if self.metrics_server else "")

    def _end_live_now(self) -> None:
        if self.runtime is not None:
            self.runtime.end_live(force=True)

    async def handle(self, method: str, params: dict, ctx) -> Any:
        if method not in NODE_METHODS:
            raise BadRequest(f"{method} is a coordinator method; this is a node agent",
                             method=method)
        return await self.ops.handle(method, params)

    async def stop(self) -> None:
        if self._rpc is not None:
            await self._rpc.close()
            self._rpc = None
        if self.ops is not None:
            await self.ops.close()
        if self.runtime is not None:
            await self.runtime.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.signals.remove()
        log.info("agent stopped")

    async def run(self) -> int:
        await self.start()
        try:
            await self.signals.stop.wait()
            self._rpc.stop_accepting()
            await self.runtime.drain(self.signals.force)
        finally:
            await self.stop()
        return 0


def run_agent(cfg: ServiceConfig, listen: tuple[str, int], token_file, name: str) -> int:
    token = read_token(Path(token_file))
    raise_nofile_limit()
    return uvloop.run(Agent(cfg, listen, token, name).run())
