"""The client SDK (pool.client): one method table behind Client and AsyncClient, checked against the
service's protocol table; both clients on a fake transport (what they send, what they return) and on
a real RPC server (errors come back as their own classes)."""
import asyncio
import inspect

import pytest

import pool
from pool import client as C
from pool import errors
from pool.wire import protocol as P

# Methods of the protocol that only a coordinator calls on its nodes, never a client.
NODE_INTERNAL = {"facts", "fetch_template", "fork_checkpoint", "fork_release", "fork_restore",
                 "migrate_out", "migrate_in", "migrate_done"}

# One call of each client method with every parameter given (a new method needs a line here).
FULL_CALLS = {
    "ping": ((), {}),
    "spawn": (("py-hello",), {"env": {"A": "1"}, "args": ["x"], "timeout": 5, "hostname": "h-1",
                              "node": "n1"}),
    "kill": (("i1",), {"grace": 1}),
    "wait": (("i1",), {"timeout": 2}),
    "list": ((), {"template": "py-hello"}),
    "info": (("i1",), {}),
    "logs": (("i1", "stderr", 10, 100), {}),
    "templates": ((), {}),
    "stats": ((), {}),
    "set_warm": (("py-hello", 2), {}),
    "nodes": ((), {}),
    "push": (("py-hello", "n1"), {"timeout": 30}),
    "fork": (("i1",), {"node": "n2", "lazy": True, "hostname": "h-2", "timeout": 10}),
    "checkpoint": (("i1",), {"tag": "before-upgrade", "keep": True, "timeout": 30}),
    "snapshots": (("i1",), {}),
    "rollback": (("i1", "before-upgrade"), {"timeout": 20}),
    "suspend": (("i1",), {"timeout": 30}),
    "resume": (("i1",), {"timeout": 20}),
    "migrate": (("i1", "n2"), {"lazy": True, "timeout": 30}),
}
SPAWN_REPLY = {"id": "i1", "template": "py-hello", "pid": 42, "address": "127.0.0.1:4000",
               "path": "restore", "node": "n1", "spawn_ms": 1.5, "total_ms": 2.0}


def _required_args(name):
    """The call with only the required parameters (each given its FULL_CALLS value)."""
    args, _ = FULL_CALLS[name]
    required = [p for p in inspect.signature(C.METHODS[name]).parameters.values()
                if p.default is inspect.Parameter.empty]
    return args[:len(required)], {}


class FakeTransport:
    """Records each request; replies with a spawn reply to spawn, `error` if set, else a reply that
    has every field an Instance method picks out."""

    def __init__(self, error=None):
        self.requests = []
        self.error = error
        self.closed = False
        self.endpoint = C._endpoint("/nowhere.sock", None, None, 1.0)
        self.broken = False

    def call(self, method, params, timeout):
        self.requests.append((method, params, timeout))
        if self.error is not None:
            raise self.error
        if method == "spawn":
            return dict(SPAWN_REPLY)
        return {"method": method, "exit_status": 0, "data": b"out"}

    def close(self):
        self.closed = True


class AsyncFakeTransport(FakeTransport):
    async def call(self, method, params, timeout):
        await asyncio.sleep(0)
        return super().call(method, params, timeout)

    async def close(self):
        super().close()


def both(calls):
    """Run calls(client) -> [results] on a blocking Client, and on an AsyncClient (awaiting each
    result in turn), each on a fake transport; returns ((results, requests) of each)."""
    sync_t, async_t = FakeTransport(), AsyncFakeTransport()
    sync_results = calls(C.Client._over(sync_t))

    async def run_async():
        out = []
        for pending in calls(C.AsyncClient._over(async_t)):
            out.append(await pending)
        return out
    return (sync_results, sync_t.requests), (asyncio.run(run_async()), async_t.requests)


# --- the table against the protocol ------------------------------------------------------------------
def test_the_table_has_every_method_a_client_may_call():
    assert set(P.METHODS) - NODE_INTERNAL == P.COORDINATOR_METHODS  # what "a client may call" means
    assert set(C.METHODS) == P.COORDINATOR_METHODS
    assert set(FULL_CALLS) == set(C.METHODS)


@pytest.mark.parametrize("name", sorted(C.METHODS))
def test_each_method_sends_the_protocols_parameters_under_their_wire_names(name):
    declared = set(inspect.signature(C.METHODS[name]).parameters)
    offered = {p for p, spec in P.METHODS[name].items() if not spec.internal}
    assert declared == offered  # the client offers every parameter, and no other
    for args, kwargs in (FULL_CALLS[name], _required_args(name)):
        call = C.METHODS[name](*args, **kwargs)
        assert call.method == name
        P.validate_params(name, call.params)  # the service accepts what the client sends
    full = C.METHODS[name](*FULL_CALLS[name][0], **FULL_CALLS[name][1])
    assert all(full.params.get(p) is not None for p in declared)  # none dropped on the way


