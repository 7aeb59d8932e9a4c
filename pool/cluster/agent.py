"""`pool agent`: one node's runtime (template cache, restorer, warm pools, copies) behind TCP, for a
coordinator (`pool serve` with `[nodes.NAME]`) to schedule onto.

It speaks the same msgpack protocol as the service, over mutual TLS with the cluster's CA (its
`--tls-dir`; plain TCP only with --insecure-plain-tcp); every connection must then authenticate with
the node's token before anything else is read (rpc.RpcServer). It answers the node methods
(protocol.NODE_METHODS): spawn and the instance calls, `facts`, `fetch_template` (it pulls from the
coordinator's TemplateSource, with its own token) and the fork methods (pool/node/ops.py).

Copies' ports are published on the agent's listen address, so clients on other machines reach them.

With `--etcd URL[,URL]` (or [etcd] in its config) the agent joins the cluster by itself: it
registers `agents/NAME` on a lease of its own (etcdstate.LeasedKey) with its address, node facts,
cached templates, free capacity and /metrics address, renews the lease every TTL/3 and rewrites the
record when it changes. It leaves on SIGTERM (the lease is revoked) or when the lease expires (a
SIGKILL, a cut link). Coordinators connect to it as to a listed node, checking that its certificate
names the registered node.
Phases as in the service: start, serve (until SIGTERM/SIGINT), drain, stop.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from pool.cluster.config import ServiceConfig, read_token
from pool.cluster.etcd import Etcd
from pool.cluster.etcdstate import ClusterKeys, LeasedKey, dumps, loads
from pool.cluster.metrics import Metrics, MetricsServer
from pool.cluster.shutdown import ShutdownSignals
from pool.errors import BadRequest, SpecError
from pool.fds import raise_nofile_limit
from pool.node.ops import NodeOps
from pool.node.runtime import NodeRuntime
from pool.wire.protocol import NODE_METHODS
from pool.wire.rpc import RpcServer
from pool.wire.tls import TlsFiles

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: ServiceConfig, listen: tuple[str, int], token: str,
                 name: str = "agent", tls: TlsFiles | None = None) -> None:
        self.cfg = cfg
        self.listen = listen
        self.token = token
        self.name = name
        self.tls = tls             # None: plain TCP (cfg.insecure_plain_tcp)
        self.runtime = None
        self.ops = None
        self.address: tuple[str, int] | None = None
        self._rpc = None
        self.metrics_server: MetricsServer | None = None
        self.registration: LeasedKey | None = None    # agents/NAME in etcd, with --etcd
        self._started = time.time()
        self.signals = ShutdownSignals(on_force=self._end_live_now)

    async def start(self) -> None:
        self.signals.install()
        host = self.listen[0]
        metrics = Metrics(CollectorRegistry(), node=self.name)
        self.runtime = NodeRuntime(self.cfg.node_settings(), metrics, name=self.name, publish_host=host)
        try:
            if self.cfg.metrics:   # this node's own /metrics (the coordinator serves only its own)
                self.metrics_server = MetricsServer(metrics.exposed, *self.cfg.metrics)
            await self.runtime.start()
            self.ops = NodeOps(self.runtime, host=host, token=self.token, tls=self.tls)
            self._rpc = RpcServer(self.handle, tokens={self.token}, name=f"pool-agent {self.name}",
                                  **self.cfg.connection_limits())
            self.address = await self._rpc.start_tcp(*self.listen, tls=self.tls,
                                                     insecure_plain_tcp=self.cfg.insecure_plain_tcp)
            if self.cfg.etcd is not None:   # last: coordinators may call as soon as it is there
                await self._register(self.cfg.etcd)
        except BaseException:
            await self.stop()
            raise
        log.info("agent %s listening on %s:%d (%s); store %s%s", self.name, *self.address,
                 "TLS" if self.tls else "PLAIN TCP", self.cfg.store,
                 f"; metrics on {self.metrics_server.address}" if self.metrics_server else "")

    async def _register(self, etcd_cfg) -> None:
        if self.address[0] in ("0.0.0.0", "::"):
            raise SpecError("--listen", None, "an agent that registers in etcd must listen on the "
                            "address coordinators reach it at, not a wildcard")
        address = f"{self.address[0]}:{self.address[1]}"

        async def record() -> str:
            facts = await self.ops.handle("facts", {})
            return dumps({**facts, "address": address, "started": self._started,
                          "metrics": self.metrics_server.address if self.metrics_server else None})

        self.registration = LeasedKey(
            Etcd(etcd_cfg.endpoints), ClusterKeys(etcd_cfg.cluster).agent(self.name), etcd_cfg.ttl,
            record, takeover=lambda kv: loads(kv.value).get("address") == address)
        await self.registration.start()
        log.info("agent %s registered in etcd (%s), lease %x", self.name,
                 ", ".join(e.url for e in etcd_cfg.endpoints), self.registration.lease)

    def _end_live_now(self) -> None:
        if self.runtime is not None:
            self.runtime.end_live(force=True)

    async def handle(self, method: str, params: dict, ctx) -> Any:
        if method not in NODE_METHODS:
            raise BadRequest(f"{method} is a coordinator method; this is a node agent",
                             method=method)
        return await self.ops.handle(method, params)

    async def stop(self) -> None:
        if self.registration is not None:   # leave first: no coordinator sends new work
            await self.registration.close()
            self.registration = None
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
            if self.registration is not None:   # leave the cluster before draining
                await self.registration.close()
                self.registration = None
            self._rpc.stop_accepting()
            await self.runtime.drain(self.signals.force)
        finally:
            await self.stop()
        return 0


def run_agent(cfg: ServiceConfig, listen: tuple[str, int], token_file, name: str | None,
              default_name: str = "agent") -> int:
    token = read_token(Path(token_file))
    tls = cfg.tls(tcp=True)
    raise_nofile_limit()
    return uvloop.run(Agent(cfg, listen, token, agent_name(name, tls, default_name), tls).run())


def agent_name(name: str | None, tls: TlsFiles | None, default: str) -> str:
    """--name, else the name in this node's certificate, else default (the hostname). A name
    that is not the certificate's is refused: the coordinator checks the certificate against it."""
    if tls is None:
        return name or default
    if name and name != tls.name:
        raise SpecError(str(tls.cert), None, f"this certificate is for node {tls.name!r}, not "
                        f"--name {name!r}: issue one for {name!r} (pool certs issue {name})")
    return tls.name
