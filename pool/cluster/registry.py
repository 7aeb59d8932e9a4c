"""Where a coordinator learns its nodes and keeps its instance routes: one small interface, two
implementations.

- StaticRegistry: the `[nodes.NAME]` list of the config file; routes in this coordinator's memory.
  One coordinator; a small setup without etcd.
- EtcdRegistry (`[etcd]`, `pool serve --etcd URL`): agents register themselves in etcd
  (etcdstate.ClusterKeys; `pool agent --etcd URL`) and come and go with their leases; routes are
  written to etcd, so any coordinator routes any instance and one that restarts loses nothing. The
  coordinator registers itself too (its own lease) and follows the prefix with one watch. Work that
  must happen once across coordinators (shipping a template to a node) is done under a lock key
  created by a transaction on the coordinator's lease (once()): the others wait for it to go.

Cluster (nodes.py) asks its registry; the service never calls etcd itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable

from pool.cluster.etcd import Etcd, Event, KeyValue
from pool.cluster.etcdstate import ClusterKeys, LeasedKey, dumps, loads
from pool.cluster.nodes import RemoteNode
from pool.errors import NodeUnavailable

log = logging.getLogger(__name__)

LOCK_WAIT_S = 2.0       # a lock waiter re-reads the lock at least this often (its watch may miss)
RETRY_S = 0.5           # the follower's pause before it reads and watches again after an outage


class StaticRegistry:
    """The config file's nodes; routes in memory."""

    joins = False

    def __init__(self, nodes: list[RemoteNode]) -> None:
        self._nodes = nodes
        self.routes: dict[str, str] = {}

    async def start(self, cluster) -> None:
        for n in self._nodes:
            cluster.add(n)

    async def close(self) -> None:
        pass

    async def set_route(self, iid: str, node: str) -> None:
        self.routes[iid] = node

    async def drop_route(self, iid: str) -> None:
        self.routes.pop(iid, None)

    @contextlib.asynccontextmanager
    async def once(self, node: str, template: str) -> AsyncIterator[None]:
        yield   # one coordinator: Cluster's own per-(node, template) future is enough

    def lease(self, node: str) -> dict | None:
        return None

    async def view(self) -> dict | None:
        return None


