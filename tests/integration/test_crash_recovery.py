"""Crashes around a real `pool serve`: the service (or an agent) SIGKILLed with live copies or
mid-restore, CRIU SIGKILLed or hung mid-restore, a warm copy SIGKILLed, a copy that writes a lot,
instances left at shutdown. After each the template still spawns, `pool ls` is true and nothing is
left behind.

This test process makes itself a child subreaper: what a SIGKILLed service leaves (its copies,
its CRIU) is reparented to it, as it would be to systemd, and it reaps them (`reap_children`)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from servicelab import cgroup_name, copies_of, wait_until

from pool.cli.demo import PROBES, LocalService, ask
from pool.client import Instance
from pool.cr import cgroups
from pool.cr.criu import become_subreaper
from pool.errors import PoolError

pytestmark = pytest.mark.integration
# fixed pools (max_warm = min_warm): these tests count copies and restores
CONFIG = "[templates.py-hello]\nmin_warm = {warm}\nmax_warm = {warm}\n[service]\nexited_history = 0\n{extra}"


@pytest.fixture
def subreaper():
    become_subreaper()


def config(warm: int = 1, extra: str = "") -> str:
    return CONFIG.format(warm=warm, extra=extra)


def reap_children(keep=()) -> None:
    """Kill and reap this process's children but keep (a service still running)."""
    keep = set(keep)
    for p in psutil.Process().children():
        if p.pid in keep:
            continue
        with contextlib.suppress(psutil.Error):
            p.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p.pid, 0)


def copy_groups() -> set[str]:
    """The names of the copies' cgroups (memory hierarchy) under our pool group."""
    pool = cgroups.node_hierarchy().pool_dirs["memory"]
    return {d.name for d in pool.iterdir() if d.is_dir()} if pool.is_dir() else set()


def instance_dirs(svc) -> list[Path]:
    d = svc.workdir / "run" / "instances"
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


HOLD = """\
#!/bin/sh
# A CRIU action script: the first restore that reaches post-restore (its tree restored, not yet
# resumed) says so and holds CRIU there until the test lets go.
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] && mkdir "{d}/held" 2>/dev/null || exit 0
while [ ! -e "{d}/go" ]; do sleep 0.02; done
"""


def nested(pid: int) -> bool:
    """Whether pid is in a pid namespace below ours (a restored copy's)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        return any(line.startswith("NSpid:") and len(line.split()) > 2 for line in f)
    return False


@pytest.fixture
def held_restore(tmp_path, monkeypatch):
    """Services started from now on hold their first restore in CRIU once its tree is restored:
    returns (wait_held() -> the CRIU process, release())."""
    d = tmp_path / "hold"
    d.mkdir()
    script = d / "hold.sh"
    script.write_text(HOLD.format(d=d))
    script.chmod(0o755)
    conf = d / "criu.conf"
    conf.write_text(f"action-script {script}\n")
    monkeypatch.setenv("CRIU_CONFIG_FILE", str(conf))

    def wait_held(svc) -> psutil.Process:
        wait_until(lambda: (d / "held").exists(), timeout=60, what="a restore held by CRIU")
        (criu,) = (p for p in psutil.Process(svc.pid).children() if p.name() != "tini")
        return criu  # (CRIU renames itself "criu: restore --rpc")

    yield wait_held, lambda: (d / "go").touch()
    (d / "go").touch()


def spawn_in_background(svc, results: list) -> threading.Thread:
    def run():
        try:
            with svc.client() as c:
                results.append(c.spawn("py-hello", timeout=60))
        except PoolError as e:
            results.append(e)
    t = threading.Thread(target=run)
    t.start()
    return t


def assert_spawns_and_tidy(svc, warm: int = 1) -> None:
    """The template spawns; `pool ls` is true; the run dir holds only the service's own copies."""
    with svc.client() as c:
        inst = c.spawn("py-hello", timeout=60)
        assert ask(inst.address, PROBES["py-hello"])["instance"] == inst.id
        assert [r["id"] for r in c.list()] == [inst.id]
        inst.kill(grace=0)
        assert c.list() == []
    svc.wait_warm("py-hello", warm)
    wait_until(lambda: len(instance_dirs(svc)) == len(copies_of(svc.pid)) == warm,
               what="one run dir per warm copy, nothing else")
    # a helper CRIU had started (e.g. its action script's child) may die a moment after CRIU was
    # killed: the service reaps such a stray on its next sweeps (every second)
    wait_until(lambda: not [p for p in psutil.Process(svc.pid).children()
                            if p.status() == psutil.STATUS_ZOMBIE], timeout=10,
               what="no zombie child of the service")


