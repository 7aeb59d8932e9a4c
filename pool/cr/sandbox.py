"""Boot an application the way CRIU can restore many times: fresh namespaces, tini as PID 1.

The app runs as `unshare --pid --net --uts --ipc --fork` -> `setsid tini -g -- APP`: PID 1 of its own
pid namespace (so every copy restores into a new one without PID collisions), leader of its own session
(CRIU dumps the session with the tree), tini reaping orphans and forwarding signals (a bare app as PID 1
ignores SIGTERM). Never `unshare --kill-child`: its PDEATHSIG would kill every restored copy when CRIU
exits. The network namespace has only loopback, brought up before the app starts.

With a RunAs (template `user`), tini runs `setpriv` and setpriv the app: the app and everything it
starts run with that uid/gid, no capabilities (effective, permitted, inheritable, ambient, bounding)
and no_new_privs. CRIU restores those credentials from the image, so every copy runs so too. tini
stays root: to dump a pid namespace CRIU's parasite in its init mounts a proc of that namespace,
which needs root there (docs/security.md, "Confinement"); tini runs nothing but the app.
"""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pool.wire import control

OUTPUT_TAIL_LINES = 40


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise FileNotFoundError(f"{name} is not installed (run `make setup`)")
    return path


class OutputTail:
    """Keeps the last lines an app printed, and lets a probe wait for a line matching a pattern."""

    def __init__(self, lines: int = OUTPUT_TAIL_LINES) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._cond = threading.Condition()
        self._seen = 0

    def add(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)
            self._seen += 1
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate(line) holds for a line printed from now on or already kept."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            while True:
                lines = list(self._lines)
                new = lines[max(0, len(lines) - (self._seen - checked)):]
                checked = self._seen
                if any(predicate(ln) for ln in new):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user an app runs as (template `user`)."""

    uid: int
    gid: int
    name: str | None = None        # an account: its supplementary groups come along
    home: str | None = None

    def setpriv_argv(self) -> list[str]:
        """setpriv's arguments to become this user with no privilege left to regain."""
        groups = ["--init-groups"] if self.name else ["--clear-groups"]
        return [_tool("setpriv"), f"--reuid={self.uid}", f"--regid={self.gid}", *groups,
                "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--"]


@dataclass
class Pipe:
    """One pipe we made for the app: our end, the app's end and the inode CRIU will know it by."""

    ours: int
    theirs: int
    inode: int

    @classmethod
    def make(cls, app_reads: bool) -> "Pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = (w, r) if app_reads else (r, w)
        return cls(ours=ours, theirs=theirs, inode=os.fstat(r).st_ino)

    @property
    def key(self) -> str:
        return f"pipe:[{self.inode}]"


@dataclass
class BootedApp:
    """An app booted in its own namespaces, not yet checkpointed."""

    launcher: subprocess.Popen
    root_pid: int                 # tini: PID 1 of the app's namespaces, the tree CRIU dumps
    stdout: Pipe
    stderr: Pipe
    ctl_in: Pipe | None           # pool -> app (the app reads)
    ctl_out: Pipe | None          # app -> pool
    output: OutputTail
    started: float = field(default_factory=time.monotonic)
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"/proc/{self.root_pid}/ns/net"

    def exited(self) -> int | None:
        """The launcher's exit status once the app is gone, else None."""
        return self.launcher.poll()

    def tree_rss(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.root_pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        return total

    def kill(self) -> None:
        """Kill the whole app (SIGKILL to PID 1 ends its namespace) and reap the launcher."""
        if self.root_pid > 0:  # -1 until PID 1 is known, and kill(-1) would signal every process
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.root_pid, signal.SIGKILL)
            # unshare reaps PID 1 and exits; killing unshare first would orphan PID 1 to us when we
            # are a child subreaper (as any Restorer makes us), and nobody would reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.launcher.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            self.launcher.kill()
        self.launcher.wait()
        self.close()

    def close(self) -> None:
        """Close our pipe ends (idempotent). The inodes stay known: the manifest records them."""
        for t in self._readers:
            t.join(timeout=2)
        self._readers.clear()
        for p in (self.stdout, self.stderr, self.ctl_in, self.ctl_out):
            if p is not None and p.ours >= 0:
                with contextlib.suppress(OSError):
                    os.close(p.ours)
                p.ours = -1


