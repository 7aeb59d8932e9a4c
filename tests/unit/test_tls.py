"""Mutual TLS on the TCP links, over real sockets on loopback: certificate files (pool certs), the RPC
layer and template transfer with the cluster's certificates, and peers with wrong certificates (another
CA, another node's name, none) refused during the handshake, before any frame is read."""
from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat

import pytest
import uvloop
from tlscerts import Cluster

from pool.errors import SpecError, TlsError
from pool.templates import transfer
from pool.templates.store import Store
from pool.wire import protocol as P
from pool.wire import tls
from pool.wire.rpc import RpcClient, RpcServer, SyncRpcClient

TOKEN = "s3cret-token-0123456789"
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
uvloop.new_event_loop().close()  # libuv's process-wide pipe, opened before the leak check watches


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Run a coroutine on each loop kind (the agent and the service run on uvloop)."""
    def go(coro):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(coro, 20))
    return go


class Handler:
    def __init__(self):
        self.calls = []

    async def __call__(self, method, params, ctx):
        self.calls.append((method, ctx))
        return "pong"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return Cluster(tmp_path_factory.mktemp("certs"))


@contextlib.asynccontextmanager
async def rpc_server(files, **kw):
    handler = Handler()
    server = RpcServer(handler, tokens={TOKEN})
    try:
        addr = await server.start_tcp("127.0.0.1", 0, tls=files, **kw)
        yield server, handler, addr
    finally:
        await server.close()


def test_certificate_files_are_private_and_never_overwritten(tmp_path):
    d = tmp_path / "certs"
    tls.make_ca(d)
    node = tls.issue(d, "n2", ip="10.0.0.2")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(node.stat().st_mode) == 0o700
    for key in (d / tls.CA_KEY, node / tls.NODE_KEY):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    info = tls.describe(node / tls.NODE_CERT)
    assert info["name"] == "n2" and info["san"] == ["n2", "10.0.0.2"]
    assert tls.TlsFiles.load(node).name == "n2"
    before = (node / tls.NODE_KEY).read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        tls.issue(d, "n2")
    with pytest.raises(FileExistsError, match="--force"):
        tls.make_ca(d)
    assert (node / tls.NODE_KEY).read_bytes() == before
    tls.issue(d, "n2", force=True)
    assert (node / tls.NODE_KEY).read_bytes() != before
    with pytest.raises(ValueError, match="not an IP address"):
        tls.issue(d, "n3", ip="nope")
    with pytest.raises(FileNotFoundError, match="pool certs init"):
        tls.issue(tmp_path / "no-ca", "n3")


def test_a_node_certificate_can_be_written_elsewhere_from_a_read_only_ca(tmp_path):
    # how a Kubernetes agent gets its own at start: the CA from a read-only Secret, the output in
    # the pod's own volume (deploy/kubernetes/agents.yaml)
    d = tmp_path / "ca"
    tls.make_ca(d)
    d.chmod(0o500)
    try:
        out = tls.issue(d, "node-7", ip="10.0.0.7", out=tmp_path / "tls")
    finally:
        d.chmod(0o700)
    assert out == tmp_path / "tls" and tls.TlsFiles.load(out).name == "node-7"
    assert not (d / "node-7").exists()


def test_unusable_tls_dirs_are_refused_naming_the_file(tmp_path, cluster):
    with pytest.raises(SpecError, match="node.key.*missing"):
        d = tmp_path / "half"
        d.mkdir()
        (d / tls.CA_CERT).write_bytes(cluster.node("n1").ca.read_bytes())
        (d / tls.NODE_CERT).write_bytes(cluster.node("n1").cert.read_bytes())
        tls.TlsFiles.load(d)
    (d / tls.NODE_KEY).write_bytes(cluster.node("n1").key.read_bytes())
    os.chmod(d / tls.NODE_KEY, 0o644)
    with pytest.raises(SpecError, match="readable by others"):
        tls.TlsFiles.load(d)
    os.chmod(d / tls.NODE_KEY, 0o600)
    (d / tls.NODE_KEY).write_bytes(cluster.node("n2").key.read_bytes())  # not n1's certificate's key
    with pytest.raises(SpecError, match="unusable certificate files"):
        tls.TlsFiles.load(d)


def test_rpc_over_mutual_tls(cluster, run):
    async def main():
        async with rpc_server(cluster.node("n2")) as (_server, handler, (host, port)):
            client = await RpcClient.connect_tcp(host, port, TOKEN, tls=cluster.node("n1"),
                                                 server_name="n2")
            async with client:
                assert await client.call("ping") == "pong"
            ctx = handler.calls[0][1]
            assert ctx.cert_name == "n1" and ctx.peer.endswith("(n1)")
            with pytest.raises(TlsError) as e:  # a server must be the node we meant to reach
                await RpcClient.connect_tcp(host, port, TOKEN, tls=cluster.node("n1"),
                                            server_name="n3")
            assert "does not name 'n3'" in e.value.message and e.value.data["expected"] == "n3"
            assert len(handler.calls) == 1
    run(main())
    with SyncRpcClient.connect_tcp("127.0.0.1", _sync_server_port(cluster), TOKEN,
                                   tls=cluster.node("n1"), server_name="n2") as c:
        assert c.call("ping") == "pong"


def test_the_client_sdk_over_tls(cluster):
    from pool.client import Client  # noqa: PLC0415

    port = _sync_server_port(cluster)
    with Client(tcp=f"127.0.0.1:{port}", token=TOKEN, tls_dir=str(cluster.dir("n1")),
                server_name="n2") as c:
        assert c.ping() == "pong"
    with pytest.raises(ValueError, match="without TLS"):
        Client(tcp=f"127.0.0.1:{port}", token=TOKEN)


_SYNC = {}


def _sync_server_port(cluster) -> int:
    """A TLS server on a thread of its own, for the blocking client."""
    import threading  # noqa: PLC0415

    ready = threading.Event()

    def run():
        async def serve():
            async with rpc_server(cluster.node("n2")) as (_s, _h, (_host, port)):
                _SYNC["port"] = port
                _SYNC["stop"] = asyncio.Event()
                _SYNC["loop"] = asyncio.get_running_loop()
                ready.set()
                await _SYNC["stop"].wait()
        asyncio.run(serve())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    _SYNC["thread"] = t
    return _SYNC["port"]


@pytest.fixture(autouse=True)
def _stop_sync_server():
    yield
    if "stop" in _SYNC:
        _SYNC["loop"].call_soon_threadsafe(_SYNC["stop"].set)
        _SYNC["thread"].join(10)
        _SYNC.clear()


def test_a_rogue_server_is_refused_before_the_hello_is_sent(cluster, run):
    """Another CA's node, or this CA's certificate for another node, at the address of n2."""
    rogue = Cluster(cluster.root / f"rogue-ca-{os.urandom(4).hex()}")

    async def main():
        for files, problem in [(rogue.node("n2"), "not signed by this cluster's CA"),
                               (cluster.node("n3"), "does not name 'n2'")]:
            async with rpc_server(files) as (_server, handler, (host, port)):
                with pytest.raises(TlsError) as e:
                    await RpcClient.connect_tcp(host, port, TOKEN, tls=cluster.node("n1"),
                                                server_name="n2")
                assert problem in e.value.message, e.value.message
                assert handler.calls == []
    run(main())


def test_a_rogue_client_is_refused_before_any_frame_is_read(tmp_path, cluster, run):
    """A client with another CA's certificate, or with none, never reaches the hello."""
    impostor = tls.TlsFiles.load(cluster.impostor(Cluster(tmp_path / "rogue"), "n1"))

    async def main():
        async with rpc_server(cluster.node("n2")) as (server, handler, (host, port)):
            with pytest.raises(TlsError) as e:
                await RpcClient.connect_tcp(host, port, TOKEN, tls=impostor, server_name="n2")
            assert "does not accept our certificate" in e.value.message, e.value.message
            # no client certificate at all: a plain TLS client that trusts the CA
            ctx = ssl.create_default_context(cafile=str(cluster.node("n1").ca))
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="n2")
            writer.write(P.encode_frame(P.make_hello(TOKEN, "no-cert")))
            assert await refused(reader)
            writer.transport.abort()
            # and a plaintext peer gets nothing but a dropped connection
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(P.encode_frame(P.make_hello(TOKEN, "plain")))
            assert await refused(reader)
            writer.close()
            assert handler.calls == [] and server.connections == 0
    run(main())


