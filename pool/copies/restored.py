"""RestoredCopy: one restored copy of a template, as seen by whoever restored it (the service's
record; the client's handle on a copy is pool.Instance, and both call its id the instance id).

The copy's PID 1 (tini) is our child (we are a child subreaper), so we reap it and keep its exit
status. A pidfd pins the process: signals never reach a recycled pid, and readiness of the pidfd
tells that the copy has exited (usable from a select loop or asyncio's add_reader).

A copy confined to a cgroup (pool/cr/cgroups.py) owns it: when the copy is reaped, its cgroup's
OOM-kill counter says whether the kernel killed it for its memory limit (oom_killed), and the
group is removed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pool import fds
from pool.cr import cgroups, criu
from pool.cr.cgroups import CopyCgroup

STREAMS = ("stdout", "stderr")
PAGE = 4096
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def open_handles(pid: int) -> tuple[int, int]:
    """A pidfd and the network namespace fd of a just-restored copy, both or neither."""
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd, os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(pidfd)
        raise


@dataclass
class RestoredCopy:
    id: str
    template: str
    build_id: str
    pid: int                       # host pid of the copy's PID 1
    pidfd: int
    run_dir: Path                  # private dir with stdout.log, stderr.log
    netns_fd: int                  # the copy's network namespace, kept open
    sdk: bool
    port: int | None = None        # the app's port inside its namespace
    address: str | None = None     # host address it is published on, set by the port publisher
    restore_s: float = 0.0
    created: float = field(default_factory=time.time)
    state: str = "warm"            # warm -> running -> exited | failed
    path: str = "restore"          # which path served the spawn: warm | restore | fork
    exit_status: int | None = None
    ctl_w: int | None = None       # pool -> app, until the identity is handed over
    ctl_r: int | None = None
    env_keys: list[str] = field(default_factory=list)  # its spawn env's names: values are secrets
    args: list[str] = field(default_factory=list)
    hostname: str | None = None
    owner: int | None = None       # uid that spawned it on the unix socket (None: over TCP, or warm)
    identity_timeout: float = 10.0     # the template's restore.identity_timeout
    hostname_pattern: str | None = None  # the template's restore.hostname ("{id}": instance id)
    zygote_id: str | None = None   # fork mode: the zygote it was forked from (pool/copies/zygote.py)
    start_time: int | None = None  # its PID 1's start (/proc/PID/stat field 22), once the journal read it
    cgroup: CopyCgroup | None = None   # its own cgroup, removed once it is reaped
    oom_killed: bool = False           # the kernel killed a process of it for its memory limit

    # -- life -------------------------------------------------------------------------------------
    def poll(self) -> int | None:
        """Reap the copy if it has exited; returns its exit status (negative: killed by signal)."""
        if self.exit_status is not None:
            return self.exit_status
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (we were not a subreaper when it was restored): fall back to the pidfd.
            if not fds.readable(self.pidfd, 0):
                return None
            status, pid = 0, self.pid
        if pid == 0:
            return None
        self.exit_status = os.waitstatus_to_exitcode(status)
        criu.disown(self.pid)
        self._end_cgroup()
        if self.state != "failed":
            self.state = "exited"
        return self.exit_status

    def exit_cause(self) -> str | None:
        """Why it ended, when that is not its own doing nor ours (a forked copy's zygote died)."""
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            fds.readable(self.pidfd, 0.5 if left is None else min(left, 0.5))
        return self.exit_status

    def signal(self, sig: int) -> None:
        if self.exit_status is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self, grace: float = 3.0) -> int | None:
        """SIGTERM (tini forwards it to the app's process group), then SIGKILL after grace seconds.

        SIGKILL to PID 1 ends every process of the copy's pid namespace at once.
        """
        if self.poll() is None and grace > 0:
            self.signal(signal.SIGTERM)
            self.wait(grace)
        if self.poll() is None:
            self.signal(signal.SIGKILL)
            self.wait(10)
        return self.exit_status

    def release_fds(self) -> None:
        """Close our fds on the copy (idempotent); its files stay for logs until close()."""
        for name in ("ctl_w", "ctl_r", "netns_fd", "pidfd"):
            fd = getattr(self, name)
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None if name.startswith("ctl") else -1)

    def _end_cgroup(self) -> None:
        """Read whether the OOM killer struck, then remove the group (idempotent)."""
        group, self.cgroup = self.cgroup, None
        if group is not None:
            self.oom_killed = group.oom_kills() > 0
            cgroups.remove_quietly(group)

    def close(self) -> None:
        """Release fds and delete the copy's private files (and its cgroup). The copy must have
        exited."""
        self.release_fds()
        self._end_cgroup()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- output -----------------------------------------------------------------------------------
    def log_path(self, stream: str) -> Path:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        return self.run_dir / f"{stream}.log"

    def read_log(self, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> bytes:
        try:
            with open(self.log_path(stream), "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def read_log_from(self, stream: str, offset: int, limit: int) -> tuple[bytes, int, int]:
        """Read from offset (a byte position in the copy's whole output). Returns the data, the
        offset after it, and how many bytes from offset on were rotated away (cut from the log)
        before they were read: the data then starts at the oldest byte still kept."""
        try:
            fd = os.open(self.log_path(stream), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return b"", offset, 0
        try:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                return b"", offset, 0  # nothing written at or after offset yet
            return (data := os.pread(fd, limit, start)), start + len(data), start - offset
        finally:
            os.close(fd)

    def rotate_logs(self, max_bytes: int) -> None:
        """Cap each log: once it holds more than max_bytes, cut its oldest bytes (a hole punched
        at its start: the space is freed, offsets stay valid) and keep the newest half. The copy
        writes the log directly, so it cannot be renamed or truncated under it."""
        for stream in STREAMS:
            try:
                fd = os.open(self.log_path(stream), os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                continue  # the copy's dir is going away
            try:
                size = os.fstat(fd).st_size
                kept_from = os.lseek(fd, 0, os.SEEK_DATA) if size else 0
                if size - kept_from > max_bytes:
                    _punch_hole(fd, (size - max_bytes // 2) // PAGE * PAGE)
            except OSError:
                pass  # nothing kept (ENXIO), or a file system that cannot punch holes
            finally:
                os.close(fd)

    def output_tail(self, lines: int = 20) -> str:
        out = []
        for stream in STREAMS:
            text = self.read_log_from(stream, 0, 1 << 20)[0].decode(errors="replace").strip()
            if text:
                out.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    # -- figures ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """RSS, PSS and CPU seconds summed over the copy's processes; the memory charged to its
        cgroup (what its memory limit counts: its pages and page cache) and that limit."""
        rss = pss = 0
        cpu = 0.0
        procs = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    mem = p.memory_full_info()
                    rss += mem.rss
                    pss += getattr(mem, "pss", 0)
                    t = p.cpu_times()
                    cpu += t.user + t.system
                    procs += 1
        group = self.cgroup
        return {"rss_bytes": rss, "pss_bytes": pss, "cpu_s": round(cpu, 3), "processes": procs,
                "memory_bytes": group.memory_bytes() if group else None,
                "memory_limit_bytes": group.memory_limit() if group else None}

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "template": self.template, "build_id": self.build_id,
                "pid": self.pid, "state": self.state, "path": self.path, "address": self.address,
                "port": self.port, "exit_status": self.exit_status, "created": self.created,
                "restore_s": round(self.restore_s, 6), "hostname": self.hostname,
                "args": self.args, "env_keys": self.env_keys, "owner": self.owner}


_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, length: int) -> None:
    """Free the first length bytes of a file; its size and later offsets stay as they were."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0),
                       ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
