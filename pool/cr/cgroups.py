"""Per-copy cgroups: each copy's memory, CPU and process limits, its out-of-memory kills, its memory use.

A copy lives in its own group `<the service's own cgroup>/pool/<copy>`, under the service's own
cgroup so that a limit on the service also bounds its copies. Two backends, chosen by what is
mounted (`detect`): cgroup v2 when the unified hierarchy offers the memory controller, else v1 (one
hierarchy per controller, /sys/fs/cgroup/memory, .../cpu, .../pids). Everything here reads and
writes files under the mount points it is given, so tests run it over a fake cgroupfs.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
POOL_GROUP = "pool"
CPU_PERIOD_US = 100_000
REMOVE_WAIT = 2.0        # seconds for a group's last processes to exit before it is removed
UNLIMITED_V1 = 1 << 62     # v1 reports "no limit" as a page-rounded LONG_MAX
@dataclass(frozen=True)
class Limits:
    """What one copy may use; None: no limit of that kind."""

    memory: int | None = None     # bytes of RAM (and swap) charged to the copy
    cpus: float | None = None     # CPU seconds per wall-clock second, e.g. 1.5
    pids: int | None = None       # processes and threads at once

    def or_defaults(self, defaults: "Limits") -> "Limits":
        """These limits, each unset one taken from defaults."""
        return Limits(*(mine if mine is not None else theirs
                        for mine, theirs in zip(self.astuple(), defaults.astuple())))

    def astuple(self) -> tuple:
        return (self.memory, self.cpus, self.pids)

    def to_dict(self) -> dict[str, int | float]:
        """The limits that are set (a manifest's `limits`)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        d = d or {}
        return cls(memory=d.get("memory"), cpus=d.get("cpus"), pids=d.get("pids"))


# --- one copy's group --------------------------------------------------------------------------------
@dataclass
class CopyCgroup:
    """A copy's group: one dir per hierarchy it lives in (v1: memory, cpu, pids; v2: one)."""

    name: str
    version: int
    dirs: dict[str, Path]         # controller -> the copy's dir in that controller's hierarchy

    @property
    def memory_dir(self) -> Path:
        return self.dirs["memory"]

    def add(self, pid: int) -> None:
        """Move pid (one process, its threads too) into the group in every hierarchy."""
        for d in set(self.dirs.values()):
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                out |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        return out

    def memory_bytes(self) -> int | None:
        """Memory charged to the copy now (its pages and page cache), or None if unreadable."""
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.memory_dir / name).read_text())
        return None

    def memory_limit(self) -> int | None:
        """The memory limit written for the copy, or None if it has none."""
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            value = int((self.memory_dir / name).read_text())
            return value if value < UNLIMITED_V1 else None
        return None

    def oom_kills(self) -> int:
        """Processes of the copy the kernel's OOM killer has killed for its memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            return read_keyed(self.memory_dir / name).get("oom_kill", 0)
        except OSError:
            return 0

    def kill(self) -> None:
        """SIGKILL every process in the group: what a restore that failed left there (a tree CRIU
        restored before it died), which would keep the group busy until someone reaps it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Remove the group (idempotent). A copy's processes leave it as they exit (a zombie holds
        none): a group still busy REMOVE_WAIT seconds later holds something else, which is left
        alone (OSError)."""
        deadline = time.monotonic() + REMOVE_WAIT
        for d in set(self.dirs.values()):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)


def remove_quietly(group: CopyCgroup) -> None:
    """remove(), a failure logged: for cleanup paths that must go on."""
    try:
        group.remove()
    except OSError as e:
        log.warning("cannot remove the cgroup of copy %s: %s", group.name, e)


@functools.cache
def node_hierarchy() -> Hierarchy | None:
    """This process's hierarchy for copies (detect(), once)."""
    return detect()


