"""The only module that talks to CRIU.

We start `criu swrk FD` ourselves (subprocess: thread-safe, killable, with a deadline) and let pycriu,
CRIU's own binding, speak the RPC over FD. Two kinds of failure stay distinct, as in pycriu:
`CriuUnavailable` (CRIU could not be found, started or talked to) and `CriuFailed` (CRIU ran and said no;
errno and the last error lines of its log come along).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from pool import config, fds
from pool.errors import CriuFailed, CriuTimeout, CriuUnavailable

_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.M)
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class CriuVersion:
    major: int
    minor: int
    sublevel: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"

    @classmethod
    def parse(cls, text: str) -> "CriuVersion":
        m = _VERSION_RE.search(text)
        if not m:
            raise ValueError(f"not a CRIU version string: {text.strip()[:80]!r}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    output: str


@dataclass
class DumpOptions:
    leave_running: bool = False
    network_lock_skip: bool = True    # templates live in their own netns; nothing to lock
    external: list[str] = field(default_factory=list)
    tcp_close: bool = False
    ghost_limit: int | None = None
    log_level: int = 4
    # Post-copy: CRIU writes every image but the lazy memory pages, then serves those pages from
    # this address until the target's lazy-pages daemon has taken them all (see dump_lazy).
    lazy_pages: bool = False
    page_server: tuple[str, int] | None = None
    # Iterative dump: the memory a pre-dump wrote (parent_img, relative to images_dir, so the
    # `parent` symlink CRIU writes there still resolves once the dir is moved) is not written
    # again unless it changed since; track_mem resets the soft-dirty bits for a later round.
    track_mem: bool = False
    parent_img: str | None = None


@dataclass
class RestoreOptions:
    # key (e.g. "pipe:[1234]") -> fd in this process that replaces it in the copy
    inherit_fds: dict[str, int] = field(default_factory=dict)
    tcp_close: bool = False
    rst_sibling: bool = False
    log_level: int = 2
    # Memory comes on demand from a lazy-pages daemon (see lazy_pages) listening in log_dir.
    lazy_pages: bool = False
    # Called with the pid of the CRIU that will restore, before it is asked to: the restored tree
    # is forked by it, so moving it into the copy's cgroup here charges the copy's memory there
    # from its first page (pool/cr/cgroups.py, docs/limits.md).
    before_restore: Callable[[int], None] | None = None


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The lines of a CRIU log that explain a failure: its errors first, else its last lines."""
    all_lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in all_lines if "Error" in ln or "error" in ln]
    picked = errors[-lines:] if errors else all_lines[-lines:]
    return "\n".join(picked)


def _single_pre_dump(client) -> object:
    """pycriu's pre_dump() with the one-shot request type (see Criu.pre_dump)."""
    pycriu = _import_pycriu()
    req = pycriu.rpc.criu_req()
    req.type = pycriu.rpc.SINGLE_PRE_DUMP
    req.opts.MergeFrom(client.opts)
    resp = client._send_req_and_recv_resp(req)
    if not resp.success:
        raise pycriu.CRIUExceptionExternal(req.type, resp.type, resp.cr_errno)
    return resp


def _import_pycriu():
    try:
        import pycriu  # noqa: PLC0415  (comes from Debian's python3-pycriu via the venv's .pth)
    except ImportError as e:
        raise CriuUnavailable(
            "pycriu is not importable: run `make setup` (it installs python3-pycriu and links it "
            "into the virtualenv)") from e
    return pycriu


