"""The cluster's state in etcd: its key layout, and a key kept alive by a lease of its own.

Everything lives under one prefix, `/prewarm-pool/CLUSTER/`:

    agents/NAME              an agent's registration (JSON: address, facts, templates, free, live,
                             metrics), on the agent's lease: it is gone once the agent is
    coordinators/ID          a coordinator that is up (JSON: host, pid, tcp), on its own lease
    routes/ID                instance ID -> node name, on that node's lease (a node that is gone
                             takes its routes with it)
    locks/ship/NODE/TEMPLATE the coordinator shipping TEMPLATE to NODE now, on its lease

LeasedKey is how an agent and a coordinator stay registered: a lease of its own (TTL seconds),
renewed every TTL/3; its key created in a transaction that refuses one someone else holds
(Conflict); a lease etcd no longer knows (expired while etcd was unreachable) is granted anew and
the key written again, so a member rejoins by itself once etcd is back.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from pool.cluster.etcd import Etcd, KeyValue
from pool.errors import Conflict, NodeUnavailable

log = logging.getLogger(__name__)

ROOT = "/prewarm-pool"


class ClusterKeys:
    def __init__(self, cluster: str) -> None:
        self.prefix = f"{ROOT}/{cluster}/"

    def agent(self, name: str = "") -> str:
        return f"{self.prefix}agents/{name}"

    def coordinator(self, cid: str = "") -> str:
        return f"{self.prefix}coordinators/{cid}"

    def route(self, iid: str = "") -> str:
        return f"{self.prefix}routes/{iid}"

    def ship_lock(self, node: str, template: str) -> str:
        return f"{self.prefix}locks/ship/{node}/{template}"

    def parse(self, key: str) -> tuple[str, str] | None:
        """(kind, name) of a key under the prefix: ("agents", "n2"), ("routes", ID), ..."""
        if not key.startswith(self.prefix):
            return None
        kind, _, name = key[len(self.prefix):].partition("/")
        return (kind, name) if name else None


class LeasedKey:
    """key = value() on a lease of its own, renewed until close(). takeover(holder) says whether an
    existing key may be replaced (e.g. this agent's own registration from before a restart)."""

    def __init__(self, etcd: Etcd, key: str, ttl: int, value: Callable[[], Awaitable[str]],
                 takeover: Callable[[KeyValue], bool] = lambda _kv: False) -> None:
        self.etcd = etcd
        self.key = key
        self.ttl = ttl
        self.value = value
        self.takeover = takeover
        self.lease = 0
        self._written: str | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._renew(), name=f"lease {self.key}")

    async def _register(self) -> None:
        self.lease = await self.etcd.grant(self.ttl)
        value = await self.value()
        won, holder, _ = await self.etcd.create(self.key, value, self.lease)
        if not won:
            if holder is None or not self.takeover(holder):
                with contextlib.suppress(NodeUnavailable):
                    await self.etcd.revoke(self.lease)
                self.lease = 0
                held = f"{holder.value} (lease {holder.lease:x})" if holder else "someone"
                raise Conflict(f"{self.key} is already held by {held}: its lease must expire "
                               "first, or pick another name", key=self.key)
            await self.etcd.put(self.key, value, self.lease)
        self._written = value

    async def _renew(self) -> None:
        outage: str | None = None
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            try:
                if await self.etcd.keepalive(self.lease) <= 0:
                    log.warning("%s: lease %x expired; registering again", self.key, self.lease)
                    await self._register()
                elif (value := await self.value()) != self._written:
                    await self.etcd.put(self.key, value, self.lease)
                    self._written = value
                if outage is not None:
                    log.info("%s: etcd is reachable again", self.key)
                    outage = None
            except asyncio.CancelledError:
                raise
            except (NodeUnavailable, Conflict) as e:
                if outage is None:   # once per outage, not every TTL/3
                    log.warning("%s: cannot renew: %s", self.key, e.message)
                outage = e.message
            except Exception:  # noqa: BLE001  a bug must not end the renewals
                log.exception("%s: renewing failed", self.key)

    async def close(self) -> None:
        """Stop renewing and revoke the lease: the key (and what hangs on the lease) goes now."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.lease:
            try:
                await self.etcd.revoke(self.lease)
            except NodeUnavailable as e:   # it expires by itself after TTL
                log.warning("%s: could not revoke lease %x: %s", self.key, self.lease, e.message)
            self.lease = 0


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def loads(value: str) -> dict:
    try:
        r = json.loads(value)
    except ValueError:
        return {}
    return r if isinstance(r, dict) else {}
