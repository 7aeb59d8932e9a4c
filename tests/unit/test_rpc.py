"""The RPC layer over real sockets, on the default loop and on uvloop. Every wait is bounded."""
import asyncio
import gc
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pool
from pool import errors
from pool.errors import InternalError, NoReply, PoolTimeout
from pool.wire import protocol as P
from pool.wire.rpc import RpcClient, RpcServer, SyncRpcClient

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
# libuv opens a process-wide pipe with its first loop and keeps it; open it now, not inside a test
# that the leak checker (tests/conftest.py) watches.
uvloop.new_event_loop().close()
TOKEN = "s3cret-token"


@pytest.fixture(params=sorted(LOOPS))
def loop_kind(request):
    return request.param


@pytest.fixture
def arun(loop_kind):
    """Run a coroutine on a fresh loop of each kind, bounded in time; fail on anything the loop reports
    (unretrieved task exceptions and the like)."""
    def run(coro, timeout=10):
        problems = []
        with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
            runner.get_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
            result = runner.run(asyncio.wait_for(coro, timeout))
        assert not problems
        return result
    return run


class Handler:
    """ping -> pong; info raises by id; wait sleeps (recording start and cancellation); else echo."""

    def __init__(self):
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.running = 0
        self.max_running = 0
        self.contexts = []

    async def __call__(self, method, params, ctx):
        self.contexts.append(ctx)
        if method == "ping":
            return "pong"
        if method == "info":
            if params["id"] == "full":
                raise errors.NoCapacity("pool is full", node="n1", free=0)
            if params["id"] == "missing":
                raise errors.InstanceNotFound("missing")
            if params["id"] == "bug":
                raise RuntimeError("oops")
            if params["id"] == "pathdata":  # data msgpack cannot carry
                raise errors.TemplateNotFound("py", where=Path("/store"))
            if params["id"] == "huge":
                return "x" * (P.MAX_FRAME + 1)
            return {"id": params["id"]}
        if method == "wait":
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.started.set()
            try:
                await asyncio.sleep(params["timeout"] if params["timeout"] is not None else 60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            finally:
                self.running -= 1
            return params["id"]
        return {"method": method, "params": params}


async def until(cond, timeout=5.0):
    """Poll cond in the current task (no helper task, so task counts stay meaningful)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def raw_frames(reader, timeout=5.0, until=lambda frames: False):
    """Every frame the server sends until it closes (a reset counts as closing) or until(frames)."""
    dec = P.FrameDecoder(max_frame=2**32)
    out = []

    async def read():
        while not until(out):
            try:
                data = await reader.read(65536)
            except ConnectionError:
                return
            if not data:
                return
            out.extend(dec.feed(data))
    await asyncio.wait_for(read(), timeout)
    return out


async def raw_hello(reader, writer, token=None):
    writer.write(P.encode_frame(P.make_hello(token, "raw")))
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    assert P.check_hello_reply(msgpack.unpackb(await reader.readexactly(size)))


async def started(handler=None, tmp_path=None, **kw):
    server = RpcServer(handler or Handler(), **kw)
    path = await server.start_unix(tmp_path / "run" / "pool.sock")
    return server, path


# --- basics -----------------------------------------------------------------------------------------
def test_ping_over_unix(arun, tmp_path):
    async def main():
        handler = Handler()
        server, path = await started(handler, tmp_path, name="node-a")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        client = await RpcClient.connect_unix(path, client="tester")
        assert client.server == "node-a"
        assert await client.call("ping") == "pong"
        assert server.connections == 1
        ctx = handler.contexts[0]
        assert (ctx.transport, ctx.client, ctx.uid, ctx.pid) == ("unix", "tester", os.getuid(), os.getpid())
        assert await client.call("stats") == {"method": "stats", "params": {}}
        assert await client.call("logs", {"id": "i", "limit": 5}) == {
            "method": "logs", "params": {"id": "i", "stream": "stdout", "offset": 0, "limit": 5}}
        await client.close()
        await until(lambda: server.connections == 0)
        with pytest.raises(errors.ProtocolError, match="closed"):
            await client.call("ping")
        await server.close()
        assert not path.exists()
    arun(main())


def test_typed_errors_round_trip(arun, tmp_path, caplog):
    async def main():
        server, path = await started(tmp_path=tmp_path)
        async with await RpcClient.connect_unix(path) as client:
            with pytest.raises(errors.NoCapacity) as e:
                await client.call("info", {"id": "full"})
            assert e.value.message == "pool is full" and e.value.data == {"node": "n1", "free": 0}
            with pytest.raises(errors.InstanceNotFound):
                await client.call("info", {"id": "missing"})
            with pytest.raises(InternalError, match="RuntimeError: oops") as e:
                await client.call("info", {"id": "bug"})
            assert e.value.code == "internal"
            with pytest.raises(errors.TemplateNotFound, match="no template named 'py' in /store") as e:
                await client.call("info", {"id": "pathdata"})
            assert e.value.data == {}
            with pytest.raises(InternalError, match="reply cannot be sent"):
                await client.call("info", {"id": "huge"})
            assert await client.call("ping") == "pong"
        await server.close()
    with caplog.at_level(logging.ERROR, logger="pool.wire.rpc"):
        arun(main())
    assert len([r for r in caplog.records if "cannot be sent" in r.getMessage()]) == 2
    bug = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(bug) == 1 and bug[0].exc_info is not None  # logged with its traceback


def test_bad_requests_keep_the_connection(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path)
        async with await RpcClient.connect_unix(path) as client:
            with pytest.raises(errors.BadRequest, match="unknown method 'fly'"):
                await client.call("fly")
            with pytest.raises(errors.BadRequest, match="'template' must be a template name") as e:
                await client.call("spawn", {"template": 3})
            assert e.value.data["param"] == "template"
            with pytest.raises(errors.BadRequest, match="unknown parameter"):
                await client.call("ping", {"x": 1})
            assert await client.call("ping") == "pong"
            assert server.connections == 1
        await server.close()
    arun(main())


def test_pipelined_calls_are_matched_by_id(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path)
        async with await RpcClient.connect_unix(path) as client:
            # Later calls finish first, so replies arrive out of order.
            calls = [client.call("wait", {"id": str(i), "timeout": (30 - i) / 1000}) for i in range(30)]
            assert await asyncio.gather(*calls) == [str(i) for i in range(30)]
        await server.close()
    arun(main())


def test_inflight_cap_applies_back_pressure(arun, tmp_path):
    async def main():
        handler = Handler()
        server, path = await started(handler, tmp_path, max_inflight_per_conn=2)
        async with await RpcClient.connect_unix(path) as client:
            got = await asyncio.gather(*[client.call("wait", {"id": str(i), "timeout": 0.02}) for i in range(8)])
            assert got == [str(i) for i in range(8)]
        assert handler.max_running == 2
        await server.close()
    arun(main())


def test_timeouts(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, request_timeout=0.05)
        async with await RpcClient.connect_unix(path) as client:
            with pytest.raises(PoolTimeout, match="wait did not finish") as e:
                await client.call("wait", {"id": "a", "timeout": 10})
            assert e.value.code == "timeout"
            with pytest.raises(NoReply, match="no reply"):  # the client's own deadline
                await client.call("wait", {"id": "b", "timeout": 0.04}, timeout=0.001)
            assert await client.call("ping") == "pong"  # the late reply was dropped quietly
        await server.close()
    arun(main())


# --- authentication ---------------------------------------------------------------------------------
def test_unix_tokens_are_enforced_when_configured(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, tokens={TOKEN, "other"})
        for token in [None, "wrong", TOKEN + "x"]:
            with pytest.raises(errors.AuthError):
                await RpcClient.connect_unix(path, token)
        async with await RpcClient.connect_unix(path, TOKEN) as client:
            assert await client.call("ping") == "pong"
        await until(lambda: server.connections == 0)
        await server.close()
    arun(main())


def test_unreachable_server_is_node_unavailable(arun, tmp_path):
    async def main():
        with pytest.raises(errors.NodeUnavailable, match="cannot connect"):
            await RpcClient.connect_unix(tmp_path / "nobody.sock")
        listener = socket.socket(socket.AF_UNIX)  # accepts (via the backlog) but never answers
        listener.bind(str(tmp_path / "silent.sock"))
        listener.listen()
        try:
            with pytest.raises(errors.NodeUnavailable, match="no answer"):
                await RpcClient.connect_unix(tmp_path / "silent.sock", timeout=0.05)
        finally:
            listener.close()
    arun(main())


def test_tcp_refuses_to_start_without_tokens(arun):
    async def main():
        for tokens in [None, set()]:
            with pytest.raises(ValueError, match="without authentication"):
                await RpcServer(Handler(), tokens=tokens).start_tcp("127.0.0.1", 0,
                                                                    insecure_plain_tcp=True)
    arun(main())
    with pytest.raises(ValueError):
        RpcServer(Handler(), tokens={""})


def test_tcp_with_token(arun):
    """The token check, seen in clear (insecure_plain_tcp); over TLS it is the same check inside."""
    async def main():
        handler = Handler()
        server = RpcServer(handler, tokens={TOKEN})
        host, port = await server.start_tcp("127.0.0.1", 0, insecure_plain_tcp=True)
        async with await RpcClient.connect_tcp(host, port, TOKEN, insecure_plain_tcp=True) as client:
            assert await client.call("ping") == "pong"
            assert handler.contexts[0].transport == "tcp" and handler.contexts[0].uid is None
        with pytest.raises(errors.AuthError):
            await RpcClient.connect_tcp(host, port, "nope", insecure_plain_tcp=True)

        # A wrong token gets the refusal and nothing else.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(P.encode_frame(P.make_hello("nope", "raw")))
        frames = await raw_frames(reader)
        assert [f["id"] for f in frames] == [0] and frames[0]["error"]["code"] == "auth_failed"
        assert TOKEN not in repr(frames)
        writer.close()

        # So does a request before the hello.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(P.encode_frame(P.make_request(1, "ping")))
        frames = await raw_frames(reader)
        assert [f["error"]["code"] for f in frames] == ["protocol_error"]
        writer.close()
        assert len(handler.contexts) == 1  # only the authenticated ping reached the handler
        await until(lambda: server.connections == 0)
        await server.close()
    arun(main())


def test_silent_client_is_disconnected(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, hello_timeout=0.05)
        reader, writer = await asyncio.open_unix_connection(str(path))
        frames = await raw_frames(reader)
        assert frames[0]["error"]["code"] == "protocol_error" and "no hello" in frames[0]["error"]["message"]
        writer.close()
        await until(lambda: server.connections == 0)
        await server.close()
    arun(main())


def test_oversized_and_garbage_frames_close_the_connection(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, max_frame=1000)
        for junk in [struct.pack(">I", 1001), struct.pack(">I", 3) + b"\xc1\xc1\xc1",
                     P.encode_frame({"v": 1, "id": "one", "method": "ping"})]:
            reader, writer = await asyncio.open_unix_connection(str(path))
            await raw_hello(reader, writer)
            writer.write(junk)
            frames = await raw_frames(reader)
            assert [(f["id"], f["error"]["code"]) for f in frames] == [(0, "protocol_error")]
            writer.close()
        await until(lambda: server.connections == 0)
        await server.close()
    arun(main())


# --- floods: connection cap and idle timeout -------------------------------------------------------------
def test_connections_over_the_cap_get_an_error_and_are_closed(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, max_connections=2)
        r1, w1 = await asyncio.open_unix_connection(str(path))   # never says hello
        r2, w2 = await asyncio.open_unix_connection(str(path))
        await raw_hello(r2, w2)
        await until(lambda: server.connections == 2)
        r3, w3 = await asyncio.open_unix_connection(str(path))
        frames = await raw_frames(r3)                              # ends: the server closed it
        assert [(f["id"], f["error"]["code"]) for f in frames] == [(0, "no_capacity")]
        assert frames[0]["error"]["data"] == {"connections": 2, "limit": 2}
        with pytest.raises(errors.NoCapacity, match="max_connections"):
            await RpcClient.connect_unix(path)
        assert server.refused == 2 and server.connections == 2
        w1.close()
        await until(lambda: server.connections == 1)
        async with await RpcClient.connect_unix(path) as client:  # room again
            assert await client.call("ping") == "pong"
        for w in (w2, w3):
            w.close()
        await server.close()
    arun(main())


def test_an_idle_connection_is_closed_after_the_hello(arun, tmp_path):
    async def main():
        server, path = await started(tmp_path=tmp_path, idle_timeout=0.1)
        reader, writer = await asyncio.open_unix_connection(str(path))
        await raw_hello(reader, writer)
        frames = await raw_frames(reader)
        assert [(f["id"], f["error"]["code"]) for f in frames] == [(0, "protocol_error")]
        assert frames[0]["error"]["data"] == {"idle_timeout": 0.1}
        await until(lambda: server.connections == 0)
        writer.close()
        await server.close()
    arun(main())


def test_a_connection_with_a_request_in_flight_is_not_idle(arun, tmp_path):
    async def main():
        release = asyncio.Event()

        async def handler(method, params, ctx):
            await release.wait()
            return "done"
        server, path = await started(handler, tmp_path=tmp_path, idle_timeout=0.05)
        async with await RpcClient.connect_unix(path) as client:
            call = asyncio.create_task(client.call("ping"))
            await asyncio.sleep(0.5)  # ten idle timeouts: the request keeps the connection busy
            assert not client.closed and server.connections == 1
            release.set()
            assert await call == "done"
            await until(lambda: client.closed)  # idle again once the reply is out
            assert await client.closed_as_idle()
        await server.close()
    arun(main())


def test_clients_reconnect_after_an_idle_close(serve_in_thread):
    server, path, loop = serve_in_thread(Handler(), tokens={TOKEN}, idle_timeout=0.05)
    c = pool.Client(path, token=TOKEN)
    try:
        assert c.ping() == "pong"
        wait_for_connections(server, loop, 0)  # closed as idle
        assert c.ping() == "pong" and not c.broken
    finally:
        c.close()

    async def with_async_client():
        ac = await pool.AsyncClient.connect(path, token=TOKEN)
        async with ac:
            assert await ac.ping() == "pong"
            await until(lambda: ac._transport.rpc.closed)
            assert await asyncio.gather(ac.ping(), ac.ping()) == ["pong", "pong"]
    asyncio.run(with_async_client())


# --- connection loss ----------------------------------------------------------------------------------
def test_client_vanishing_mid_call_cancels_its_requests(arun, tmp_path, caplog):
    async def main():
        handler = Handler()
        server, path = await started(handler, tmp_path)
        before = len(asyncio.all_tasks())
        reader, writer = await asyncio.open_unix_connection(str(path))
        await raw_hello(reader, writer)
        writer.write(P.encode_frame(P.make_request(1, "wait", {"id": "w"})))
        await asyncio.wait_for(handler.started.wait(), 5)
        writer.transport.abort()
        await asyncio.wait_for(handler.cancelled.wait(), 5)
        await until(lambda: server.connections == 0 and len(asyncio.all_tasks()) == before)
        async with await RpcClient.connect_unix(path) as client:
            assert await client.call("ping") == "pong"
        await server.close()
    with caplog.at_level(logging.INFO):
        arun(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_server_close_fails_pending_calls(arun, tmp_path):
    async def main():
        handler = Handler()
        server, path = await started(handler, tmp_path)
        client = await RpcClient.connect_unix(path)
        call = asyncio.create_task(client.call("wait", {"id": "w"}))
        await asyncio.wait_for(handler.started.wait(), 5)
        await server.close()
        assert handler.cancelled.is_set() and server.connections == 0
        with pytest.raises(errors.ProtocolError, match="connection closed"):
            await asyncio.wait_for(call, 5)
        assert client.closed
        await client.close()
        assert not path.exists()
    arun(main())


# --- the socket file ----------------------------------------------------------------------------------
def test_socket_file_lifecycle(arun, tmp_path):
    async def main():
        path = tmp_path / "pool.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # leaves a socket file nobody listens on
        server = RpcServer(Handler())
        assert await server.start_unix(path, mode=0o600) == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(FileExistsError, match="another server"):
            await RpcServer(Handler()).start_unix(path)
        await server.close()
        assert not path.exists()
        path.write_text("not a socket")
        with pytest.raises(FileExistsError, match="not a socket"):
            await RpcServer(Handler()).start_unix(path)
        assert path.read_text() == "not a socket"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.sock"]  # no temporary left behind
    arun(main())


# --- the blocking client ---------------------------------------------------------------------------
@pytest.fixture
def threaded_server(serve_in_thread):
    return serve_in_thread(Handler(), tokens={TOKEN}, name="sync-node")


def test_sync_client(threaded_server):
    _, path, _ = threaded_server
    with SyncRpcClient.connect_unix(path, TOKEN) as client:
        assert client.server == "sync-node"
        assert client.call("ping") == "pong"
        with pytest.raises(errors.NoCapacity):
            client.call("info", {"id": "full"})
        assert client.call("kill", {"id": "i"}) == {"method": "kill", "params": {"id": "i", "grace": 3.0}}
    with pytest.raises(errors.AuthError):
        SyncRpcClient.connect_unix(path, "wrong")


def connections(server, loop) -> int:
    return asyncio.run_coroutine_threadsafe(asyncio.sleep(0, server.connections), loop).result(5)


def wait_for_connections(server, loop, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while connections(server, loop) != n:
        assert time.monotonic() < deadline, f"the server did not get to {n} connections"
        time.sleep(0.01)


def test_sync_client_left_to_the_gc_closes_its_connection_quietly(threaded_server, caplog):
    server, path, loop = threaded_server
    client = SyncRpcClient.connect_unix(path, TOKEN)
    assert client.call("ping") == "pong"
    own_loop = client._loop
    del client
    gc.collect()
    assert own_loop.is_closed()
    wait_for_connections(server, loop, 0)
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_a_script_that_never_closes_its_client_exits_silently(threaded_server):
    _, path, _ = threaded_server
    script = ("import sys\nfrom pool.wire.rpc import SyncRpcClient\n"
              "c = SyncRpcClient.connect_unix(sys.argv[1], sys.argv[2])\nassert c.call('ping') == 'pong'\n")
    r = subprocess.run([sys.executable, "-c", script, str(path), TOKEN], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr) == (0, "")


# --- robustness ---------------------------------------------------------------------------------------
EXAMPLES_PER_LOOP = 1200

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)
param_names = st.sampled_from(sorted({n for s in P.METHODS.values() for n in s}) + ["bogus"])
param_values = st.one_of(values, st.text(max_size=6), st.integers(-5, 100), st.floats(-1, 100),
                         st.lists(st.text(max_size=4), max_size=3),
                         st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))


def mostly(good, bad):
    return st.one_of(good, good, good, bad)


# Requests with a good envelope and the method's own parameter names (values of any type) reach the
# schemas and the handler; mangled ones exercise the envelope checks.
well_formed = st.sampled_from(sorted(P.METHODS)).flatmap(lambda m: st.builds(
    lambda rid, params: P.make_request(rid, m, params), st.integers(1, 50),
    st.fixed_dictionaries({}, optional={n: param_values for n in P.METHODS[m]})))
mangled = st.builds(
    lambda msg, drop: {k: v for k, v in msg.items() if k not in drop},
    st.fixed_dictionaries({"v": mostly(st.just(1), values), "id": mostly(st.integers(1, 50), values),
                           "method": mostly(st.sampled_from(sorted(P.METHODS)), values),
                           "params": mostly(st.dictionaries(param_names, param_values, max_size=4), values)}),
    st.sets(st.sampled_from(["v", "id", "method", "params"]), max_size=1))
requests = st.one_of(well_formed, well_formed, mangled)
hellos = st.fixed_dictionaries(
    {"hello": st.sampled_from(["pool", "pool", "other"])},
    optional={"v": st.sampled_from([1, 1, 2]), "token": st.sampled_from([TOKEN, "bad", None]) | values,
              "client": st.text(max_size=5) | values})


def _frame(obj):
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


chunks = st.one_of(
    st.binary(max_size=48),                                                        # random bytes
    st.builds(lambda n, tail: struct.pack(">I", n) + tail,                         # huge declared length
              st.integers(2**16, 2**32 - 1), st.binary(max_size=16)),
    st.builds(lambda f, cut: f[:cut % len(f)], requests.map(_frame), st.integers(0, 2**16)),  # truncated
    requests.map(_frame),                                                          # wrong-typed requests
    st.dictionaries(st.text(max_size=6), values, max_size=5).map(_frame),           # garbage maps
    values.map(_frame),                                                            # non-map payloads
    hellos.map(_frame),
)
# A case: maybe a valid hello, some request frames, then maybe some hostile bytes.
cases = st.tuples(mostly(st.just(True), st.just(False)), st.lists(requests.map(_frame), max_size=4),
                  st.lists(chunks, max_size=2))


async def _fuzz_handler(method, params, ctx):
    if method == "ping":
        return "pong"
    if method == "wait":  # something in flight to cancel when a connection ends early
        await asyncio.sleep(min(params["timeout"] or 0.01, 0.01))
    return {"method": method, "params": params}


async def _run_case(path, with_hello, request_frames, parts):
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        if with_hello:
            writer.write(P.encode_frame(P.make_hello(TOKEN, "fuzz")))
        for part in request_frames + parts:
            writer.write(part)
        if parts or not with_hello:
            writer.write_eof()  # (only here: EOF means "gone" and would cancel the requests)
        await writer.drain()
    except ConnectionError:
        pass  # the server may hang up before we are done talking
    # A well-behaved exchange ends with one reply per request; anything else with the server closing.
    frames = await raw_frames(reader, until=lambda fr: len(fr) > len(request_frames)
                              or any(f.get("id") == 0 for f in fr))
    writer.close()
    # Whatever was sent, the server only ever answers with well-formed replies.
    # (The fuzzed parts may contain a valid hello of their own.)
    if frames and "hello" in frames[0]:
        assert P.check_hello_reply(frames.pop(0)) == "prewarm-pool"
    else:
        assert len(frames) <= 1  # before the hello: a refusal at most
    for i, f in enumerate(frames):
        assert isinstance(f.get("id"), int) and ("result" in f) != ("error" in f), f
        if "error" in f:
            assert f["error"]["code"] in {"protocol_error", "bad_request", "auth_failed"}, f
            if f["id"] == 0:
                assert i == len(frames) - 1  # a connection error is the last thing said


def test_robustness_against_hostile_input(loop_kind, tmp_path):
    loop = LOOPS[loop_kind]()
    problems = []
    loop.set_exception_handler(lambda loop, ctx: problems.append(ctx))
    run = lambda coro: loop.run_until_complete(asyncio.wait_for(coro, 10))  # noqa: E731

    async def count_tasks():
        return len(asyncio.all_tasks())

    server = RpcServer(_fuzz_handler, tokens={TOKEN}, hello_timeout=2)
    try:
        path = run(server.start_unix(tmp_path / "pool.sock"))
        good = run(RpcClient.connect_unix(path, TOKEN))
        baseline = run(count_tasks())

        @settings(max_examples=EXAMPLES_PER_LOOP, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=cases)
        def one(case):
            ran.append(1)
            run(_run_case(path, *case))
            assert run(good.call("ping")) == "pong"

        ran = []
        one()
        assert len(ran) >= EXAMPLES_PER_LOOP
        run(until(lambda: server.connections == 1))
        assert run(count_tasks()) == baseline  # nothing left behind by the hostile connections
        run(good.close())
        run(until(lambda: server.connections == 0))
    finally:
        run(server.close())
        loop.close()
    assert not problems
