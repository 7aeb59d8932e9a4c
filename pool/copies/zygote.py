"""Fork mode: copies forked from a restored *zygote* instead of each restored by CRIU.

    restore the template once (the restore chain, as any copy) -> tell it it is the zygote
    -> for each copy: the restore chain's run dir and log steps -> ask the zygote to fork
    -> take the child (its pidfd) over -> the usual identity hand-over (restore.hand_over*)

The zygote is the SDK's checkpoint() serving fork requests on a unix seqpacket socket (pool.runtime,
the messages in pool.wire.control). Each child enters fresh pid/net/uts/ipc namespaces and shares the
zygote's memory copy-on-write. The child is PID 1 of its own pid namespace, nested in the zygote's:
not our child (the zygote reaps it, or the zygote's init if the zygote is gone), so a ForkedCopy
watches it by the pidfd it sent and reads its exit status with PIDFD_GET_INFO. When the zygote ends, the kernel ends every process of its pid
namespace, forked copies included: they end with the cause ZYGOTE_DIED, and the next fork restores a
new zygote. A new build retires the zygote: no more forks from it, killed once its last copy ends.

A zygote is journaled as a warm copy and its children with their zygote's id, so a node that restarts
after a crash ends both (a forked copy cannot be adopted again: its zygote's channel died with the
node). A zygote takes one slot of the node's capacity; it is never handed out.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from pool import fds
from pool.copies import journal, restore_chain
from pool.copies.restore import Restorer, new_instance_id
from pool.copies.restored import STREAMS, RestoredCopy
from pool.cr import cgroups
from pool.errors import RestoreError
from pool.templates.store import Template
from pool.wire import control

log = logging.getLogger(__name__)

ZYGOTE_DIED = "zygote_died"    # a forked copy's end cause when its zygote ended
FORK = "forking from the zygote"
START = "starting the zygote"
FORK_TIMEOUT = 10.0            # for the zygote's reply and the child's hello

# PIDFD_GET_INFO (Linux 6.13; exit status with PIDFD_INFO_EXIT since 6.15): struct pidfd_info v0
_PIDFD_INFO_SIZE = 64
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
_PIDFD_INFO_EXIT = 1 << 3
_EXIT_CODE_AT = 16 + 11 * 4    # after mask, cgroupid and eleven u32 ids
_PF_EXITING = 0x4


def reaped_status(pidfd: int) -> int | None:
    """The wait status of the process behind pidfd once it was reaped (by anyone), else None.
    Kernels without PIDFD_INFO_EXIT: 0 once the pidfd says it exited (the status is unknown)."""
    buf = bytearray(struct.pack("=Q", _PIDFD_INFO_EXIT) + bytes(_PIDFD_INFO_SIZE - 8))
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno == errno.ESRCH:  # reaped, no exit info kept (the pidfd was not watched)
            return 0
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
        return 0 if fds.readable(pidfd, 0) else None
    (mask,) = struct.unpack_from("=Q", buf, 0)
    if not mask & _PIDFD_INFO_EXIT:
        return None  # running, or exited and not reaped yet
    (status,) = struct.unpack_from("=i", buf, _EXIT_CODE_AT)
    return status


def pid_of(pidfd: int) -> int:
    """The pid (in our pid namespace) of the process a pidfd refers to."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise ProcessLookupError(errno.ESRCH, "the forked child is gone already")


@dataclass(eq=False)
class ForkedCopy(RestoredCopy):
    """A copy forked from a zygote: a RestoredCopy but for how it is watched (not our child)."""

    zygote: Any = field(default=None, repr=False)   # the Zygote it came from

    def poll(self) -> int | None:
        if self.exit_status is not None:
            return self.exit_status
        status = reaped_status(self.pidfd)
        if status is None:
            return None
        self.exit_status = os.waitstatus_to_exitcode(status)
        if self.state != "failed":
            self.state = "exited"
        if self.zygote is not None:
            self.zygote.child_ended(self)
        return self.exit_status

    def exit_cause(self) -> str | None:
        return ZYGOTE_DIED if self.zygote is not None and self.zygote.dying() else None


