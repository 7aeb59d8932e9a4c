"""Snapshots of running instances: checkpoint one without stopping it, list them, restore one in
place of the running process (rollback, resume), retention.

A checkpoint is five explicit steps over the running copy:

    pre-dump (only where the kernel tracks dirty memory; else skipped, and said so)
    -> freeze -> dump -> thaw (or kill: a suspend)          one CRIU dump (fork.checkpoint_instance)
    -> post-dump: the freeze time read from CRIU's own stats, files made private, metadata written

CRIU freezes the tree (cgroup freezer or ptrace), dumps it and thaws it (leave_running) in one call;
its stats-dump image says how long the app was frozen, which the reply reports. A failed dump thaws
the copy (CRIU resumes what it froze): a failed checkpoint leaves the instance running, and
CheckpointError says at which step and why.

Pre-dump (iterative: a shorter freeze) needs soft-dirty tracking (`criu check --feature
mem_dirty_track`, `pool doctor`). Where the kernel has it, CRIU copies the app's memory into SNAP/pre
while the app runs, and the dump (track_mem, parent_img) then writes only the pages changed since:
its image/parent is CRIU's link to ../../pre, relative, so it resolves wherever the snapshot dir
goes, and the build's manifest lists those files as parent/NAME, so they ship with it (migration)
and are verified as its own are. A pre-dump that fails is removed and the checkpoint goes on with a
full dump: it never fails the checkpoint nor stops the app, and the snapshot's note says why. Where
the kernel lacks it, the step is skipped and the app is frozen for the whole dump (docs/limits.md).

Where: RUN_DIR/snapshots/INSTANCE/SNAP/ of the node that runs the instance: a sealed fork build
(manifest.json + image/, fork.py's format: stdio keyed by the instance's log paths, no control
channel), pre/ if a pre-dump ran, and snapshot.json (tag, time, freeze time). Directories 0700,
files 0600: a snapshot is the app's memory. The node's run dir, not the template store: a snapshot belongs to one instance and
goes with it (a published copy, `pool checkpoint --keep`, goes into the store as a template).

A snapshot is restored into a fresh run dir whose log files are hard links to the instance's (so
its output continues in the same files, offsets kept): restore() below.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pool.copies import fork, restore_chain
from pool.copies.restored import STREAMS, RestoredCopy
from pool.cr.criu import Criu, read_dump_stats
from pool.errors import CheckpointError, CriuError, RestoreError, SnapshotNotFound
from pool.templates.manifest import Manifest
from pool.templates.store import Store, Template, load_build, write_problem

META = "snapshot.json"
BUILD = "build"
PRE = "pre"          # the pre-dump's images, the dump's parent


@dataclass(frozen=True)
class Snapshot:
    id: str
    instance: str
    tag: str | None
    created: float                 # unix time
    bytes: int                     # on disk (the pre-dump's images included)
    freeze_ms: float | None        # how long the app was frozen (CRIU's stats), if known
    dump_ms: float                 # the whole dump call
    pre_dumped: bool
    dir: Path
    pre_dump: str = ""             # what the pre-dump step did, or why it was skipped

    @property
    def template(self) -> Template:
        return load_build(self.dir / BUILD)

    def describe(self) -> dict:
        return {"id": self.id, "instance": self.instance, "tag": self.tag, "created": self.created,
                "bytes": self.bytes, "freeze_ms": self.freeze_ms, "dump_ms": self.dump_ms,
                "pre_dumped": self.pre_dumped}


class Snapshots:
    """One node's snapshot area: root/INSTANCE/SNAP/."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def instance_dir(self, iid: str) -> Path:
        return self.root / iid

    def list(self, iid: str) -> list[Snapshot]:
        """iid's snapshots, oldest first (unreadable leftovers skipped)."""
        d = self.instance_dir(iid)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                out.append(_read(p, iid))
        return sorted(out, key=lambda s: (s.created, s.id))

    def get(self, iid: str, snap: str | None = None) -> Snapshot:
        """Snapshot snap of iid (by id or tag; None: the latest); SnapshotNotFound if none."""
        snaps = self.list(iid)
        if snap is None:
            if not snaps:
                raise SnapshotNotFound(iid, None)
            return snaps[-1]
        for s in reversed(snaps):
            if snap in (s.id, s.tag):
                return s
        raise SnapshotNotFound(iid, snap)

    def remove(self, s: Snapshot) -> None:
        shutil.rmtree(s.dir, ignore_errors=True)

    def remove_instance(self, iid: str) -> None:
        shutil.rmtree(self.instance_dir(iid), ignore_errors=True)

    def prune(self, iid: str, keep: int) -> list[str]:
        """Keep iid's newest `keep` snapshots (0: all); returns the ids removed."""
        snaps = self.list(iid)
        doomed = snaps[:-keep] if keep and len(snaps) > keep else []
        for s in doomed:
            self.remove(s)
        return [s.id for s in doomed]

    def clean(self, keep_instances: set[str]) -> int:
        """At a node's start: remove the snapshots of instances it no longer has."""
        if not self.root.is_dir():
            return 0
        gone = [p for p in self.root.iterdir() if p.name not in keep_instances]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return len(gone)

    def totals(self) -> tuple[int, int]:
        """(count, bytes) of every snapshot held."""
        count = size = 0
        if self.root.is_dir():
            for d in self.root.iterdir():
                for s in self.list(d.name):
                    count, size = count + 1, size + s.bytes
        return count, size


