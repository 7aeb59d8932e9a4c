"""The coordinator's view of its nodes: connections to `pool agent`s with heartbeats, the embedded
local node, where each instance lives, and shipping templates to nodes that lack them.

Health. Each remote node has one RPC connection and a heartbeat task: every heartbeat_s it asks the
node for its facts (compatibility, cached builds, free capacity), with a deadline of heartbeat_s.
A node is up only while its connection is open: a closed connection (agent died, RST) marks it down
at once and fails its calls in flight with NodeUnavailable; DOWN_AFTER missed heartbeats on an open
connection (a cut link sends no RST) close it. The heartbeat keeps reconnecting; a node that answers
again is up again (it rejoins with whatever it still has: its facts say so).

Every call to a node has a deadline, so a node that goes silent costs a caller at most that.

Every link is mutual TLS when the coordinator has TLS files: an agent's certificate must name the
node (`[nodes.NAME]`), or the connection fails with TlsError before a frame is sent and the node
stays down with that as its last error. Agents fetching templates from the coordinator's source are
told its name (`source_name`, the name in its own certificate) to check it the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pool.cluster.scheduler import NodeView
from pool.errors import InstanceNotFound, NodeUnavailable, NoReply, PoolError, ProtocolError, TemplateNotFound
from pool.templates.compat import NodeFacts, check, compatibility_problem, node_facts
from pool.templates.transfer import TemplateSource
from pool.wire.protocol import validate_params
from pool.wire.rpc import RpcClient
from pool.wire.tls import TlsFiles

log = logging.getLogger(__name__)

DOWN_AFTER = 3          # missed heartbeats on an open connection before a node is down
CALL_SLACK = 5.0        # seconds a node call may take beyond the operation's own timeout


class LocalNode:
    """The coordinator's embedded node: calls go straight to its NodeOps."""

    remote = False

    def __init__(self, ops) -> None:
        self.ops = ops
        self.name = ops.runtime.name

    @property
    def healthy(self) -> bool:
        return not self.ops.runtime.draining

    async def call(self, method: str, params: dict | None = None,
                   timeout: float | None = None) -> Any:

        return await self.ops.handle(method, validate_params(method, params or {}))

    def cached(self) -> dict[str, str]:
        return {name: build for name in self.ops.store.names()
                if (build := self.holds(name)) is not None}

    def holds(self, template: str) -> str | None:
        """The build of template this node can restore (a lazy fork's build cannot), or None.
        One readlink; the manifest is the store's cached one (the spawn path asks)."""
        try:
            t = self.ops.store.current(template)
        except PoolError:  # corrupt: not a build to restore (as store.all() skips it)
            return None
        return t.build_id if t is not None and not t.manifest.lazy_pages else None

    def free(self) -> int:
        return self.ops.runtime.free()

    def facts(self) -> NodeFacts:
        return node_facts(self.ops.criu)

    def describe(self) -> dict:
        return {"name": self.name, "healthy": self.healthy, "address": None, "local": True,
                "templates": self.cached(), "free": self.free()}