class Zygote:
    """One restored copy of a template that forks copies on request (see the module doc)."""

    def __init__(self, copy: RestoredCopy, sock: socket.socket, template: Template,
                 restorer: Restorer) -> None:
        self.copy = copy
        self.sock = sock
        self.template = template
        self.restorer = restorer
        self.fork_lock = threading.Lock()  # one fork at a time: the zygote serves them in turn
        self.lock = threading.Lock()       # children and retired (short holds: the loop takes it)
        self.children: set[int] = set()  # id() of forked copies not yet ended
        self.retired = False             # a newer build serves; killed once childless
        self.killed = False              # we ended it (else its death is news)
        self.forks = 0

    @property
    def id(self) -> str:
        return self.copy.id

    @property
    def pid(self) -> int:
        return self.copy.pid

    @property
    def build_id(self) -> str:
        return self.copy.build_id

    # -- life -----------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.copy.exit_status is None and not fds.readable(self.copy.pidfd, 0)

    def dying(self) -> bool:
        """Dead, or its init is exiting (the kernel ends the zygote's namespace, copies first)."""
        if not self.alive():
            return True
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return True
        fields = stat[stat.rindex(b")") + 2:].split()
        return fields[0] == b"Z" or bool(int(fields[6]) & _PF_EXITING)

    def child_ended(self, child: ForkedCopy) -> None:
        with self.lock:
            self.children.discard(id(child))
            last = self.retired and not self.children
        if last:
            self.end()

    def end(self) -> None:
        """SIGKILL its init: its namespace ends, forked copies included. Whoever watches its pidfd
        reaps it (reap())."""
        self.killed = True
        self.copy.signal(signal.SIGKILL)

    def reap(self) -> int | None:
        """Its exit status once it has ended (then its fds and files are released), else None."""
        status = self.copy.poll()
        if status is not None:
            self.sock.close()
            journal.forget(self.copy.run_dir)
            self.copy.close()
        return status

    def describe(self) -> dict[str, Any]:
        rss, pss = self.memory()
        return {"id": self.id, "pid": self.pid, "build_id": self.build_id, "forks": self.forks,
                "copies": len(self.children), "retired": self.retired,
                "rss_bytes": rss, "pss_bytes": pss}

    def memory(self) -> tuple[int, int]:
        """RSS and PSS of the zygote's own processes (its forked copies, below them in the process
        tree but in pid namespaces of their own, are not counted)."""
        rss = pss = 0
        with contextlib.suppress(psutil.Error, OSError):
            own_ns = os.readlink(f"/proc/{self.pid}/ns/pid")
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error, OSError):
                    if os.readlink(f"/proc/{p.pid}/ns/pid") == own_ns:
                        mem = p.memory_full_info()
                        rss += mem.rss
                        pss += getattr(mem, "pss", 0)
        return rss, pss

    # -- forks ----------------------------------------------------------------------------------------
    def fork(self, instance_id: str, run_dir: Path, timeout: float = FORK_TIMEOUT) -> ForkedCopy:
        """One forked copy, warm (waiting for its identity). RestoreError naming the broken rule
        if the zygote refuses; nothing is left behind on failure."""
        job = restore_chain.RestoreJob(template=self.template, instance_id=instance_id,
                                       run_dir=run_dir, criu=self.restorer.criu, confine=True,
                                       cgroups=cgroups.node_hierarchy(),
                                       default_limits=self.restorer.copy_limits)
        with self.fork_lock:
            copy = restore_chain.run(job, (restore_chain.make_run_dir, restore_chain.make_cgroup,
                                           restore_chain.open_logs,
                                           lambda j: self._fork(j, timeout),
                                           restore_chain.close_handed_fds,
                                           restore_chain.validate_copy))
            self.forks += 1
        return copy

    def _fork(self, job: restore_chain.RestoreJob, timeout: float) -> None:
        """The restore chain's step in place of CRIU: the zygote forks, the child says hello."""
        m = job.template.manifest
        stdio = [job.inherit[m.stdio_key(stream)] for stream in STREAMS]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        job.undo.callback(ours.close)
        with theirs:
            reply = self._ask(stdio + [theirs.fileno()], timeout)
        if reply["type"] == "refused":
            raise RestoreError(FORK, f"the template breaks the fork rule {reply.get('rule')!r}: "
                                     f"{reply.get('message')} (see docs/limits.md, fork mode)")
        if reply["type"] != "forked":
            raise RestoreError(FORK, f"the zygote could not fork: {reply.get('message', reply)}")
        ours.settimeout(timeout)
        try:
            hello, got = control.recv_packet(ours)
        except (control.ControlError, OSError) as e:
            raise RestoreError(FORK, f"the forked child did not say hello: {e}") from e
        job.undo.callback(_close_all, got)   # ours until the copy takes them
        if hello["type"] != "hello" or len(got) != 1:
            raise RestoreError(FORK, f"expected the child's hello with its pidfd, got {hello!r:.80}")
        pid = pid_of(got[0])
        got.append(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        got.append(os.dup(ours.fileno()))     # one socket both ways; two fds, each closed once
        pidfd, netns_fd, ctl_r = got
        ours.settimeout(None)
        if job.cgroup is not None:  # before its identity: none of the app's copy work runs outside
            try:
                job.cgroup.add(pid)
            except OSError as e:
                raise RestoreError(FORK, f"cannot move the forked copy into its cgroup: "
                                         f"{e.strerror or e}") from e
        job.copy = ForkedCopy(
            id=job.instance_id, template=job.template.name, build_id=job.template.build_id,
            pid=pid, pidfd=pidfd, run_dir=job.run_dir, netns_fd=netns_fd, sdk=True, port=m.port,
            ctl_w=ours.detach(), ctl_r=ctl_r,
            identity_timeout=float(m.restore_spec.get("identity_timeout") or 10.0),
            hostname_pattern=m.restore_spec.get("hostname"), zygote_id=self.id, zygote=self,
            cgroup=job.cgroup)
        got.clear()
        job.cgroup = None  # the copy's now: its end removes it
        with self.lock:  # before anything can report its end (child_ended)
            self.children.add(id(job.copy))
        job.undo.callback(_discard, job.copy)

    def _ask(self, fds_out: list[int], timeout: float) -> dict:
        self.sock.settimeout(timeout)
        try:
            control.send_packet(self.sock, {"type": "fork"}, fds_out)
            reply, extra = control.recv_packet(self.sock)
        except (control.ControlError, OSError) as e:
            self.end()  # a zygote that does not answer cannot be trusted with the next fork
            raise RestoreError(FORK, f"the zygote stopped answering: {e}") from e
        _close_all(extra)
        return reply


def start(restorer: Restorer, name: str, node: str, timeout: float = FORK_TIMEOUT) -> Zygote:
    """Restore name once and make it a zygote (journaled as a warm copy: a restart ends it)."""
    copy = restorer.restore(name, instance_id=f"zygote-{secrets.token_hex(4)}")
    try:
        template = restorer.prepare(name)
        if template.build_id != copy.build_id:
            raise RestoreError(START, "a new build was published meanwhile")
        sock = _connect(copy, timeout)
        journal.write(copy.run_dir, journal.Record.of(copy, node))
    except BaseException as e:
        copy.kill(grace=0)
        copy.close()
        if isinstance(e, (control.ControlError, OSError)):
            raise RestoreError(START, str(e)) from e
        raise
    copy.state = "zygote"
    for name_ in ("ctl_w", "ctl_r"):  # its control pipes are done with: it serves on the socket
        os.close(getattr(copy, name_))
        setattr(copy, name_, None)
    return Zygote(copy, sock, template, restorer)


def _connect(copy: RestoredCopy, timeout: float) -> socket.socket:
    """Tell the restored copy it is the zygote; its connection to our socket, once it serves."""
    # a path socket (the zygote is in another network namespace, so not an abstract one), in a
    # private dir of a short path: a run dir may be longer than sun_path's 108 bytes
    sock_dir = tempfile.mkdtemp(prefix="pool-zygote-")
    path = os.path.join(sock_dir, "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(timeout)
            control.write_frame(copy.ctl_w, {"type": "zygote", "socket": str(path)})
            try:
                sock, _ = listener.accept()
            except TimeoutError as e:
                raise RestoreError(START, f"the copy did not connect within {timeout:g}s: is its "
                                          "SDK too old for fork mode?") from e
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
    try:
        sock.settimeout(timeout)
        hello, extra = control.recv_packet(sock)
        _close_all(extra)
        if hello["type"] != "serving":
            raise RestoreError(START, f"expected the zygote to serve, got {hello!r:.80}")
    except BaseException:
        sock.close()
        raise
    return sock


class Zygotes:
    """The node's zygotes, one serving per fork-mode template; thread-safe (forks run in the node's
    executor). on_start(zygote) is called (in the forking thread) for each new one: the node
    watches its pidfd and calls ended() once it is reaped."""

    def __init__(self, restorer: Restorer, node: str, on_start: Callable[[Zygote], None]) -> None:
        self.restorer = restorer
        self.node = node
        self.on_start = on_start
        self.serving: dict[str, Zygote] = {}
        self.all: set[Zygote] = set()                  # serving, retired, or dead and not reaped
        self._lock = threading.Lock()
        self._template_locks: dict[str, threading.Lock] = {}

    def count(self) -> int:
        with self._lock:
            return len(self.all)

    def fork(self, name: str) -> ForkedCopy:
        """One warm copy of name forked from its zygote, which is (re)started as needed."""
        with self._lock:
            tlock = self._template_locks.setdefault(name, threading.Lock())
        with tlock:
            z = self.serving.get(name)
            # one readlink, not the manifest: the build was checked when its zygote started
            if z is not None and (not z.alive() or
                                  z.build_id != self.restorer.store.current_build_id(name)):
                self._retire(name, z)
                z = None
            if z is None:
                z = start(self.restorer, name, self.node)
                with self._lock:
                    self.serving[name] = z
                    self.all.add(z)
                self.on_start(z)
        iid = new_instance_id()
        return z.fork(iid, self.restorer.instances_dir / f"{iid}.{secrets.token_hex(4)}")

    def retire(self, name: str) -> None:
        """name's build changed (or went away): no more forks from its zygote, which is ended once
        its last copy has ended."""
        z = self.serving.get(name)
        if z is not None:
            self._retire(name, z)

    def _retire(self, name: str, z: Zygote) -> None:
        with self._lock:
            if self.serving.get(name) is z:
                del self.serving[name]
        with z.lock:
            z.retired = True
            childless = not z.children
        if childless:
            z.end()

    def ended(self, z: Zygote) -> None:
        """z was reaped (by the node's watcher)."""
        with self._lock:
            self.all.discard(z)
            if self.serving.get(z.template.name) is z:
                del self.serving[z.template.name]

    def describe(self, name: str) -> dict[str, Any] | None:
        z = self.serving.get(name)
        return None if z is None else z.describe()

    def close(self, leave_children: bool) -> None:
        """At stop: kill every zygote, and reap it; leave_children: leave a zygote with copies
        still running (on_shutdown = "leave"), releasing our side only."""
        with self._lock:
            zygotes = list(self.all)
            self.all.clear()
            self.serving.clear()
        for z in zygotes:
            if leave_children and z.children and z.alive():
                z.sock.close()
                z.copy.release_fds()
                continue
            z.killed = True
            z.copy.kill(grace=0)
            z.reap()


def _close_all(fds_: list[int]) -> None:
    while fds_:
        with contextlib.suppress(OSError):
            os.close(fds_.pop())


def _discard(copy: RestoredCopy) -> None:
    copy.kill(grace=0)
    copy.close()
