"""The in-app SDK: make an application a template, and give each restored copy its identity.

    import pool.runtime
    identity = pool.runtime.checkpoint()   # returns in every restored copy
    print(identity.instance_id, identity.env, identity.args)

The app boots and warms up, then calls checkpoint(): the builder is told "ready" and checkpoints the
process while it waits here; in each restored copy this call returns with that copy's identity after
the SDK applied it (os.environ, sys.argv; the pool has already set the copy's hostname) and reseeded
what copies would otherwise share (Python `random`, numpy's global generator, tempfile's name
sequence). str hashing (PYTHONHASHSEED) is fixed at interpreter start and stays shared. Outside the
pool (no control channel) it returns a local identity at once, so the same app runs unchanged
without the pool.

Fork mode (`[restore] method = "fork"`): the node restores one copy as a *zygote* and tells it so
instead of handing it an identity; checkpoint() then serves fork requests and returns only in each
forked child, which enters fresh pid/net/uts/ipc namespaces (lo up), takes the stdio and control
socket the node sent, and then waits for its identity like a restored copy. A fork is refused, the
rule named, while more than one thread runs, a socket listens or a child process lives (see
docs/limits.md).

Standard library and msgpack only: applications import this, the service never does.
"""
from __future__ import annotations

import ctypes
import gc
import fcntl
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
from typing import Callable

from pool.wire import control
from pool.wire.control import Identity  # the app's side of the identity frame; public here too

_before: list[Callable[[], None]] = []
_after: list[Callable[["Identity"], None]] = []
_after_checkpoint: list[Callable[[], None]] = []


def before_checkpoint(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run fn just before the checkpoint (close connections, flush caches, ...): the
    template's, and each `pool checkpoint` (suspend, migrate) of a running copy."""
    _before.append(fn)
    return fn


def after_checkpoint(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run fn once a running copy's checkpoint is taken, in the copy that kept running
    and in each process restored from that snapshot (rollback, resume, restart, migrate)."""
    _after_checkpoint.append(fn)
    return fn


def after_restore(fn: Callable[[Identity], None]) -> Callable[[Identity], None]:
    """Decorator: run fn(identity) in each restored copy, after the identity is applied."""
    _after.append(fn)
    return fn


def _control_fds() -> tuple[int, int] | None:
    raw = os.environ.get(control.ENV_VAR)
    if not raw:
        return None
    try:
        r, w = (int(x) for x in raw.split(","))
    except ValueError as e:
        raise RuntimeError(f"{control.ENV_VAR}={raw!r} is not 'R,W'") from e
    return r, w


def checkpoint() -> Identity:
    """Signal readiness, get checkpointed, return this copy's identity (see the module doc)."""
    fds = _control_fds()
    if fds is None:
        return Identity(instance_id="local", env={}, args=sys.argv[1:], seed=0)
    rfd, wfd = fds
    for fn in _before:
        fn()
    control.write_frame(wfd, {"type": "ready", "pid": os.getpid(), "runtime": "python"})
    msg = control.read_frame(rfd)  # CRIU checkpoints us here; each copy continues from this read
    if msg["type"] == "zygote":
        rfd = wfd = _serve_forks(str(msg["socket"]), (rfd, wfd))  # returns in each forked child
        msg = control.read_frame(rfd)
    return _become(msg, rfd, wfd)


def _become(msg: dict, rfd: int, wfd: int) -> Identity:
    """Take the identity frame msg: apply it, run the after_restore hooks, ack (or report)."""
    if msg["type"] != "identity":
        raise control.ControlError(f"expected an identity message, got {msg['type']!r}")
    ident = Identity.from_message(msg)
    try:
        _apply(ident)
        for fn in _after:
            fn(ident)
    except Exception as e:
        control.write_frame(wfd, {"type": "error", "message": f"{type(e).__name__}: {e}"})
        raise
    control.write_frame(wfd, {"type": "ack", "instance_id": ident.instance_id, "pid": os.getpid(),
                              "serves": ["checkpoint"]})
    threading.Thread(target=_serve_checkpoints, args=(rfd, wfd), name="pool-control",
                     daemon=True).start()
    return ident


def _serve_checkpoints(rfd: int, wfd: int) -> None:
    """A running copy's side of its control channel: run the checkpoint hooks when told. Ends
    when the pool closes the channel (or the copy is a fork, whose channel has no other end)."""
    hooks = {"before_checkpoint": _before, "after_checkpoint": _after_checkpoint}
    while True:
        try:
            msg = control.read_frame(rfd)
        except (control.ControlError, OSError):
            return
        try:
            for fn in hooks[msg["type"]]:
                fn()
            reply = {"type": "ok"}
        except KeyError:
            reply = {"type": "error", "message": f"unknown control message {msg['type']!r}"}
        except Exception as e:  # noqa: BLE001  reported to the pool, which decides
            reply = {"type": "error", "message": f"{type(e).__name__}: {e}"}
        try:
            control.write_frame(wfd, reply)
        except (control.ControlError, OSError):
            return


def _apply(ident: Identity) -> None:
    os.environ.update(ident.env)
    os.environ["POOL_INSTANCE_ID"] = ident.instance_id
    if ident.args:
        sys.argv[1:] = ident.args
    reseed(ident.seed)


def reseed(seed: int) -> None:
    """Give this copy its own random state: every copy restored from one image starts identical."""
    random.seed(seed)
    # tempfile caches a name generator seeded before the checkpoint; a new one draws from os.urandom.
    tempfile._name_sequence = None  # type: ignore[attr-defined]
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))


