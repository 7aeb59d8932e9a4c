"""What a wire-tap sees: a real template (counter, built by real CRIU with a random marker in its
environment, so in its memory pages) shipped over loopback through a recording TCP relay, and an RPC
hello with its token. Over mutual TLS the capture holds neither the token nor the marker; the same
run in plain TCP (the control) shows both, so the search would have found them."""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path

import pytest
from tlscerts import Cluster

from pool.templates import transfer
from pool.templates.build import build
from pool.templates.spec import load_spec
from pool.templates.store import Store
from pool.wire.rpc import RpcClient, RpcServer

pytestmark = pytest.mark.integration
COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"
MARKER = "tls-capture-marker-" + secrets.token_hex(12)
TOKEN = "capture-token-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def marked(session_store, criu):
    """counter with MARKER in its environment: in its memory when it is checkpointed."""
    spec = load_spec(COUNTER)
    spec = dataclasses.replace(spec, name="counter-marked", env=spec.env + (("MARKER", MARKER),))
    template = build(spec, session_store, criu).template
    assert any(MARKER.encode() in p.read_bytes() for p in template.image_dir.iterdir())
    return template


class Relay:
    """A TCP relay on loopback that records every byte going either way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.recorded = bytearray()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[:2]

    async def _relay(self, c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self.target)

        async def pump(reader, writer):
            try:
                while data := await reader.read(65536):
                    self.recorded += data
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(c_reader, s_writer), pump(s_reader, c_writer))

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def _ship_and_hello(src_store: Store, dst: Path, certs: Cluster | None) -> bytes:
    """Fetch counter-marked and make one RPC call, both through one recording relay each."""
    n1 = certs.node("n1") if certs else None
    n2 = certs.node("n2") if certs else None
    source = transfer.TemplateSource(src_store, tokens={TOKEN}, tls=n1)
    relay = Relay(await source.start("127.0.0.1", 0))
    server = RpcServer(lambda method, params, ctx: asyncio.sleep(0, "pong"), tokens={TOKEN})
    rpc_relay = Relay(await server.start_tcp("127.0.0.1", 0, tls=n1, insecure_plain_tcp=not certs))
    try:
        res = await transfer.fetch(Store(dst), "counter-marked", await relay.start(), token=TOKEN,
                                   tls=n2, server_name="n1", codecs=("none",))
        assert res.files_sent > 0 and res.bytes_wire == res.bytes_raw   # uncompressed on purpose
        host, port = await rpc_relay.start()
        async with await RpcClient.connect_tcp(host, port, TOKEN, tls=n2, server_name="n1",
                                               insecure_plain_tcp=not certs) as client:
            assert await client.call("ping") == "pong"
    finally:
        await relay.close()
        await rpc_relay.close()
        await source.close()
        await server.close()
    return bytes(relay.recorded + rpc_relay.recorded)


def test_a_capture_of_tls_links_holds_no_token_and_no_image_bytes(marked, session_store, tmp_path):
    plain = asyncio.run(_ship_and_hello(session_store, tmp_path / "plain", None))
    assert MARKER.encode() in plain and TOKEN.encode() in plain      # the control: visible in clear

    captured = asyncio.run(_ship_and_hello(session_store, tmp_path / "tls",
                                           Cluster(tmp_path / "certs")))
    assert len(captured) > marked.image_bytes                        # the whole image went by
    assert MARKER.encode() not in captured and TOKEN.encode() not in captured
    image = max(marked.image_dir.iterdir(), key=lambda p: p.stat().st_size).read_bytes()
    assert image[4096:4096 + 64] not in captured                     # nor any image bytes
    assert Store(tmp_path / "tls").get("counter-marked").build_id == marked.build_id
