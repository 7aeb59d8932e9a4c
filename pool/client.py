"""Clients of the pool service: `pool.spawn()`, the blocking `Client`, the asyncio `AsyncClient`, and the
`Instance` handle they return (client side; pool.copies.restored.RestoredCopy is the service's own record).

    import pool
    inst = pool.spawn("py-hello", env={"GREETING": "hi"}, args=["--fast"])
    print(inst.id, inst.address, inst.path)   # "127.0.0.1:PORT", "warm" or "restore"
    inst.kill()

Errors are the typed ones from pool.errors (NoCapacity, Quarantined, TemplateNotFound, ...); a missing
service is NodeUnavailable with a one-line hint.
"""
from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool import config
from pool.errors import NodeUnavailable

SPAWN_SLACK = 5.0  # seconds the RPC call may take beyond the spawn's own timeout


def _no_service(where: str, e: BaseException) -> NodeUnavailable:
    cause = e.__cause__ if isinstance(e, NodeUnavailable) and e.__cause__ else e
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return NodeUnavailable(f"no pool service at {where}: start one with `pool serve` ({why})",
                           socket=where)


def _spawn_params(template: str, env: dict[str, str] | None, args: list[str] | None,
                  timeout: float, hostname: str | None, node: str | None) -> dict[str, Any]:
    p: dict[str, Any] = {"template": template, "env": dict(env or {}), "args": list(args or []),
                         "timeout": float(timeout)}
    if hostname is not None:
        p["hostname"] = hostname
    if node is not None:
        p["node"] = node
    return p