# --- the checkpoint -------------------------------------------------------------------------------
def checkpoint(inst: RestoredCopy, snaps: Snapshots, criu: Criu, *, tag: str | None = None,
               leave_running: bool = True, source_manifest: Manifest | None = None,
               timeout: float = 120.0) -> Snapshot:
    """Checkpoint the running copy inst into a new snapshot (see the module doc for the steps).

    leave_running False is a suspend: CRIU kills the copy once its image is complete (and thaws it
    if the dump fails). CheckpointError on failure, nothing left on disk."""
    if inst.poll() is not None:
        raise CheckpointError("checking the instance", f"instance {inst.id} has exited")
    sid = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    sdir = snaps.instance_dir(inst.id) / sid
    try:
        snaps.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        sdir.parent.mkdir(exist_ok=True, mode=0o700)
        sdir.mkdir(mode=0o700)
    except OSError as e:
        raise CheckpointError("making the snapshot's directory", _os_problem(e)) from e
    try:
        pre_dumped, pre_note = pre_dump(inst, criu, sdir, timeout=timeout)
        t0 = time.monotonic()
        try:
            build = fork.checkpoint_instance(inst, sdir / BUILD, criu, leave_running=leave_running,
                                             name=f"{inst.template}+fork-{secrets.token_hex(8)}",
                                             source_manifest=source_manifest, timeout=timeout,
                                             keep_channel=True,
                                             parent=sdir / PRE if pre_dumped else None)
        except RestoreError as e:
            raise CheckpointError("dumping (freeze, dump, thaw)", e.problem) from e
        except OSError as e:
            raise CheckpointError("dumping (freeze, dump, thaw)", _os_problem(e)) from e
        dump_ms = (time.monotonic() - t0) * 1000
        return post_dump(inst, sdir, build, tag, dump_ms, pre_dumped, pre_note)
    except BaseException:
        shutil.rmtree(sdir, ignore_errors=True)
        raise


_dirty_tracking: dict[str, bool] = {}   # CRIU binary -> `criu check --feature mem_dirty_track`


def pre_dump(inst: RestoredCopy, criu: Criu, sdir: Path, *,
             timeout: float = 120.0) -> tuple[bool, str]:
    """Step 1: where the kernel tracks dirty memory, pre-dump the running copy into sdir/pre, so
    that the dump freezes it only to write what changed since. Returns whether sdir/pre is the
    dump's parent now, and what happened. Never raises for CRIU: a failed pre-dump is removed
    and the dump is a full one (the app keeps running either way: a pre-dump leaves it running,
    and CRIU thaws what it froze when it fails)."""
    key = str(criu.binary)
    if key not in _dirty_tracking:
        _dirty_tracking[key] = criu.feature("mem_dirty_track").ok
    if not _dirty_tracking[key]:
        return False, ("skipped: this kernel has no soft-dirty memory tracking (`criu check "
                       "--feature mem_dirty_track`, pool doctor): the app was frozen for the whole dump")
    pre = sdir / PRE
    try:
        with tempfile.TemporaryDirectory(prefix="pool-predump-") as logs:
            criu.pre_dump(inst.pid, pre, log_dir=Path(logs), timeout=timeout)
    except (CriuError, OSError) as e:
        shutil.rmtree(pre, ignore_errors=True)
        return False, (f"failed, so the dump was a full one and the app was frozen for all of it: "
                       f"{_first_lines(e)}")
    return True, ("ran: the app's memory was copied while it ran (pre/); the dump froze it only "
                  "to write what changed since")


