"""A cluster on etcd, for real: Debian's etcd started by the test in a tmp data dir (on loopback for
the client alone; in lab host n1 for the netns lab, where agents in n2 and n3 reach it) and always
stopped; `pool agent --etcd` in every lab host, one or two `pool serve --etcd` coordinators in n1.

Shown: the client's transactions, leases, watch and its typed error when etcd is down; agents join
by themselves and leave when their lease expires (SIGKILL) or at once (SIGTERM); `pool nodes` shows
the etcd view; two coordinators spawn at once onto the same cold agents with one transfer per
(agent, template); after a kill -9 of one, the other lists, forks and kills every copy, and the
killed one restarted finds what is left; etcd stopped while a spawn is in flight (its copy running
on the agent, its route not yet written: held there by routegate/sitecustomize.py) is a typed error
that leaves no copy behind, and once etcd is back the next spawn works and every copy is listed and
killed.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from etcdlab import EtcdServer, in_lab
from netlab import NetLab, wait_until
from poollab import PoolLab
from replyshape import assert_shape

from pool.cli.demo import ROOT
from pool.cluster.etcd import Etcd, parse_endpoints
from pool.cluster.etcdstate import LeasedKey
from pool.errors import Conflict, NodeUnavailable
from pool.wire import replies as R

ROUTE_GATE = Path(__file__).parent / "routegate"   # sitecustomize holding a spawn at set_route

pytestmark = pytest.mark.integration


# -- the client alone, against etcd on loopback -------------------------------------------------------
def test_the_client_speaks_etcd_transactions_leases_and_watch(tmp_path):
    with EtcdServer(tmp_path / "etcd") as server:
        async def scenario():
            etcd = Etcd(parse_endpoints(f"http://127.0.0.1:1,{server.url}"))  # a dead one first
            lease = await etcd.grant(2)
            won, holder, rev = await etcd.create("/t/lock", "a", lease)
            assert won and holder is None
            won, holder, _ = await etcd.create("/t/lock", "b")        # the txn loses
            assert not won and holder.value == "a" and holder.lease == lease
            seen = []

            async def follow():
                async for ev in etcd.watch("/t/", rev + 1, prefix=True):
                    seen.append((ev.kind, ev.kv.key))
                    if ev.kind == "delete":
                        return

            # the lease expires unrenewed: its key goes, and the watch sees it go
            await etcd.put("/t/other", "x")
            await asyncio.wait_for(follow(), 30)
            assert seen == [("put", "/t/other"), ("delete", "/t/lock")]
            assert await etcd.keepalive(lease) == 0
            # a registration: a second holder of the same key is a Conflict; revoking frees it
            first = LeasedKey(etcd, "/t/agents/n1", 5, lambda: _value("10.0.0.1:7070"))
            await first.start()
            second = LeasedKey(etcd, "/t/agents/n1", 5, lambda: _value("10.0.0.9:7070"))
            with pytest.raises(Conflict, match="/t/agents/n1 is already held"):
                await second.start()
            await first.close()
            assert await etcd.get("/t/agents/n1") is None
            return etcd

        etcd = asyncio.run(scenario())
    with pytest.raises(NodeUnavailable, match=re.escape(server.url)) as err:
        asyncio.run(etcd.range("/t/", prefix=True))
    assert server.url in err.value.data["endpoint"]


async def _value(address: str) -> str:
    return f'{{"address": "{address}"}}'


# -- the netns lab --------------------------------------------------------------------------------------
@pytest.fixture
def etcd_lab(session_store, counter, tmp_path):
    """(NetLab(3), etcd in n1, a PoolLab on it with no agent or coordinator started yet)."""
    with NetLab(3) as lab:
        server = in_lab(lab, "n1", tmp_path / "etcd")
        try:
            server.start()
            pl = PoolLab(lab, session_store.root, tmp_path / "pool", etcd=server.url, etcd_ttl=3)
            try:
                yield lab, server, pl
            finally:
                pl.close()
        finally:
            server.stop()


def names(pl: PoolLab, coordinator: str = "coordinator") -> set[str]:
    with pl.client(coordinator) as c:
        return {r["name"] for r in c.nodes()}


def transfers(pl: PoolLab, host: str, template: str) -> int:
    """Templates host's agent fetched for real (not `already current`)."""
    return sum(1 for line in pl.log(host).splitlines()
               if f"fetched {template} (build" in line and "already current" not in line)


