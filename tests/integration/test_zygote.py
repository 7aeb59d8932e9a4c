"""Fork mode with real CRIU and real processes: copies forked from a restored zygote (templates/py-fork
through a real `pool serve`; the rule checks through the node's Zygotes directly).

Forked copies are unique (instance id, random, temp names, pid/net namespaces, hostname), isolated
(each one's port is its own), get their env/args, share memory with the zygote (PSS < RSS); a fork
the template's rules forbid is refused, the rule named, leaving nothing; a killed zygote ends its
copies with cause zygote_died and the next spawn forks from a new one; a service SIGKILLed with
forked copies ends them and their zygote on restart; a Node SDK template is refused at build."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
from replyshape import assert_shape
from servicelab import wait_until

from pool.cli.demo import Probe, ask
from pool.copies.restore import Restorer
from pool.copies.zygote import Zygotes
from pool.cr.criu import become_subreaper
from pool.errors import BuildError, RestoreError
from pool.templates.build import build
from pool.templates.spec import load_spec
from pool.wire import replies as R
from pool.wire.control import Identity

pytestmark = pytest.mark.integration
APPS = Path(__file__).resolve().parents[1] / "apps"
ROOT = Path(__file__).resolve().parents[2]
PROBE = Probe("GET", "/", None, lambda r: "instance" in r)
# a fixed pool (max_warm = 0): these tests count which spawns fork
CONFIG = ("[templates.py-fork]\nmin_warm = {warm}\nmax_warm = 0\nmax_live = 8\n"
          "[service]\nexited_history = 16\n")


@pytest.fixture
def py_fork(built):
    return built("py-fork")


def zygote_of(c) -> dict:
    return c.stats()["templates"]["py-fork"]["zygote"]


def test_forked_copies_are_unique_isolated_and_share_memory(service, py_fork):
    svc = service(CONFIG.format(warm=0))
    with svc.client() as c:
        insts = [c.spawn("py-fork", env={"GREETING": f"hi {i}"}, args=[f"arg{i}"],
                         hostname=f"copy-{i}") for i in range(3)]
        assert [i.served_by for i in insts] == ["fork"] * 3
        bodies = [ask(i.address, PROBE) for i in insts]
        for n, (inst, body) in enumerate(zip(insts, bodies)):
            assert body["instance"] == inst.id           # its published port reaches this copy only
            assert body["greeting"] == f"hi {n}" and body["args"] == [f"arg{n}"]
            assert body["hostname"] == f"copy-{n}" and body["pid"] == 1  # PID 1 of its own pid ns
            assert body["table"] == 200_000              # the zygote's state, inherited
        for key in ("instance", "random", "tempname", "pidns", "netns", "hostname"):
            assert len({b[key] for b in bodies}) == 3, f"{key} is shared between forked copies"
        assert len({i.address for i in insts}) == 3
        z = zygote_of(c)
        assert z["forks"] == 3 and z["copies"] == 3 and z["pss_bytes"] > 0
        zygote_ns = os.readlink(f"/proc/{z['pid']}/ns/net")
        assert zygote_ns not in {b["netns"] for b in bodies}
        stats = c.info(insts[0].id)["stats"]
        assert 0 < stats["pss_bytes"] < stats["rss_bytes"]  # pages shared with the zygote
        assert stats["processes"] == 1

        c.set_warm("py-fork", 1)                         # forked copies kept warm: served warm
        svc.wait_warm("py-fork", 1)
        warm = c.spawn("py-fork")
        assert warm.served_by == "warm" and ask(warm.address, PROBE)["instance"] == warm.id
        assert warm.kill()["exit_status"] == 143         # SIGTERM: PID 1 exits on it
        snap = assert_shape(c.stats(), R.ServiceStats)["templates"]["py-fork"]
        assert snap["zygote"]["forks"] >= 3
        assert snap["spawns"]["fork"] >= 3 and snap["spawns"]["warm"] == 1
        for i in insts:
            i.kill(grace=0)


def test_killing_the_zygote_ends_its_copies_and_the_next_spawn_forks_a_new_one(service, py_fork):
    svc = service(CONFIG.format(warm=0))
    with svc.client() as c:
        insts = [c.spawn("py-fork") for _ in range(2)]
        first = zygote_of(c)
        os.kill(first["pid"], signal.SIGKILL)
        for i in insts:
            assert i.wait(timeout=30) == -signal.SIGKILL
            assert c.info(i.id)["end_cause"] == "zygote_died"
        wait_until(lambda: zygote_of(c) is None, what="the dead zygote reaped")
        assert not psutil.pid_exists(first["pid"]) or \
            psutil.Process(first["pid"]).status() != psutil.STATUS_ZOMBIE
        again = c.spawn("py-fork")
        assert again.served_by == "fork" and ask(again.address, PROBE)["instance"] == again.id
        assert zygote_of(c)["pid"] != first["pid"]
        again.kill(grace=0)
    assert "died with status" in svc.log.read_text()


def test_a_new_build_retires_the_zygote_once_its_last_copy_ends(service, py_fork, session_store,
                                                                 criu):
    svc = service(CONFIG.format(warm=0))
    with svc.client() as c:
        old = c.spawn("py-fork")
        first = zygote_of(c)
        rebuilt = build(load_spec(ROOT / "templates" / "py-fork"), session_store, criu).template
        wait_until(lambda: c.stats()["templates"]["py-fork"]["build"] == rebuilt.build_id,
                   what="the new build noticed")
        new = c.spawn("py-fork")
        assert zygote_of(c)["pid"] != first["pid"] and zygote_of(c)["build_id"] == rebuilt.build_id
        assert ask(old.address, PROBE)["instance"] == old.id   # the retired zygote's copy lives on
        assert psutil.Process(first["pid"]).status() != psutil.STATUS_ZOMBIE
        old.kill(grace=0)                                      # its last copy: the zygote ends
        wait_until(lambda: not psutil.pid_exists(first["pid"]), what="the retired zygote reaped")
        assert ask(new.address, PROBE)["instance"] == new.id
        new.kill(grace=0)


def test_service_sigkilled_with_forked_copies_ends_them_and_the_zygote_on_restart(service,
                                                                                    py_fork):
    become_subreaper()  # what the SIGKILLed service leaves is reparented to us, as to systemd
    svc = service(CONFIG.format(warm=1))
    svc.wait_warm("py-fork", 1)
    with svc.client() as c:
        live = c.spawn("py-fork")
        zpid = zygote_of(c)["pid"]
    svc.proc.kill()
    svc.proc.wait()
    left = [psutil.Process(zpid), *psutil.Process(zpid).children(recursive=True)]
    assert live.pid in {p.pid for p in left}
    again = service(CONFIG.format(warm=0))
    try:
        wait_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                               for p in left), what="the old zygote and its copies ended")
        with again.client() as c:
            assert c.list() == []                    # a forked copy is never adopted again
            fresh = c.spawn("py-fork")
            assert ask(fresh.address, PROBE)["instance"] == fresh.id
            fresh.kill(grace=0)
    finally:
        _reap_all_but(again.pid)


def _reap_all_but(keep: int) -> None:
    """Kill and reap our children (what a stopped service left, reparented to us) but keep."""
    for p in psutil.Process().children():
        if p.pid != keep:
            with contextlib.suppress(psutil.Error):
                p.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, 0)


def test_forked_copies_left_at_shutdown_run_until_the_next_start_ends_them(service, py_fork):
    become_subreaper()
    leave = CONFIG.format(warm=0) + 'on_shutdown = "leave"\n'
    svc = service(leave)
    with svc.client() as c:
        live = c.spawn("py-fork")
        zpid = zygote_of(c)["pid"]
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
    assert psutil.Process(live.pid).status() != psutil.STATUS_ZOMBIE  # left running, its zygote too
    left = [psutil.Process(zpid), *psutil.Process(zpid).children(recursive=True)]
    again = service(leave)
    try:
        wait_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                               for p in left), what="the left zygote and its copy ended")
        with again.client() as c:
            assert c.list() == []
            fresh = c.spawn("py-fork")
            assert ask(fresh.address, PROBE)["instance"] == fresh.id
            fresh.kill(grace=0)
    finally:
        _reap_all_but(again.pid)


@pytest.mark.parametrize("rule,broken", [("one thread", "thread"),
                                         ("no listening socket", "listener"),
                                         ("no child process", "child")])
def test_a_fork_that_breaks_a_rule_is_refused_with_the_rule_named(tmp_path, store, criu, rule,
                                                                   broken):
    app = tmp_path / "fork-rules"
    shutil.copytree(APPS / "fork-rules", app)
    toml = app / "template.toml"
    toml.write_text(toml.read_text().replace('[env]\n', f'[env]\nBREAK = "{broken}"\n'))
    build(load_spec(app), store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    zygotes = Zygotes(restorer, "local", on_start=lambda z: None)
    try:
        with pytest.raises(RestoreError, match=f"breaks the fork rule '{rule}'") as e:
            zygotes.fork("fork-rules")
        assert e.value.step == "forking from the zygote"
        z = next(iter(zygotes.all))
        assert z.alive() and z.children == set()    # refused: the zygote still serves, no child
        assert [d.name.split(".")[0] for d in restorer.instances_dir.iterdir()] == [z.id]
    finally:
        zygotes.close(leave_children=False)
    assert list(restorer.instances_dir.iterdir()) == []


def test_a_fork_that_breaks_no_rule_is_served(tmp_path, store, criu):
    build(load_spec(APPS / "fork-rules"), store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    zygotes = Zygotes(restorer, "local", on_start=lambda z: None)
    try:
        copy = zygotes.fork("fork-rules")
        restorer.hand_over(copy, Identity("rules-ok"))
        wait_until(lambda: b"rules-ok up" in copy.read_log(), what="the copy's log line")
        copy.kill(grace=0)
        assert copy.exit_status == -signal.SIGKILL and copy.exit_cause() is None
        copy.close()
    finally:
        zygotes.close(leave_children=False)
    assert list(restorer.instances_dir.iterdir()) == []


def test_a_forked_copy_lives_in_its_own_cgroup_with_the_templates_limits(tmp_path, store, criu):
    app = tmp_path / "fork-rules"
    shutil.copytree(APPS / "fork-rules", app)
    with (app / "template.toml").open("a") as f:
        f.write('\n[limits]\nmemory = "256M"\npids = 64\n')
    build(load_spec(app), store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    zygotes = Zygotes(restorer, "local", on_start=lambda z: None)
    try:
        copy = zygotes.fork("fork-rules")
        group, zygote = copy.cgroup, next(iter(zygotes.all))
        assert group is not None and group.name == copy.run_dir.name
        assert copy.pid in group.pids() and copy.pid not in zygote.copy.cgroup.pids()
        assert group.memory_limit() == 256 * 2**20
        assert (group.dirs["pids"] / "pids.max").read_text().strip() == "64"
        restorer.hand_over(copy, Identity("confined-fork"))
        wait_until(lambda: b"confined-fork up" in copy.read_log(), what="the copy's log line")
        assert group.memory_bytes() > 0          # what it did as a copy was charged to it
        copy.kill(grace=0)
        copy.close()
        assert copy.cgroup is None and not any(d.exists() for d in group.dirs.values())
    finally:
        zygotes.close(leave_children=False)
    assert list(restorer.instances_dir.iterdir()) == []


def test_build_refuses_fork_mode_for_a_runtime_that_cannot_fork(tmp_path, store, criu):
    app = tmp_path / "node-sdk"
    shutil.copytree(APPS / "node-sdk", app)
    with open(app / "template.toml", "a") as f:
        f.write('\n[restore]\nmethod = "fork"\n')
    with pytest.raises(BuildError) as e:
        build(load_spec(app), store, criu)
    assert e.value.step == "checking the restore method"
    assert "'node'" in e.value.problem and "cannot be forked" in e.value.problem
    assert store.names() == []