# --- the hierarchies ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hierarchy:
    """Where copies' groups go: the pool group in each controller's hierarchy."""

    version: int
    pool_dirs: dict[str, Path]    # controller -> its pool group (v2: the same dir for all)

    def make(self, name: str, limits: Limits) -> CopyCgroup:
        """Create the copy's group with its limits; nothing is left behind if this fails."""
        missing = [c for c, v in zip(CONTROLLERS, limits.astuple())
                   if v is not None and c not in self.pool_dirs]
        if missing:
            raise OSError(errno.ENOTSUP, f"the {', '.join(missing)} controller is not available "
                                         f"(cgroup v{self.version})")
        if self.version == 2:
            self._enable_controllers()
        else:
            for d in set(self.pool_dirs.values()):
                d.mkdir(exist_ok=True)
        group = CopyCgroup(name, self.version, {c: p / name for c, p in self.pool_dirs.items()})
        made: list[Path] = []
        try:
            for d in set(group.dirs.values()):
                d.mkdir()
                made.append(d)
            self._write_limits(group, limits)
        except BaseException:
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return group

    def adopt(self, name: str) -> CopyCgroup | None:
        """The group of a copy made earlier (a restarted node adopting it), if it exists."""
        group = CopyCgroup(name, self.version, {c: p / name for c, p in self.pool_dirs.items()})
        return group if group.memory_dir.is_dir() else None

    def _enable_controllers(self) -> None:
        """v2: controllers are offered to children only when the parent enables them, and a
        non-root group holding processes cannot enable any (EBUSY): the service must then run in
        a delegated group of its own (docs/limits.md)."""
        pool = self.pool_dirs["memory"]
        want = " ".join(f"+{c}" for c in self.pool_dirs)
        for d in (pool.parent, pool):
            d.mkdir(exist_ok=True)
            enabled = set((d / "cgroup.subtree_control").read_text().split())
            if not set(self.pool_dirs) <= enabled:
                _write(d / "cgroup.subtree_control", want)

    def _write_limits(self, group: CopyCgroup, limits: Limits) -> None:
        v2 = self.version == 2
        if limits.memory is not None:
            d = group.dirs["memory"]
            _write(d / ("memory.max" if v2 else "memory.limit_in_bytes"), str(limits.memory))
            # swap must not stretch the limit: RAM + swap are capped together
            if v2:
                _write_if_present(d / "memory.swap.max", "0")
                _write_if_present(d / "memory.oom.group", "1")  # one OOM kill ends the copy
            else:
                _write_if_present(d / "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.cpus is not None:
            d = group.dirs["cpu"]
            quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
            if v2:
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))
        if limits.pids is not None:
            _write(group.dirs["pids"] / "pids.max", str(limits.pids))


def cpu_quota(group: CopyCgroup) -> tuple[int, int] | None:
    """(quota, period) in microseconds as written for the copy's CPU limit; None: no limit."""
    d = group.dirs["cpu"]
    if group.version == 2:
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" else (int(quota), int(period))
    quota_us = int((d / "cpu.cfs_quota_us").read_text())
    return None if quota_us < 0 else (quota_us, int((d / "cpu.cfs_period_us").read_text()))


def detect(mounts: str | None = None, own: str | None = None) -> Hierarchy | None:
    """The hierarchy copies' groups go in, from /proc/self/mounts and /proc/self/cgroup (or the
    texts given); None when no memory controller is mounted."""
    mounts = _read("/proc/self/mounts") if mounts is None else mounts
    own = _read("/proc/self/cgroup") if own is None else own
    v1_mounts: dict[str, Path] = {}
    v2_mount: Path | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = Path(_unescape(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            v2_mount = point
        elif fstype == "cgroup":
            for c in CONTROLLERS:
                if c in options:
                    v1_mounts.setdefault(c, point)
    own_paths = parse_own(own)
    if v2_mount is not None and "" in own_paths:
        try:
            offered = set((v2_mount / "cgroup.controllers").read_text().split())
        except OSError:
            offered = set()
        if "memory" in offered:
            pool = v2_mount / own_paths[""].lstrip("/") / POOL_GROUP
            return Hierarchy(2, {c: pool for c in CONTROLLERS if c in offered})
    if "memory" not in v1_mounts:
        return None
    return Hierarchy(1, {c: point / own_paths.get(c, "/").lstrip("/") / POOL_GROUP
                         for c, point in v1_mounts.items()})


def parse_own(text: str) -> dict[str, str]:
    """/proc/self/cgroup as controller -> path ("" for the unified hierarchy, line `0::/path`)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        for c in ctrls.split(",") if ctrls else [""]:
            out.setdefault(c, path)
    return out


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("oom_kill 2" per line: memory.events, memory.oom_control)."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _write(path: Path, value: str) -> None:
    # O_CREAT: a real cgroupfs has the file already (and refuses to create one); a test's plain
    # directory standing in for it does not
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        _write(path, value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
