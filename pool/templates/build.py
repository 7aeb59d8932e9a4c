"""Build a template: boot -> ready -> warm up -> checkpoint -> publish, as explicit steps.

Until the publish step a failure rolls back: the app is killed, the staging directory removed, and the
previously published build (if any) stays current. Publishing is one rename (store.py); after it,
cleanup problems are only reported.
"""
from __future__ import annotations

import os
import platform
import stat
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pool.cr import hints, netns, sandbox
from pool.cr.criu import Criu, DumpOptions
from pool.errors import BuildError, CriuError, CriuFailed
from pool.templates import store, workingset
from pool.templates.manifest import Manifest
from pool.templates.spec import Spec
from pool.wire.control import ControlError, read_frame

Progress = Callable[[str], None]
NODE_SDK_DIR = Path(__file__).resolve().parents[1] / "js"  # pool/js: pool-runtime.js


def _quiet(_: str) -> None:
    pass


@dataclass
class BuildResult:
    template: store.Template

    @property
    def manifest(self) -> Manifest:
        return self.template.manifest


def app_environment(spec: Spec) -> dict[str, str]:
    """A small, predictable environment: the builder's secrets and POOL_* settings do not leak into
    images. Our own Python environment comes first on PATH so SDK apps find pool.runtime, and
    NODE_PATH holds the Node SDK (`require('pool-runtime')`)."""
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    venv_bin = str(Path(sys.executable).parent)
    if sys.prefix != sys.base_prefix and venv_bin not in path.split(os.pathsep):
        path = venv_bin + os.pathsep + path
    home = spec.user.home if spec.user is not None and spec.user.home else \
        os.environ.get("HOME", "/root")  # an unprivileged app cannot read root's home
    env = {"PATH": path, "HOME": home,
           "LANG": os.environ.get("LANG", "C.UTF-8"),
           "UV_USE_IO_URING": "0",  # CRIU cannot dump io_uring (Node's libuv uses it by default)
           "NODE_PATH": str(NODE_SDK_DIR)}
    env.update(spec.env_dict)
    return env


def build(spec: Spec, st: store.Store, criu: Criu, *, progress: Progress = _quiet,
          timeout: float = 300.0, echo: Callable[[str], None] | None = None) -> BuildResult:
    try:
        return _build(spec, st, criu, progress, timeout, echo)
    except OSError as e:  # staging dir, manifest, publish (the app's steps raise BuildError)
        raise BuildError("writing the store", store.write_problem(e.errno), errno=e.errno) from e