def test_service_sigkilled_with_3_live_copies_adopts_them_on_restart(service, subreaper):
    svc = service(config())
    svc.wait_warm("py-hello", 1)
    with svc.client() as c:
        insts = [c.spawn("py-hello", env={"N": str(i)}) for i in range(3)]
    svc.wait_warm("py-hello", 1)
    old_warm = copies_of(svc.pid) - {i.pid for i in insts}
    assert len(old_warm) == 1
    live_groups, warm_group = {cgroup_name(i.pid) for i in insts}, cgroup_name(*old_warm)
    assert {g.split(".")[0] for g in live_groups} == {i.id for i in insts}
    assert live_groups | {warm_group} <= copy_groups()
    svc.proc.kill()
    svc.proc.wait()

    again = service(config())
    try:
        with again.client() as c:
            rows = {r["id"]: r for r in c.list()}
            assert set(rows) == {i.id for i in insts}
            for n, i in enumerate(insts):
                assert rows[i.id]["pid"] == i.pid and rows[i.id]["env_keys"] == ["N"]
                assert rows[i.id]["address"] == i.address  # its host port was free again
                assert ask(rows[i.id]["address"], PROBES["py-hello"])["instance"] == i.id
            assert c.stats()["templates"]["py-hello"]["live"] == 3
            # the old warm copy could never be handed out (its control channel died): killed
            wait_until(lambda: all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                                   for p in old_warm if psutil.pid_exists(p)), what="warm copy killed")
            # the old warm copy's group went with it; the live ones' groups are theirs again
            assert warm_group not in copy_groups() and live_groups <= copy_groups()
            assert {cgroup_name(i.pid) for i in insts} == live_groups
            for i in insts:
                c.kill(i.id, grace=0)
            assert c.list() == []
            assert not copy_groups() & live_groups  # each adopted copy's end removed its group
        assert "3 live copies adopted again" in again.log.read_text()
        assert_spawns_and_tidy(again)
    finally:
        reap_children(keep={again.pid})


def test_service_sigkilled_mid_restore_leaves_nothing_after_restart(service, subreaper,
                                                                     held_restore):
    wait_held, _ = held_restore
    svc = service(config(warm=0))
    results: list = []
    spawner = spawn_in_background(svc, results)  # a miss: restored on demand
    criu = wait_held(svc)  # the restore stays in flight: the service dies in its middle
    half_restored = criu.children(recursive=True)
    svc.proc.kill()
    svc.proc.wait()
    spawner.join(60)
    assert isinstance(results[0], PoolError)

    again = service(config(warm=0))
    try:
        gone = [criu, *half_restored]
        wait_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                               for p in gone), what="the in-flight restore killed")
        assert "restores killed" in again.log.read_text()
        with again.client() as c:
            assert c.list() == []
        assert_spawns_and_tidy(again, warm=0)
    finally:
        reap_children(keep={again.pid})


def test_criu_sigkilled_mid_restore_leaves_no_tree_and_no_zombie(service, held_restore):
    wait_held, release = held_restore
    svc = service(config(warm=0))
    results: list = []
    spawner = spawn_in_background(svc, results)
    criu = wait_held(svc)  # its tree is restored, not yet resumed, when it dies
    half_restored = criu.children(recursive=True)
    assert any(nested(p.pid) for p in half_restored)
    criu.kill()
    release()  # its action script (reparented to the service) ends too
    spawner.join(90)
    # the waiting spawn is served by the next restore, or fails with a typed error
    assert isinstance(results[0], (PoolError, Instance))
    wait_until(lambda: not any(p.is_running() for p in half_restored),
               what="the half-restored tree killed and reaped")
    with svc.client() as c:
        t = c.stats()["templates"]["py-hello"]
        assert t["restore_failures"] >= 1 and "CRIU" in t["last_error"] and not t["quarantined"]
        if not isinstance(results[0], PoolError):
            c.kill(results[0].id, grace=0)
    assert_spawns_and_tidy(svc, warm=0)


def test_hung_criu_is_killed_at_the_restore_deadline(service, held_restore):
    wait_held, _ = held_restore
    svc = service(config(warm=0, extra="restore_timeout = 3\n"))
    results: list = []
    spawner = spawn_in_background(svc, results)
    criu = wait_held(svc)  # hangs in its action script
    tree = [criu, *criu.children(recursive=True)]
    # functional deadline: restore_timeout (3 s) plus the time to kill and reap
    wait_until(lambda: not any(p.is_running() for p in tree), timeout=20,
               what="the hung CRIU and its tree killed at the deadline")
    spawner.join(90)
    with svc.client() as c:
        t = c.stats()["templates"]["py-hello"]
        assert "no answer within 3s" in t["last_error"] and not t["quarantined"]
        if not isinstance(results[0], PoolError):
            c.kill(results[0].id, grace=0)
    assert_spawns_and_tidy(svc, warm=0)