def _drain(fd: int, tail: OutputTail, echo) -> None:
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            text = ln.decode(errors="replace")
            tail.add(text)
            if echo:
                echo(text)
    if buf:
        tail.add(buf.decode(errors="replace"))


def resolve_command(exe: str, cwd: Path, path: str) -> str:
    """The file exe runs: a path (relative to cwd) or looked up in PATH. FileNotFoundError if none."""
    resolved = os.path.join(cwd, exe) if "/" in exe else shutil.which(exe, path=path)
    if resolved is None or not os.path.exists(resolved):
        raise FileNotFoundError(f"command not found: {exe!r} (PATH={path})")
    return resolved


def boot(command: list[str], *, cwd: Path, env: dict[str, str], sdk: bool,
         echo=None, user: RunAs | None = None) -> BootedApp:
    """Start command in fresh pid/net/uts/ipc namespaces under tini (as user, if given); returns
    once PID 1 exists.

    Raises FileNotFoundError/PermissionError naming the command when it cannot be executed.
    """
    resolved = resolve_command(command[0], cwd, env.get("PATH", ""))
    if not os.access(resolved, os.X_OK):
        raise PermissionError(f"command is not executable: {resolved}")

    stdout, stderr = Pipe.make(app_reads=False), Pipe.make(app_reads=False)
    ctl_in = Pipe.make(app_reads=True) if sdk else None
    ctl_out = Pipe.make(app_reads=False) if sdk else None
    app_fds = [p.theirs for p in (ctl_in, ctl_out) if p is not None]
    env = dict(env)
    if sdk:
        env[control.ENV_VAR] = f"{ctl_in.theirs},{ctl_out.theirs}"
    drop = " ".join(user.setpriv_argv()) + " " if user is not None else ""
    script = (f'{_tool("ip")} link set lo up && '
              f'exec {_tool("setsid")} {_tool("tini")} -g -s -- {drop}"$@"')
    argv = [_tool("unshare"), "--pid", "--net", "--uts", "--ipc", "--fork", "--",
            "/bin/sh", "-c", script, "pool-app", *command]
    try:
        launcher = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=stdout.theirs, stderr=stderr.theirs, pass_fds=app_fds,
                                    start_new_session=True)
    except OSError:
        for p in (stdout, stderr, ctl_in, ctl_out):
            if p is not None:
                os.close(p.ours)
                os.close(p.theirs)
        raise
    for p in (stdout, stderr, ctl_in, ctl_out):
        if p is not None:  # the app holds its ends now; ours must not keep pipes open
            os.close(p.theirs)
    tail = OutputTail()
    app = BootedApp(launcher=launcher, root_pid=-1, stdout=stdout, stderr=stderr, ctl_in=ctl_in,
                    ctl_out=ctl_out, output=tail)
    for p in (stdout, stderr):
        t = threading.Thread(target=_drain, args=(p.ours, tail, echo), daemon=True,
                             name="app-output")
        t.start()
        app._readers.append(t)
    try:
        app.root_pid = _wait_child(launcher, timeout=10)
    except BaseException:
        app.kill()
        raise
    return app


def _wait_child(launcher: subprocess.Popen, timeout: float) -> int:
    """The host pid of unshare's child: PID 1 of the new namespaces."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(launcher.pid).children()
            if kids:
                return kids[0].pid
        if launcher.poll() is not None:
            raise ChildProcessError(f"unshare exited with status {launcher.returncode} at once")
        time.sleep(0.002)
    raise TimeoutError("unshare did not start the app's namespace in time")
