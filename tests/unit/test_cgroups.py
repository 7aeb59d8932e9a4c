"""pool/cr/cgroups.py over a fake cgroupfs (plain directories in tmp_path): which hierarchy is
chosen, where copies' groups go, what is written for each limit, what is read back."""
from __future__ import annotations

from pathlib import Path

import pytest

from pool.cr import cgroups
from pool.cr.cgroups import Limits
from pool.tomlfields import parse_size

OWN_V1 = "9:name=systemd:/\n8:pids:/\n4:memory:/svc/abc\n1:cpu,cpuacct:/\n0::/\n"


def v1_mounts(root: Path) -> str:
    lines = [f"cgroup {root}/memory cgroup rw,relatime,memory 0 0",
             f"cgroup {root}/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0",
             f"cgroup {root}/pids cgroup rw,relatime,pids 0 0",
             f"cgroup2 {root}/unified cgroup2 rw,relatime 0 0"]
    for d in ("memory", "cpu,cpuacct", "pids", "unified"):
        (root / d).mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    return "\n".join(lines) + "\n"


def v2_mounts(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return f"cgroup2 {root} cgroup2 rw,nosuid 0 0\n"


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("1G") == parse_size("1024M") == 1 << 30
    assert parse_size("4096") == 4096 and parse_size("64k") == 64 << 10
    assert parse_size("2GiB") == 2 << 30
    for bad in ("", "M", "1.5G", "-1M", "12X"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_limits_take_unset_ones_from_defaults():
    mine = Limits(memory=1 << 20)
    assert mine.or_defaults(Limits(memory=5, cpus=2.0, pids=9)) == Limits(1 << 20, 2.0, 9)
    assert Limits.from_dict(mine.to_dict()) == mine and Limits().to_dict() == {}


def test_v1_is_chosen_when_the_unified_hierarchy_has_no_memory_controller(tmp_path):
    h = cgroups.detect(v1_mounts(tmp_path), OWN_V1)
    assert h.version == 1
    # under the service's own group in each hierarchy
    assert h.pool_dirs == {"memory": tmp_path / "memory/svc/abc/pool",
                           "cpu": tmp_path / "cpu,cpuacct/pool", "pids": tmp_path / "pids/pool"}


def test_v2_is_chosen_when_it_offers_memory(tmp_path):
    h = cgroups.detect(v2_mounts(tmp_path / "cg"), "0::/system.slice/pool.service\n")
    assert h.version == 2
    assert set(h.pool_dirs.values()) == {tmp_path / "cg/system.slice/pool.service/pool"}


def test_nothing_mounted_means_no_hierarchy(tmp_path):
    assert cgroups.detect("proc /proc proc rw 0 0\n", "0::/\n") is None


def test_v1_group_gets_each_limit_and_goes_away(tmp_path):
    h = cgroups.detect(v1_mounts(tmp_path), OWN_V1)
    (tmp_path / "memory/svc/abc").mkdir(parents=True)  # the service's own group
    g = h.make("c1.ab", Limits(memory=64 << 20, cpus=1.5, pids=32))
    mem = g.dirs["memory"]
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (g.dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "150000"
    assert cgroups.cpu_quota(g) == (150_000, 100_000)
    assert (g.dirs["pids"] / "pids.max").read_text() == "32"
    g.add(4242)
    assert all((d / "cgroup.procs").read_text() == "4242" for d in g.dirs.values())
    (mem / "memory.usage_in_bytes").write_text("12345\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert g.memory_bytes() == 12345 and g.oom_kills() == 2 and g.memory_limit() == 64 << 20
    for d in g.dirs.values():  # a real cgroupfs removes its files with the dir
        for f in d.iterdir():
            f.unlink()
    g.remove()
    g.remove()  # idempotent
    assert not any(d.exists() for d in g.dirs.values())


def test_v2_group_enables_controllers_and_caps_swap(tmp_path):
    root = tmp_path / "cg"
    h = cgroups.detect(v2_mounts(root), "0::/\n")
    pool = root / "pool"
    pool.mkdir()
    (pool / "cgroup.subtree_control").write_text("")
    g = h.make("c3", Limits(memory=1 << 30, cpus=0.5))
    d = g.memory_dir
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert cgroups.cpu_quota(g) == (50_000, 100_000)
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert g.oom_kills() == 1


def test_a_limit_whose_controller_is_missing_makes_nothing(tmp_path):
    root = tmp_path / "cg"
    mounts = v2_mounts(root)
    (root / "cgroup.controllers").write_text("memory\n")
    h = cgroups.detect(mounts, "0::/\n")
    with pytest.raises(OSError, match="pids controller is not available"):
        h.make("c4", Limits(pids=10))
    assert not (root / "pool" / "c4").exists()


def test_parse_own_reads_every_controller_of_a_line():
    own = cgroups.parse_own(OWN_V1)
    assert own["memory"] == "/svc/abc" and own["cpuacct"] == "/" and own[""] == "/"
