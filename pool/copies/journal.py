"""The journal of a node's copies: one small JSON record in each copy's private run dir, so that a
node that crashed (SIGKILL, OOM, power cut of the service only) finds its copies again on restart.

    run_dir/instances/<id>.<random>/copy.json   id, template, build_id, pid and its start time,
                                                port, published address, state (warm | live),
                                                handed time, node, identity
    run_dir/instances/<id>.<random>/owner       pid and start time of the process that made the dir

A record is written (atomically: a temporary file renamed over it) when a copy is adopted and again
when it is handed out, and removed when the copy is reaped. `recover()` sorts what a previous life
of the node left: a live copy whose pid still runs with the recorded start time is adopted again;
a warm copy is killed (its control channel died with the old node, so it can never be handed out);
anything else (dead copies, dirs of restores that were in flight) is killed and its dir removed,
and its cgroup (named after its dir, pool/cr/cgroups.py) once its processes are gone; a copy adopted
again takes its cgroup back (its end removes it, and reports an out-of-memory kill, as before).
A dir whose owner is another running process (`pool restore`, another node on the same run dir)
is not ours and is left alone. Fork mode: a zygote is recorded as a warm copy (so it is ended) and a
forked copy with its zygote's id; a forked copy is never adopted again, whatever its state (its
zygote, ended at recovery, takes it along: see pool/copies/zygote.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from pool.copies.restored import RestoredCopy, open_handles
from pool.cr import cgroups
from pool.cr.cgroups import Hierarchy

log = logging.getLogger(__name__)

RECORD = "copy.json"
OWNER = "owner"
WARM, LIVE = "warm", "live"


@dataclass
class Record:
    id: str
    template: str
    build_id: str
    pid: int
    start_time: int                 # /proc/PID/stat field 22: tells a recycled pid apart
    node: str
    state: str = WARM               # warm | live
    port: int | None = None         # the app's port inside its namespace
    address: str | None = None      # where it was published on the host
    handed_at: float | None = None  # wall-clock time of its spawn
    path: str = "restore"
    created: float = 0.0
    hostname: str | None = None
    env_keys: list[str] = field(default_factory=list)  # names only: values may be secrets
    args: list[str] = field(default_factory=list)
    owner: int | None = None        # uid that spawned it (pool.cluster.access)
    zygote_id: str | None = None    # fork mode: the zygote it was forked from

    @classmethod
    def of(cls, inst, node: str, state: str = WARM, handed_at: float | None = None) -> "Record":
        if inst.start_time is None:  # read once per copy: a spawn's record reads no file
            inst.start_time = start_time(inst.pid) or 0
        return cls(id=inst.id, template=inst.template, build_id=inst.build_id, pid=inst.pid,
                   start_time=inst.start_time, node=node, state=state, port=inst.port,
                   address=inst.address, handed_at=handed_at, path=inst.path,
                   created=inst.created, hostname=inst.hostname, env_keys=list(inst.env_keys),
                   args=list(inst.args), owner=inst.owner, zygote_id=inst.zygote_id)


def start_time(pid: int) -> int | None:
    """When pid started (clock ticks since boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: count fields after its last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def write(run_dir: Path, record: Record) -> None:
    """Write the record atomically: a crash leaves the old record or the new one, never half."""
    tmp = run_dir / f".{RECORD}.tmp"
    data = memoryview(json.dumps(asdict(record)).encode())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        while data:  # one open and a write: a spawn's record is on its path
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    os.replace(tmp, run_dir / RECORD)


def forget(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run_dir / RECORD)


def read(run_dir: Path) -> Record | None:
    """The dir's record, or None if it has none or it is not a valid one."""
    try:
        data = json.loads((run_dir / RECORD).read_text())
        if isinstance(data, dict) and isinstance(data.get("env"), dict):  # written before env_keys
            data["env_keys"] = sorted(data.pop("env"))
        rec = Record(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(rec.pid, int) or rec.pid <= 1 or rec.state not in (WARM, LIVE):
        return None
    return rec


def mark_owner(run_dir: Path) -> None:
    """Say which process made this dir: a node recovering leaves a living owner's dirs alone."""
    (run_dir / OWNER).write_text(f"{os.getpid()} {start_time(os.getpid())}\n")


def _owner_alive(run_dir: Path) -> bool:
    try:
        pid, started = (run_dir / OWNER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and str(start_time(pid)) == started


def still_running(rec: Record) -> bool:
    return start_time(rec.pid) == rec.start_time


# -- recovery ---------------------------------------------------------------------------------------
@dataclass
class Recovery:
    live: list[tuple[Path, Record]] = field(default_factory=list)  # to adopt again
    killed: int = 0                                                # warm copies, in-flight restores
    removed: int = 0                                               # dirs cleaned


KILLED_EXIT_WAIT = 5.0    # seconds for SIGKILLed trees to leave their cgroups before removal


def recover(instances_dir: Path, node: str, hierarchy: Hierarchy | None = None) -> Recovery:
    """Sort what a previous life of this node left in instances_dir (see the module doc);
    hierarchy: where its copies' cgroups are (None: it made none)."""
    out = Recovery()
    if not instances_dir.is_dir():
        return out
    held = _holders(instances_dir)
    doomed: list[Path] = []
    killed: list[psutil.Process] = []
    for d in sorted(p for p in instances_dir.iterdir() if p.is_dir()):
        rec = read(d)
        if (rec.node != node) if rec is not None else _owner_alive(d):
            continue  # another node's, or a running `pool restore`'s
        if rec is not None and rec.state == LIVE and rec.zygote_id is None and still_running(rec):
            out.live.append((d, rec))
            continue
        pids = held.get(d.name, set())
        if rec is not None and still_running(rec):
            pids.add(rec.pid)
        out.killed += len(pids)
        killed += _kill_trees(pids)
        doomed.append(d)
    _wait_exited(killed, KILLED_EXIT_WAIT)  # a group still holding a process cannot be removed
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
        group = hierarchy.adopt(d.name) if hierarchy is not None else None
        if group is not None:
            cgroups.remove_quietly(group)
        out.removed += 1
    return out


def _holders(instances_dir: Path) -> dict[str, set[int]]:
    """For each copy dir, the processes holding a file in it open (its copy, or a CRIU that was
    restoring into it when the node died)."""
    prefix = f"{instances_dir}/"
    out: dict[str, set[int]] = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                out.setdefault(target[len(prefix):].split("/", 1)[0], set()).add(int(entry.name))
    return out


def _kill_trees(pids: set[int]) -> list[psutil.Process]:
    """SIGKILL each process and its descendants (returned); they are not our children (the node
    that made them is gone), so whoever they were reparented to reaps them."""

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    return procs


def _wait_exited(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until every process has exited (a zombie has: it holds no cgroup), or timeout."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _still_runs(p)]
        if procs:
            time.sleep(0.01)


def _still_runs(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reopen(run_dir: Path, rec: Record, hierarchy: Hierarchy | None = None):
    """A RestoredCopy for a live copy of a previous life of the node, with its cgroup if it has one
    in hierarchy; OSError if it is gone."""

    pidfd, netns_fd = open_handles(rec.pid)
    if not still_running(rec):  # the pid was recycled before we pinned it
        os.close(pidfd)
        os.close(netns_fd)
        raise ProcessLookupError(rec.pid, f"pid {rec.pid} is another process now")
    return RestoredCopy(id=rec.id, template=rec.template, build_id=rec.build_id, pid=rec.pid,
                    pidfd=pidfd, run_dir=run_dir, netns_fd=netns_fd, sdk=False, port=rec.port,
                   created=rec.created, state="running", path=rec.path, env_keys=rec.env_keys,
                   args=rec.args, hostname=rec.hostname, owner=rec.owner, start_time=rec.start_time,
                   cgroup=hierarchy.adopt(run_dir.name) if hierarchy is not None else None)


def host_port(address: str | None) -> int:
    """The port of a "HOST:PORT" address, 0 if none."""
    return int(address.rpartition(":")[2]) if address else 0
