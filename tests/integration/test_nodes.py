"""Scheduling across nodes, for real: three `pool agent`s, each in its own lab host (network
namespace), and a coordinator in host n1 that knows them from its config (tests/poollab.py).
Real CRIU, real processes, real TCP between the namespaces.

Shown: spawns are spread and land where the template is cached; a first spawn on a cold node ships
the template; instance calls route to the instance's node; remote fork (eager and lazy) keeps the
memory state; an agent SIGKILLed mid-spawn or mid-transfer, a cut link, a corrupted image in
transit all end in a typed error or a rerouted spawn with nothing half-installed; every link is
mutual TLS: peers without a certificate of the cluster's CA, or with another node's, are refused in
the handshake (both directions), unauthenticated peers inside TLS get nothing but a refusal;
everything is cleaned up (the autouse leak check).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from poollab import AGENT_PORT, COORDINATOR, PoolLab
from tlscerts import Cluster
from replyshape import assert_shape

from pool.errors import NodeUnavailable, TemplateCorrupt, TlsError
from pool.templates.build import build
from pool.templates.spec import load_spec
from pool.templates.store import Store
from pool.wire import protocol as P
from pool.wire import replies as R
from pool.wire.rpc import RpcClient
from pool.wire.tls import TlsFiles

pytestmark = pytest.mark.integration
COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"


@pytest.fixture(scope="module")
def counter_big(session_store, criu):
    """counter with 48 MB of ballast: a transfer that takes long enough to interrupt."""
    spec = load_spec(COUNTER)
    spec = dataclasses.replace(spec, name="counter-big", env=spec.env + (("BALLAST_MB", "48"),))
    return build(spec, session_store, criu).template


def published(pl: PoolLab, host: str) -> list[str]:
    return Store(pl.agent_store(host)).names()


def part_files(pl: PoolLab, host: str) -> list[Path]:
    return list((pl.agent_store(host) / ".partial").rglob("*.part"))


def received_files(pl: PoolLab, host: str) -> list[Path]:
    """Files of a transfer in progress: verified ones and the .part being written."""
    return [p for p in (pl.agent_store(host) / ".partial").rglob("image/*") if p.is_file()]


def in_thread(fn):
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_spawns_spread_where_cached_and_a_cold_node_gets_the_template_shipped(pool_lab, counter):
    pl = pool_lab()
    with pl.client() as c:
        for host in ("n1", "n2"):
            r = assert_shape(c.push("counter", host), R.FetchResult)
            assert r["build_id"] == counter.build_id and r["files_sent"] > 0
            assert r["bytes_wire"] < r["bytes_raw"]                 # compressed on the wire
        assert assert_shape(c.push("counter", "n1"), R.FetchResult)["already_current"]
        insts = [c.spawn("counter") for _ in range(4)]
        assert sorted(i.node for i in insts) == ["n1", "n1", "n2", "n2"]  # cached, then free slots
        cold = assert_shape(c.call("spawn", {"template": "counter", "node": "n3", "timeout": 60.0}, 90),
                            R.SpawnReply)
        assert cold["node"] == "n3" and cold["shipped"]["files_sent"] > 0
        assert cold["shipped"]["build_id"] == counter.build_id
        assert published(pl, "n3") == ["counter"] and not part_files(pl, "n3")
        nodes = {r["name"]: r for r in assert_shape(c.nodes(), list[R.NodeView])}
        assert nodes["n3"]["templates"] == {"counter": counter.build_id}

        # instance calls go to the instance's node; ports are published on the node's address
        assert cold["address"].startswith(pl.lab.address("n3") + ":")
        assert pl.get(cold["address"], "/inc")["count"] == 1
        assert pl.get(insts[0].address)["instance"] == insts[0].id
        rows = assert_shape(c.list("counter"), list[R.CopyInfo])
        assert {(r["id"], r["node"]) for r in rows} == \
            {(i.id, i.node) for i in insts} | {(cold["id"], "n3")}
        assert c.info(cold["id"])["node"] == "n3"
        wait_for(lambda: b"serving" in c.logs(cold["id"])["data"], 10, "the copy's log line")
        for iid in [i.id for i in insts] + [cold["id"]]:
            assert c.kill(iid, grace=0)["exit_status"] is not None
        assert c.list() == []
        stats = assert_shape(c.stats(), R.ServiceStats)
        assert set(stats["nodes"]) == {"n1", "n2", "n3"}


def test_remote_fork_keeps_the_memory_state_and_gets_a_fresh_identity(pool_lab):
    pl = pool_lab()
    with pl.client() as c:
        orig = c.spawn("counter", node="n2")
        for _ in range(3):
            pl.get(orig.address, "/inc")
        fork = assert_shape(c.fork(orig.id, node="n3", hostname="forked-one"), R.ForkReply)
        assert fork["node"] == "n3" and fork["id"] != orig.id and fork["path"] == "restore"
        assert fork["forked_from"] == {"id": orig.id, "template": "counter", "node": "n2"}
        assert pl.get(fork["address"])["count"] == 3                # state as at the fork
        assert pl.get(fork["address"], "/inc")["count"] == 4        # and then its own
        assert pl.get(orig.address, "/inc")["count"] == 4           # the original kept running
        assert pl.get(orig.address)["count"] == 4
        assert hostname_of(fork["pid"]) == "forked-one"
        assert c.info(fork["id"])["node"] == "n3"
        # the source served its image once and dropped it; the target keeps it as a template
        assert published(pl, "n2") == ["counter"]
        assert fork["template"].startswith("counter+fork-")
        assert fork["template"] in published(pl, "n3")
        c.kill(fork["id"], grace=0)
        c.kill(orig.id, grace=0)


def hostname_of(pid: int) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()


def test_lazy_remote_fork_restores_at_once_and_fetches_the_memory(pool_lab, counter_big):
    pl = pool_lab()
    with pl.client() as c:
        orig = c.spawn("counter-big", node="n1", timeout=60)
        for _ in range(2):
            pl.get(orig.address, "/inc")
        checksum = pl.get(orig.address, "/sum", timeout=30)["sum"]
        fork = assert_shape(c.fork(orig.id, node="n2", lazy=True), R.ForkReply)
        assert fork["node"] == "n2" and fork["path"] == "lazy" and fork["lazy"]
        assert fork["image_bytes"] < counter_big.image_bytes / 4   # the memory came on demand
        assert pl.get(fork["address"], "/inc", timeout=30)["count"] == 3
        assert pl.get(fork["address"], "/sum", timeout=60)["sum"] == checksum
        # every page in: the lazy build is dropped on n2; the original resumes on n1
        wait_for(lambda: not any(n.startswith("counter-big-fork") for n in published(pl, "n2")),
                 60, "the lazy build to be dropped")
        assert pl.get(orig.address, "/inc", timeout=30)["count"] == 3
        c.kill(fork["id"], grace=0)
        c.kill(orig.id, grace=0)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return v


def test_agent_killed_mid_spawn_fails_it_typed_then_spawns_go_elsewhere_and_it_rejoins(pool_lab):
    pl = pool_lab()
    with pl.client() as c:
        for h in pl.lab.hosts:
            c.push("counter", h)
    agent = pl.agents["n2"]
    os.kill(agent.pid, signal.SIGSTOP)        # the spawn below is surely in flight on it
    with pl.client() as c:
        t, out = in_thread(lambda: c.spawn("counter", node="n2", timeout=30))
        time.sleep(0.3)
        pl.kill_agent("n2")
        t.join(30)
        assert isinstance(out.get("error"), NodeUnavailable), out
        assert out["seconds"] < 10
        pl.wait_nodes(lambda r: not r["n2"]["healthy"], 10, "n2 down")
        spawned = [c.spawn("counter") for _ in range(3)]
        assert all(i.node in ("n1", "n3") for i in spawned)
        with pytest.raises(NodeUnavailable):
            c.spawn("counter", node="n2")
        pl.start_agent("n2")                   # it comes back with its cache: rejoins
        pl.wait_nodes_up("n2")
        back = c.spawn("counter", node="n2")
        assert back.node == "n2" and pl.get(back.address)["instance"] == back.id
        for i in spawned + [back]:
            i.kill(grace=0)


def test_agent_killed_mid_transfer_leaves_nothing_half_installed_and_a_retry_works(
        pool_lab, counter_big):
    pl = pool_lab()
    with pl.client() as c:
        # The link to n3 passes the request and the start of the image, then stalls: the transfer is
        # surely in progress (received files in n3's partial dir) and cannot finish before the kill.
        pl.lab.stall_after("n3", 256 << 10)
        t, out = in_thread(lambda: c.spawn("counter-big", node="n3", timeout=60))
        wait_for(lambda: received_files(pl, "n3"), 30, "the transfer to start")
        pl.kill_agent("n3")
        t.join(30)
        assert isinstance(out.get("error"), NodeUnavailable), out
        assert published(pl, "n3") == []                       # nothing usable, nothing current
        pl.lab.unstall("n3")
        pl.start_agent("n3")
        pl.wait_nodes_up("n3")
        r = c.push("counter-big", "n3")                         # the retry resumes
        assert r["files_reused"] >= 1 and r["files_sent"] >= 1   # kept what it verified
        assert published(pl, "n3") == ["counter-big"] and not part_files(pl, "n3")
        Store(pl.agent_store("n3")).get("counter-big").verify(full=True)


def test_a_cut_link_fails_the_spawn_in_flight_then_spawns_avoid_the_node_until_it_is_back(pool_lab):
    pl = pool_lab()
    with pl.client() as c:
        c.push("counter", "n2")
        c.push("counter", "n3")
        pl.lab.link_down("n2")
        t0 = time.monotonic()
        with pytest.raises(NodeUnavailable):   # sent before the heartbeat noticed: no hang
            c.spawn("counter", node="n2", timeout=60)
        assert time.monotonic() - t0 < 15
        pl.wait_nodes(lambda r: not r["n2"]["healthy"], 10, "n2 down")
        moved = c.spawn("counter")
        assert moved.node == "n3"
        pl.lab.link_up("n2")
        pl.wait_nodes_up("n2", timeout=30)
        back = c.spawn("counter", node="n2")
        assert pl.get(back.address)["instance"] == back.id
        moved.kill(grace=0)
        back.kill(grace=0)
        assert c.list() == []


def test_an_image_corrupted_in_transit_is_refused_and_nothing_is_installed(pool_lab, counter,
                                                                           session_store, tmp_path):
    bad = tmp_path / "bad-store"
    shutil.copytree(session_store.root / "counter", bad / "counter", symlinks=True)
    victim = max((bad / "counter" / "current" / "image").iterdir(), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:            # same size, one byte flipped: only sha256 can tell
        f.seek(victim.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    pl = pool_lab(store_root=bad)
    with pl.client() as c:
        with pytest.raises(TemplateCorrupt) as e:
            c.spawn("counter", node="n2", timeout=60)
        assert victim.name in e.value.message
        with pytest.raises(TemplateCorrupt):
            c.push("counter", "n3")
        for h in ("n2", "n3"):
            assert published(pl, h) == [] and not part_files(pl, h)
        assert c.list() == []


def _raw(pl: PoolLab, host: str, data: bytes, tls: bool = True) -> list[dict]:
    """Send data to host's agent from n1 (inside TLS with the coordinator's certificate, or in
    clear); every frame it answers until it closes."""
    s = pl.lab.connect("n1", host, AGENT_PORT, timeout=5)
    if tls:
        s = pl.certs.node(COORDINATOR).client_context().wrap_socket(s, server_hostname=host)
    try:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    except (ConnectionResetError, socket.timeout, ssl.SSLError):
        pass
    finally:
        s.close()
    return P.FrameDecoder().feed(got)


def _connect_from_n1(pl: PoolLab, host: str, tls: TlsFiles, token: str,
                     expect: str | None = None) -> None:
    """An RPC connection from inside n1 to host's agent with tls's certificate, expecting node
    `expect` (default host) there; raises its error."""
    expect = expect or host

    async def go():
        sock = pl.lab.socket("n1")
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (pl.lab.address(host), AGENT_PORT))
        except BaseException:
            sock.close()
            raise
        client = await RpcClient._connect(
            host, lambda: asyncio.open_connection(sock=sock, ssl=tls.client_context(),
                                                  server_hostname=expect),
            token, 5.0, "rogue", server_name=expect)
        await client.close()
    asyncio.run(go())


def test_unauthenticated_or_wrong_token_peers_get_only_a_refusal(pool_lab):
    """Inside TLS (the coordinator's certificate) the token is checked as before; a peer in clear
    or with a certificate of another CA (a rogue coordinator) gets no frame at all."""
    pl = pool_lab()
    token = pl.token_file("n2").read_text().strip()
    ping = P.encode_frame(P.make_hello(token, "x")) + P.encode_frame(P.make_request(2, "list", {}))
    assert _raw(pl, "n2", ping, tls=False) == []            # plaintext: nothing, not even a refusal
    rogue = pl.certs.impostor(Cluster(pl.workdir / "rogue-ca"), COORDINATOR)
    with pytest.raises(TlsError, match="does not accept our certificate"):
        _connect_from_n1(pl, "n2", TlsFiles.load(rogue), token)
    with pytest.raises(TlsError, match="does not name 'n2'"):       # n3's agent is not n2
        _connect_from_n1(pl, "n3", pl.certs.node(COORDINATOR), token, expect="n2")
    spawn = P.encode_frame(P.make_request(1, "spawn", {"template": "counter"}))
    list_ = P.encode_frame(P.make_request(2, "list", {}))
    for hello in (P.make_hello("wrong-token-0123456789", "x"), P.make_hello(None, "x")):
        frames = _raw(pl, "n2", P.encode_frame(hello) + spawn + list_)
        assert len(frames) == 1 and frames[0]["id"] == 0
        assert frames[0]["error"]["code"] == "auth_failed"
    frames = _raw(pl, "n2", spawn)             # no hello at all
    assert len(frames) == 1 and frames[0]["error"]["code"] == "protocol_error"
    token = pl.token_file("n2").read_text().strip()
    frames = _raw(pl, "n2", P.encode_frame(P.make_hello(token, "x")) + list_)
    assert frames[0]["hello"] == "pool" and frames[1] == {"id": 2, "result": []}
    # the agent refuses coordinator methods, and the coordinator refuses node methods
    frames = _raw(pl, "n2", P.encode_frame(P.make_hello(token, "x"))
                  + P.encode_frame(P.make_request(3, "nodes", {})))
    assert frames[1]["error"]["code"] == "bad_request"
    with pl.client() as c:
        with pytest.raises(Exception) as e:
            c.call("fetch_template", {"name": "counter", "source": "1.2.3.4:5"})
        assert getattr(e.value, "code", "") == "bad_request"


def test_a_rogue_agent_is_refused_by_the_coordinator_and_the_node_stays_down(pool_lab):
    """At n3's address: an agent with n2's certificate (the cluster's CA, another name), then one
    whose certificate another CA signed. The coordinator refuses both in the handshake and says why;
    the real agent back, n3 is up again."""
    pl = pool_lab()
    pl.kill_agent("n3")
    pl.wait_nodes(lambda rows: not rows["n3"]["healthy"], what="n3 down")
    rogue_ca = Cluster(pl.workdir / "rogue-ca")
    for tls_dir, name, problem in [(pl.certs.dir("n2"), "n2", "does not name 'n3'"),
                                   (rogue_ca.dir("n3"), "n3", "not signed by this cluster's CA")]:
        pl.start_agent("n3", tls_dir=tls_dir, name=name)
        rows = pl.wait_nodes(lambda rows: problem in (rows["n3"]["last_error"] or ""),
                             what=f"n3 refused: {problem}")
        assert not rows["n3"]["healthy"] and "TLS handshake" in rows["n3"]["last_error"]
        with pl.client() as c:
            with pytest.raises(NodeUnavailable):
                c.spawn("counter", node="n3", timeout=30)
        pl.kill_agent("n3")
    pl.start_agent("n3")
    pl.wait_nodes_up("n3")
