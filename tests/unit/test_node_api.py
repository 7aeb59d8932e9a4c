"""The node API (pool.node.api) over a NodeRuntime with a fake restorer (tests/nodefakes.py): the
node's real table, supervisor, pools and executor; copies whose process is a pipe. No CRIU."""
import asyncio
import signal
from dataclasses import fields

import pytest
from nodefakes import FakeMetrics, FakeRestorer

from pool.cluster.config import load_config
from pool.errors import BadRequest, InstanceNotFound, NoCapacity, ShuttingDown
from pool.node.runtime import NodeRuntime
from pool.node.settings import NodeSettings
from pool.node.table import CopyState
from pool.node.warm import WarmSettings

SPAWN_KEYS = {"id", "template", "pid", "address", "path", "node", "spawn_ms"}


def fixed(min_warm=0, **kw) -> WarmSettings:
    """A pool that keeps exactly min_warm ready (max_warm = min_warm): these tests count restores;
    demand-following pools are tested in test_warm.py and test_demand.py."""
    return WarmSettings(min_warm=min_warm, **{"max_warm": min_warm, **kw})


def node(tmp_path, capacity=2, **templates):
    settings = NodeSettings(store=tmp_path / "store", run_dir=tmp_path, capacity=capacity,
                            kill_grace=0.5, drain_timeout=1.0, defaults=fixed(),
                            templates={n: fixed(**kw) for n, kw in templates.items()})
    restorer = FakeRestorer(tmp_path, *(templates or {"t": {}}))
    return NodeRuntime(settings, FakeMetrics(), name="n1", restorer=restorer)


def run(rt, test):
    """test(rt, api) on a started runtime, then stopped (its copies killed and reaped)."""
    async def go():
        await rt.start()
        try:
            await test(rt, rt.api)
        finally:
            await rt.stop()
    asyncio.run(asyncio.wait_for(go(), 30))


async def spawn(api, template="t", timeout=5.0):
    return await api.handle("spawn", {"template": template, "env": {"A": "1"}, "args": ["x"],
                                      "timeout": timeout})


def test_spawn_list_info_kill_reply_shapes(tmp_path):
    async def test(rt, api):
        r = await spawn(api)
        assert set(r) == SPAWN_KEYS
        assert r["template"] == "t" and r["node"] == "n1" and r["path"] == "restore"
        (inst,) = rt.restorer.made
        assert r["id"] == inst.id and r["pid"] == inst.pid
        assert inst.env_keys == ["A"] and inst.args == ["x"] and inst.state == "running"

        (listed,) = await api.handle("list", {"template": None})
        assert listed["id"] == r["id"] and listed["node"] == "n1" and listed["end_cause"] is None
        assert listed["state"] == "running" and listed["uptime_s"] >= 0
        assert await api.handle("list", {"template": "other"}) == []

        info = await api.handle("info", {"id": r["id"]})
        assert set(info["stats"]) == {"rss_bytes", "pss_bytes", "cpu_s", "processes", "memory_bytes",
                                      "memory_limit_bytes"}

        killed = await api.handle("kill", {"id": r["id"], "grace": 1.0})
        assert inst.signals == [signal.SIGTERM]
        assert killed["state"] == "exited" and killed["end_cause"] == "killed"
        assert killed["exit_status"] == -signal.SIGTERM and killed["exited_at"] is not None
        assert "uptime_s" not in killed and "stats" not in await api.handle("info", {"id": r["id"]})
        assert await api.handle("list", {"template": None}) == []
        assert (await api.handle("stats", {}))["exited_kept"] == 1
    run(node(tmp_path, t={}), test)


def test_kill_and_info_of_an_unknown_id_are_instance_not_found(tmp_path):
    async def test(rt, api):
        for method, params in (("kill", {"id": "nope", "grace": 1.0}), ("info", {"id": "nope"}),
                               ("wait", {"id": "nope", "timeout": 0})):
            with pytest.raises(InstanceNotFound):
                await api.handle(method, params)
        with pytest.raises(BadRequest):
            await api.handle("no_such_method", {})
    run(node(tmp_path, t={}), test)