def test_sigkill_of_a_warm_copy_is_one_bad_outcome_and_it_is_replaced(service):
    svc = service(config(warm=2))
    svc.wait_warm("py-hello", 2)
    victim = next(iter(copies_of(svc.pid)))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in copies_of(svc.pid) and len(copies_of(svc.pid)) == 2,
               what="the warm copy reaped and replaced")
    t = svc.wait_warm("py-hello", 2)
    assert t["failures_in_a_row"] <= 1 and not t["quarantined"]
    assert "died" in t["last_error"] or "while warm" in t["last_error"]
    assert_spawns_and_tidy(svc, warm=2)


CHATTY = """\
import os, signal, time
import pool.runtime
pool.runtime.checkpoint()
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"x" * 65535 + b"\\n"))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def end_offset(c, iid: str) -> int:
    """Where `pool logs` of iid ends now (offsets count every byte ever written)."""
    offset = 0
    while r := c.logs(iid, offset=offset, limit=1 << 20):
        if not r["data"]:
            return r["offset"]
        offset = r["offset"]
    return offset


def test_a_copys_logs_are_capped_and_rotated(store, criu, tmp_path):
    from pool.templates.build import build
    from pool.templates.spec import load_spec

    folder = tmp_path / "chatty"
    folder.mkdir()
    (folder / "app.py").write_text(CHATTY)
    (folder / "template.toml").write_text('command = ["python3", "app.py"]\n[ready]\nsdk = true\n')
    build(load_spec(folder), store, criu)
    with LocalService(store.root, tmp_path,  # a fixed pool: one copy, one instance dir
                      "[service]\nmax_log_bytes = 4096\n[templates.chatty]\nmax_warm = 0\n") as svc, \
            svc.client() as c:
        inst = c.spawn("chatty", timeout=60)
        wait_until(lambda: inst.logs() == b"ready\n", what="the copy's first line")
        (log,) = (d / "stdout.log" for d in instance_dirs(svc))
        app = psutil.Process(inst.pid).children()[0]
        total = 6
        for _ in range(3):
            app.send_signal(signal.SIGUSR1)  # 64 KiB
            total += 65536
            wait_until(lambda: end_offset(c, inst.id) == total  # noqa: B023
                       and log.stat().st_blocks * 512 <= 8192, what="the burst written, then cut")
        first = c.logs(inst.id, offset=0, limit=1 << 20)
        assert first["offset"] == total and len(first["data"]) <= 4096 + 4096  # cap + a page
        assert first["rotated_away"] == total - len(first["data"]) > 0
        assert first["data"].endswith(b"x\n") and set(first["data"]) == {ord("x"), ord("\n")}
        assert c.logs(inst.id, offset=first["offset"])["data"] == b""
        app.send_signal(signal.SIGUSR1)
        wait_until(lambda: c.logs(inst.id, offset=first["offset"])["data"], what="more output")
        inst.kill(grace=0)



def test_agent_sigkilled_with_a_live_copy_adopts_it_on_restart(pool_lab, subreaper):
    pl = pool_lab()
    with pl.client() as c:
        inst = c.spawn("counter", node="n2", timeout=60)
        agent = pl.agents.pop("n2")
        agent.kill()                  # its copy lives on, unreachable: its port died with it
        agent.wait(10)
        pl.start_agent("n2")
        pl.wait_nodes_up("n2")
        (row,) = [r for r in c.list() if r["id"] == inst.id]
        assert row["node"] == "n2" and row["pid"] == inst.pid
        assert pl.get(row["address"])["instance"] == inst.id
        c.kill(inst.id, grace=0)
        assert c.list() == []
        back = c.spawn("counter", node="n2", timeout=60)
        assert pl.get(back.address)["instance"] == back.id
        back.kill(grace=0)
    assert "1 live copies adopted again" in pl.log("n2")


def test_instances_left_at_shutdown_are_adopted_by_the_next_service(service, subreaper):
    leave = config(warm=0, extra='on_shutdown = "leave"\n')
    svc = service(leave)
    with svc.client() as c:
        inst = c.spawn("py-hello")
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
    again = service(leave)
    try:
        with again.client() as c:
            assert [r["id"] for r in c.list()] == [inst.id]
            assert ask(inst.address, PROBES["py-hello"])["instance"] == inst.id
            c.kill(inst.id, grace=0)
        assert_spawns_and_tidy(again, warm=0)
    finally:
        reap_children(keep={again.pid})
