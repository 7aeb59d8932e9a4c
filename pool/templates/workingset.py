"""The working set of a lazy template: the pages its app touches when it serves its warm-up after a
restore, recorded at build time and fetched first by every lazy restore (REAP, FaaSnap).

Recording: after the checkpoint, one trial restore of the new image with CRIU lazy pages; the
trial copy is handed an identity (SDK templates), serves the spec's warm-up requests once (else
its ready probe, when that is an HTTP URL), and the lazy-pages daemon's -v4 log then names every
page the copy faulted on (pool.cr.criu.faulted_pages). The daemon also pushes pages in the
background from the moment the restore ends, so a page it pushed before the app touched it is not
recorded: the set is what a lazy restore had to fetch on demand, which is what a restore should
fetch first.

The file (image/pool-working-set, sealed in the manifest like every image file, 0600) is text:

    pool-working-set 1
    PID ADDRESS PAGES         one line per run of pages: pid inside the copy, hex address, count

PID is the process's pid inside the copy's pid namespace: CRIU restores every pid as dumped.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pool.cr import netns
from pool.cr.criu import Criu, RestoreOptions, become_subreaper, disown, faulted_pages
from pool.errors import BuildError, CriuError, TemplateCorrupt
from pool.templates.spec import Spec
from pool.wire import control
from pool.wire.control import Identity

FILE = "pool-working-set"
HEADER = "pool-working-set 1"
PAGE = 4096
MAX_RUNS = 1 << 20           # a sanity bound on a file read from a store


@dataclass(frozen=True)
class Run:
    """pages consecutive pages from address on, in process pid (its pid inside the copy)."""

    pid: int
    address: int
    pages: int


def from_faults(faults: list[tuple[int, int]]) -> list[Run]:
    """Runs of consecutive pages, per process, in address order."""
    runs: list[Run] = []
    for pid, addr in sorted(set(faults)):
        last = runs[-1] if runs else None
        if last and last.pid == pid and last.address + last.pages * PAGE == addr:
            runs[-1] = Run(pid, last.address, last.pages + 1)
        else:
            runs.append(Run(pid, addr, 1))
    return runs


def write(image_dir: Path, runs: list[Run]) -> Path:
    path = image_dir / FILE
    text = HEADER + "\n" + "".join(f"{r.pid} {r.address:x} {r.pages}\n" for r in runs)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def read(image_dir: Path, template: str) -> list[Run] | None:
    """The build's working set; None if it has none (then a lazy restore fetches nothing first).
    TemplateCorrupt names the first bad line."""
    path = image_dir / FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateCorrupt(template, f"{FILE} cannot be read: {e}") from e
    if not lines or lines[0] != HEADER:
        raise TemplateCorrupt(template, f"{FILE}: first line is not {HEADER!r}")
    if len(lines) > MAX_RUNS:
        raise TemplateCorrupt(template, f"{FILE}: more than {MAX_RUNS} runs")
    runs = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            pid, addr, pages = line.split()
            run = Run(int(pid), int(addr, 16), int(pages))
        except ValueError as e:
            raise TemplateCorrupt(template, f"{FILE} line {n}: not 'PID ADDRESS PAGES'") from e
        if run.pid <= 0 or run.pages <= 0 or run.address % PAGE:
            raise TemplateCorrupt(template, f"{FILE} line {n}: bad pid, address or page count")
        runs.append(run)
    return runs


# --- recording at build time ------------------------------------------------------------------------
def record(spec: Spec, image_dir: Path, criu: Criu, pipes: dict[str, int], *,
           timeout: float = 120.0) -> list[Run]:
    """One trial lazy restore of image_dir, its warm-up served once; writes and returns the
    working set. BuildError if the trial fails; it leaves no process, fd or file behind (the
    image is only read)."""
    become_subreaper()  # the trial copy must become our child, to be killed and reaped
    with tempfile.TemporaryDirectory(prefix="pool-workingset-") as tmp, \
            contextlib.ExitStack() as undo:
        work = Path(tmp)
        inherit, ours = _trial_fds(pipes, work, undo)
        try:
            daemon = criu.lazy_pages(image_dir, work, ready_timeout=timeout)
            undo.callback(daemon.kill)
            pid = criu.restore(image_dir, log_dir=work, timeout=timeout, opts=RestoreOptions(
                inherit_fds=inherit, lazy_pages=True, tcp_close=spec.checkpoint.tcp_close))
        except CriuError as e:
            raise BuildError("recording the working set", f"the trial lazy restore failed: "
                                                          f"{e.message}") from e
        undo.callback(_kill, pid)
        for fd in inherit.values():
            os.close(fd)
        inherit.clear()
        deadline = time.monotonic() + timeout
        if ours:
            _hand_identity(*ours, deadline)
        _serve_warmup(spec, pid, deadline, work)
        try:
            daemon.wait(max(1.0, deadline - time.monotonic()))
        except CriuError as e:
            raise BuildError("recording the working set", e.message) from e
        runs = from_faults(faulted_pages((work / "lazy-pages.log").read_text(errors="replace")))
    write(image_dir, runs)
    return runs


def _trial_fds(pipes: dict[str, int], work: Path,
               undo: contextlib.ExitStack) -> tuple[dict[str, int], tuple[int, int] | None]:
    """Stdio files and (SDK) control pipes for the trial copy: ({CRIU key: its fd}, our ends)."""
    inherit: dict[str, int] = {}

    def close_later(fd: int) -> int:
        undo.callback(_close_quietly, fd)
        return fd

    for stream in ("stdout", "stderr"):
        inherit[f"pipe:[{pipes[stream]}]"] = os.open(work / f"{stream}.log",
                                                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    undo.callback(lambda: [_close_quietly(fd) for fd in inherit.values()])
    if "ctl_in" not in pipes:
        return inherit, None
    r, ctl_w = os.pipe2(os.O_CLOEXEC)
    ctl_r, w = os.pipe2(os.O_CLOEXEC)
    inherit[f"pipe:[{pipes['ctl_in']}]"], inherit[f"pipe:[{pipes['ctl_out']}]"] = r, w
    return inherit, (close_later(ctl_w), close_later(ctl_r))


def _hand_identity(ctl_w: int, ctl_r: int, deadline: float) -> None:
    identity = Identity(f"workingset-{secrets.token_hex(3)}")
    try:
        control.write_frame(ctl_w, identity.to_message(time.time() + deadline - time.monotonic()))
        reply = control.read_frame(ctl_r, deadline)
    except (control.ControlError, OSError) as e:
        raise BuildError("recording the working set", f"the trial copy did not take its "
                                                      f"identity: {e}") from e
    if reply.get("type") != "ack":
        raise BuildError("recording the working set", f"the trial copy answered {reply!r:.120}")


def _serve_warmup(spec: Spec, pid: int, deadline: float, work: Path) -> None:
    """The requests whose pages make the working set: the warm-up once, else an HTTP ready probe."""
    w = spec.warmup
    if w is not None and w.urls:
        requests = [(url, w.method, None if w.body is None else w.body.encode()) for url in w.urls]
    elif spec.ready.mode == "http":
        requests = [(str(spec.ready.value), "GET", None)]
    else:
        return
    for url, method, body in requests:
        try:
            status, _ = netns.http_in(f"/proc/{pid}/ns/net", url, method=method, body=body,
                                      timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001  (http.client raises its own errors too)
            raise BuildError("recording the working set",
                             f"the trial copy did not answer {method} {url}: {e}",
                             output_tail=_tail(work)) from e
        if status >= 400:
            raise BuildError("recording the working set",
                             f"the trial copy answered {method} {url} with {status}",
                             output_tail=_tail(work))


def _tail(work: Path) -> str:
    with contextlib.suppress(OSError):
        return (work / "stderr.log").read_text(errors="replace")[-2000:]
    return ""


def _kill(pid: int) -> None:
    """SIGKILL to the trial copy's PID 1 ends its pid namespace; reap it (we are its subreaper)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    disown(pid)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)