# --- two clients, one table ------------------------------------------------------------------------
def test_sync_and_async_clients_have_the_same_methods_and_signatures():
    for name in C.METHODS:
        sync, coro = getattr(C.Client, name), getattr(C.AsyncClient, name)
        assert inspect.signature(sync) == inspect.signature(coro), name
        assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(coro), name
        assert sync.__doc__ == coro.__doc__ == C.METHODS[name].__doc__
    # nothing beyond the table but the plumbing each needs
    plumbing = {"call", "close", "connect", "where", "broken", "instance_type"}
    for cls in (C.Client, C.AsyncClient):
        assert {n for n in dir(cls) if not n.startswith("_")} - plumbing == set(C.METHODS), cls


def test_sync_and_async_instances_have_the_same_methods_and_signatures():
    for name in C.INSTANCE_METHODS:
        sync, coro = getattr(C.Instance, name), getattr(C.AsyncInstance, name)
        assert inspect.signature(sync) == inspect.signature(coro), name
        assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(coro), name
        client_params = list(inspect.signature(C.METHODS[name]).parameters.values())
        assert list(inspect.signature(sync).parameters.values())[1:] == client_params[1:]  # id filled in


def test_module_level_spawn_takes_what_client_spawn_takes():
    module = list(inspect.signature(pool.spawn).parameters.values())
    method = list(inspect.signature(C.Client.spawn).parameters.values())[1:]  # without self
    assert module[0].name == "name" and method[0].name == "template"  # both names are public API
    assert module[1:] == method[1:]


@pytest.mark.parametrize("name", sorted(C.METHODS))
def test_both_clients_send_the_same_request_for_the_same_call(name):
    args, kwargs = FULL_CALLS[name]
    (sync_results, sync_sent), (async_results, async_sent) = both(
        lambda c: [getattr(c, name)(*args, **kwargs)])
    assert sync_sent == async_sent and len(sync_sent) == 1
    method, params, timeout = sync_sent[0]
    assert method == name and timeout is not None and timeout > 0
    if name == "spawn":
        assert type(sync_results[0]) is C.Instance and type(async_results[0]) is C.AsyncInstance
        assert vars(sync_results[0]) | {"_client": None} == vars(async_results[0]) | {"_client": None}
    else:
        assert sync_results == async_results


def test_spawn_returns_an_instance_served_by_and_its_older_name_path():
    (sync, _), (asynced, _) = both(lambda c: [c.spawn("py-hello")])
    for inst in (sync[0], asynced[0]):
        assert inst.served_by == inst.path == "restore"
        assert (inst.id, inst.pid, inst.node, inst.url) == ("i1", 42, "n1", "http://127.0.0.1:4000/")


def test_spawn_and_wait_give_the_rpc_slack_beyond_their_own_timeout():
    _, (_, sent) = both(lambda c: [c.spawn("t", timeout=7), c.wait("i", timeout=None),
                                   c.wait("i", timeout=3), c.ping()])
    assert [t for _, _, t in sent] == [7 + C.SPAWN_SLACK, None, 3 + C.SPAWN_SLACK,
                                       C.DEFAULT_CALL_TIMEOUT]


def test_instance_methods_go_through_their_client_with_the_id():
    sync_t = FakeTransport()
    inst = C.Client._over(sync_t).spawn("py-hello")
    got = [inst.kill(grace=1), inst.wait(2), inst.logs("stderr"), inst.info()]

    async def run_async():
        ac = C.AsyncClient._over(async_t)
        ainst = await ac.spawn("py-hello")
        return [await ainst.kill(grace=1), await ainst.wait(2), await ainst.logs("stderr"),
                await ainst.info()]
    async_t = AsyncFakeTransport()
    assert asyncio.run(run_async()) == got
    assert got[1] == 0 and got[2] == b"out" and got[3]["method"] == "info"   # wait/logs pick a field
    assert sync_t.requests == async_t.requests
    assert [(m, p["id"]) for m, p, _ in sync_t.requests[1:]] == [
        ("kill", "i1"), ("wait", "i1"), ("logs", "i1"), ("info", "i1")]