# --- fork mode: the zygote's loop --------------------------------------------------------------------
CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x04000000, 0x20000000, 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_EXIT_ON_SIGTERM = 128 + signal.SIGTERM


def _serve_forks(path: str, zygote_fds: tuple[int, int]) -> int:
    """Serve the node's fork requests on the unix socket at path. Returns only in a forked child,
    with its control socket. The zygote serves until the node goes away; then it waits to be ended
    (its forked copies live in its pid namespace: they end with it)."""
    # Every object the app built so far goes to the collector's permanent generation: a copy's
    # collections then never walk (and so never write to) the pages it shares with the zygote,
    # which would copy them one by one (copy-on-write) in each forked copy.
    gc.collect()
    gc.freeze()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.connect(path)
    try:
        control.send_packet(sock, {"type": "serving", "pid": os.getpid()})
        while True:
            child_ctl = _serve_one(sock, zygote_fds)
            if child_ctl is not None:
                return child_ctl
    except (control.ControlError, OSError):
        sock.close()
    while True:  # the node went away: its next life ends us (and our forks)
        signal.pause()


def _serve_one(sock: socket.socket, zygote_fds: tuple[int, int]) -> int | None:
    """One fork request: refused (a rule broken), or forked (in the child: its control socket)."""
    msg, fds = control.recv_packet(sock)
    if msg["type"] != "fork" or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        control.send_packet(sock, {"type": "error", "message": f"expected a fork request with 3 "
                                   f"fds, got {msg['type']!r} with {len(fds)}"})
        return None
    broken = fork_rule_broken()
    if broken is not None:
        for fd in fds:
            os.close(fd)
        control.send_packet(sock, {"type": "refused", "rule": broken[0], "message": broken[1]})
        return None
    return _fork_one(sock, fds, zygote_fds)


def fork_rule_broken() -> tuple[str, str] | None:
    """The first rule this process breaks for a fork (rule, what breaks it), or None.

    One thread: fork copies only the calling thread; the others would be missing in the copy (and
    any lock they held, held for ever). No listening socket: it belongs to the zygote's network
    namespace, so the copy's published port would reach nothing and every copy would share it.
    No child process: a child is not forked with its parent, so the copy would lack it."""
    # /proc is the host's: its pids are not os.getpid()'s (ours is in the copy's pid namespace)
    tasks = os.listdir("/proc/self/task")
    main = os.readlink("/proc/self")
    if len(tasks) > 1:
        names = sorted(_read(f"/proc/self/task/{t}/comm") for t in tasks if t != main)
        return ("one thread", f"{len(tasks)} threads run at the fork (besides the main one: "
                              f"{', '.join(names)}); start threads after checkpoint() returns")
    for fd in os.listdir("/proc/self/fd"):
        if _listening(int(fd)):
            return ("no listening socket", f"fd {fd} is a listening socket; open listeners after "
                                           "checkpoint() returns, in the copy's own namespace")
    own_ns = os.readlink("/proc/self/ns/pid")
    children = [pid for t in tasks for pid in _read(f"/proc/self/task/{t}/children").split()
                if _pid_ns(pid) == own_ns]  # not the forked copies: each is in a namespace of its own
    if children:
        return ("no child process", f"child processes {', '.join(children)} are running; a fork "
                                    "copies only this process: start them after checkpoint() returns")
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None  # gone meanwhile


