"""Publish a copy's port on the host: 127.0.0.1:HOSTPORT -> 127.0.0.1:PORT inside the copy's netns.

Each copy of an isolated template listens on the same port in its own network namespace, so none of
them can collide or starve another; this proxy gives each one a distinct host port. Connections into
the namespace use sockets created inside it (netns.socket_in), so no veth, route or NAT is needed.

The host port belongs to the instance, not to one process: a rollback or restart re-points the proxy
at the new process's namespace (repoint), and while the instance sleeps (suspended, restarting) the
listener stays open and each new connection first awaits the waker (the restore), then is forwarded.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

from pool.cr import netns

log = logging.getLogger(__name__)


class PortProxy:
    def __init__(self, netns_fd: int, port: int, host: str = "127.0.0.1") -> None:
        self.netns_fd = netns_fd
        self.port = port
        self.host = host
        self.last_activity = time.monotonic()
        self.waker: Callable[[], Awaitable[object]] | None = None  # set while nothing listens
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self, host_port: int = 0) -> str:
        self._server = await asyncio.start_server(self._on_client, self.host, host_port)
        return self.address

    async def start_on(self, host_port: int) -> str:
        """Publish on host_port if it is free (a copy adopted again keeps its address), else on
        any free port."""
        if host_port:
            with contextlib.suppress(OSError):
                return await self.start(host_port)
        return await self.start()

    def repoint(self, netns_fd: int) -> None:
        """Forward new connections into this namespace (a new process of the same instance)."""
        self.netns_fd = netns_fd
        self.waker = None

    async def _on_client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.last_activity = time.monotonic()
        loop = asyncio.get_running_loop()
        a_writer = None
        try:
            if self.waker is not None:
                await self.waker()  # the instance sleeps: this connection wakes it
            # A thread joins the namespace for ~0.1 ms; not via an executor that could be full.
            sock = netns.socket_in(self.netns_fd)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
            except OSError:
                sock.close()
                raise
            a_reader, a_writer = await asyncio.open_connection(sock=sock)
            await asyncio.gather(self._pipe(c_reader, a_writer), self._pipe(a_reader, c_writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # the copy or the client went away: just drop this connection
        except Exception as e:  # noqa: BLE001  a failed wake: this connection is dropped
            log.warning("port %s: could not wake the instance: %s", self.address,
                        getattr(e, "message", e))
        finally:
            for w in (c_writer, a_writer):
                if w is not None:
                    w.close()
            self._conns.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.last_activity = time.monotonic()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