def test_both_clients_raise_the_transports_error_unchanged():
    err = errors.NoCapacity("full", free=0)
    with pytest.raises(errors.NoCapacity) as sync_err:
        C.Client._over(FakeTransport(err)).stats()
    assert sync_err.value is err

    async def run_async():
        await C.AsyncClient._over(AsyncFakeTransport(err)).stats()
    with pytest.raises(errors.NoCapacity) as async_err:
        asyncio.run(run_async())
    assert async_err.value is err


def test_close_and_context_managers_close_the_transport():
    t = FakeTransport()
    with C.Client._over(t):
        pass
    assert t.closed

    async def run_async():
        at = AsyncFakeTransport()
        async with C.AsyncClient._over(at):
            pass
        return at.closed
    assert asyncio.run(run_async())


# --- errors from a real server, in both clients --------------------------------------------------------
TOKEN = "client-token"
RAISED = {e.code: e for e in [
    errors.NoCapacity("pool is full", node="n1", free=0),
    errors.ShuttingDown("node n1 is shutting down", node="n1"),
    errors.PoolTimeout("template 't': no copy was ready within 1 s", template="t", timeout=1.0),
    errors.Quarantined("template 't' is quarantined", template="t", failures=3),
    errors.TemplateNotFound("t", where="the store"),
    errors.InstanceNotFound("i9"),
    errors.RestoreError("restoring with CRIU", "it broke", output_tail="last words"),
    errors.Incompatible("CRIU 3.17 < 3.19", node="n1"),
    errors.CriuFailed("restore", "no such file", errno=2, log_tail="Error: x"),
]}


async def _raise_by_id(method, params, ctx):
    if method == "info":
        if params["id"] == "bug":
            raise RuntimeError("a bug")
        raise RAISED[params["id"]]
    return "pong"


@pytest.fixture
def erring_server(serve_in_thread):
    _, path, _ = serve_in_thread(_raise_by_id, tokens={TOKEN})
    return path


def _check_decoded(got, sent):
    assert type(got) is type(sent)
    assert (got.code, got.message, got.data) == (sent.code, sent.message, sent.data)


@pytest.mark.parametrize("code", sorted(RAISED))
def test_errors_decode_from_the_wire_into_their_class_in_both_clients(erring_server, code):
    with pool.Client(erring_server, token=TOKEN) as c:
        with pytest.raises(errors.PoolError) as sync_err:
            c.info(code)
        assert c.ping() == "pong"  # an error reply leaves the connection usable
        # ... but after a NodeUnavailable pool.spawn() opens a new one (the service may be new)
        assert c.broken == isinstance(RAISED[code], errors.NodeUnavailable)

    async def run_async():
        async with await pool.AsyncClient.connect(erring_server, token=TOKEN) as ac:
            try:
                await ac.info(code)
            except errors.PoolError as e:
                return e
    _check_decoded(sync_err.value, RAISED[code])
    _check_decoded(asyncio.run(run_async()), RAISED[code])


def test_a_handler_bug_and_a_wrong_token_decode_in_both_clients(erring_server):
    with pool.Client(erring_server, token=TOKEN) as c:
        with pytest.raises(errors.InternalError, match="RuntimeError: a bug"):
            c.info("bug")
    with pytest.raises(errors.AuthError):
        pool.Client(erring_server, token="wrong")

    async def run_async():
        async with await pool.AsyncClient.connect(erring_server, token=TOKEN) as ac:
            with pytest.raises(errors.InternalError, match="RuntimeError: a bug"):
                await ac.info("bug")
        with pytest.raises(errors.AuthError):
            await pool.AsyncClient.connect(erring_server, token="wrong")
    asyncio.run(run_async())


def test_shutting_down_and_timeouts_keep_their_families_after_the_wire(erring_server):
    with pool.Client(erring_server, token=TOKEN) as c:
        with pytest.raises(errors.NodeUnavailable):   # what callers of old caught
            c.info("shutting_down")
        assert c.broken                               # pool.spawn() opens a new connection next time
        with pool.Client(erring_server, token=TOKEN) as c2, pytest.raises(TimeoutError):
            c2.info("timeout")


def test_no_service_is_node_unavailable_naming_the_socket(tmp_path):
    where = tmp_path / "none.sock"
    with pytest.raises(errors.NodeUnavailable, match="no pool service at .*none.sock") as e:
        pool.Client(where)
    assert e.value.data["socket"] == str(where)

    async def run_async():
        with pytest.raises(errors.NodeUnavailable, match="no pool service at .*none.sock"):
            await pool.AsyncClient.connect(where)
    asyncio.run(run_async())