def test_agents_join_by_themselves_and_leave_with_their_lease(etcd_lab):
    lab, server, pl = etcd_lab
    for h in lab.hosts:
        pl.start_agent(h)
    pl.start_coordinator()
    rows = pl.wait_nodes_up(*lab.hosts)
    for h in lab.hosts:
        lease = assert_shape(rows[h], R.NodeView)["lease"]
        assert lease["id"] and lease["ttl"] > 0
    with pl.client() as c:
        cluster = assert_shape(c.stats(), R.ServiceStats)["cluster"]
    assert cluster["endpoints"] == [server.url] and cluster["error"] is None
    assert [m["client_urls"] for m in cluster["members"]] == [[server.url]]
    assert [co["me"] for co in cluster["coordinators"]] == [True]
    assert sorted(cluster["leases"]) == lab.hosts
    out = subprocess.run([sys.executable, "-m", "pool.cli", "nodes", "--socket", str(pl.socket)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "LEASE" in out and "COORDINATOR" in out and "(this one)" in out and server.url in out
    # SIGKILL: nobody revokes the lease; the node goes when it expires
    pl.kill_agent("n3")
    pl.wait_nodes(lambda r: "n3" not in r, 30, "n3 gone after its lease expired")
    # SIGTERM: the agent revokes its lease as it leaves
    assert pl.stop_agent("n2") == 0
    pl.wait_nodes(lambda r: "n2" not in r, 30, "n2 gone")
    pl.start_agent("n3")                                         # and joins again by itself
    pl.wait_nodes_up("n3")
    assert names(pl) == {"n1", "n3"}


def test_two_coordinators_spawn_on_the_same_agents_and_survive_a_kill(etcd_lab):
    lab, server, pl = etcd_lab
    for h in lab.hosts:
        pl.start_agent(h)          # fresh stores: every agent lacks counter
    pl.start_coordinator()
    pl.start_coordinator("c2")
    for co in ("coordinator", "c2"):
        pl.wait_nodes_up(*lab.hosts, coordinator=co)
    spawned: dict[str, list] = {"coordinator": [], "c2": []}
    errors: list = []
    start = threading.Barrier(2)

    def spawn_through(co: str) -> None:
        try:
            with pl.client(co) as c:
                start.wait(10)
                for i in range(6):   # every node, both coordinators at the same time
                    spawned[co].append(c.spawn("counter", node=lab.hosts[i % 3], timeout=60))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=spawn_through, args=(co,)) for co in spawned]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    # one transfer per (agent, template), whichever coordinator won the ship lock
    assert {h: transfers(pl, h, "counter") for h in lab.hosts} == {h: 1 for h in lab.hosts}
    ids = {i.id for batch in spawned.values() for i in batch}
    assert len(ids) == 12
    for co in spawned:
        with pl.client(co) as c:
            assert {r["id"] for r in c.list("counter")} == ids
    mine = spawned["coordinator"][0]
    pl.get(mine.address, "/inc")
    pl.get(mine.address, "/inc")
    killed = f"{socket.gethostname()}-{pl.coordinator.pid}"       # its id in etcd
    pl.kill_coordinator()                                        # kill -9
    with pl.client("c2") as c:
        assert {r["id"] for r in c.list("counter")} == ids
        assert c.info(mine.id)["node"] == mine.node                # routed from etcd
        fork = c.fork(mine.id, node="n3")
        assert pl.get(fork["address"])["count"] == 2             # its memory came along
        for inst in spawned["coordinator"]:
            assert c.kill(inst.id, grace=0)["id"] == inst.id
    pl.start_coordinator()                                       # the killed one, restarted
    pl.wait_nodes_up(*lab.hosts)                                 # found in etcd, connected
    left = {i.id for i in spawned["c2"]} | {fork["id"]}
    with pl.client() as c:
        assert {r["id"] for r in c.list()} == left
        for iid in left:
            c.kill(iid, grace=0)
        assert c.list() == []

        def coordinators_once_killed_is_gone() -> set[str] | None:
            up = {co["id"] for co in c.stats()["cluster"]["coordinators"]}
            return None if killed in up else up

        # the killed coordinator goes when its lease expires; the restarted one and c2 are up
        up = wait_until(coordinators_once_killed_is_gone, 30)
        assert up == {f"{socket.gethostname()}-{p.pid}" for p in (pl.coordinator,
                                                                    pl.coordinators["c2"])}


def test_etcd_stopped_during_a_spawn_is_a_typed_error_and_leaves_no_copy(etcd_lab, tmp_path):
    """The spawn is held (routegate/sitecustomize.py) once its copy runs on n2 and before the
    coordinator records the route; etcd is stopped then, and the spawn released."""
    lab, server, pl = etcd_lab
    gate = tmp_path / "gate"
    gate.mkdir()
    for h in ("n2", "n3"):
        pl.start_agent(h)
    pl.env["POOL_TEST_ROUTE_GATE"] = str(gate)
    pl.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROUTE_GATE),
                                                         os.environ.get("PYTHONPATH")]))
    pl.start_coordinator()
    pl.wait_nodes_up("n2", "n3")
    held: dict = {}

    def spawn_held() -> None:
        try:
            with pl.client() as held_client:
                held["reply"] = held_client.spawn("counter", node="n2", timeout=60)
        except BaseException as e:  # noqa: BLE001  asserted below
            held["error"] = e

    with pl.client() as c:
        before = [c.spawn("counter", node="n2").id, c.spawn("counter", node="n3").id]
        (gate / "armed").touch()
        spawning = threading.Thread(target=spawn_held)
        spawning.start()
        try:
            reached = wait_until(lambda: (gate / "reached").exists() or not spawning.is_alive(), 60)
            assert reached and (gate / "reached").exists(), (held, pl.log("coordinator")[-2000:])
            in_flight = (gate / "reached").read_text()
            # the copy is running on its agent, not yet routed: the moment a lost copy would be made
            assert in_flight in {r["id"] for r in c.list("counter") if r["node"] == "n2"}
            assert spawning.is_alive()
            server.stop()
        finally:
            (gate / "release").touch()
            spawning.join(90)
        assert not spawning.is_alive()
        assert "reply" not in held, held
        assert isinstance(held["error"], NodeUnavailable), held
        assert server.url in str(held["error"])
        # the copy that could not be routed was killed on its agent: only the routed ones live
        listed = c.list("counter")
        assert sorted(r["id"] for r in listed) == sorted(before)
        assert {r["node"] for r in listed} == {"n2", "n3"}     # both agents answered the list
        server.start()
        after = wait_until(lambda: _spawn_or_none(c), timeout=30, interval=0.2)
        assert after is not None, pl.log("coordinator")[-2000:]
        assert after.id != in_flight
        everything = sorted([*before, after.id])
        assert sorted(r["id"] for r in c.list("counter")) == everything
        for iid in everything:
            c.kill(iid, grace=0)
        assert c.list("counter") == []


def _spawn_or_none(c):
    try:
        return c.spawn("counter", node="n2")
    except NodeUnavailable:   # etcd is not back yet (or its watch not yet re-read)
        return None