async def refused(reader) -> bool:
    """The server ended the connection without a byte of reply (a TLS alert at most)."""
    try:
        return await asyncio.wait_for(reader.read(1024), 5) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True


def test_plain_tcp_only_when_asked_for_by_name(cluster):
    async def main():
        server = RpcServer(Handler(), tokens={TOKEN})
        with pytest.raises(ValueError, match="without TLS"):
            await server.start_tcp("127.0.0.1", 0)
        with pytest.raises(ValueError, match="without TLS"):
            await RpcClient.connect_tcp("127.0.0.1", 1, TOKEN)
        with pytest.raises(ValueError, match="server_name"):
            await RpcClient.connect_tcp("127.0.0.1", 1, TOKEN, tls=cluster.node("n1"))
        await server.close()
    asyncio.run(main())


def test_template_transfer_over_tls_and_a_rogue_source(tmp_path, cluster):
    from test_transfer import publish_fake  # noqa: PLC0415

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    manifest = publish_fake(a)
    rogue = Cluster(tmp_path / "rogue")

    async def fetch_from(src_files, name):
        src = transfer.TemplateSource(a, tokens={TOKEN}, tls=src_files)
        addr = await src.start("127.0.0.1", 0)
        try:
            return await transfer.fetch(b, "fake", addr, token=TOKEN, tls=cluster.node("n2"),
                                        server_name=name)
        finally:
            await src.close()

    with pytest.raises(TlsError, match="not signed by this cluster's CA"):
        asyncio.run(fetch_from(rogue.node("n1"), "n1"))
    with pytest.raises(TlsError, match="does not name 'n1'"):
        asyncio.run(fetch_from(cluster.node("n3"), "n1"))
    assert b.names() == []
    res = asyncio.run(fetch_from(cluster.node("n1"), "n1"))
    assert res.template.manifest == manifest and res.files_sent == len(manifest.files)


def test_a_node_with_tcp_links_needs_tls_or_the_insecure_flag(tmp_path, cluster):
    from pool.cluster.agent import agent_name  # noqa: PLC0415
    from pool.cluster.config import load_config  # noqa: PLC0415

    token = tmp_path / "token"
    token.write_text("x" * 24)
    token.chmod(0o600)
    cfg = load_config(None, tcp="127.0.0.1:7070", token_file=str(token))
    with pytest.raises(SpecError, match="tls_dir.*--insecure-plain-tcp"):
        cfg.tls(tcp=True)
    assert load_config(None, insecure_plain_tcp=True).tls(tcp=True) is None
    assert load_config(None).tls(tcp=False) is None                  # unix socket only
    files = load_config(None, tls_dir=str(cluster.dir("n2"))).tls(tcp=True)
    assert files.name == "n2"
    assert agent_name(None, files, "host") == "n2" and agent_name("n2", files, "host") == "n2"
    with pytest.raises(SpecError, match="for node 'n2', not --name 'n3'"):
        agent_name("n3", files, "host")
    assert agent_name(None, None, "host") == "host"