class EtcdRegistry:
    """Nodes and routes from etcd, followed by one watch on the cluster's prefix."""

    joins = True

    def __init__(self, etcd: Etcd, cluster_name: str, ttl: int,
                 make_node: Callable[[str, tuple[str, int]], RemoteNode], me: dict) -> None:
        self.etcd = etcd
        self.keys = ClusterKeys(cluster_name)
        self.ttl = ttl
        self.make_node = make_node
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.me = {**me, "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.time()}
        self.routes: dict[str, str] = {}                 # mirror of routes/
        self.agents: dict[str, KeyValue] = {}            # mirror of agents/
        self.coordinators: dict[str, KeyValue] = {}      # mirror of coordinators/
        self.registration = LeasedKey(etcd, self.keys.coordinator(self.id), ttl, self._record)
        self._cluster = None
        self._follow: asyncio.Task | None = None

    async def _record(self) -> str:
        return dumps(self.me)

    # -- life -------------------------------------------------------------------------------------
    async def start(self, cluster) -> None:
        """Register, read the whole state once (so routes are known before the first request),
        then follow it. etcd unreachable here: NodeUnavailable naming it (start again later)."""
        self._cluster = cluster
        await self.registration.start()
        revision = await self._load()
        self._follow = asyncio.get_running_loop().create_task(self._follow_from(revision),
                                                              name="etcd-follow")

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        await self.registration.close()

    async def _load(self) -> int:
        kvs, revision = await self.etcd.range(self.keys.prefix, prefix=True)
        seen = set()
        self.routes.clear()
        self.coordinators.clear()
        for kv in kvs:
            seen.add(kv.key)
            await self._apply(Event("put", kv))
        for name in [n for n in self.agents if self.keys.agent(n) not in seen]:
            await self._apply(Event("delete", KeyValue(self.keys.agent(name), "", 0, 0, 0)))
        return revision

    async def _follow_from(self, revision: int) -> None:
        while True:
            try:
                async for ev in self.etcd.watch(self.keys.prefix, revision + 1, prefix=True):
                    revision = max(revision, ev.kv.mod_revision)
                    await self._apply(ev)
            except asyncio.CancelledError:
                raise
            except NodeUnavailable as e:
                log.warning("cluster state: %s; reading it again", e.message)
            except Exception:  # noqa: BLE001  a bug must not end following the cluster
                log.exception("cluster state: following etcd failed")
            while True:   # read everything again: what happened while the watch was down
                await asyncio.sleep(RETRY_S)
                try:
                    revision = await self._load()
                    break
                except NodeUnavailable:
                    continue

    async def _apply(self, ev: Event) -> None:
        parsed = self.keys.parse(ev.kv.key)
        if parsed is None:
            return
        kind, name = parsed
        if kind == "routes":
            if ev.kind == "put":
                self.routes[name] = ev.kv.value
            else:
                self.routes.pop(name, None)
        elif kind == "coordinators":
            if ev.kind == "put":
                self.coordinators[name] = ev.kv
            else:
                self.coordinators.pop(name, None)
        elif kind == "agents":
            await self._agent(name, ev)

    async def _agent(self, name: str, ev: Event) -> None:
        cluster = self._cluster
        old = self.agents.get(name)
        if ev.kind == "delete":
            if self.agents.pop(name, None) is not None:
                log.info("node %s left (its lease is gone)", name)
                await cluster.remove(name)
            return
        self.agents[name] = ev.kv
        address = _address(loads(ev.kv.value).get("address"))
        if address is None:
            log.warning("node %s registered without an address: ignored", name)
            return
        current = cluster.nodes.get(name)
        if current is not None and (not current.remote or current.address == address):
            return
        if current is not None:   # the agent came back elsewhere
            await cluster.remove(name)
        log.info("node %s %s (%s:%d)", name, "re-registered" if old else "joined", *address)
        cluster.add(self.make_node(name, address))

    # -- routes -----------------------------------------------------------------------------------
    async def set_route(self, iid: str, node: str) -> None:
        """Write iid -> node on the node's lease (a node that leaves takes its routes along)."""
        kv = self.agents.get(node)
        await self.etcd.put(self.keys.route(iid), node, kv.lease if kv else 0)
        self.routes[iid] = node

    async def drop_route(self, iid: str) -> None:
        self.routes.pop(iid, None)
        await self.etcd.delete(self.keys.route(iid))

    # -- work done once ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def once(self, node: str, template: str) -> AsyncIterator[None]:
        """Hold the ship lock of (node, template): a key created by a txn on our lease. A loser
        waits until the holder deletes it (or its lease expires), then tries again; whoever
        holds it next checks first whether the work is still to do."""
        key = self.keys.ship_lock(node, template)
        while True:
            won, holder, revision = await self.etcd.create(key, self.id, self.registration.lease)
            if won:
                break
            if holder is not None:
                log.info("shipping %s to %s: %s is at it; waiting", template, node, holder.value)
                await self._gone(key, revision)
        try:
            yield
        finally:
            try:
                await self.etcd.delete_if(key, revision)
            except NodeUnavailable as e:    # it goes with our lease at worst
                log.warning("releasing %s: %s", key, e.message)

    async def _gone(self, key: str, revision: int) -> None:
        """Until key is deleted after revision (or LOCK_WAIT_S passed: the caller reads again)."""
        with contextlib.suppress(TimeoutError, NodeUnavailable):
            async with asyncio.timeout(LOCK_WAIT_S):
                async for ev in self.etcd.watch(key, revision + 1):
                    if ev.kind == "delete":
                        return

    # -- the view for `pool nodes` ----------------------------------------------------------------
    def lease(self, node: str) -> dict | None:
        kv = self.agents.get(node)
        if kv is None:
            return None
        record = loads(kv.value)
        return {"id": f"{kv.lease:x}", "ttl": None, "registered": record.get("started"),
                "metrics": record.get("metrics")}

    async def _ttl(self, lease: int) -> int:
        ttl, _ = await self.etcd.time_to_live(lease)
        return ttl

    async def view(self) -> dict:
        out = {"endpoints": [e.url for e in self.etcd.endpoints], "prefix": self.keys.prefix,
               "me": self.id, "members": [], "coordinators": [], "leases": {}, "error": None}
        try:
            out["members"] = await self.etcd.members()
            for cid, kv in sorted(self.coordinators.items()):
                r = loads(kv.value)
                out["coordinators"].append({
                    "id": cid, "host": r.get("host"), "pid": r.get("pid"), "tcp": r.get("tcp"),
                    "lease": f"{kv.lease:x}", "ttl": await self._ttl(kv.lease), "me": cid == self.id})
            for name, kv in sorted(self.agents.items()):
                out["leases"][name] = await self._ttl(kv.lease)
        except NodeUnavailable as e:
            out["error"] = e.message
        return out


def _address(text) -> tuple[str, int] | None:
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    return (host, int(port)) if port.isdigit() else None