class RemoteNode:
    """One `pool agent`, over one authenticated TCP connection."""

    remote = True

    def __init__(self, name: str, address: tuple[str, int], token: str, heartbeat_s: float,
                 tls: TlsFiles | None = None) -> None:
        self.name = name
        self.address = address
        self.token = token
        self.tls = tls                           # None: plain TCP (insecure_plain_tcp)
        self.heartbeat_s = heartbeat_s
        self.client = None                       # rpc.RpcClient while connected
        self.info: dict[str, Any] = {}           # its last `facts` reply
        self.missed = 0
        self.spawning = 0                        # our spawns in flight on it
        self.placed = 0                          # our spawns since its last facts (free drifts)
        self.down_since: float | None = time.time()
        self.last_error = "not contacted yet"
        self._task: asyncio.Task | None = None
        self.up = asyncio.Event()

    @property
    def healthy(self) -> bool:
        return self.client is not None and not self.client.closed and bool(self.info) \
            and not self.info.get("draining")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(),
                                                            name=f"heartbeat-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.down_since = self.down_since or time.time()  # stopping: not news worth a warning
        await self._disconnect("the coordinator is stopping")

    async def _disconnect(self, why: str) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()  # fails its calls in flight: they become NodeUnavailable
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("node %s is down: %s", self.name, why)
        self.last_error = why
        self.up.clear()

    async def _heartbeat(self) -> None:

        while True:
            t0 = time.monotonic()
            try:
                if self.client is None or self.client.closed:
                    if self.client is not None:
                        await self._disconnect("its connection closed")
                    self.client = await RpcClient.connect_tcp(
                        *self.address, self.token, tls=self.tls, server_name=self.name,
                        insecure_plain_tcp=self.tls is None, timeout=self.heartbeat_s,
                        client="pool-coordinator")
                facts = await self.client.call("facts", timeout=self.heartbeat_s)
                NodeFacts.from_wire(facts.get("facts"))
                self.info, self.missed, self.placed = facts, 0, 0
                if self.down_since is not None:
                    log.info("node %s is up (%s:%d)", self.name, *self.address)
                    self.down_since = None
                self.up.set()
            except asyncio.CancelledError:
                raise
            except (PoolError, OSError, ValueError) as e:
                why = getattr(e, "message", None) or str(e)
                if self.client is None or self.client.closed:
                    await self._disconnect(why)     # nobody there (refused, reset): down now
                else:
                    self.missed += 1
                    self.last_error = why
                    if self.missed >= DOWN_AFTER:
                        await self._disconnect(f"{self.missed} heartbeats missed ({why})")
            except Exception as e:  # noqa: BLE001  a bug must not end the heartbeat
                log.exception("node %s: heartbeat failed", self.name)
                await self._disconnect(f"heartbeat failed: {e}")
            await asyncio.sleep(max(0.05, self.heartbeat_s - (time.monotonic() - t0)))

    async def call(self, method: str, params: dict | None = None,
                   timeout: float | None = None) -> Any:
        """One call with a deadline; a lost node or deadline is NodeUnavailable."""
        client = self.client
        if client is None or client.closed:
            raise NodeUnavailable(f"node {self.name} is down ({self.last_error})", node=self.name)
        try:
            return await client.call(method, params, timeout)
        except ProtocolError as e:
            raise NodeUnavailable(f"node {self.name} went away during {method}: {e.message}",
                                  node=self.name) from e
        except NoReply as e:
            raise NodeUnavailable(f"node {self.name} did not answer {method} within {timeout}s",
                                  node=self.name) from e

    def cached(self) -> dict[str, str]:
        return dict(self.info.get("templates") or {})

    def holds(self, template: str) -> str | None:
        return (self.info.get("templates") or {}).get(template)

    def free(self) -> int:
        return int(self.info.get("free", 0)) - self.spawning - self.placed

    def facts(self) -> NodeFacts | None:
        with contextlib.suppress(ValueError):
            return NodeFacts.from_wire(self.info.get("facts"))
        return None

    def describe(self) -> dict:
        return {"name": self.name, "healthy": self.healthy, "local": False,
                "address": f"{self.address[0]}:{self.address[1]}", "templates": self.cached(),
                "free": self.free() if self.info else 0, "live": self.info.get("live"),
                "down_since": self.down_since, "last_error": None if self.healthy else self.last_error}