def test_capacity_is_enforced_across_spawns(tmp_path):
    async def test(rt, api):
        a, b = await spawn(api), await spawn(api)
        with pytest.raises(NoCapacity) as e:
            await spawn(api, timeout=0.2)
        assert e.value.data["limit"] == "capacity"
        facts_free = rt.free()
        assert facts_free == 0 and rt.table.live_count() == 2
        await api.handle("kill", {"id": a["id"], "grace": 1.0})
        c = await spawn(api)  # room again
        assert c["id"] not in (a["id"], b["id"])
    run(node(tmp_path, capacity=2, t={"max_live": 8}), test)


def test_set_warm_fills_the_pool_and_a_spawn_takes_a_warm_copy(tmp_path):
    async def test(rt, api):
        snap = await api.handle("set_warm", {"template": "t", "min_warm": 1})
        assert snap["min_warm"] == 1
        while rt.pools.by_name["t"].warm < 1:
            await asyncio.sleep(0.01)
        (warm,) = rt.table
        assert warm.state is CopyState.WARM
        r = await spawn(api)
        assert r["path"] == "warm" and r["id"] == warm.inst.id
        assert warm.state is CopyState.LIVE
    run(node(tmp_path, capacity=4, t={}), test)


def test_set_warm_above_capacity_is_refused_naming_min_warm(tmp_path):
    async def test(rt, api):
        await api.handle("set_warm", {"template": "t", "min_warm": 2})
        with pytest.raises(BadRequest) as e:
            await api.handle("set_warm", {"template": "u", "min_warm": 2})
        assert e.value.data["param"] == "min_warm"
        assert e.value.data["capacity"] == 3 and e.value.data["warm_elsewhere"] == 2
        assert "min_warm 2" in e.value.message
        assert rt.pools.by_name["u"].settings.min_warm == 0  # unchanged
        with pytest.raises(BadRequest) as e:  # beyond its own max_live
            await api.handle("set_warm", {"template": "t", "min_warm": 9})
        assert e.value.data["param"] == "min_warm"
    run(node(tmp_path, capacity=3, t={"max_live": 4}, u={"max_live": 4}), test)


def test_stats_reply(tmp_path):
    async def test(rt, api):
        r = await spawn(api)
        s = await api.handle("stats", {})
        assert s["node"] == "n1" and s["draining"] is False and s["spawns_in_flight"] == 0
        assert s["live"] == 1 and s["copies"] == 1 and s["exited_kept"] == 0
        assert s["store"] == str(tmp_path / "store")
        t = s["templates"]["t"]
        assert t["live"] == 1 and t["spawns"] == {"warm": 0, "restore": 1}
        assert r["id"] in {c["id"] for c in await api.handle("list", {"template": "t"})}
    run(node(tmp_path, t={}), test)


def test_draining_refuses_new_spawns_and_ends_the_copies(tmp_path):
    async def test(rt, api):
        r = await spawn(api)
        (inst,) = rt.restorer.made
        await rt.drain(asyncio.Event())
        assert inst.signals == [signal.SIGTERM] and rt.table.find(r["id"]).exited
        assert (await api.handle("ping", {}))["draining"] is True
        with pytest.raises(ShuttingDown):
            await spawn(api)
        with pytest.raises(ShuttingDown):
            await api.handle("set_warm", {"template": "t", "min_warm": 1})
    run(node(tmp_path, t={}), test)


def test_the_service_config_makes_the_node_settings(tmp_path):
    cfg_file = tmp_path / "pool.toml"
    cfg_file.write_text('[service]\ncapacity = 5\nkill_grace = 1.5\non_shutdown = "leave"\n'
                        'max_live = 7\n[templates.t]\nmin_warm = 2\nttl = 9\n')
    cfg = load_config(cfg_file, store=str(tmp_path / "s"))
    s = cfg.node_settings()
    for f in fields(NodeSettings):  # every node setting comes from the service's own
        assert getattr(s, f.name) == getattr(cfg, f.name), f.name
    assert s.capacity == 5 and s.on_shutdown == "leave" and s.store == tmp_path / "s"
    assert s.warm_settings("t") == WarmSettings(min_warm=2, max_live=7, ttl=9.0)
    assert s.warm_settings("other") == WarmSettings(0, 7)
