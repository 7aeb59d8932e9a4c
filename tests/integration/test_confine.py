"""Confined and unprivileged copies, real CRIU on real copies: each copy in a cgroup of its own with
its template's [limits] (memory, cpus, pids), an out-of-memory kill reported as such, the group gone
once the copy ends or its restore fails; `user = "nobody"` copies without uid 0 or capabilities."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pool.cli.demo import LocalService
from pool.copies.restore import Restorer
from pool.cr import cgroups, netns, sandbox
from pool.errors import BuildError, RestoreError
from pool.templates.build import CAP_SYS_RESOURCE, app_environment, build, has_capability
from pool.templates.spec import load_spec

APP = Path(__file__).resolve().parents[1] / "apps" / "confined" / "app.py"
MB = 1 << 20


@pytest.fixture
def template_dir():
    """make(name, extra_toml, env) -> a template folder of tests/apps/confined, readable by every
    user (under /var/tmp: pytest's own tmp dirs are root's only)."""
    base = Path(tempfile.mkdtemp(prefix="confine-", dir="/var/tmp"))
    base.chmod(0o755)

    def make(name: str, extra: str = "", env: str = "") -> Path:
        d = base / name
        d.mkdir(mode=0o755)
        shutil.copy(APP, d / "app.py")
        (d / "app.py").chmod(0o644)
        (d / "template.toml").write_text(
            f'command = ["/usr/bin/python3", "app.py"]\n{extra}\n'
            f'[env]\n{env}\n[ready]\ntcp = 8080\n[network]\nmode = "isolated"\nport = 8080\n')
        return d

    yield make
    shutil.rmtree(base, ignore_errors=True)


def ask(inst, path: str) -> dict:
    """GET path from the copy, inside its network namespace."""
    status, body = netns.http_in(f"/proc/{inst.pid}/ns/net", f"http://127.0.0.1:8080{path}",
                                 timeout=30)
    assert status == 200
    return json.loads(body)


def group_dirs(name_prefix: str) -> list[Path]:
    h = cgroups.node_hierarchy()
    return [d for pool in set(h.pool_dirs.values()) if pool.is_dir()
            for d in pool.iterdir() if d.name.startswith(name_prefix)]


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def test_a_copy_lives_in_its_own_cgroup_with_its_limits_charged_from_the_restore(
        template_dir, store, criu, tmp_path):
    spec = load_spec(template_dir("limited", '[limits]\nmemory = "256M"\ncpus = 1.5\npids = 64',
                                  'BALLAST_MB = "32"'))
    build(spec, store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    inst = restorer.spawn("limited")
    try:
        group = inst.cgroup
        assert group is not None
        for d in set(group.dirs.values()):
            assert inst.pid in {int(p) for p in (d / "cgroup.procs").read_text().split()}
        assert cgroups.cpu_quota(group) == (150_000, 100_000)
        pids_dir = group.dirs["pids"]
        assert (pids_dir / "pids.max").read_text().strip() == "64"
        stats = inst.stats()
        assert stats["memory_limit_bytes"] == 256 * MB
        # the 32 MiB of ballast CRIU restored were charged to the copy's group, not to CRIU's
        assert stats["memory_bytes"] >= 32 * MB
        dirs = set(group.dirs.values())
    finally:
        inst.kill(grace=0)
        inst.close()
    assert inst.cgroup is None and not any(d.exists() for d in dirs)


def test_a_fork_bomb_stops_at_the_pids_limit(template_dir, store, criu, tmp_path):
    build(load_spec(template_dir("few-pids", "[limits]\npids = 16")), store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    inst = restorer.spawn("few-pids")
    try:
        r = ask(inst, "/forkbomb?n=1000")
        assert r["stopped"] == "EAGAIN" and r["forked"] < 16
        assert ask(inst, "/")["pid"] > 0  # the copy itself lives on
    finally:
        inst.kill(grace=0)
        inst.close()


def test_a_failed_restore_leaves_no_cgroup(template_dir, store, criu, tmp_path):
    # 8 MiB cannot hold the 32 MiB the image restores: the kernel kills it during the restore
    build(load_spec(template_dir("too-small", '[limits]\nmemory = "8M"', 'BALLAST_MB = "32"')),
          store, criu)
    restorer = Restorer(store, criu, tmp_path / "run")
    with pytest.raises(RestoreError) as e:
        restorer.restore("too-small", instance_id="toosmall0000")
    assert "out of memory" in str(e.value)
    assert group_dirs("toosmall0000") == []
    assert not list((tmp_path / "run" / "instances").iterdir())


def test_an_oom_killed_copy_ends_with_cause_oom_and_harms_nothing_else(
        template_dir, store, criu, tmp_path):
    build(load_spec(template_dir("greedy", '[limits]\nmemory = "64M"')), store, criu)
    config = "[templates.greedy]\nmin_warm = 1\nmax_live = 4\n"
    with LocalService(store.root, tmp_path, config) as svc, svc.client() as c:
        greedy, bystander = c.spawn("greedy"), c.spawn("greedy")
        with pytest.raises(OSError):  # the copy dies under the request
            urllib.request.urlopen(f"http://{greedy.address}/alloc?mb=200", timeout=60).read()
        c.wait(greedy.id, timeout=30)
        info = c.info(greedy.id)
        assert info["end_cause"] == "oom" and info["exit_status"] != 0
        with urllib.request.urlopen(f"http://{bystander.address}/alloc?mb=8", timeout=30) as r:
            assert json.loads(r.read())["held_mb"] == 8
        stats = c.info(bystander.id)["stats"]
        assert 8 * MB <= stats["memory_bytes"] <= stats["memory_limit_bytes"] == 64 * MB
        t = c.stats()["templates"]["greedy"]
        assert not t["quarantined"] and t["failures_in_a_row"] == 0
        assert c.spawn("greedy").kill(grace=0)["end_cause"] == "killed"
        c.kill(bystander.id, grace=0)


def check_unprivileged(ns: str, tini: int, folder: Path) -> None:
    """The app under tini runs as nobody, without capabilities, and writes only where it may."""
    status, body = netns.http_in(ns, "http://127.0.0.1:8080/", timeout=30)
    assert status == 200 and json.loads(body)["uid"] == 65534
    app = [p.pid for p in psutil.Process(tini).children(recursive=True)]
    assert app  # the namespace's init (tini, root: docs/security.md) runs the app
    for pid in app:
        st = status_of(pid)
        assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert int(st["CapInh"], 16) == int(st["CapAmb"], 16) == 0
        assert st["NoNewPrivs"] == "1"
    mark = f"confine-{os.getpid()}-{time.monotonic_ns()}"

    def write(path: str) -> str:
        status, body = netns.http_in(ns, f"http://127.0.0.1:8080/write?path={path}", timeout=30)
        return json.loads(body)["result"]
    assert write(f"/etc/{mark}") == "EACCES"
    assert write(f"{folder}/{mark}") == "EACCES"
    assert write(f"/tmp/{mark}") == "ok"  # removed by the app
    assert not Path(f"/etc/{mark}").exists() and not (folder / mark).exists()


def test_an_app_booted_as_nobody_has_no_privilege_and_cannot_write_outside_what_it_owns(
        template_dir):
    folder = template_dir("nobody", 'user = "nobody"')
    spec = load_spec(folder)
    app = sandbox.boot(list(spec.command), cwd=spec.cwd, env=app_environment(spec), sdk=False,
                       user=spec.user)
    try:
        deadline = time.monotonic() + 30
        while True:  # until it listens (bounded)
            try:
                netns.connect_in(app.netns, 8080, timeout=1).close()
                break
            except OSError:
                assert app.exited() is None and time.monotonic() < deadline, app.output.text()
                time.sleep(0.05)
        check_unprivileged(app.netns, app.root_pid, folder)
    finally:
        app.kill()


def test_a_nobody_template_restores_unprivileged_copies_or_is_refused_with_the_reason(
        template_dir, store, criu, tmp_path):
    """CRIU reads a process's rlimits with prlimit, which for another user's process needs
    CAP_SYS_RESOURCE: where root has it, every restored copy runs as nobody; where root lacks it
    (a container that drops it, as this test machine), the build says so before booting."""
    folder = template_dir("nobody", 'user = "nobody"')
    if not has_capability(CAP_SYS_RESOURCE):
        with pytest.raises(BuildError) as e:
            build(load_spec(folder), store, criu)
        assert "CAP_SYS_RESOURCE" in str(e.value) and list(store.all()) == []
        return
    build(load_spec(folder), store, criu)
    inst = Restorer(store, criu, tmp_path / "run").spawn("nobody")
    try:
        check_unprivileged(f"/proc/{inst.pid}/ns/net", inst.pid, folder)
    finally:
        inst.kill(grace=0)
        inst.close()


def test_a_build_whose_files_the_user_cannot_read_is_refused(template_dir, store, criu):
    folder = template_dir("hidden", 'user = "nobody"')
    folder.chmod(0o700)
    with pytest.raises(BuildError) as e:
        build(load_spec(folder), store, criu)
    assert "user nobody" in str(e.value) and "cannot read and enter" in str(e.value)
    assert list(store.all()) == []
