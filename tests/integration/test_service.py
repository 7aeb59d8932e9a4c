"""The pool service as a real subprocess with real CRIU: clients, CLI, capacity, quarantine, drain,
leaks. The service runs on a private socket, run dir and (shared, read-only) store."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import psutil
import pytest
from replyshape import assert_shape
from servicelab import POOL, cgroup_name, cli, copies_of, wait_until

import pool
from pool.cli.demo import PROBES, LocalService, ask
from pool.cr import cgroups
from pool.errors import NoCapacity, Quarantined
from pool.wire import replies as R

pytestmark = pytest.mark.integration


def test_spawn_kill_wait_logs_list_with_the_python_client(service, monkeypatch):
    # a fixed pool (max_warm 0: never above min_warm), so that set-warm 0 below empties it
    svc = service("[templates.py-hello]\nmin_warm = 2\nmax_warm = 0\nmax_live = 32\n")
    svc.wait_warm("py-hello", 2)
    with svc.client() as c:
        inst = c.spawn("py-hello", env={"GREETING": "hi"}, args=["one", "two"], hostname="copy-a")
        assert inst.served_by == "warm" and inst.node == "local" and inst.template == "py-hello"
        assert inst.path == "warm"                     # the older name of served_by
        assert inst.address.startswith("127.0.0.1:") and inst.spawn_ms > 0
        body = ask(inst.address, PROBES["py-hello"])
        assert body["instance"] == inst.id and body["args"] == ["one", "two"]
        assert body["greeting"] == "hi" and body["hostname"] == "copy-a"
        assert [r["id"] for r in c.list("py-hello")] == [inst.id]
        info = inst.info()
        assert info["state"] == "running" and info["stats"]["rss_bytes"] > 0
        wait_until(lambda: b"serving" in inst.logs(), what="the copy's log line")
        assert inst.wait(timeout=0.2) is None          # still running
        assert inst.kill()["exit_status"] == 143       # SIGTERM through tini
        assert inst.wait() == 143
        assert c.list() == []
        after = inst.info()                            # kept for a while after exit
        assert after["state"] == "exited" and after["end_cause"] == "killed"
        assert b"serving" in inst.logs()

        c.set_warm("py-hello", 0)                      # a miss: restored on demand
        svc.wait_warm("py-hello", 0)
        miss = c.spawn("py-hello")
        assert miss.served_by == miss.path == "restore"
        assert ask(miss.address, PROBES["py-hello"])["instance"] == miss.id
        miss.kill(grace=0)

        with pytest.raises(pool.TemplateNotFound):
            c.spawn("no-such-template")
        with pytest.raises(pool.InstanceNotFound):
            c.info("nope")

    monkeypatch.setenv("POOL_SOCKET", str(svc.socket))  # the module-level API
    try:
        inst = pool.spawn("py-hello", args=["x"], node="local")
        assert ask(inst.address, PROBES["py-hello"])["args"] == ["x"] and inst.node == "local"
        inst.kill(grace=0)
    finally:
        pool.close_default()

    async def with_async_client():
        async with await pool.AsyncClient.connect(svc.socket) as ac:
            insts = await asyncio.gather(*(ac.spawn("py-hello") for _ in range(3)))
            assert len({i.id for i in insts}) == 3
            assert all(i.served_by in ("warm", "restore") for i in insts)
            await asyncio.gather(*(i.kill(grace=0) for i in insts))
            statuses = await asyncio.gather(*(i.wait() for i in insts))
            assert all(s is not None for s in statuses)
    asyncio.run(with_async_client())


def test_cli_commands(service):
    svc = service()
    svc.wait_warm("py-hello", 1)
    r = cli(svc, "spawn", "py-hello", "--env", "GREETING=cli", "--json", "--", "a1", "a2")
    inst = json.loads(r.stdout)
    assert inst["path"] == inst["served_by"] and inst["path"] in ("warm", "restore")
    body = ask(inst["address"], PROBES["py-hello"])
    assert body["args"] == ["a1", "a2"] and body["greeting"] == "cli"
    rows = json.loads(cli(svc, "ls", "--json").stdout)
    assert [row["id"] for row in rows] == [inst["id"]]
    assert inst["id"] in cli(svc, "ls").stdout
    wait_until(lambda: "serving" in cli(svc, "logs", inst["id"]).stdout, what="log line")
    assert cli(svc, "logs", "--stderr", inst["id"]).returncode == 0
    stats = json.loads(cli(svc, "stats", "--json").stdout)
    assert stats["templates"]["py-hello"]["live"] == 1
    assert "py-hello" in cli(svc, "stats").stdout
    assert "exit status" in cli(svc, "kill", inst["id"]).stdout
    follow = cli(svc, "logs", "-f", inst["id"])         # returns at once: the copy has exited
    assert "serving" in follow.stdout
    assert "min_warm 3" in cli(svc, "set-warm", "py-hello", "3").stdout

    gone = dict(svc.env, POOL_SOCKET=str(svc.workdir / "nobody.sock"))
    r = subprocess.run([POOL, "ls"], env=gone, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(f"pool ls: no pool service at {svc.workdir / 'nobody.sock'}: start "
                               "one with `pool serve`")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_json_everywhere_many_ids_and_clear_errors(service):
    """--json on every verb that prints data; `kill A B C` reports each ID and fails if one did;
    a socket the user may not open says so instead of "start `pool serve`"."""
    svc = service()
    svc.wait_warm("py-hello", 1)
    a, b = (json.loads(cli(svc, "spawn", "py-hello", "--json").stdout) for _ in range(2))
    r = cli(svc, "kill", a["id"], "no-such-id", b["id"], "--grace", "0", "--json", check=False)
    assert r.returncode == 1
    results = json.loads(r.stdout)
    assert [x["id"] for x in results] == [a["id"], "no-such-id", b["id"]]
    assert [x["ok"] for x in results] == [True, False, True]
    assert results[1]["error"] == "instance_not_found"
    r = cli(svc, "kill", "gone-1", "gone-2", check=False)   # plain output: one line per failure
    assert r.returncode == 1 and r.stderr.count("pool kill: gone-") == 2
    logs = json.loads(cli(svc, "logs", a["id"], "--json").stdout)
    assert logs["exited"] and "serving" in logs["text"]
    warm = json.loads(cli(svc, "set-warm", "py-hello", "2", "--json").stdout)
    assert warm["min_warm"] == 2
    assert "TARGET" in cli(svc, "stats").stdout

    # a socket this user cannot open: the error names the permission, not a missing service
    nobody = dict(svc.env, POOL_SOCKET=str(svc.socket))
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", POOL, "ls"],
                       env=nobody, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith(f"pool ls: permission denied on {svc.socket}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_instance_used_as_a_context_manager_is_killed_on_exit(service):
    svc = service()
    svc.wait_warm("py-hello", 1)
    with svc.client() as c:
        with c.spawn("py-hello") as inst:
            assert ask(inst.address, PROBES["py-hello"])
        assert inst.info()["end_cause"] == "killed"
        assert c.list("py-hello") == []

    async def with_async_client() -> str:
        async with await pool.AsyncClient.connect(str(svc.socket)) as ac:
            async with await ac.spawn("py-hello") as ainst:
                assert ainst.pid > 0
            return (await ainst.info())["end_cause"]
    assert asyncio.run(with_async_client()) == "killed"


def test_every_reply_has_the_shape_its_type_declares(service):
    # the client's static types (pool/wire/replies.py) hold for what a real service sends
    svc = service()
    svc.wait_warm("py-hello", 1)
    with svc.client() as c:
        assert_shape(c.ping(), R.Pong)
        secret = "s3cret-" + os.urandom(8).hex()
        spawned = assert_shape(c.call("spawn", {"template": "py-hello", "env": {"API_KEY": secret},
                                                "args": [], "timeout": 30.0}, 35), R.SpawnReply)
        iid = spawned["id"]
        info = assert_shape(c.info(iid), R.CopyInfo)
        assert "stats" in info and info["env_keys"] == ["API_KEY"]
        # env values are secrets: never in a reply, nor in what the service keeps on disk
        assert secret not in repr(info) + repr(c.list()) + repr(c.stats())
        assert not [f for f in (svc.workdir / "run").rglob("*.json") if secret in f.read_text()]
        assert [r["id"] for r in assert_shape(c.list(), list[R.CopyInfo])] == [iid]
        wait_until(lambda: assert_shape(c.logs(iid), R.LogChunk)["data"], what="the copy's log")
        assert assert_shape(c.wait(iid, timeout=0.1), R.CopyInfo)["exit_status"] is None
        assert assert_shape(c.set_warm("py-hello", 1), R.PoolFigures)["min_warm"] == 1
        assert assert_shape(c.stats(), R.ServiceStats)["templates"]["py-hello"]["live"] == 1
        assert {t["name"] for t in assert_shape(c.templates(), list[R.TemplateInfo])} >= {"py-hello"}
        assert [n["name"] for n in assert_shape(c.nodes(), list[R.NodeView])] == ["local"]
        assert assert_shape(c.kill(iid, grace=0), R.CopyInfo)["end_cause"] == "killed"
        assert assert_shape(c.info(iid), R.CopyInfo)["exited_at"] is not None


def _service_fds(pid):
    return psutil.Process(pid).num_fds()


def test_200_spawns_from_a_warm_pool_leak_nothing(service):
    svc = service("[templates.py-hello]\nmin_warm = 4\nmax_warm = 4\nmax_live = 16\n"  # fixed: it counts copies
                  "[service]\nexited_history = 50\n")
    svc.wait_warm("py-hello", 4)
    fds_before, kids_before = _service_fds(svc.pid), copies_of(svc.pid)
    assert len(kids_before) == 4
    paths = {"warm": 0, "restore": 0}
    with svc.client() as c:
        for _ in range(200):
            inst = c.spawn("py-hello")
            paths[inst.path] += 1
            inst.kill(grace=0)
        svc.wait_warm("py-hello", 4)
        stats = c.stats()
    assert stats["live"] == 0 and stats["exited_kept"] == 50
    assert paths["warm"] >= 4, paths
    wait_until(lambda: len(copies_of(svc.pid)) == 4, what="only the 4 warm copies as children")
    assert not (copies_of(svc.pid) & kids_before)      # the old warm copies were handed out and ended
    # <=, not ==: a client connection of wait_warm may still have been closing at the first count
    wait_until(lambda: _service_fds(svc.pid) <= fds_before, timeout=10,
               what=f"service fds back to {fds_before} (now {_service_fds(svc.pid)})")
    assert psutil.Process(svc.pid).status() != psutil.STATUS_ZOMBIE
    zombies = [p for p in psutil.Process(svc.pid).children() if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies


def test_16_concurrent_clients(service):
    svc = service("[templates.py-hello]\nmin_warm = 2\nmax_live = 32\n")
    svc.wait_warm("py-hello", 2)
    results, errors = [], []

    def one():
        try:
            with svc.client() as c:
                inst = c.spawn("py-hello", timeout=60)
                results.append((inst.id, ask(inst.address, PROBES["py-hello"])["instance"], inst.path))
                c.kill(inst.id, grace=0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == 16 and len({r[0] for r in results}) == 16
    assert all(iid == seen for iid, seen, _ in results)
    assert {p for *_, p in results} <= {"warm", "restore"}


def test_capacity_queue_then_no_capacity(service):
    svc = service("[templates.py-hello]\nmin_warm = 0\nmax_live = 1\n")
    with svc.client() as c:
        first = c.spawn("py-hello")
        t0 = time.monotonic()
        with pytest.raises(NoCapacity):
            c.spawn("py-hello", timeout=1.0)
        assert 0.9 < time.monotonic() - t0 < 5
        got = []
        waiter = threading.Thread(target=lambda: got.append(svc.client().spawn("py-hello",
                                                                                timeout=30)))
        waiter.start()
        time.sleep(0.5)
        assert c.stats()["templates"]["py-hello"]["waiting"] == 1
        first.kill(grace=0)                       # frees the slot: the queued spawn gets it
        waiter.join(60)
        assert got and got[0].path == "restore"
        got[0].kill(grace=0)
        got[0]._client.close()


DIES_FAST = """\
import sys
import pool.runtime
pool.runtime.checkpoint()
print("restored, exiting at once", flush=True)
sys.exit(3)
"""


def test_quarantine_of_a_template_whose_copies_die_right_after_restore(store, criu, tmp_path):
    from pool.templates.build import build
    from pool.templates.spec import load_spec

    folder = tmp_path / "dies-fast"
    folder.mkdir()
    (folder / "app.py").write_text(DIES_FAST)
    (folder / "template.toml").write_text('command = ["python3", "app.py"]\n[ready]\nsdk = true\n')
    build(load_spec(folder), store, criu)
    with LocalService(store.root, tmp_path, "[templates.dies-fast]\nmin_warm = 1\nmax_live = 4\n") as svc, \
            svc.client() as c:
        for i in range(3):
            inst = c.spawn("dies-fast", timeout=30)
            assert inst.wait(timeout=10) == 3
        wait_until(lambda: c.stats()["templates"]["dies-fast"]["quarantined"], what="quarantine")
        t = c.stats()["templates"]["dies-fast"]
        assert t["failures_in_a_row"] == 3 and "exited with status 3" in t["last_error"]
        t0 = time.monotonic()
        with pytest.raises(Quarantined) as e:
            c.spawn("dies-fast")
        assert time.monotonic() - t0 < 0.5 and "quarantined" in e.value.message
        time.sleep(0.5)
        assert c.stats()["templates"]["dies-fast"]["restoring"] == 0   # no refills
        assert not c.set_warm("dies-fast", 1)["quarantined"]           # the operator clears it


def test_ttl_ends_an_instance(service):
    svc = service("[templates.py-hello]\nmin_warm = 1\nttl = 1\n")
    with svc.client() as c:
        inst = c.spawn("py-hello")
        assert inst.wait(timeout=15) is not None
        assert inst.info()["end_cause"] == "killed"


def test_sigterm_drains_and_leaves_nocopies_of(service):
    svc = service("[templates.py-hello]\nmin_warm = 2\n[service]\ndrain_timeout = 5\n")
    svc.wait_warm("py-hello", 2)
    with svc.client() as c:
        live = [c.spawn("py-hello") for _ in range(2)]
    svc.wait_warm("py-hello", 2)
    copies = copies_of(svc.pid)
    assert len(copies) == 4 and {i.pid for i in live} <= copies
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
    assert not svc.socket.exists()
    for pid in copies:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    log = svc.log.read_text()
    assert "draining" in log and "stopped" in log
    assert not list((svc.workdir / "run" / "instances").iterdir())


def test_on_shutdown_leave_keeps_live_instances(service):
    """on_shutdown = "leave": live instances outlive the service; warm copies do not."""
    svc = service("[templates.py-hello]\nmin_warm = 1\n[service]\non_shutdown = \"leave\"\n")
    svc.wait_warm("py-hello", 1)
    with svc.client() as c:
        inst = c.spawn("py-hello")
    svc.wait_warm("py-hello", 1)
    warm = copies_of(svc.pid) - {inst.pid}
    assert len(warm) == 1
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
    try:
        assert psutil.pid_exists(inst.pid) and psutil.Process(inst.pid).status() != psutil.STATUS_ZOMBIE
        wait_until(lambda: not any(psutil.pid_exists(p) for p in warm), what="warm copy gone")
        assert "leaving instance" in svc.log.read_text()
    finally:
        # The left instance is ours to end now. With the service gone it was reparented to the
        # nearest subreaper, which may be this test process: psutil's wait() reaps it then.
        left = psutil.Process(inst.pid)
        group = cgroups.node_hierarchy().adopt(cgroup_name(inst.pid))
        left.kill()
        left.wait(timeout=10)
        group.remove()  # what the next start of the service would do (journal.recover)


def test_second_signal_forces_exit(service):
    """A copy that ignores SIGTERM holds up the drain; a second SIGTERM ends it at once."""
    svc = service("[templates.py-hello]\nmin_warm = 0\n[service]\ndrain_timeout = 60\n"
                  "kill_grace = 60\n")
    with svc.client() as c:
        inst = c.spawn("py-hello")
    # Stop the copy's tini: it blocks SIGTERM (to forward it), so the signal stays pending and the
    # copy outlives its grace. (Stopping the app would not do: a fatal signal kills a stopped
    # process that has no handler.) SIGKILL still ends a stopped process.
    os.kill(inst.pid, signal.SIGSTOP)
    svc.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert svc.proc.poll() is None  # still draining: the copy has 60 s of grace
    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    assert "forcing" in svc.log.read_text()
    wait_until(lambda: not psutil.pid_exists(inst.pid)
               or psutil.Process(inst.pid).status() == psutil.STATUS_ZOMBIE, what="copy gone")


@pytest.mark.parametrize("setting,needle", [("ttl = 1.5", "ttl of 1.5s reached"),
                                              ("idle_timeout = 1.0", "idle for 1s")])
def test_ttl_and_idle_timeout_end_instances(service, setting, needle):
    svc = service(f"[templates.py-hello]\nmin_warm = 0\n{setting}\n[service]\nkill_grace = 1\n")
    with svc.client() as c:
        inst = c.spawn("py-hello")
        urllib.request.urlopen(f"http://{inst.address}/", timeout=10).read()  # traffic, then none
        t0 = time.monotonic()
        assert inst.wait(timeout=15) is not None
        assert time.monotonic() - t0 >= 0.5
        assert c.info(inst.id)["state"] in ("exited", "failed")
    assert needle in svc.log.read_text()
