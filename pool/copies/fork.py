"""Fork a running copy: checkpoint it without stopping it, as a template-format build that any node
can restore (after pool/templates/transfer.py ships it), its memory state included.

A running copy is not a template: its stdio are log files in its run dir, not the builder's pipes,
and its control channel is spent (it has its identity). So the fork's manifest keys stdio by file
path (`stdio_keys`, CRIU's inherit-fd key for a regular file: the path without its leading '/'),
which Restorer uses in place of the pipe inodes; it lists no control pipes, so a restored fork is
a transparent copy that keeps the original's identity, hostname aside; and it is dumped with
tcp_close (a live copy may hold client connections), which its restore then needs too.

Lazy variant (post-copy migration): checkpoint_instance_lazy writes only the small images and
serves the memory from a page server; restore_lazy runs the restore chain's lazy variant
(pool/copies/restore_chain.py): a lazy-pages daemon against the page server, and a restore at once,
pages arriving on demand and in the background.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.copies import restore_chain
from pool.copies.restored import RestoredCopy
from pool.cr.criu import Criu, DumpOptions, LazyDump, LazyPages, become_subreaper
from pool.errors import CriuError, CriuTimeout, RestoreError
from pool.names import fork_name
from pool.templates.manifest import Manifest
from pool.templates.store import Store, Template, new_build_id, seal


def checkpoint_instance(inst: RestoredCopy, dest: Store | Path, criu: Criu, *,
                        leave_running: bool = True, name: str | None = None,
                        source_manifest: Manifest | None = None,
                        timeout: float = 120.0, keep_channel: bool = False,
                        parent: Path | None = None) -> Template:
    """Dump the running copy inst into a template build.

    dest a Store: published there as `name` (default: a fresh store.fork_name). dest a Path: written as a
    build dir (manifest.json + image/) that must not exist yet, not published. The copy keeps
    running (leave_running) after a pause of one dump. keep_channel (a snapshot of the instance
    itself, not a fork): its control pipes are recorded, so a restore hands it fresh ones.
    parent (a build dir only): the images of a pre-dump of inst (Criu.pre_dump); the dump writes
    only the memory changed since, and its image/parent links there by a relative path, so the
    two stay together wherever the dir that holds both moves (the manifest lists the pre-dump's
    files as parent/NAME: they ship with the build).
    """
    name = name or fork_name(inst.template)
    keys = _stdio_keys(inst)
    pipes = _control_pipes(inst) if keep_channel else {}
    source_manifest = source_manifest or _source_manifest(inst, dest)
    if isinstance(dest, Store):
        if parent is not None:
            raise ValueError("a pre-dump parent goes with a build dir, not into a store")
        with dest.staging(name) as staged:
            manifest = _dump(inst, staged, criu, keys, source_manifest, leave_running, timeout)
            return dest.publish(name, staged, {**manifest, "pipes": pipes})
    build_dir = Path(dest)
    build_dir.mkdir(mode=0o700)
    try:
        manifest = _dump(inst, build_dir, criu, keys, source_manifest, leave_running, timeout,
                         parent)
        return seal(build_dir, name, {**manifest, "pipes": pipes})
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise


def _dump(inst: RestoredCopy, build_dir: Path, criu: Criu, keys: dict[str, str],
          source_manifest: Manifest | None, leave_running: bool, timeout: float,
          parent: Path | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    opts = DumpOptions(leave_running=leave_running, tcp_close=True)
    if parent is not None:
        opts.track_mem = True
        opts.parent_img = os.path.relpath(parent, build_dir / "image")
    with tempfile.TemporaryDirectory(prefix="pool-fork-") as logs:
        try:
            criu.dump(inst.pid, build_dir / "image", log_dir=Path(logs), timeout=timeout,
                      opts=opts)
            criu.cpuinfo_dump(build_dir / "image")
        except CriuError as e:
            raise RestoreError("checkpointing the running copy", e.message) from e
        with contextlib.suppress(FileNotFoundError):  # CRIU's measures (freeze time) go with it
            shutil.copyfile(Path(logs) / "stats-dump", build_dir / "image" / "stats-dump")
    return _manifest(inst, criu, keys, source_manifest, dump_s=time.monotonic() - t0)


@dataclass
class LazyCheckpoint:
    """The source side of a lazy migration: a build dir without the lazy memory, and the dump
    that serves that memory until the target has taken it (then the copy is killed, unless
    leave_running: frozen until then, it resumes)."""

    template: Template
    dump: LazyDump
    page_server: tuple[str, int]
    log_dir: Path        # CRIU's work dir while it serves; removed once the dump has ended

    def wait(self, timeout: float) -> None:
        """Until every page was served; CriuTimeout (CRIU killed, the copy resumed) after timeout."""
        try:
            if not self.dump.wait(timeout):
                self.abort()
                raise CriuTimeout("dump", f"pages not all served within {timeout:g}s; "
                                          "CRIU was killed")
        finally:
            if self.dump.done():
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def abort(self) -> None:
        """Stop serving: CRIU is killed and the copy resumes where it was."""
        self.dump.kill()
        with contextlib.suppress(Exception):
            self.dump.wait(30)
        shutil.rmtree(self.log_dir, ignore_errors=True)


def checkpoint_instance_lazy(inst: RestoredCopy, build_dir: Path, criu: Criu,
                             page_server: tuple[str, int], *, leave_running: bool = False,
                             name: str | None = None,
                             source_manifest: Manifest | None = None,
                             ready_timeout: float = 60.0, timeout: float = 300.0) -> LazyCheckpoint:
    """Lazily dump inst into build_dir (must not exist); pages are served at page_server.

    Returns once the build dir is complete (small: no anonymous memory) and the page server
    listens. Ship the build dir, then restore_lazy() on the target. Needs fs.pipe-max-size >= 4 MiB.
    """
    name = name or fork_name(inst.template)
    keys = _stdio_keys(inst)
    build_dir = Path(build_dir)
    build_dir.mkdir(mode=0o700)
    logs = Path(tempfile.mkdtemp(prefix="pool-fork-"))
    try:
        t0 = time.monotonic()
        try:
            job = criu.dump_lazy(inst.pid, build_dir / "image", page_server, log_dir=logs,
                                 opts=DumpOptions(leave_running=leave_running, tcp_close=True),
                                 ready_timeout=ready_timeout, timeout=timeout)
        except CriuError as e:
            raise RestoreError("checkpointing the running copy lazily", e.message) from e
        try:
            criu.cpuinfo_dump(build_dir / "image")
            manifest = _manifest(inst, criu, keys, source_manifest, dump_s=time.monotonic() - t0)
            manifest["lazy_pages"] = True
            template = seal(build_dir, name, manifest)
        except BaseException:
            job.kill()
            with contextlib.suppress(Exception):
                job.wait(30)
            raise
        return LazyCheckpoint(template, job, page_server, logs)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        raise


def restore_copy(template: Template, criu: Criu, run_dir: Path, *, instance_id: str,
                 timeout: float = 60.0) -> RestoredCopy:
    """Restore a fork build or a snapshot as instance_id, eagerly: a migrated instance keeps its
    id (and, a snapshot's, its control channel: fresh pipes, no identity hand-over). run_dir (must
    not exist) becomes the copy's private dir."""
    become_subreaper()  # the copy must become our child, to be reaped
    job = restore_chain.RestoreJob(template=template, instance_id=instance_id, run_dir=Path(run_dir),
                                   criu=criu, timeout=timeout)
    return restore_chain.run(job, restore_chain.EAGER)