@dataclass
class Instance:
    """A spawned copy, as a client sees it. kill/wait/logs/info go through the client that made it."""

    id: str
    template: str
    pid: int
    address: str | None
    path: str                 # "warm" (a prewarmed copy) or "restore" (restored on a miss)
    node: str = "local"
    spawn_ms: float = 0.0
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def _from(cls, reply: dict, client: Any) -> Instance:
        return cls(id=reply["id"], template=reply["template"], pid=reply["pid"],
                   address=reply.get("address"), path=reply["path"], node=reply.get("node", "local"),
                   spawn_ms=reply.get("spawn_ms", 0.0), _client=client)

    @property
    def url(self) -> str | None:
        return f"http://{self.address}/" if self.address else None

    def kill(self, grace: float = 3.0) -> dict:
        return self._client.kill(self.id, grace)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once the copy has ended (negative: signal), None at timeout."""
        return self._client.wait(self.id, timeout)["exit_status"]

    def logs(self, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> bytes:
        return self._client.logs(self.id, stream, offset, limit)["data"]

    def info(self) -> dict:
        return self._client.info(self.id)


class Client:
    """Blocking client on one connection (unix socket by default; TCP with a token). Not thread-safe:
    use one per thread (pool.spawn() does)."""

    def __init__(self, socket: str | os.PathLike | None = None, *, tcp: str | None = None,
                 token: str | None = None, timeout: float = 5.0) -> None:
        self.where = tcp or str(socket or config.socket_path())
        self.broken = False
        self._tcp, self._token, self._timeout = tcp, token, timeout
        self._rpc = self._connect()

    def _connect(self) -> Any:
        from pool.wire.rpc import SyncRpcClient  # noqa: PLC0415

        try:
            if self._tcp:
                host, _, port = self._tcp.rpartition(":")
                return SyncRpcClient.connect_tcp(host, int(port), self._token or "", timeout=self._timeout)
            return SyncRpcClient.connect_unix(self.where, self._token, timeout=self._timeout)
        except (OSError, TimeoutError, NodeUnavailable) as e:
            raise _no_service(self.where, e) from e

    def _reconnect(self) -> None:
        self._rpc.close()
        try:
            self._rpc = self._connect()
        except NodeUnavailable:
            self.broken = True
            raise

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float | None = 60.0) -> Any:
        from pool.errors import ProtocolError  # noqa: PLC0415
        from pool.wire.rpc import idle_close  # noqa: PLC0415

        if self._rpc.closed_as_idle():  # the server closed it while we were idle: open a new one
            self._reconnect()
        try:
            return self._rpc.call(method, params, timeout)
        except ProtocolError as e:
            if not idle_close(e):
                self.broken = True  # the connection is gone: pool.spawn() reconnects next time
                raise
        except NodeUnavailable:
            self.broken = True
            raise
        # Closed as idle just as the request went out: the server never read it, so send it again.
        self._reconnect()
        return self._rpc.call(method, params, timeout)

    def spawn(self, template: str, env: dict[str, str] | None = None, args: list[str] | None = None,
              timeout: float = 30.0, hostname: str | None = None, node: str | None = None) -> Instance:
        reply = self.call("spawn", _spawn_params(template, env, args, timeout, hostname, node),
                          timeout + SPAWN_SLACK)
        return Instance._from(reply, self)

    def kill(self, id: str, grace: float = 3.0) -> dict:  # noqa: A002
        return self.call("kill", {"id": id, "grace": float(grace)}, grace + 30)

    def wait(self, id: str, timeout: float | None = None) -> dict:  # noqa: A002
        params = {"id": id, "timeout": None if timeout is None else float(timeout)}
        return self.call("wait", params, None if timeout is None else timeout + SPAWN_SLACK)

    def list(self, template: str | None = None) -> list[dict]:
        return self.call("list", {"template": template})

    def info(self, id: str) -> dict:  # noqa: A002
        return self.call("info", {"id": id})

    def logs(self, id: str, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> dict:  # noqa: A002
        return self.call("logs", {"id": id, "stream": stream, "offset": offset, "limit": limit})

    def templates(self) -> list[dict]:
        return self.call("templates")

    def stats(self) -> dict:
        return self.call("stats")

    def set_warm(self, template: str, min_warm: int) -> dict:
        return self.call("set_warm", {"template": template, "min_warm": min_warm})

    def ping(self) -> dict:
        return self.call("ping")

    def nodes(self) -> list[dict]:
        return self.call("nodes")

    def push(self, template: str, node: str, timeout: float = 600.0) -> dict:
        return self.call("push", {"template": template, "node": node, "timeout": float(timeout)},
                         timeout + SPAWN_SLACK)

    def fork(self, id: str, node: str | None = None, lazy: bool = False,  # noqa: A002
             hostname: str | None = None, timeout: float = 120.0) -> dict:
        """Checkpoint running instance id (it keeps running) and restore a copy on node; the
        reply is the copy's (id, node, pid, address, path, forked_from)."""
        return self.call("fork", {"id": id, "node": node, "lazy": lazy, "hostname": hostname,
                                  "timeout": float(timeout)}, timeout * 3 + SPAWN_SLACK)

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncInstance(Instance):
    """Instance whose methods are coroutines (returned by AsyncClient)."""

    async def kill(self, grace: float = 3.0) -> dict:  # type: ignore[override]
        return await self._client.kill(self.id, grace)

    async def wait(self, timeout: float | None = None) -> int | None:  # type: ignore[override]
        return (await self._client.wait(self.id, timeout))["exit_status"]

    async def logs(self, stream: str = "stdout", offset: int = 0,  # type: ignore[override]
                   limit: int = 65536) -> bytes:
        return (await self._client.logs(self.id, stream, offset, limit))["data"]

    async def info(self) -> dict:  # type: ignore[override]
        return await self._client.info(self.id)


