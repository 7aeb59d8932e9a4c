"""Bounds of a real `pool serve`: set-warm within max_live and the node's capacity, capacity enforced
across templates, a drain that ends on time whatever is queued, and a template built while the
service runs picked up without a manual step. After each, the template still spawns and `pool ls`
tells the truth; the leak fixture checks that nothing is left behind."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import psutil
import pytest
from servicelab import POOL, cli, copies_of, wait_until

from pool.cli.demo import PROBES, LocalService, ask
from pool.errors import BadRequest, NoCapacity, PoolError, TemplateNotFound

pytestmark = pytest.mark.integration
TEMPLATES = POOL.rsplit("/.venv/", 1)[0] + "/templates"
SLACK_S = 10.0  # stop(), the interpreter's exit, a slow shared machine




def assert_serves(svc):
    """The template spawns and answers, `pool ls` lists exactly it, and it goes away on kill."""
    with svc.client() as c:
        inst = c.spawn("py-hello", timeout=60)
        assert ask(inst.address, PROBES["py-hello"])["instance"] == inst.id
        assert [r["id"] for r in json.loads(cli(svc, "ls", "--json").stdout)] == [inst.id]
        inst.kill(grace=0)
        assert json.loads(cli(svc, "ls", "--json").stdout) == []


def test_set_warm_beyond_max_live_is_refused_and_the_template_still_spawns(service):
    svc = service("[templates.py-hello]\nmin_warm = 1\nmax_live = 8\n")
    svc.wait_warm("py-hello", 1)
    with svc.client() as c:
        with pytest.raises(BadRequest) as e:  # over any pool's bound: refused at the boundary
            c.set_warm("py-hello", 100000)
        assert e.value.data["param"] == "min_warm"
        with pytest.raises(BadRequest) as e:  # over this pool's max_live: refused by the node
            c.set_warm("py-hello", 100)
        assert e.value.data["param"] == "min_warm" and e.value.data["max_live"] == 8
        assert "min_warm" in e.value.message and "max_live (8)" in e.value.message
        t = c.stats()["templates"]["py-hello"]
        assert (t["min_warm"], t["max_live"]) == (1, 8) and t["restoring"] <= 1
    r = cli(svc, "set-warm", "py-hello", "100", check=False)
    assert r.returncode != 0 and "min_warm" in r.stderr and "max_live" in r.stderr
    assert_serves(svc)


def test_capacity_is_enforced_across_the_node(service):
    # a fixed pool (max_warm = min_warm): the test counts restores
    svc = service("[service]\ncapacity = 2\n[templates.py-hello]\nmin_warm = 2\nmax_warm = 2\n"
                  "max_live = 8\n")
    svc.wait_warm("py-hello", 2)
    with svc.client() as c:
        with pytest.raises(BadRequest) as e:          # more warm copies than the node holds
            c.set_warm("py-hello", 3)
        assert e.value.data["param"] == "min_warm" and e.value.data["capacity"] == 2
        held = [c.spawn("py-hello", timeout=60) for _ in range(2)]
        assert [i.path for i in held] == ["warm", "warm"]
        time.sleep(1.0)  # a few ticks: min_warm wants 2 more copies, the node has no room for them
        t = c.stats()["templates"]["py-hello"]
        assert (t["warm"], t["live"], t["restoring"], t["restores"]) == (0, 2, 0, 2)
        assert len(copies_of(svc.pid)) == 2
        with pytest.raises(NoCapacity) as e:          # the node has no free capacity left
            c.spawn("py-hello", timeout=1.0)
        assert "capacity" in e.value.message
        held[0].kill(grace=0)                          # room for one warm copy again
        svc.wait_warm("py-hello", 1)
        assert len(copies_of(svc.pid)) == 2
        held[1].kill(grace=0)
    assert_serves(svc)


def test_restores_failing_for_want_of_fds_never_quarantine_the_template(service):
    svc = service("[service]\nquarantine_after = 2\nrestore_concurrency = 1\n"
                  "[templates.py-hello]\nmin_warm = 0\n")
    proc = psutil.Process(svc.pid)
    limits = proc.rlimit(psutil.RLIMIT_NOFILE)
    with svc.client() as c:
        def pool_stats():  # stats itself may meet EMFILE while a restore holds the last fds
            try:
                return c.stats()["templates"]["py-hello"]
            except PoolError as e:
                assert "Too many open files" in e.message
                return None

        c.ping()                                      # connected while fds are still there
        # a few fds to answer stats with, too few for a restore (logs, pipes, CRIU)
        proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 3, limits[1]))
        try:
            c.set_warm("py-hello", 2)
            wait_until(lambda: (pool_stats() or {}).get("restore_failures", 0) >= 3, timeout=30,
                       what="restores failing with EMFILE")
        finally:
            proc.rlimit(psutil.RLIMIT_NOFILE, limits)
        t = c.stats()["templates"]["py-hello"]
        assert "Too many open files" in t["last_error"]
        assert not t["quarantined"] and t["failures_in_a_row"] == 0
        t = svc.wait_warm("py-hello", 2)               # fds are back: it recovers by itself
        assert not t["quarantined"] and t["failures_in_a_row"] == 0
    assert_serves(svc)


def test_set_warm_down_cancels_the_restores_still_queued(service):
    svc = service("[service]\nrestore_concurrency = 1\n"
                  "[templates.py-hello]\nmin_warm = 0\nmax_live = 32\n")
    with svc.client() as c:
        c.set_warm("py-hello", 32)
        wait_until(lambda: c.stats()["templates"]["py-hello"]["restoring"] > 1, timeout=10,
                   what="restores queued (one runs, the others wait their turn)")
        done_before = c.set_warm("py-hello", 0)["restores"]
        t = svc.wait_warm("py-hello", 0, timeout=30)   # nothing restoring, nothing dying
        assert t["restores"] <= done_before + 1         # only the one running may still finish
        assert t["restore_failures"] == 0 and not t["quarantined"]
        wait_until(lambda: not copies_of(svc.pid), timeout=10, what="no copies left")
    assert_serves(svc)


def test_sigterm_with_restores_queued_ends_within_the_drain_deadline(service):
    drain_timeout, kill_grace = 2.0, 1.0
    svc = service("[service]\nrestore_concurrency = 1\n"
                  f"drain_timeout = {drain_timeout}\nkill_grace = {kill_grace}\n"
                  "[templates.py-hello]\nmin_warm = 0\nmax_live = 32\n")
    with svc.client() as c:
        inst = c.spawn("py-hello", timeout=60)        # a live copy the drain must end
        c.set_warm("py-hello", 32)
        wait_until(lambda: c.stats()["templates"]["py-hello"]["restoring"] > 1, timeout=10,
                   what="restores queued (one runs, the others wait their turn)")
        at_signal = copies_of(svc.pid)
    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    most = len(at_signal)
    while svc.proc.poll() is None and time.monotonic() - t0 < drain_timeout + kill_grace + SLACK_S:
        try:
            most = max(most, len(copies_of(svc.pid)))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert svc.proc.wait(1) == 0, "the drain did not end within drain_timeout + kill_grace + slack"
    # the one restore running at the signal may finish; no queued one starts
    assert most <= len(at_signal) + 1
    log = svc.log.read_text()
    cancelled = int(re.search(r"refills stopped, (\d+) restore\(s\) cancelled", log).group(1))
    assert cancelled >= 1 and log.count("a cancelled restore was already running") <= 1
    assert not psutil.pid_exists(inst.pid) or psutil.Process(inst.pid).status() == psutil.STATUS_ZOMBIE
    assert not list((svc.workdir / "run" / "instances").iterdir())
    assert "draining" in log and "stopped" in log
    assert_serves(service("[templates.py-hello]\nmin_warm = 1\n"))   # a new service starts clean


def test_a_template_built_while_the_service_runs_is_used_without_a_manual_step(store, tmp_path):
    with LocalService(store.root, tmp_path, "[templates.py-hello]\nmin_warm = 1\nmax_live = 4\n") \
            as svc, svc.client() as c:
        time.sleep(1.0)  # a few ticks: an unbuilt template must not fail its way into quarantine
        t = c.stats()["templates"]["py-hello"]
        assert t["unbuilt"] and not t["quarantined"]
        assert (t["failures_in_a_row"], t["restore_failures"], t["restores"]) == (0, 0, 0)
        with pytest.raises(TemplateNotFound):
            c.spawn("py-hello", timeout=5)
        assert not c.stats()["templates"]["py-hello"]["quarantined"]

        first = _build(svc)
        t = svc.wait_warm("py-hello", 1, timeout=60)   # no set-warm: the node noticed the build
        assert not t["unbuilt"] and t["build"] == first
        assert_serves(svc)

        second = _build(svc)                            # a rebuild replaces the warm copy
        assert second != first
        wait_until(lambda: c.stats()["templates"]["py-hello"]["build"] == second, timeout=30,
                   what="the node to use the new build")
        svc.wait_warm("py-hello", 1, timeout=60)
        inst = c.spawn("py-hello", timeout=60)
        assert c.info(inst.id)["build_id"] == second
        inst.kill(grace=0)
        assert_serves(svc)


def _build(svc) -> str:
    """`pool build py-hello` into the service's store, as a user would; the new build id."""
    r = subprocess.run([POOL, "build", "-q", "--json", f"{TEMPLATES}/py-hello"], env=svc.env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["build_id"]
