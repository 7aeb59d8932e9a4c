"""Shared fixtures. Integration tests run real CRIU on real processes; every test is checked for leaks:
no stray child process, zombie, tini tree, network namespace, veth, temp dir, copy cgroup or fd of
ours survives it.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pool.cr import cgroups

ROOT = Path(__file__).resolve().parent.parent


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            pass
    return out


def _netns() -> set[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


_STARTED = time.time()


def _tinis() -> set[int]:
    """tini processes of ours: descendants of this test process, or orphans born after it started
    (a copy that escaped our subreaper). Other sessions' copies on the machine are not ours."""
    mine = _children()
    return {p.pid for p in psutil.process_iter(["name", "ppid", "create_time"])
            if p.info["name"] == "tini"
            and (p.pid in mine or (p.info["ppid"] == 1 and p.info["create_time"] >= _STARTED))}


def _tmp_entries() -> set[str]:
    return {p.name for p in Path("/tmp").iterdir() if p.name.startswith("pool-") and not p.name.startswith("pool-test-session")}


def copy_cgroups() -> set[str]:
    """The copies' cgroups under this process's pool group (the services tests start are its
    children, in its own cgroup: their copies' groups are there too)."""
    h = cgroups.node_hierarchy()
    if h is None:
        return set()
    return {f"{c}:{d.name}" for c, pool in h.pool_dirs.items() if pool.is_dir()
            for d in pool.iterdir() if d.is_dir()}


def snapshot() -> dict[str, set]:
    return {"child processes": _children(), "fds": _fds(), "network namespaces": _netns(),
            "network links": _links(), "tini processes": _tinis(), "pool temp dirs": _tmp_entries(),
            "copy cgroups": copy_cgroups()}


def leaks(before: dict[str, set], settle: float = 5.0) -> dict[str, set]:
    """What exists now that did not before; waits up to settle seconds for exits to finish."""
    deadline = time.monotonic() + settle
    while True:
        now = snapshot()
        new = {k: now[k] - before[k] for k in now if now[k] - before[k]}
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail any test that leaves processes, zombies, namespaces, links, temp dirs or fds behind."""
    if request.node.get_closest_marker("leaks_ok"):
        yield
        return
    before = snapshot()
    yield
    new = leaks(before)
    if new:
        # Clean up so one leak does not fail every later test, then report it.
        for pid in new.get("child processes", set()) | new.get("tini processes", set()):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        pytest.fail(f"test leaked: {new}", pytrace=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "leaks_ok: skip the leak check (for session fixtures only)")