class AsyncClient:
    """asyncio client: `async with await AsyncClient.connect() as c: inst = await c.spawn(...)`.
    Concurrent calls on one client are fine (pipelined on one connection)."""

    def __init__(self, where: str, tcp: str | None, token: str | None, timeout: float) -> None:
        self.where = where
        self._tcp, self._token, self._timeout = tcp, token, timeout
        self._rpc: Any = None
        self._reconnecting = asyncio.Lock()

    @classmethod
    async def connect(cls, socket: str | os.PathLike | None = None, *, tcp: str | None = None,
                      token: str | None = None, timeout: float = 5.0) -> AsyncClient:
        client = cls(tcp or str(socket or config.socket_path()), tcp, token, timeout)
        client._rpc = await client._connect()
        return client

    async def _connect(self) -> Any:
        from pool.wire.rpc import RpcClient  # noqa: PLC0415

        try:
            if self._tcp:
                host, _, port = self._tcp.rpartition(":")
                return await RpcClient.connect_tcp(host, int(port), self._token or "", timeout=self._timeout)
            return await RpcClient.connect_unix(self.where, self._token, timeout=self._timeout)
        except (OSError, TimeoutError, NodeUnavailable) as e:
            raise _no_service(self.where, e) from e

    async def _reconnect(self) -> None:
        # Concurrent callers may all see the idle close: only the first one reconnects.
        async with self._reconnecting:
            if await self._rpc.closed_as_idle():
                await self._rpc.close()
                self._rpc = await self._connect()

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = 60.0) -> Any:
        from pool.wire.rpc import idle_close  # noqa: PLC0415

        if await self._rpc.closed_as_idle():
            await self._reconnect()
        try:
            return await self._rpc.call(method, params, timeout)
        except Exception as e:
            if not idle_close(e):
                raise
        await self._reconnect()  # closed as idle as the request went out: it never ran, send it again
        return await self._rpc.call(method, params, timeout)

    async def spawn(self, template: str, env: dict[str, str] | None = None,
                    args: list[str] | None = None, timeout: float = 30.0,
                    hostname: str | None = None, node: str | None = None) -> AsyncInstance:
        reply = await self.call("spawn", _spawn_params(template, env, args, timeout, hostname, node),
                                timeout + SPAWN_SLACK)
        return AsyncInstance._from(reply, self)

    async def kill(self, id: str, grace: float = 3.0) -> dict:  # noqa: A002
        return await self.call("kill", {"id": id, "grace": float(grace)}, grace + 30)

    async def wait(self, id: str, timeout: float | None = None) -> dict:  # noqa: A002
        params = {"id": id, "timeout": None if timeout is None else float(timeout)}
        return await self.call("wait", params, None if timeout is None else timeout + SPAWN_SLACK)

    async def list(self, template: str | None = None) -> list[dict]:
        return await self.call("list", {"template": template})

    async def info(self, id: str) -> dict:  # noqa: A002
        return await self.call("info", {"id": id})

    async def logs(self, id: str, stream: str = "stdout", offset: int = 0,  # noqa: A002
                   limit: int = 65536) -> dict:
        return await self.call("logs", {"id": id, "stream": stream, "offset": offset,
                                        "limit": limit})

    async def templates(self) -> list[dict]:
        return await self.call("templates")

    async def stats(self) -> dict:
        return await self.call("stats")

    async def set_warm(self, template: str, min_warm: int) -> dict:
        return await self.call("set_warm", {"template": template, "min_warm": min_warm})

    async def ping(self) -> dict:
        return await self.call("ping")

    async def nodes(self) -> list[dict]:
        return await self.call("nodes")

    async def close(self) -> None:
        await self._rpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# --- module-level convenience: one default client per thread, per socket ----------------------------
_default = threading.local()


def default_client() -> Client:
    """The calling thread's client for $POOL_SOCKET (reconnected after a fork or a broken link)."""
    where = str(config.socket_path())
    c: Client | None = getattr(_default, "client", None)
    if c is not None and (c.where != where or _default.pid != os.getpid() or c.broken):
        if _default.pid == os.getpid():
            c.close()
        c = None
    if c is None:
        c = Client(Path(where))
        _default.client, _default.pid = c, os.getpid()
    return c


def close_default() -> None:
    """Close the calling thread's default client (its socket); the next pool.spawn() reconnects."""
    c: Client | None = getattr(_default, "client", None)
    if c is not None and _default.pid == os.getpid():
        c.close()
    _default.client = None


def spawn(name: str, env: dict[str, str] | None = None, args: list[str] | None = None,
          timeout: float = 30.0, hostname: str | None = None) -> Instance:
    """Spawn a copy of template name through the service at $POOL_SOCKET (default /run/pool/pool.sock)."""
    return default_client().spawn(name, env=env, args=args, timeout=timeout, hostname=hostname)
