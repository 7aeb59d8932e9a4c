"""Build a template: boot -> ready -> warm up -> checkpoint -> publish, as explicit steps.

Until the publish step a failure rolls back: the app is killed, the staging directory removed, and the
previously published build (if any) stays current. Publishing is one rename (store.py); after it,
cleanup problems are only reported.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pool.cr import hints, netns, sandbox
from pool.cr.criu import Criu, DumpOptions
from pool.errors import BuildError, CriuError, CriuFailed
from pool.templates import store
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
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"),
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
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest["build_s"] = round(time.monotonic() - t0, 4)
        progress("publishing")
        template = st.publish(spec.name, staged, manifest)  # point of no return
    progress(f"built {spec.name}: ready after {boot_to_ready:.2f}s, image "
             f"{template.image_bytes / 2**20:.1f} MB, dump {dump_s:.2f}s")
    return BuildResult(template)


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


def _boot(spec: Spec, echo) -> sandbox.BootedApp:
    try:
        return sandbox.boot(list(spec.command), cwd=spec.cwd, env=app_environment(spec),
                            sdk=spec.sdk, echo=echo)
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