def _listening(fd: int) -> bool:
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            return False
        with socket.socket(fileno=os.dup(fd)) as s:
            return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False  # gone meanwhile (the listing's own fd), or not a socket we may query


def _fork_one(sock: socket.socket, fds: list[int], zygote_fds: tuple[int, int]) -> int | None:
    """Fork a child that is PID 1 of a new pid namespace. In the zygote: report, keep the child to
    reap it (its exit status is what the node reads from its pidfd), return None. In the child:
    new net/uts/ipc namespaces, stdio in place, hello said (with a pidfd of itself); returns its
    control socket."""
    stdout, stderr, ctl = fds
    try:
        _pid_namespace_for_next_child()
        pid = os.fork()
    except OSError as e:
        pid, failed = -1, e
    if pid == 0:
        _become_copy(sock, stdout, stderr, ctl, zygote_fds)  # exits on failure
        return ctl
    for fd in fds:
        os.close(fd)
    if pid < 0:
        control.send_packet(sock, {"type": "error", "message": f"fork: {failed}"})
    else:
        _forked.add(pid)
        control.send_packet(sock, {"type": "forked"})
    return None


_forked: set[int] = set()   # the zygote's children (forked copies) not reaped yet, as it sees them
_own_pid_ns: list[int] = []  # an fd on the zygote's own pid namespace, opened once
_zygote_sigchld: list = []    # the app's SIGCHLD handler, given back to each forked copy


def _reap_forked(*_: object) -> None:
    """The zygote's SIGCHLD handler: reap its forked copies (only those: the app's own children,
    had it any, keep their statuses for it)."""
    for pid in list(_forked):
        try:
            done = os.waitpid(pid, os.WNOHANG)[0]
        except ChildProcessError:
            done = pid
        if done:
            _forked.discard(pid)


def _pid_namespace_for_next_child() -> None:
    """The next child is PID 1 of a new pid namespace below ours: back to our own namespace for
    children (unshare refuses to nest from a pending one), then a fresh one."""
    if not _own_pid_ns:
        _own_pid_ns.append(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
        _zygote_sigchld.append(signal.signal(signal.SIGCHLD, _reap_forked))
    if _libc.setns(_own_pid_ns[0], CLONE_NEWPID) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns to its own pid namespace: {os.strerror(e)}")
    _unshare(CLONE_NEWPID)


def _become_copy(sock: socket.socket, stdout: int, stderr: int, ctl: int,
                 zygote_fds: tuple[int, int]) -> None:
    """In the forked child: what makes it a copy of its own, short of its identity."""
    try:
        signal.signal(signal.SIGCHLD, _zygote_sigchld[0])
        _forked.clear()
        sock.close()  # the zygote's channels are not the copy's
        for fd in (*zygote_fds, _own_pid_ns.pop()):
            os.close(fd)
        _unshare(CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC)
        _lo_up()
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        # PID 1 ignores signals it has no handler for, even the host's SIGTERM
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda *_: os._exit(_EXIT_ON_SIGTERM))
        pidfd = os.pidfd_open(os.getpid())
        with socket.socket(fileno=os.dup(ctl)) as s:
            control.send_packet(s, {"type": "hello"}, [pidfd])
        os.close(pidfd)
        os.environ[control.ENV_VAR] = f"{ctl},{ctl}"
    except BaseException as e:  # noqa: BLE001  the node sees the control socket close
        os.write(2, f"pool.runtime: making the forked copy failed: {type(e).__name__}: {e}\n"
                 .encode())
        os._exit(3)


_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare: {os.strerror(e)}")


def _lo_up() -> None:
    """Bring the loopback interface of this (new) network namespace up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | _IFF_UP))