def restore_lazy(template: Template, criu: Criu, run_dir: Path, page_server: tuple[str, int] | None,
                 *, instance_id: str, timeout: float = 60.0) -> tuple[RestoredCopy, LazyPages]:
    """Restore a (lazily) checkpointed build at once, its memory fetched on demand.

    page_server None reads the pages from the build's own files. The build must have no control
    pipes (a fork: there is no identity handshake here). run_dir (must not exist) becomes the
    copy's private dir. Returns the copy, warm, and the lazy-pages daemon, which exits once every
    page is in: wait() on it, with a deadline.
    """
    if template.manifest.sdk:
        raise ValueError(f"{template.name} has an SDK control channel: restore it with Restorer")
    become_subreaper()  # the copy must become our child, to be reaped
    job = restore_chain.RestoreJob(template=template, instance_id=instance_id, run_dir=Path(run_dir),
                                   criu=criu, timeout=timeout, page_server=page_server)
    copy = restore_chain.run(job, restore_chain.LAZY)
    assert job.lazy_pages is not None, "the lazy chain starts the lazy-pages daemon"
    return copy, job.lazy_pages


# --- helpers ---------------------------------------------------------------------------------------
def _stdio_keys(inst: RestoredCopy) -> dict[str, str]:
    """The copy's stdio as CRIU will know them: its own log files, else we cannot key them."""
    keys = {}
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        try:
            target = os.readlink(f"/proc/{inst.pid}/fd/{fd}")
        except OSError as e:
            raise RestoreError("checkpointing the running copy",
                               f"cannot read its {stream}: {e.strerror}") from e
        if not target.startswith("/"):
            raise RestoreError("checkpointing the running copy",
                               f"its {stream} is {target}, not a file: it cannot be forked")
        keys[stream] = target.lstrip("/")
    return keys


def _control_pipes(inst: RestoredCopy) -> dict[str, int]:
    """The pipe inodes of the copy's control channel, if it kept one (keyed as a build's are)."""
    if inst.ctl_w is None or inst.ctl_r is None:
        return {}
    return {"ctl_in": os.fstat(inst.ctl_w).st_ino, "ctl_out": os.fstat(inst.ctl_r).st_ino}


def _source_manifest(inst: RestoredCopy, dest: Store | Path) -> Manifest | None:
    """The manifest of the build inst was restored from, when dest is the store that holds it."""
    if isinstance(dest, Store):
        with contextlib.suppress(Exception):
            t = dest.get(inst.template)
            if t.build_id == inst.build_id:
                return t.manifest
    return None


def _manifest(inst: RestoredCopy, criu: Criu, keys: dict[str, str], source: Manifest | None,
              dump_s: float) -> dict[str, Any]:
    """The fork's manifest facts (seal() adds its files)."""
    spec = (source.to_dict()["spec"] if source is not None
            else {"name": inst.template, "network": {"mode": "isolated", "port": inst.port}})
    spec["checkpoint"] = {**(spec.get("checkpoint") or {}), "tcp_close": True}  # as dumped
    return {
        "build_id": new_build_id(),
        "spec": spec,
        "spec_digest": source.spec_digest if source is not None else None,
        "criu_version": str(criu.version()),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "pipes": {},               # no identity hand-over: the fork keeps the original's identity
        "stdio_keys": keys,
        "forked_from": {"template": inst.template, "build_id": inst.build_id,
                        "instance": inst.id},
        "dump_s": round(dump_s, 4),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
