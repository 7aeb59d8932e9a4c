"""Clients of the pool service: `pool.spawn()`, the blocking `Client`, the asyncio `AsyncClient`, and the
`Instance` handle they return (client side; pool.copies.restored.RestoredCopy is the service's own record).

    import pool
    inst = pool.spawn("py-hello", env={"GREETING": "hi"}, args=["--fast"])
    print(inst.id, inst.address, inst.served_by)   # "127.0.0.1:PORT", "warm", "restore" or "fork"
    inst.kill()

Every RPC method a client may call is declared once, in METHODS: its parameters (the declaration's
signature), the request it makes and how the reply becomes its result. `Client` and `AsyncClient` get
their methods from that table, over two transports: a blocking connection (SyncRpcClient) and an
asyncio one (RpcClient). So the two clients cannot drift apart; the same goes for `Instance` and
`AsyncInstance`, whose methods are the client's with the instance's id filled in. A type checker
cannot see methods made at import time: each class carries their typed signatures in a generated
`if TYPE_CHECKING:` block (scripts/client_types.py writes it from METHODS and each declaration's
`@returns`; the replies' TypedDicts are in pool.wire.replies).

Errors are the typed ones from pool.errors (NoCapacity, Quarantined, TemplateNotFound, ...); a missing
service is NodeUnavailable with a one-line hint.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, TypeVar

from pool import config
from pool.errors import InstanceNotFound, NodeUnavailable, ProtocolError
from pool.wire.replies import (CheckpointReply, CopyInfo, FetchResult, ForkReply, InstanceRestored,
                               LogChunk, MigrateReply, NodeView, PoolFigures, Pong, ServiceStats, SnapshotInfo,
                               SpawnReply, SuspendReply, TemplateInfo)
from pool.wire.rpc import RpcClient, SyncRpcClient, idle_close
from pool.wire.tls import TlsFiles

SPAWN_SLACK = 5.0           # seconds the RPC call may take beyond the spawn's own timeout
DEFAULT_CALL_TIMEOUT = 60.0  # seconds a call without a timeout of its own may take


# --- the handle a spawn returns -----------------------------------------------------------------------
@dataclass
class Instance:
    """A spawned copy, as a client sees it. kill/wait/logs/info go through the client that made it.

    served_by says how the spawn was served: "warm" (a prewarmed copy), "restore" (restored on a
    miss) or "fork" (forked from the template's zygote on a miss, `[restore] method = "fork"`); `path`
    is the same value under its older name (and the reply's field name)."""

    id: str
    template: str
    pid: int
    address: str | None
    served_by: str
    node: str = "local"
    spawn_ms: float = 0.0
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def _from(cls, reply: SpawnReply, client: Any) -> Instance:
        return cls(id=reply["id"], template=reply["template"], pid=reply["pid"],
                   address=reply.get("address"), served_by=reply["path"],
                   node=reply.get("node", "local"), spawn_ms=reply.get("spawn_ms", 0.0), _client=client)

    @property
    def path(self) -> str:
        """The same as served_by (kept for callers written before it)."""
        return self.served_by

    @property
    def url(self) -> str | None:
        return f"http://{self.address}/" if self.address else None

    # generated: Instance methods (scripts/client_types.py writes their static types)
    if TYPE_CHECKING:
        def kill(self, grace: float = 3.0) -> CopyInfo: ...
        def wait(self, timeout: float | None = None) -> int | None: ...
        def logs(self, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> bytes: ...
        def info(self) -> CopyInfo: ...
    # end: Instance methods

    # `with client.spawn(...) as inst:` kills the copy on the way out, so a forgotten one does not
    # hold a slot until its ttl. A copy that already ended (and was forgotten) is not an error.
    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(InstanceNotFound):
            self.kill()


class AsyncInstance(Instance):
    """Instance whose methods are coroutines (returned by AsyncClient); `async with` kills it."""

    def __enter__(self) -> Instance:
        raise TypeError("use `async with` on an AsyncInstance")

    async def __aenter__(self) -> AsyncInstance:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        with contextlib.suppress(InstanceNotFound):
            await self.kill()

    # generated: AsyncInstance methods (scripts/client_types.py writes their static types)
    if TYPE_CHECKING:
        async def kill(self, grace: float = 3.0) -> CopyInfo: ...  # type: ignore[override]
        async def wait(self, timeout: float | None = None) -> int | None: ...  # type: ignore[override]
        async def logs(self, stream: str = "stdout", offset: int = 0,  # type: ignore[override]
                       limit: int = 65536) -> bytes: ...
        async def info(self) -> CopyInfo: ...  # type: ignore[override]
    # end: AsyncInstance methods


# --- the method table ---------------------------------------------------------------------------------
def _reply(reply: Any, client: Any) -> Any:
    return reply


def _instance(reply: dict, client: Any) -> Instance:
    return client.instance_type._from(reply, client)


class Call(NamedTuple):
    """One request as a client method makes it, and what becomes of its reply."""

    method: str
    params: dict[str, Any]
    timeout: float | None = DEFAULT_CALL_TIMEOUT  # how long the call may take; None: no limit
    result: Callable[[Any, Any], Any] = _reply    # (reply, client) -> what the method returns


_Declare = TypeVar("_Declare", bound=Callable[..., Call])


def returns(result_type: str) -> Callable[[_Declare], _Declare]:
    """What the client method declared by the decorated function returns (its static type, by name:
    scripts/client_types.py writes the typed signatures into the clients from it)."""
    def mark(declare: _Declare) -> _Declare:
        declare.returns = result_type  # type: ignore[attr-defined]
        return declare
    return mark


class _Declarations:
    """One function per RPC method: its signature is the client method's, it returns the Call.
    (A class only as a namespace, so `list` is not shadowed in this module.)"""

    @staticmethod
    @returns("Pong")
    def ping() -> Call:
        return Call("ping", {})

    @staticmethod
    @returns("Instance")
    def spawn(template: str, env: dict[str, str] | None = None, args: list[str] | None = None,
              timeout: float = 30.0, hostname: str | None = None, node: str | None = None) -> Call:
        """Spawn a copy of template, on node if given; returns its Instance (AsyncInstance)."""
        params: dict[str, Any] = {"template": template, "env": dict(env or {}),
                                  "args": list(args or []), "timeout": float(timeout)}
        if hostname is not None:
            params["hostname"] = hostname
        if node is not None:
            params["node"] = node
        return Call("spawn", params, timeout + SPAWN_SLACK, _instance)

    @staticmethod
    @returns("CopyInfo")
    def kill(id: str, grace: float = 3.0) -> Call:  # noqa: A002
        """Kill instance id (SIGTERM, SIGKILL after grace seconds); the reply has its exit_status."""
        return Call("kill", {"id": id, "grace": float(grace)}, grace + 30)

    @staticmethod
    @returns("CopyInfo")
    def wait(id: str, timeout: float | None = None) -> Call:  # noqa: A002
        """Until instance id ends or timeout; the reply's exit_status is None if it still runs."""
        return Call("wait", {"id": id, "timeout": None if timeout is None else float(timeout)},
                    None if timeout is None else timeout + SPAWN_SLACK)

    @staticmethod
    @returns("list[CopyInfo]")
    def list(template: str | None = None) -> Call:
        """The live instances (of template, if given)."""
        return Call("list", {"template": template})

    @staticmethod
    @returns("CopyInfo")
    def info(id: str) -> Call:  # noqa: A002
        return Call("info", {"id": id})

    @staticmethod
    @returns("LogChunk")
    def logs(id: str, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> Call:  # noqa: A002
        """Up to limit bytes of instance id's stdout or stderr from offset (the reply's data)."""
        return Call("logs", {"id": id, "stream": stream, "offset": offset, "limit": limit})

    @staticmethod
    @returns("list[TemplateInfo]")
    def templates() -> Call:
        return Call("templates", {})

    @staticmethod
    @returns("ServiceStats")
    def stats() -> Call:
        return Call("stats", {})

    @staticmethod
    @returns("PoolFigures")
    def set_warm(template: str, min_warm: int) -> Call:
        """Keep min_warm copies of template warm (also lifts its quarantine)."""
        return Call("set_warm", {"template": template, "min_warm": min_warm})

    @staticmethod
    @returns("list[NodeView]")
    def nodes() -> Call:
        return Call("nodes", {})

    @staticmethod
    @returns("FetchResult")
    def push(template: str, node: str, timeout: float = 600.0) -> Call:
        """Ship template's current build to node."""
        return Call("push", {"template": template, "node": node, "timeout": float(timeout)},
                    timeout + SPAWN_SLACK)

    @staticmethod
    @returns("ForkReply")
    def fork(id: str, node: str | None = None, lazy: bool = False,  # noqa: A002
             hostname: str | None = None, timeout: float = 120.0) -> Call:
        """Checkpoint running instance id (it keeps running) and restore a copy on node; the
        reply is the copy's (id, node, pid, address, path, forked_from)."""
        return Call("fork", {"id": id, "node": node, "lazy": lazy, "hostname": hostname,
                             "timeout": float(timeout)}, timeout * 3 + SPAWN_SLACK)


    # -- running instances -------------------------------------------------------------------------
    @staticmethod
    @returns("CheckpointReply")
    def checkpoint(id: str, tag: str | None = None, keep: bool = False,  # noqa: A002
                   timeout: float = 120.0) -> Call:
        """Checkpoint running instance id without stopping it; the reply's snapshot has its id and
        how long the app was frozen. keep: also publish it as a new template."""
        return Call("checkpoint", {"id": id, "tag": tag, "keep": keep, "timeout": float(timeout)},
                    timeout + SPAWN_SLACK)

    @staticmethod
    @returns("list[SnapshotInfo]")
    def snapshots(id: str) -> Call:  # noqa: A002
        """Instance id's snapshots, oldest first."""
        return Call("snapshots", {"id": id})

    @staticmethod
    @returns("InstanceRestored")
    def rollback(id: str, snapshot: str | None = None, timeout: float = 60.0) -> Call:  # noqa: A002
        """Replace instance id's process by a restore of snapshot (id or tag; default the latest):
        same id, same address."""
        return Call("rollback", {"id": id, "snapshot": snapshot, "timeout": float(timeout)},
                    timeout + SPAWN_SLACK)

    @staticmethod
    @returns("SuspendReply")
    def suspend(id: str, timeout: float = 120.0) -> Call:  # noqa: A002
        """Checkpoint instance id to disk and end its process; its address stays open and the next
        connection (or resume) restores it."""
        return Call("suspend", {"id": id, "timeout": float(timeout)}, timeout + SPAWN_SLACK)

    @staticmethod
    @returns("InstanceRestored")
    def resume(id: str, timeout: float = 60.0) -> Call:  # noqa: A002
        """Restore suspended instance id now."""
        return Call("resume", {"id": id, "timeout": float(timeout)}, timeout + SPAWN_SLACK)

    @staticmethod
    @returns("MigrateReply")
    def migrate(id: str, node: str, lazy: bool = False, timeout: float = 120.0) -> Call:  # noqa: A002
        """Move running instance id to node (same id; a new address, in the reply); if the move
        fails it runs on where it was. lazy: it runs on node at once, its memory following."""
        return Call("migrate", {"id": id, "node": node, "lazy": lazy, "timeout": float(timeout)},
                    timeout * 4 + SPAWN_SLACK)

# RPC method name -> its declaration. Both clients have exactly these methods.
METHODS: dict[str, Callable[..., Call]] = {
    name: getattr(_Declarations, name) for name, fn in vars(_Declarations).items()
    if isinstance(fn, staticmethod)}

# Instance methods: the client method of the same name with the instance's id, and which field of
# the reply they return (None: all of it).
INSTANCE_METHODS: dict[str, str | None] = {"kill": None, "wait": "exit_status", "logs": "data",
                                           "info": None}


def _as_method(fn: Callable, owner: type, name: str, like: Callable, drop: str | None = None) -> Callable:
    """fn as method `name` of owner, showing the signature and doc of `like` (without param drop)."""
    params = [p for p in inspect.signature(like).parameters.values() if p.name != drop]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__signature__ = inspect.Signature([self_param, *params])  # type: ignore[attr-defined]
    fn.__name__, fn.__qualname__ = name, f"{owner.__qualname__}.{name}"
    fn.__doc__ = like.__doc__
    fn.__module__ = owner.__module__
    return fn


def _blocking_method(owner: type, name: str, declare: Callable[..., Call]) -> Callable:
    def method(self, *args: Any, **kwargs: Any) -> Any:
        call = declare(*args, **kwargs)
        return call.result(self.call(call.method, call.params, call.timeout), self)
    return _as_method(method, owner, name, declare)


def _async_method(owner: type, name: str, declare: Callable[..., Call]) -> Callable:
    async def method(self, *args: Any, **kwargs: Any) -> Any:
        call = declare(*args, **kwargs)
        return call.result(await self.call(call.method, call.params, call.timeout), self)
    return _as_method(method, owner, name, declare)


def _blocking_instance_method(owner: type, name: str, field_: str | None) -> Callable:
    def method(self, *args: Any, **kwargs: Any) -> Any:
        reply = getattr(self._client, name)(self.id, *args, **kwargs)
        return reply if field_ is None else reply[field_]
    return _as_method(method, owner, name, METHODS[name], drop="id")


def _async_instance_method(owner: type, name: str, field_: str | None) -> Callable:
    async def method(self, *args: Any, **kwargs: Any) -> Any:
        reply = await getattr(self._client, name)(self.id, *args, **kwargs)
        return reply if field_ is None else reply[field_]
    return _as_method(method, owner, name, METHODS[name], drop="id")


for _name, _field in INSTANCE_METHODS.items():
    setattr(Instance, _name, _blocking_instance_method(Instance, _name, _field))
    setattr(AsyncInstance, _name, _async_instance_method(AsyncInstance, _name, _field))


def _client_methods(make: Callable[[type, str, Callable[..., Call]], Callable]) -> Callable[[type], type]:
    """Class decorator: one method per METHODS entry, made by make (blocking or async)."""
    def decorate(cls: type) -> type:
        for name, declare in METHODS.items():
            setattr(cls, name, make(cls, name, declare))
        return cls
    return decorate


# --- the transports -----------------------------------------------------------------------------------
def _no_service(where: str, e: BaseException) -> NodeUnavailable:
    cause = e.__cause__ if isinstance(e, NodeUnavailable) and e.__cause__ else e
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    if isinstance(cause, PermissionError):  # a service is there, but not for this user
        return NodeUnavailable(f"permission denied on {where}: the socket is for root and the "
                               "socket's group (0660); run as one of them or join that group",
                               socket=where, errno=cause.errno)
    return NodeUnavailable(f"no pool service at {where}: start one with `pool serve` ({why})",
                           socket=where)


def _open(kind: Any, e: _Endpoint) -> Any:
    """kind.connect_tcp or kind.connect_unix: a SyncRpcClient, or a coroutine for an RpcClient."""
    if e.tcp:
        host, _, port = e.tcp.rpartition(":")
        tls = TlsFiles.load(e.tls_dir) if e.tls_dir else None
        return kind.connect_tcp(host, int(port), e.token or "", tls=tls, server_name=e.server_name,
                                insecure_plain_tcp=e.insecure_plain_tcp, timeout=e.timeout)
    return kind.connect_unix(e.where, e.token, timeout=e.timeout)


class _Endpoint(NamedTuple):
    where: str                # the socket path, or HOST:PORT
    tcp: str | None
    token: str | None
    timeout: float            # for connecting
    tls_dir: str | None = None          # TCP: this client's TLS directory (pool certs issue)
    server_name: str | None = None      # TCP: the name the service's certificate must carry
    insecure_plain_tcp: bool = False    # TCP without TLS (the token in clear)


def _endpoint(socket: str | os.PathLike | None, tcp: str | None, token: str | None,
              timeout: float, **tls: Any) -> _Endpoint:
    return _Endpoint(tcp or str(socket or config.socket_path()), tcp, token, timeout, **tls)


class _BlockingTransport:
    """One blocking connection (SyncRpcClient). After the server closed it as idle it reconnects,
    and sends again a request the server never read; any other loss marks it broken."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self.endpoint = endpoint
        self.broken = False
        self._rpc = self._connect()

    def _connect(self) -> SyncRpcClient:
        e = self.endpoint
        try:
            return _open(SyncRpcClient, e)
        except (OSError, TimeoutError, NodeUnavailable) as err:
            raise _no_service(e.where, err) from err

    def _reconnect(self) -> None:
        self._rpc.close()
        try:
            self._rpc = self._connect()
        except NodeUnavailable:
            self.broken = True
            raise

    def call(self, method: str, params: dict[str, Any] | None, timeout: float | None) -> Any:
        if self._rpc.closed_as_idle():  # the server closed it while we were idle: open a new one
            self._reconnect()
        try:
            return self._rpc.call(method, params, timeout)
        except ProtocolError as e:
            if not idle_close(e):
                self.broken = True  # the connection is gone: pool.spawn() reconnects next time
                raise
        except NodeUnavailable:  # ShuttingDown too: a new connection may find a new service
            self.broken = True
            raise
        # Closed as idle just as the request went out: the server never read it, so send it again.
        self._reconnect()
        return self._rpc.call(method, params, timeout)

    def close(self) -> None:
        self._rpc.close()


class _AsyncTransport:
    """One asyncio connection (RpcClient), shared by concurrent calls. After the server closed it
    as idle it reconnects, and sends again a request the server never read."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self.endpoint = endpoint
        self.broken = False
        self._rpc: RpcClient | None = None
        self._reconnecting = asyncio.Lock()

    @classmethod
    async def connect(cls, endpoint: _Endpoint) -> _AsyncTransport:
        transport = cls(endpoint)
        transport._rpc = await transport._connect()
        return transport

    @property
    def rpc(self) -> RpcClient:
        assert self._rpc is not None, "_AsyncTransport.connect() makes a connected one"
        return self._rpc

    async def _connect(self) -> RpcClient:
        e = self.endpoint
        try:
            return await _open(RpcClient, e)
        except (OSError, TimeoutError, NodeUnavailable) as err:
            raise _no_service(e.where, err) from err

    async def _reconnect(self) -> None:
        # Concurrent callers may all see the idle close: only the first one reconnects.
        async with self._reconnecting:
            if await self.rpc.closed_as_idle():
                await self.rpc.close()
                try:
                    self._rpc = await self._connect()
                except NodeUnavailable:
                    self.broken = True
                    raise

    async def call(self, method: str, params: dict[str, Any] | None, timeout: float | None) -> Any:
        if await self.rpc.closed_as_idle():
            await self._reconnect()
        try:
            return await self.rpc.call(method, params, timeout)
        except ProtocolError as e:
            if not idle_close(e):
                self.broken = True
                raise
        except NodeUnavailable:
            self.broken = True
            raise
        await self._reconnect()  # closed as idle as the request went out: it never ran, send it again
        return await self.rpc.call(method, params, timeout)

    async def close(self) -> None:
        if self._rpc is not None:
            await self._rpc.close()


# --- the clients ----------------------------------------------------------------------------------------
class _OnTransport:
    """What both clients are besides their methods: a transport, where it goes, whether it broke."""

    _transport: Any

    @property
    def where(self) -> str:
        return self._transport.endpoint.where

    @property
    def broken(self) -> bool:
        """The connection is gone; a new client is needed (pool.spawn() makes one by itself)."""
        return self._transport.broken


@_client_methods(_blocking_method)
class Client(_OnTransport):
    """Blocking client on one connection (unix socket by default; TCP with a token). Not thread-safe:
    use one per thread (pool.spawn() does). Its methods are METHODS'."""

    instance_type = Instance

    # generated: Client methods (scripts/client_types.py writes their static types)
    if TYPE_CHECKING:
        def ping(self) -> Pong: ...
        def spawn(self, template: str, env: dict[str, str] | None = None, args: list[str] | None = None,
                  timeout: float = 30.0, hostname: str | None = None,
                  node: str | None = None) -> Instance: ...
        def kill(self, id: str, grace: float = 3.0) -> CopyInfo: ...
        def wait(self, id: str, timeout: float | None = None) -> CopyInfo: ...
        def list(self, template: str | None = None) -> List[CopyInfo]: ...
        def info(self, id: str) -> CopyInfo: ...
        def logs(self, id: str, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> LogChunk: ...
        def templates(self) -> List[TemplateInfo]: ...
        def stats(self) -> ServiceStats: ...
        def set_warm(self, template: str, min_warm: int) -> PoolFigures: ...
        def nodes(self) -> List[NodeView]: ...
        def push(self, template: str, node: str, timeout: float = 600.0) -> FetchResult: ...
        def fork(self, id: str, node: str | None = None, lazy: bool = False, hostname: str | None = None,
                 timeout: float = 120.0) -> ForkReply: ...
        def checkpoint(self, id: str, tag: str | None = None, keep: bool = False,
                       timeout: float = 120.0) -> CheckpointReply: ...
        def snapshots(self, id: str) -> List[SnapshotInfo]: ...
        def rollback(self, id: str, snapshot: str | None = None,
                     timeout: float = 60.0) -> InstanceRestored: ...
        def suspend(self, id: str, timeout: float = 120.0) -> SuspendReply: ...
        def resume(self, id: str, timeout: float = 60.0) -> InstanceRestored: ...
        def migrate(self, id: str, node: str, lazy: bool = False, timeout: float = 120.0) -> MigrateReply: ...
    # end: Client methods

    def __init__(self, socket: str | os.PathLike | None = None, *, tcp: str | None = None,
                 token: str | None = None, timeout: float = 5.0, tls_dir: str | None = None,
                 server_name: str | None = None, insecure_plain_tcp: bool = False) -> None:
        """tcp=HOST:PORT: over mutual TLS with tls_dir's certificate, the service's certificate
        naming server_name (docs/security.md); plain only with insecure_plain_tcp."""
        self._transport = _BlockingTransport(_endpoint(
            socket, tcp, token, timeout, tls_dir=tls_dir, server_name=server_name,
            insecure_plain_tcp=insecure_plain_tcp))

    @classmethod
    def _over(cls, transport: Any) -> Client:
        """A client on a transport of your own (anything with call(method, params, timeout) and
        close(), e.g. a fake in tests)."""
        client = cls.__new__(cls)
        client._transport = transport
        return client

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float | None = DEFAULT_CALL_TIMEOUT) -> Any:
        """One request by name (for methods this client has no method for)."""
        return self._transport.call(method, params, timeout)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@_client_methods(_async_method)
class AsyncClient(_OnTransport):
    """asyncio client: `async with await AsyncClient.connect() as c: inst = await c.spawn(...)`.
    Concurrent calls on one client are fine (pipelined on one connection). Its methods are METHODS',
    as coroutines."""

    instance_type = AsyncInstance

    # generated: AsyncClient methods (scripts/client_types.py writes their static types)
    if TYPE_CHECKING:
        async def ping(self) -> Pong: ...
        async def spawn(self, template: str, env: dict[str, str] | None = None, args: list[str] | None = None,
                        timeout: float = 30.0, hostname: str | None = None,
                        node: str | None = None) -> AsyncInstance: ...
        async def kill(self, id: str, grace: float = 3.0) -> CopyInfo: ...
        async def wait(self, id: str, timeout: float | None = None) -> CopyInfo: ...
        async def list(self, template: str | None = None) -> List[CopyInfo]: ...
        async def info(self, id: str) -> CopyInfo: ...
        async def logs(self, id: str, stream: str = "stdout", offset: int = 0,
                       limit: int = 65536) -> LogChunk: ...
        async def templates(self) -> List[TemplateInfo]: ...
        async def stats(self) -> ServiceStats: ...
        async def set_warm(self, template: str, min_warm: int) -> PoolFigures: ...
        async def nodes(self) -> List[NodeView]: ...
        async def push(self, template: str, node: str, timeout: float = 600.0) -> FetchResult: ...
        async def fork(self, id: str, node: str | None = None, lazy: bool = False,
                       hostname: str | None = None, timeout: float = 120.0) -> ForkReply: ...
        async def checkpoint(self, id: str, tag: str | None = None, keep: bool = False,
                             timeout: float = 120.0) -> CheckpointReply: ...
        async def snapshots(self, id: str) -> List[SnapshotInfo]: ...
        async def rollback(self, id: str, snapshot: str | None = None,
                           timeout: float = 60.0) -> InstanceRestored: ...
        async def suspend(self, id: str, timeout: float = 120.0) -> SuspendReply: ...
        async def resume(self, id: str, timeout: float = 60.0) -> InstanceRestored: ...
        async def migrate(self, id: str, node: str, lazy: bool = False,
                          timeout: float = 120.0) -> MigrateReply: ...
    # end: AsyncClient methods

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    @classmethod
    async def connect(cls, socket: str | os.PathLike | None = None, *, tcp: str | None = None,
                      token: str | None = None, timeout: float = 5.0, tls_dir: str | None = None,
                      server_name: str | None = None, insecure_plain_tcp: bool = False) -> AsyncClient:
        """As Client(): tcp over mutual TLS (tls_dir, server_name) or, if asked, plain."""
        return cls(await _AsyncTransport.connect(_endpoint(
            socket, tcp, token, timeout, tls_dir=tls_dir, server_name=server_name,
            insecure_plain_tcp=insecure_plain_tcp)))

    @classmethod
    def _over(cls, transport: Any) -> AsyncClient:
        """A client on a transport of your own (anything with async call(method, params, timeout)
        and close(), e.g. a fake in tests)."""
        return cls(transport)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = DEFAULT_CALL_TIMEOUT) -> Any:
        """One request by name (for methods this client has no method for)."""
        return await self._transport.call(method, params, timeout)

    async def close(self) -> None:
        await self._transport.close()

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
          timeout: float = 30.0, hostname: str | None = None, node: str | None = None) -> Instance:
    """Spawn a copy of template name through the service at $POOL_SOCKET (default /run/pool/pool.sock)."""
    return default_client().spawn(name, env=env, args=args, timeout=timeout, hostname=hostname,
                                  node=node)