def post_dump(inst: RestoredCopy, sdir: Path, build: Template, tag: str | None,
              dump_ms: float, pre_dumped: bool, pre_note: str) -> Snapshot:
    """Step 5: the freeze time from CRIU's stats, every file private, the metadata written."""
    stats = read_dump_stats(build.image_dir)
    frozen_us = stats.get("frozen_time")
    try:
        for p in sdir.rglob("*"):
            if not p.is_symlink():  # image/parent: its target, pre/, is in the walk itself
                os.chmod(p, 0o700 if p.is_dir() else 0o600)
        meta = {"id": sdir.name, "instance": inst.id, "tag": tag, "created": time.time(),
                "freeze_ms": None if frozen_us is None else round(frozen_us / 1000, 3),
                "dump_ms": round(dump_ms, 3), "pre_dumped": pre_dumped, "pre_dump": pre_note}
        fd = os.open(sdir / META, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
    except OSError as e:
        raise CheckpointError("writing the snapshot", _os_problem(e)) from e
    return _read(sdir, inst.id)


def publish(s: Snapshot, store: Store, name: str) -> Template:
    """`--keep`: the snapshot as a new template in the store (atomic), outliving its instance."""
    with store.staging(name) as staged:
        shutil.copytree(s.dir / BUILD / "image", staged / "image")
        facts = s.template.manifest.to_dict()
        for key in ("format", "name", "files", "image_bytes"):
            facts.pop(key, None)
        facts["pipes"] = {}  # a template's copies have no channel to the snapshot's hooks
        return store.publish(name, staged, facts)


# --- restoring one ----------------------------------------------------------------------------------
def restore(s: Snapshot, criu: Criu, instances_dir: Path, *, logs_from: Path,
            timeout: float = 60.0) -> RestoredCopy:
    """Restore snapshot s as instance s.instance, in a fresh run dir whose stdout.log and
    stderr.log are the instance's (hard links to those in logs_from)."""
    run_dir = instances_dir / f"{s.instance}.{secrets.token_hex(4)}"

    def link_instance_logs(job: restore_chain.RestoreJob) -> None:
        for stream in STREAMS:
            old = logs_from / f"{stream}.log"
            with contextlib.suppress(FileNotFoundError):
                os.link(old, job.run_dir / old.name)

    job = restore_chain.RestoreJob(template=s.template, instance_id=s.instance, run_dir=run_dir,
                                   criu=criu, timeout=timeout)
    steps = restore_chain.swap(restore_chain.EAGER, restore_chain.make_run_dir,
                               restore_chain.make_run_dir, link_instance_logs)
    try:
        return restore_chain.run(job, steps)
    except RestoreError as e:
        raise RestoreError(f"restoring snapshot {s.id}: {e.step}", e.problem,
                           output_tail=e.output_tail) from e


# --- helpers ------------------------------------------------------------------------------------------
def _read(sdir: Path, iid: str) -> Snapshot:
    meta = json.loads((sdir / META).read_text())
    size = sum(p.stat().st_size for p in sdir.rglob("*") if p.is_file() and not p.is_symlink())
    return Snapshot(id=meta["id"], instance=iid, tag=meta.get("tag"), created=meta["created"],
                    bytes=size, freeze_ms=meta.get("freeze_ms"), dump_ms=meta["dump_ms"],
                    pre_dumped=bool(meta.get("pre_dumped")), dir=sdir,
                    pre_dump=str(meta.get("pre_dump") or ""))


def _first_lines(e: Exception) -> str:
    """What an error says, on one line: its message and the last line of CRIU's log tail."""
    lines = [ln.strip() for ln in str(getattr(e, "message", None) or e).splitlines() if ln.strip()]
    return " | ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)


def _os_problem(e: OSError) -> str:
    return write_problem(e.errno) if e.errno else str(e)