class Cluster:
    """The nodes, the instance routing table and template shipping. Which remote nodes there are,
    and where routes are kept, is its registry's business (registry.StaticRegistry: the config's
    [nodes.*]; registry.EtcdRegistry: agents that join through etcd)."""

    def __init__(self, store, local: LocalNode | None, registry,
                 source_host: str | None, tls: TlsFiles | None = None) -> None:
        self.store = store                      # the coordinator's store: what it can ship
        self.local = local
        self.registry = registry
        self.nodes: dict[str, LocalNode | RemoteNode] = {}
        if local is not None:
            self.nodes[local.name] = local
        self.routes: dict[str, str] = registry.routes   # instance id -> node name (a mirror)
        self.source = None                      # transfer.TemplateSource, when there are remotes
        self.source_address: tuple[str, int] | None = None
        self._source_host = source_host
        self.tls = tls
        self._shipping: dict[tuple[str, str], asyncio.Future] = {}
        self._tokens: set[str] = set()

    @property
    def remotes(self) -> list[RemoteNode]:
        return [n for n in self.nodes.values() if n.remote]

    async def start(self, tokens: set[str], source_port: int = 0) -> None:
        """Serve templates to agents (if any may come), then let the registry bring the nodes."""
        self._tokens = tokens
        if self.registry.joins or tokens:
            self.source = TemplateSource(self.store, tokens=tokens, tls=self.tls)
            self.source_address = await self.source.start(self._source_host or "127.0.0.1",
                                                          source_port)
        await self.registry.start(self)

    def add(self, n: RemoteNode) -> None:
        """A remote node from the registry: its heartbeat starts now."""
        self.nodes[n.name] = n
        n.start()

    async def remove(self, name: str) -> None:
        n = self.nodes.get(name)
        if n is not None and n.remote:
            del self.nodes[name]
            await n.close()

    async def close(self) -> None:
        await self.registry.close()
        for n in self.remotes:
            await n.close()
        if self.source is not None:
            await self.source.close()

    async def set_route(self, iid: str, node: str) -> None:
        """Remember where iid lives (in etcd too, with an EtcdRegistry: NodeUnavailable if not)."""
        await self.registry.set_route(iid, node)

    async def drop_route(self, iid: str) -> None:
        try:
            await self.registry.drop_route(iid)
        except PoolError as e:   # a stale route only costs a lookup on its node later
            log.warning("forgetting the route of %s: %s", iid, e.message)

    def node(self, name: str):
        n = self.nodes.get(name)
        if n is None:
            raise NodeUnavailable(f"no node named {name!r} (known: "
                                  f"{', '.join(sorted(self.nodes)) or 'none'})", node=name)
        return n

    def up_node(self, name: str):
        """The node named name, if it is up; NodeUnavailable if it is unknown or down."""
        n = self.node(name)
        if not n.healthy:
            raise NodeUnavailable(f"node {name} is down", node=name)
        return n

    # -- scheduling ---------------------------------------------------------------------------------
    def views(self, template: str) -> list[NodeView]:
        """What scheduler.choose_node needs, for a spawn of template. On the spawn path: no file
        is read (the store's manifest is cached per build, Store.current), no manifest parsed."""
        try:
            current = self.store.current(template)
        except PoolError:
            current = None
        manifest = current.manifest if current is not None else None
        held = {name: n.holds(template) for name, n in self.nodes.items()}
        if manifest is None and not any(held.values()):
            raise TemplateNotFound(template, where="the coordinator's store or any node")
        out = []
        for n in self.nodes.values():
            build = held[n.name]
            # a node holds the template if it has the build we would ship (or any, if we have none)
            has = build is not None and (manifest is None or build == manifest.build_id)
            compatible: bool | str = True
            if not has:
                facts = n.facts()
                if manifest is None:
                    compatible = "not cached there, and the coordinator has no copy to ship"
                elif facts is not None:
                    compatible = compatibility_problem(manifest, facts) or True
            out.append(NodeView(n.name, n.healthy, frozenset({template} if has else ()),
                                n.free(), compatible))
        return out

    async def ensure_template(self, n, template: str, timeout: float) -> dict | None:
        """Ship template to node n unless it holds our build; one transfer per (node, template)."""
        if not n.remote:
            return None
        key = (n.name, template)
        fut = self._shipping.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._ship_once(n, template, timeout))
            self._shipping[key] = fut
            fut.add_done_callback(lambda _f: self._shipping.pop(key, None))
        return await asyncio.shield(fut)

    async def _ship_once(self, n: RemoteNode, template: str, timeout: float) -> dict:
        """Under the registry's lock for (node, template): another coordinator may have shipped
        it while we waited for the lock, which a fresh look at the node's facts tells."""
        async with self.registry.once(n.name, template):
            build = self.store.get(template).build_id
            if self.registry.joins:
                facts = await n.call("facts", None, CALL_SLACK)
                n.info["templates"] = facts.get("templates") or {}
                if n.holds(template) == build:
                    return {"name": template, "build_id": build, "already_current": True,
                            "node": n.name}
            return await self._ship(n, template, timeout)

    async def _ship(self, n: RemoteNode, template: str, timeout: float) -> dict:
        t = self.store.get(template)
        facts = n.facts()
        if facts is not None:
            check(t.manifest, facts)  # Incompatible before a byte moves
        if self.source_address is None:
            raise NodeUnavailable("the coordinator serves no templates (no remote nodes)")
        host, port = self.source_address
        r = await n.call("fetch_template", {"name": template, "source": f"{host}:{port}",
                                            "build_id": t.build_id, "timeout": timeout,
                                            "source_name": self.tls.name if self.tls else None},
                         timeout + CALL_SLACK)
        n.info.setdefault("templates", {})[template] = r["build_id"]
        return r

    # -- routing ------------------------------------------------------------------------------------
    async def locate(self, iid: str):
        """The node that has (or had) instance iid."""
        name = self.routes.get(iid)
        if name is not None:
            return self.node(name)
        for n in self.nodes.values():  # e.g. spawned before this coordinator started
            if not n.healthy:
                continue
            with contextlib.suppress(InstanceNotFound, NodeUnavailable):
                await n.call("info", {"id": iid}, CALL_SLACK)
                with contextlib.suppress(NodeUnavailable):   # found anyway: routing it works
                    await self.set_route(iid, n.name)
                return n
        raise InstanceNotFound(iid)
