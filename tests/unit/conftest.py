"""Fixtures shared by the unit tests of the RPC layer and the clients."""
from __future__ import annotations

import asyncio
import threading

import pytest

from pool.wire.rpc import RpcServer


@pytest.fixture
def serve_in_thread(tmp_path):
    """serve_in_thread(handler, **RpcServer kwargs) -> (server, path, loop): an RpcServer on a loop in
    a thread, for blocking clients (they run a loop of their own in the calling thread). Stopped at
    the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    servers = []

    def start(handler, **kw):
        server = RpcServer(handler, **kw)
        servers.append(server)
        path = asyncio.run_coroutine_threadsafe(server.start_unix(tmp_path / "pool.sock"), loop).result(5)
        return server, path, loop

    thread.start()
    try:
        yield start
    finally:
        for server in servers:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