def _build(spec: Spec, st: store.Store, criu: Criu, progress: Progress, timeout: float,
           echo: Callable[[str], None] | None) -> BuildResult:
    t0 = time.monotonic()
    criu_version = criu.version()
    with st.staging(spec.name) as staged:
        image = staged / "image"
        progress(f"booting {spec.name}: {' '.join(spec.command)}")
        app = _boot(spec, echo)
        try:
            boot_to_ready = _wait_ready(app, spec, progress)
            warm_s = _warm_up(app, spec, progress)
            rss = app.tree_rss()
            progress(f"checkpointing ({rss / 2**20:.0f} MB resident)")
            t_dump = time.monotonic()
            try:
                criu.dump(app.root_pid, image, log_dir=staged, timeout=timeout,
                          opts=DumpOptions(tcp_close=spec.checkpoint.tcp_close,
                                           ghost_limit=spec.checkpoint.ghost_limit))
                dump_s = time.monotonic() - t_dump
                criu.cpuinfo_dump(image)
            except CriuFailed as e:
                raise _checkpoint_failed(e, app) from e
        except (BuildError, CriuError):
            raise
        except BaseException as e:
            raise BuildError("building", f"{type(e).__name__}: {e}",
                             output_tail=app.output.text()) from e
        finally:
            app.kill()  # CRIU killed the tree after a good dump; after a failure we must
        pipes = {"stdout": app.stdout.inode, "stderr": app.stderr.inode}
        if app.ctl_in is not None and app.ctl_out is not None:
            pipes.update(ctl_in=app.ctl_in.inode, ctl_out=app.ctl_out.inode)
        working_set = _record_working_set(spec, image, criu, pipes, progress, timeout)
        manifest = {
            "build_id": store.new_build_id(),
            "spec": spec.to_dict(),
            "spec_digest": spec.digest,
            "criu_version": str(criu_version),
            "kernel": platform.release(),
            "arch": platform.machine(),
            "pipes": pipes,
            "rss_bytes": rss,
            "boot_to_ready_s": round(boot_to_ready, 4),
            "warmup_s": round(warm_s, 4),
            "dump_s": round(dump_s, 4),
            **working_set,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest["build_s"] = round(time.monotonic() - t0, 4)
        progress("publishing")
        template = st.publish(spec.name, staged, manifest)  # point of no return
    progress(f"built {spec.name}: ready after {boot_to_ready:.2f}s, image "
             f"{template.image_bytes / 2**20:.1f} MB, dump {dump_s:.2f}s")
    return BuildResult(template)


def _record_working_set(spec: Spec, image: Path, criu: Criu, pipes: dict[str, int],
                        progress: Progress, timeout: float) -> dict[str, int]:
    """Lazy templates: the pages a restored copy touches serving its warm-up, fetched first by
    every lazy restore (pool/templates/workingset.py). Returns the manifest's figure for it."""
    if spec.restore.method != "lazy":
        return {}
    progress("recording the working set (one trial lazy restore)")
    runs = workingset.record(spec, image, criu, pipes, timeout=timeout)
    pages = sum(r.pages for r in runs)
    progress(f"working set: {pages} pages ({pages * workingset.PAGE / 2**20:.1f} MB)")
    return {"working_set_pages": pages}


def _checkpoint_failed(e: CriuFailed, app: sandbox.BootedApp) -> BuildError:
    code = e.errno or _no_space_logged(e.log_tail)
    if code in store.NO_SPACE:
        why = store.write_problem(code)
    else:
        why = hints.explain(hints.DUMP, e.log_tail)
    return BuildError("checkpointing", "CRIU refused the checkpoint" + (f": {why}" if why else "")
                      + f"\n--- CRIU log ---\n{e.log_tail}", output_tail=app.output.text(),
                      errno=code)


def _no_space_logged(log: str) -> int | None:
    """ENOSPC or EDQUOT if CRIU's log shows a write that failed so (it logs strerror, not errno)."""
    return next((code for code in store.NO_SPACE if os.strerror(code) in log), None)


def check_user_access(spec: Spec, env: dict[str, str]) -> None:
    """With `user`, the files the app starts from must be usable by that user: its cwd (read and
    enter), its program (execute) and the arguments naming files in cwd (read). BuildError naming
    the first path that stops it (permission bits; ACLs are not read)."""
    user = spec.user
    if user is None:
        return
    gids = set(os.getgrouplist(user.name, user.gid)) if user.name else {user.gid}
    who = f"uid {user.uid} gid {user.gid}" + (f" (user {user.name})" if user.name else "")
    try:
        exe = Path(sandbox.resolve_command(spec.command[0], spec.cwd, env.get("PATH", "")))
    except FileNotFoundError as e:
        raise BuildError("starting the app", str(e)) from e
    needs = [(spec.cwd, os.R_OK | os.X_OK, "read and enter"), (exe, os.X_OK, "execute")]
    needs += [(spec.cwd / a, os.R_OK, "read") for a in spec.command[1:]
              if not a.startswith("-") and (spec.cwd / a).is_file()]
    for path, want, verb in needs:
        if (stop := _denied(path.resolve(), user.uid, gids, want)) is not None:
            raise BuildError("checking the template's files",
                             f"{who} cannot {verb} {path}: {stop}; give that user access "
                             "(chmod/chown) or run as another user")

    if not has_capability(CAP_SYS_RESOURCE):
        raise BuildError("checking the template's user",
                         f"user = {spec.user.name or spec.user.uid!r}: this node cannot checkpoint "
                         "a process of another user: its root lacks CAP_SYS_RESOURCE (as in a "
                         "container that drops it), which CRIU needs to read the app's rlimits "
                         "(prlimit); run the service with root's full capability set, or leave "
                         "user out")


CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process holds capability number cap (CapEff of /proc/self/status)."""
    with open("/proc/self/status") as f:
        eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    return bool(eff >> cap & 1)


def _denied(path: Path, uid: int, gids: set[int], want: int) -> str | None:
    """Why uid cannot reach path (search on every parent) and use it with want; None if it can."""
    for d in [*reversed(path.parents), path]:
        need = want if d == path else os.X_OK
        st = d.stat()
        shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
        if (st.st_mode >> shift) & need != need:
            return f"{d} is mode {stat.filemode(st.st_mode)} owned by {st.st_uid}:{st.st_gid}"
    return None


def _boot(spec: Spec, echo) -> sandbox.BootedApp:
    env = app_environment(spec)
    check_user_access(spec, env)
    try:
        return sandbox.boot(list(spec.command), cwd=spec.cwd, env=env,
                            sdk=spec.sdk, echo=echo, user=spec.user)
    except (FileNotFoundError, PermissionError) as e:
        raise BuildError("starting the app", str(e)) from e
    except (ChildProcessError, TimeoutError) as e:
        raise BuildError("starting the app's namespaces", str(e)) from e


def _not_ready(app: sandbox.BootedApp, spec: Spec, why: str) -> BuildError:
    return BuildError("waiting for readiness", why, output_tail=app.output.text())


def _check_alive(app: sandbox.BootedApp, spec: Spec) -> None:
    rc = app.exited()
    if rc is not None:
        time.sleep(0.05)  # let the output readers catch the app's last words
        raise _not_ready(app, spec, f"the app exited with status {rc} before it was ready")


def _wait_ready(app: sandbox.BootedApp, spec: Spec, progress: Progress) -> float:
    ready = spec.ready
    deadline = time.monotonic() + ready.timeout
    progress(f"waiting for readiness ({ready.mode}, up to {ready.timeout:g}s)")
    if ready.mode == "sdk":
        assert app.ctl_out is not None
        try:
            msg = read_frame(app.ctl_out.ours, deadline)
        except ControlError as e:
            _check_alive(app, spec)
            if app.exited() is None and time.monotonic() >= deadline:
                raise _not_ready(app, spec, f"no checkpoint() call within {ready.timeout:g}s") from e
            raise _not_ready(app, spec, f"control channel: {e}") from e
        if msg.get("type") != "ready":
            raise _not_ready(app, spec, f"expected a ready message, got {msg.get('type')!r}")
        _check_can_fork(spec, msg, app)
    elif ready.mode == "stdout":
        pattern = re.compile(ready.value)
        while not app.output.wait_for(lambda ln: bool(pattern.search(ln)), ready.interval * 4):
            _check_alive(app, spec)
            if time.monotonic() >= deadline:
                raise _not_ready(app, spec, f"no output line matched /{ready.value}/ within "
                                            f"{ready.timeout:g}s")
    elif ready.mode == "delay":
        while time.monotonic() - app.started < ready.value:
            _check_alive(app, spec)
            time.sleep(min(0.05, ready.value))
    else:  # tcp or http: probe from inside the app's network namespace
        while not _probe_once(app, spec):
            _check_alive(app, spec)
            if time.monotonic() >= deadline:
                raise _not_ready(app, spec, f"{ready.mode} probe {ready.value} did not answer "
                                            f"within {ready.timeout:g}s")
            time.sleep(ready.interval)
    _check_alive(app, spec)
    took = time.monotonic() - app.started
    progress(f"ready after {took:.2f}s")
    return took


FORKING_RUNTIMES = ("python",)  # SDK runtimes whose process can fork a copy of itself


def _check_can_fork(spec: Spec, ready: dict, app: sandbox.BootedApp) -> None:
    """[restore] method = "fork" needs an SDK runtime that can fork its running process."""
    runtime = ready.get("runtime")
    if spec.restore.method != "fork" or runtime in FORKING_RUNTIMES:
        return
    raise BuildError("checking the restore method",
                     f'[restore] method = "fork" needs an SDK runtime that can fork a running '
                     f"process ({', '.join(FORKING_RUNTIMES)}); this app's SDK runtime is "
                     f"{runtime!r}: a JVM or a Node VM cannot be forked while it runs (only the "
                     'forking thread survives a fork, and the VM needs its others); use method = '
                     '"criu" or "lazy"', output_tail=app.output.text())


def _probe_once(app: sandbox.BootedApp, spec: Spec) -> bool:
    try:
        if spec.ready.mode == "tcp":
            netns.connect_in(app.netns, int(spec.ready.value), timeout=0.5).close()
            return True
        status, _ = netns.http_in(app.netns, str(spec.ready.value), timeout=1.0)
        return 200 <= status < 400
    except OSError:
        return False
    except Exception:  # noqa: BLE001  (http.client raises its own errors for half-up servers)
        return False


def _warm_up(app: sandbox.BootedApp, spec: Spec, progress: Progress) -> float:
    w = spec.warmup
    if w is None or not w.urls:
        return 0.0
    t0 = time.monotonic()
    progress(f"warming up: {len(w.urls)} URL(s) x {w.repeat}")
    body = w.body.encode() if w.body is not None else None
    for i in range(w.repeat):
        for url in w.urls:
            try:
                status, _ = netns.http_in(app.netns, url, method=w.method, body=body,
                                          timeout=w.timeout)
            except Exception as e:  # noqa: BLE001
                _check_alive(app, spec)
                raise BuildError("warming up", f"{w.method} {url} failed: {e}",
                                 output_tail=app.output.text()) from e
            if status >= 400:
                raise BuildError("warming up", f"{w.method} {url} answered {status} "
                                               f"(round {i + 1})", output_tail=app.output.text())
    return time.monotonic() - t0