class Criu:
    """One CRIU binary. Methods are blocking and safe to call from several threads at once."""

    # Mutual TLS for lazy pages over TCP (the page server and the lazy-pages daemon): anything with
    # ca, cert, key paths and criu_args() (pool.wire.tls.TlsFiles); None: plain TCP.
    page_server_tls: Any = None

    def __init__(self, binary: str | os.PathLike[str]) -> None:
        self.binary = str(binary)
        self._version: CriuVersion | None = None

    # -- discovery ---------------------------------------------------------------------------------
    @classmethod
    def locate(cls) -> "Criu":
        """Find a usable CRIU: POOL_CRIU, else the installer's path, else PATH. Checks version only."""
        problems = []
        for path, why in config.criu_candidates():
            try:
                crit = cls(path)
                v = crit.version()
            except CriuUnavailable as e:
                if why == "POOL_CRIU":
                    raise CriuUnavailable(f"POOL_CRIU={path}: {e.message}", path=path) from e
                problems.append(f"{path} ({why}): {e.message}")
                continue
            if not v.at_least(*config.MIN_CRIU_VERSION):
                problems.append(f"{path} ({why}) is CRIU {v}, older than 4.2")
                if why == "POOL_CRIU":
                    break
                continue
            return crit
        detail = "; ".join(problems) or "no CRIU found"
        raise CriuUnavailable(
            f"no usable CRIU >= 4.2 ({detail}); run `make setup` or scripts/install-criu.sh, "
            f"or point POOL_CRIU at a CRIU >= 4.2")

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.binary, *args], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except FileNotFoundError as e:
            raise CriuUnavailable(f"{self.binary} does not exist", path=self.binary) from e
        except PermissionError as e:
            raise CriuUnavailable(f"{self.binary} is not executable", path=self.binary) from e
        except OSError as e:
            raise CriuUnavailable(f"cannot run {self.binary}: {e.strerror}", path=self.binary,
                                  errno=e.errno) from e
        except subprocess.TimeoutExpired as e:
            raise CriuUnavailable(f"{self.binary} {' '.join(args)} did not answer in {timeout}s") from e

    def version(self) -> CriuVersion:
        if self._version is None:
            res = self._run(["--version"], timeout=10)
            try:
                self._version = CriuVersion.parse(res.stdout)
            except ValueError as e:
                raise CriuUnavailable(
                    f"{self.binary} --version did not print a CRIU version "
                    f"(exit {res.returncode}): {(res.stdout + res.stderr).strip()[:200]}",
                    path=self.binary) from e
        return self._version

    def check(self) -> CheckResult:
        """`criu check`: whether the kernel and CRIU can dump and restore at all."""
        res = self._run(["check"], timeout=60)
        out = (res.stdout + res.stderr).strip()
        return CheckResult(ok=res.returncode == 0, output=out)

    def feature(self, name: str) -> CheckResult:
        """`criu check --feature NAME`, e.g. uffd-noncoop (lazy pages), mem_dirty_track, timens."""
        res = self._run(["check", "--feature", name], timeout=30)
        out = (res.stdout + res.stderr).strip()
        return CheckResult(ok=res.returncode == 0 and "Error" not in out and "OFF" not in out,
                           output=out)

    # -- RPC ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _swrk(self, pass_fds: tuple[int, ...]) -> Iterator[tuple[object, subprocess.Popen]]:
        """A fresh `criu swrk` process and a pycriu client bound to it; both gone on exit."""
        pycriu = _import_pycriu()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                proc = subprocess.Popen(
                    [self.binary, "swrk", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(), *pass_fds),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except OSError as e:
                raise CriuUnavailable(f"cannot start {self.binary} swrk: {e.strerror}",
                                      path=self.binary, errno=e.errno) from e
            theirs.close()
            client = pycriu.criu()
            client.use_fd(ours.fileno())
            try:
                yield client, proc
            finally:
                # pycriu dups our fd and closes the dup only on success: close it on every path.
                dup = getattr(client._comm, "sk", None)
                if dup is not None:
                    dup.close()
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if proc.stderr:
                    proc.stderr.close()
        finally:
            ours.close()
            theirs.close()

    def _call(self, op: str, fn, client, proc: subprocess.Popen, timeout: float,
              log_file: Path | None):
        """Run one pycriu request with a deadline; translate failures into our errors."""
        pycriu = _import_pycriu()
        result: dict[str, object] = {}

        def target() -> None:
            try:
                result["value"] = fn(client)
            except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
                result["error"] = e

        worker = threading.Thread(target=target, name=f"criu-{op}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            killed = _kill_tree(proc.pid)
            worker.join(10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # once CRIU is reaped, what it had restored is reparented to us
            _reap_orphans(killed - {proc.pid})
            raise CriuTimeout(op, f"no answer within {timeout:g}s; CRIU was killed",
                              log_tail=_read_tail(log_file), log_path=_str(log_file))
        err = result.get("error")
        if err is None:
            return result.get("value")
        tail = _read_tail(log_file)
        if isinstance(err, pycriu.CRIUExceptionExternal):
            code = getattr(err, "errno", None) or None
            raise CriuFailed(op, _errno_text(code), errno=code, log_tail=tail,
                             log_path=_str(log_file)) from err
        if isinstance(err, pycriu.CRIUException):
            # The RPC itself broke: CRIU died or never answered. What it had half-restored is
            # reparented to us (we are a subreaper): kill and reap it.
            stderr = _drain(proc)
            reap_strays()
            if tail or stderr:
                raise CriuFailed(op, f"CRIU stopped answering ({err})", log_tail=tail or stderr,
                                 log_path=_str(log_file)) from err
            raise CriuUnavailable(f"could not talk to CRIU ({self.binary}): {err}") from err
        raise err  # a bug of ours: keep its traceback

    def dump(self, pid: int, images_dir: Path, *, opts: DumpOptions | None = None,
             timeout: float = 120.0, log_dir: Path) -> Path:
        """Checkpoint the tree rooted at pid into images_dir, which this call creates (0700).

        The log goes to log_dir, so that a failed dump removes images_dir entirely and still keeps
        its log. Returns the log's path.
        """
        return self._dump_into_new(pid, images_dir, opts or DumpOptions(), timeout, log_dir, "dump")

    def pre_dump(self, pid: int, images_dir: Path, *, opts: DumpOptions | None = None,
                 timeout: float = 120.0, log_dir: Path) -> Path:
        """Pre-dump the tree rooted at pid into images_dir (created here, 0700): its memory is
        written while it runs (frozen only to collect it), and the kernel's soft-dirty bits reset,
        so that a dump with parent_img pointing here writes only what changed since. The tree always
        keeps running. Needs `feature("mem_dirty_track")`; without it CRIU aborts. A failure
        removes images_dir; the log stays in log_dir. Returns the log's path.

        One-shot: SINGLE_PRE_DUMP. A PRE_DUMP request would make CRIU wait on the same connection
        for a next pre-dump or the dump (cr-service.c, pre_dump_loop); ours is one process a call.
        """
        opts = replace(opts or DumpOptions(), track_mem=True, parent_img=None, lazy_pages=False)
        return self._dump_into_new(pid, images_dir, opts, timeout, log_dir, "pre-dump")

    def _dump_into_new(self, pid: int, images_dir: Path, opts: DumpOptions, timeout: float,
                       log_dir: Path, op: str) -> Path:
        images_dir.mkdir(mode=0o700)
        try:
            return self._dump(pid, images_dir, opts, timeout, log_dir, op=op)
        except BaseException:
            shutil.rmtree(images_dir, ignore_errors=True)
            raise

    def _dump(self, pid: int, images_dir: Path, opts: DumpOptions, timeout: float,
              log_dir: Path, status_fd: int | None = None,
              watch: list[subprocess.Popen] | None = None, op: str = "dump") -> Path:
        """One dump ("dump") or pre-dump ("pre-dump") request to a CRIU of its own."""
        img_fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        log_fd = os.open(log_dir, os.O_DIRECTORY | os.O_RDONLY)
        log_path = log_dir / f"{op}.log"
        try:
            with self._swrk((img_fd, log_fd)) as (client, proc):
                if watch is not None:
                    watch.append(proc)
                o = client.opts
                o.images_dir_fd = img_fd
                o.work_dir_fd = log_fd
                o.log_file = log_path.name
                o.log_level = opts.log_level
                o.pid = pid
                o.leave_running = opts.leave_running
                o.shell_job = False
                o.file_locks = True
                o.tcp_close = opts.tcp_close
                if opts.network_lock_skip:
                    o.network_lock = 3  # criu_network_lock_method.SKIP
                for ext in opts.external:
                    o.external.append(ext)
                if opts.ghost_limit is not None:
                    o.ghost_limit = opts.ghost_limit
                if opts.track_mem:
                    o.track_mem = True
                if opts.parent_img is not None:
                    o.parent_img = opts.parent_img
                if opts.lazy_pages:
                    o.lazy_pages = True
                    if opts.page_server is not None:
                        o.ps.address, o.ps.port = opts.page_server
                        if self.page_server_tls is not None:  # CA checked, not the name: see criu_args
                            tls = self.page_server_tls
                            o.tls, o.tls_no_cn_verify = True, True
                            o.tls_cacert, o.tls_cert, o.tls_key = str(tls.ca), str(tls.cert), str(tls.key)
                if status_fd is not None:
                    o.status_fd = status_fd  # CRIU opens /proc/OURPID/fd/N and writes once ready
                request = _single_pre_dump if op == "pre-dump" else (lambda c: c.dump())
                self._call(op, request, client, proc, timeout, log_path)
        finally:
            os.close(img_fd)
            os.close(log_fd)
        return log_path

    def restore(self, images_dir: Path, *, opts: RestoreOptions | None = None,
                timeout: float = 60.0, log_dir: Path) -> int:
        """Restore the tree in images_dir (detached); returns the pid of its root in our namespace.

        The restored root becomes our child once CRIU exits only if this process is a child subreaper
        (see `become_subreaper`); otherwise it is reparented to init and cannot be waited for.
        """
        opts = opts or RestoreOptions()
        img_fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        log_fd = os.open(log_dir, os.O_DIRECTORY | os.O_RDONLY)
        log_path = log_dir / "restore.log"
        for fd in opts.inherit_fds.values():
            os.set_inheritable(fd, True)  # else CRIU says "Can't fstat inherit fd"
        try:
            with self._swrk((img_fd, log_fd, *opts.inherit_fds.values())) as (client, proc):
                if opts.before_restore is not None:
                    try:
                        opts.before_restore(proc.pid)
                    except BaseException:
                        proc.kill()  # it waits for a request that will not come
                        raise
                o = client.opts
                o.images_dir_fd = img_fd
                o.work_dir_fd = log_fd
                o.log_file = "restore.log"
                o.log_level = opts.log_level
                o.shell_job = False
                o.file_locks = True
                o.tcp_close = opts.tcp_close
                o.rst_sibling = opts.rst_sibling
                o.lazy_pages = opts.lazy_pages
                # The tree stays in CRIU's own cgroup (the copy's: before_restore): never moved
                # into the cgroup it was dumped from (a running copy's, when it is forked).
                o.manage_cgroups_mode = 0  # criu_cg_mode.IGNORE
                for key, fd in opts.inherit_fds.items():
                    o.inherit_fd.add(key=key, fd=fd)
                resp = self._call("restore", lambda c: c.restore(), client, proc, timeout, log_path)
                claim(int(resp.pid))  # before CRIU exits and the copy becomes our child
        finally:
            os.close(img_fd)
            os.close(log_fd)
        return int(resp.pid)

    # -- lazy pages (post-copy) -------------------------------------------------------------------
    def dump_lazy(self, pid: int, images_dir: Path, page_server: tuple[str, int], *,
                  opts: DumpOptions | None = None, ready_timeout: float = 60.0,
                  timeout: float = 300.0, log_dir: Path) -> "LazyDump":
        """Start a lazy dump; return once images_dir is complete and its page server listens.

        The tree stays frozen while the pages are served; the returned LazyDump ends when the
        target has taken every page (then the tree is killed, or resumed with leave_running), or
        after `timeout` seconds in all (CRIU killed: the tree is resumed, as after a failed dump).
        Needs fs.pipe-max-size >= 4 MiB: CRIU holds the pages in pipes and cannot grow them here.
        """
        opts = replace(opts or DumpOptions(), lazy_pages=True, page_server=page_server)
        images_dir.mkdir(mode=0o700)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        job = LazyDump(log_dir / "dump.log")
        job.start(lambda: self._dump(pid, images_dir, opts, timeout, log_dir, status_fd=ready_w,
                                     watch=job.procs))
        try:
            job.wait_ready(ready_r, ready_timeout)
        except BaseException:
            shutil.rmtree(images_dir, ignore_errors=True)
            raise
        finally:
            os.close(ready_r)
            os.close(ready_w)
        return job

    def lazy_pages(self, images_dir: Path, work_dir: Path, *,
                   page_server: tuple[str, int] | None = None,
                   ready_timeout: float = 30.0, log_faults: bool = True) -> "LazyPages":
        """Start `criu lazy-pages` for one restore from images_dir (no RPC exists for it).

        It listens on work_dir/lazy-pages.socket, so the lazy restore must use the same work_dir
        (our restore uses log_dir). With page_server it fetches pages from a lazy dump's page
        server, else it reads them from the images' pages files. It exits once every page is in.
        log_faults: log at -v4, which names every page the copy faulted on (see faulted_pages);
        without it the daemon logs errors only and spends no time on a line per page copied.
        """
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        args = [self.binary, "lazy-pages", "-D", str(images_dir), "-W", str(work_dir),
                "-o", "lazy-pages.log", "-v4" if log_faults else "-v1",
                "--status-fd", str(ready_w)]
        if page_server is not None:
            args += ["--page-server", "--address", page_server[0], "--port", str(page_server[1])]
            if self.page_server_tls is not None:
                args += self.page_server_tls.criu_args()
        try:
            proc = subprocess.Popen(args, pass_fds=(ready_w,), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            raise CriuUnavailable(f"cannot start {self.binary} lazy-pages: {e.strerror}",
                                  path=self.binary, errno=e.errno) from e
        os.close(ready_w)
        daemon = LazyPages(proc, work_dir / "lazy-pages.log")
        try:
            ready = _wait_status(ready_r, ready_timeout, proc.poll)
        finally:
            os.close(ready_r)
        if not ready:
            daemon.kill()
            why = (f"exited with status {proc.returncode}" if proc.returncode is not None
                   else f"not ready within {ready_timeout:g}s; killed")
            raise CriuFailed("lazy-pages", why, log_tail=daemon.log_tail(),
                             log_path=str(daemon.log_path))
        return daemon

    def cpuinfo_dump(self, images_dir: Path) -> None:
        """Record this node's CPU features (cpuinfo.img) next to a template's images."""
        self._cpuinfo("cpuinfo-dump", images_dir)

    def cpuinfo_check(self, images_dir: Path) -> None:
        """Raise CriuFailed if this node's CPU lacks features recorded in images_dir/cpuinfo.img."""
        self._cpuinfo("cpuinfo-check", images_dir)

    def _cpuinfo(self, action: str, images_dir: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="pool-cpuinfo-") as tmp:
            log = Path(tmp) / "cpuinfo.log"
            res = self._run(["cpuinfo", action.split("-")[1], "-D", str(images_dir),
                             "-o", str(log), "-v4"], timeout=30)
            if res.returncode != 0:
                text = log.read_text(errors="replace") if log.exists() else res.stderr
                raise CriuFailed(f"cpuinfo {action.split('-')[1]}", f"exit status {res.returncode}",
                                 log_tail=log_tail(text))


class LazyDump:
    """A lazy dump running in a thread: its page server serves the pages until the target has them."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.procs: list[subprocess.Popen] = []  # the `criu swrk` serving the pages, once started
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, fn) -> None:
        def target() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  re-raised by wait()
                self._error = e

        self._thread = threading.Thread(target=target, name="criu-lazy-dump", daemon=True)
        self._thread.start()

    def wait_ready(self, ready_fd: int, timeout: float) -> None:
        """Until CRIU says its page server listens; raises the dump's error if it ended first."""
        assert self._thread is not None
        if _wait_status(ready_fd, timeout, lambda: None if self._thread.is_alive() else 0):
            return
        if self._thread.is_alive():
            self.kill()
            self._thread.join(30)
            self._error = None
            raise CriuTimeout("dump", f"lazy dump not ready within {timeout:g}s; CRIU was killed",
                              log_tail=_read_tail(self.log_path), log_path=str(self.log_path))
        self.wait(0)  # raises the dump's own error
        raise CriuFailed("dump", "lazy dump ended before its page server started",
                         log_tail=_read_tail(self.log_path), log_path=str(self.log_path))

    def kill(self) -> None:
        """Abort: kill CRIU. The dumped tree is resumed (its tracer is gone), as after a failed dump."""
        for proc in self.procs:
            _kill_tree(proc.pid)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the dump has ended (raising its error, if any); False if still serving."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return True


class LazyPages:
    """A running `criu lazy-pages` daemon (feeds one lazily restored tree its memory)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def wait(self, timeout: float) -> int:
        """Its exit status once every page was delivered; CriuTimeout (daemon killed) after timeout."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            self.kill()
            raise CriuTimeout("lazy-pages", f"pages not all delivered within {timeout:g}s; killed",
                              log_tail=self.log_tail(), log_path=str(self.log_path)) from e
        if rc != 0:
            raise CriuFailed("lazy-pages", f"exit status {rc}", log_tail=self.log_tail(),
                             log_path=str(self.log_path))
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_tail(self) -> str:
        return _read_tail(self.log_path)

    def failed(self) -> str | None:
        """Why the daemon ended before its job was done (None: still running, or all pages in)."""
        rc = self.proc.poll()
        if rc is None or rc == 0:
            return None
        return f"the lazy-pages daemon exited with status {rc}"

    def watch(self, timeout: float, on_failure) -> threading.Thread:
        """Reap the daemon in the background: it ends once every page is in, or once the copy it
        feeds has exited. If it dies first, or is still running after timeout seconds (then it is
        killed), on_failure(why) is called: the copy's memory can no longer be trusted (a dead
        daemon's missing pages would read as zeros)."""
        def reap() -> None:
            try:
                self.wait(timeout)
            except (CriuTimeout, CriuFailed) as e:
                on_failure(e.message)

        thread = threading.Thread(target=reap, name="criu-lazy-pages", daemon=True)
        thread.start()
        return thread


_FAULT_RE = re.compile(r"(\d+)-\d+: #PF at 0x([0-9a-f]+)")


def faulted_pages(log_text: str) -> list[tuple[int, int]]:
    """(pid, page address) for every page a lazily restored tree faulted on, in order, from the
    lazy-pages daemon's -v4 log ("uffd: PID-UFFD: #PF at 0xADDR", CRIU 4.x criu/uffd.c; PID is
    the process's pid inside the restored tree's namespace, the same in every restore). Pages the
    daemon pushed in the background before the copy touched them are not there."""
    return [(int(m.group(1)), int(m.group(2), 16)) for m in _FAULT_RE.finditer(log_text)]


def _wait_status(fd: int, timeout: float, ended) -> bool:
    """Wait for CRIU's status-fd byte; False on timeout or once ended() says the writer is gone."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fds.readable(fd, min(left, 0.05)):
            return os.read(fd, 1) == b"\0"  # EOF: CRIU closed it without saying ready
        if ended() is not None:
            return False


def read_dump_stats(images_dir: Path) -> dict[str, int]:
    """What CRIU measured of a dump (its stats-dump image): freezing_time, frozen_time (how long
    the tree was frozen), memdump_time, memwrite_time in microseconds, pages_*; {} if unreadable."""
    pycriu = _import_pycriu()
    try:
        with open(images_dir / "stats-dump", "rb") as f:
            entry = pycriu.images.load(f)["entries"][0]
    except (OSError, KeyError, IndexError, ValueError, pycriu.images.MagicException):
        return {}
    return {k: int(v) for k, v in (entry.get("dump") or {}).items()
            if isinstance(v, (int, str)) and str(v).isdigit()}


def become_subreaper() -> None:
    """Make this process the reaper of every restored copy (PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


def _kill_tree(pid: int) -> set[int]:
    """SIGKILL a process and its descendants (CRIU plus whatever it had half-restored)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    return {p.pid for p in procs}


def _reap_orphans(pids: set[int], timeout: float = 3.0) -> None:
    """Reap killed descendants of a dead CRIU that were reparented to us (we are a subreaper):
    else a half-restored copy stays our zombie."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.discard(pid)
            except ChildProcessError:  # not ours: gone, or reaped by init
                left.discard(pid)
        if left:
            time.sleep(0.02)


# -- stray children -------------------------------------------------------------------------------
# A copy's PID 1 becomes our child once the CRIU that restored it exits (we are a subreaper). So
# do the half-restored tree and the helpers (iptables, ...) of a CRIU that died mid-restore:
# strays, which nobody else would kill or reap. A stray is a direct child that no one claimed
# (Criu.restore claims the pid it returns before CRIU exits; RestoredCopy.poll disowns it once
# reaped) and that is either in a pid namespace below ours (a restored tree) or a zombie (a dead
# helper: our own subprocesses are waited for by whoever started them as soon as they exit).
_claimed: set[int] = set()
_claimed_lock = threading.Lock()


def claim(pid: int) -> None:
    with _claimed_lock:
        _claimed.add(pid)


def disown(pid: int) -> None:
    with _claimed_lock:
        _claimed.discard(pid)


def _status(pid: int | str) -> tuple[int, bool]:
    """How many pid namespaces pid is in as seen from ours (1: ours only; 0: gone), and whether it
    is a zombie."""
    depth, zombie = 0, False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    zombie = line.split()[1] == "Z"
                elif line.startswith("NSpid:"):
                    depth = len(line.split()) - 1
    except OSError:
        pass
    return depth, zombie


def stray_children(known: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Our direct children that are neither known nor claimed, and are in a nested pid namespace
    or zombies."""
    kids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            kids.update(int(pid) for pid in f.read().split())
    ours = _status("self")[0]
    with _claimed_lock:
        mine = _claimed | set(known)
    strays = set()
    for pid in kids - mine:
        depth, zombie = _status(pid)
        if depth > ours or depth and zombie:
            strays.add(pid)
    return strays


def kill_strays(strays: set[int]) -> None:
    """SIGKILL strays (the init of their pid namespace: all of it dies) and reap them by pid.
    They are our unreaped children, so their pids cannot have been recycled."""
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap_orphans(strays)


def reap_strays(known: set[int] | frozenset[int] = frozenset(), grace: float = 0.2) -> set[int]:
    """Kill and reap the strays seen twice, grace seconds apart (a restore that just returned has
    claimed its pid by then). Returns them."""
    first = stray_children(known)
    if not first:
        return set()
    time.sleep(grace)
    strays = first & stray_children(known)
    kill_strays(strays)
    return strays


def _drain(proc: subprocess.Popen) -> str:
    if proc.stderr is None:
        return ""
    try:
        proc.wait(timeout=5)
        return log_tail(proc.stderr.read().decode(errors="replace"))
    except (subprocess.TimeoutExpired, OSError, ValueError):
        return ""


def _read_tail(log_file: Path | None) -> str:
    if log_file is None:
        return ""
    try:
        return log_tail(log_file.read_text(errors="replace"))
    except OSError:
        return ""


def _errno_text(code: int | None) -> str:
    if not code:
        return "CRIU reported failure"
    name = errno_mod.errorcode.get(code, str(code))
    return f"errno {code} ({name}: {os.strerror(code)})"


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)
