"""`pool doctor`: can this node build and restore templates? One screen, one verdict.

Each check says OK / MISSING (or WARN) and what it means for the user. Required checks decide the exit
status; optional ones (lazy restore, pre-dump) only explain what will not be available.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from pool import config
from pool.cr.criu import Criu
from pool.errors import CriuUnavailable


@dataclass
class Check:
    name: str
    status: str          # OK | MISSING | WARN
    detail: str
    required: bool = True

    @property
    def ok(self) -> bool:
        return self.status == "OK" or not self.required


LAZY_PIPE_SIZE = 4 * 1024 * 1024


def run_checks(store: Path | None = None) -> tuple[list[Check], dict]:
    checks: list[Check] = []
    facts: dict = {"kernel": platform.release(), "arch": platform.machine()}
    checks.append(Check("root", "OK" if os.geteuid() == 0 else "MISSING",
                        "running as root" if os.geteuid() == 0 else
                        "CRIU needs root to checkpoint and restore: run as root"))
    try:
        criu = Criu.locate()
        version = criu.version()
        facts["criu_path"], facts["criu_version"] = criu.binary, str(version)
        checks.append(Check("criu", "OK", f"CRIU {version} at {criu.binary}"))
    except CriuUnavailable as e:
        criu = None
        facts["criu_path"], facts["criu_version"] = None, None
        checks.append(Check("criu", "MISSING", e.message))
    if criu is not None:
        res = criu.check()
        facts["criu_check"] = res.output.splitlines()[-1] if res.output else ""
        checks.append(Check("criu check", "OK" if res.ok else "MISSING",
                            "kernel supports checkpoint/restore" if res.ok else
                            f"`criu check` failed: {res.output.splitlines()[-1] if res.output else ''}"
                            " (this kernel cannot checkpoint/restore; see docs/limits.md)"))
        uffd = criu.feature("uffd-noncoop")
        for feat, name, required, meaning in (
            ("ns_pid", "pid namespaces", True, "each copy needs its own pid namespace"),
            ("timens", "time namespaces", False, "copies' monotonic clocks would jump after restore"),
            ("uffd-noncoop", "userfaultfd", False, "lazy restore (--lazy) unavailable"),
            ("mem_dirty_track", "soft-dirty tracking", False,
             "no pre-dump / iterative migration; dumps stop the app for the whole copy"),
            ("pidfd_store", "pidfd store", False, "CRIU cannot track pid reuse between dumps"),
        ):
            r = uffd if feat == "uffd-noncoop" else criu.feature(feat)
            checks.append(Check(name, "OK" if r.ok else ("MISSING" if required else "WARN"),
                                "supported" if r.ok else meaning, required=required))
    for ns in ("pid", "net", "uts", "ipc"):
        present = os.path.exists(f"/proc/self/ns/{ns}")
        checks.append(Check(f"{ns} namespace", "OK" if present else "MISSING",
                            "available" if present else f"kernel lacks CONFIG_{ns.upper()}_NS"))
    for tool in ("tini", "unshare", "ip", "setsid"):
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        checks.append(Check(tool, "OK" if path else "MISSING", path or
                            f"{tool} is not installed: run `make setup`"))
    pipe_max = _read_int("/proc/sys/fs/pipe-max-size")
    facts["pipe_max_size"] = pipe_max
    checks.append(Check(
        "fs.pipe-max-size", "OK" if pipe_max and pipe_max >= LAZY_PIPE_SIZE else "WARN",
        f"{pipe_max}" if pipe_max and pipe_max >= LAZY_PIPE_SIZE else
        f"{pipe_max}: lazy restore unavailable until `sysctl fs.pipe-max-size={LAZY_PIPE_SIZE}`",
        required=False))
    if criu is not None:
        checks.append(_lazy_restore_check(uffd.ok, pipe_max))
    checks.append(_subreaper_check())
    checks.append(_kdat_cache_check())
    store = store or config.store_path()
    facts["store"] = str(store)
    checks.append(_store_check(store))
    return checks, facts


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _lazy_restore_check(uffd_ok: bool, pipe_max: int | None) -> Check:
    """Templates with [restore] method = "lazy" need both userfaultfd and big enough pipes."""
    why = []
    if not uffd_ok:
        why.append("`criu check --feature uffd-noncoop` fails (no non-cooperative userfaultfd)")
    if not pipe_max or pipe_max < LAZY_PIPE_SIZE:
        why.append(f"fs.pipe-max-size is {pipe_max}, below {LAZY_PIPE_SIZE} (`make setup` raises it)")
    if not why:
        return Check("lazy restore", "OK", 'templates with [restore] method = "lazy" restore '
                                           "lazily", required=False)
    return Check("lazy restore", "WARN", 'unavailable: templates with [restore] method = "lazy" '
                 "cannot be built or restored here: " + "; ".join(why), required=False)


def _subreaper_check() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    val = ctypes.c_int(0)
    ok = libc.prctl(37, ctypes.byref(val), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    return Check("subreaper", "OK" if ok else "MISSING",
                 "PR_SET_CHILD_SUBREAPER available: the pool reaps every copy" if ok else
                 "prctl(PR_GET_CHILD_SUBREAPER) failed: restored copies could not be reaped")


def _kdat_cache_check() -> Check:
    # CRIU keeps its kernel probe results in /run/criu.kdat only when /run is a tmpfs (so a reboot
    # clears them); without it every dump and restore re-probes the kernel.
    tmpfs = _fs_type("/run") == "tmpfs"
    return Check("criu kdat cache", "OK" if tmpfs else "WARN",
                 "/run is tmpfs: CRIU caches its kernel probes" if tmpfs else
                 "/run is not a tmpfs: CRIU re-probes the kernel on every restore (about 40 ms "
                 "more per restore-on-miss; warm spawns are not affected)", required=False)


def _fs_type(path: str) -> str:
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype


def _store_check(store: Path) -> Check:
    probe = store
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if store.exists():
        mode = stat.S_IMODE(store.stat().st_mode)
        if mode & 0o077:
            return Check("store", "WARN", f"{store} is mode {mode:o}: images hold process memory; "
                                          "the pool tightens it to 700 on the next build",
                         required=False)
        return Check("store", "OK", f"{store} (mode {mode:o})")
    if os.access(probe, os.W_OK):
        return Check("store", "OK", f"{store} (created on first build, mode 700)")
    return Check("store", "MISSING", f"{store} cannot be created: {probe} is not writable; "
                                     "set POOL_STORE")


def verdict(checks: list[Check]) -> tuple[bool, str]:
    failed = [c for c in checks if not c.ok]
    if not failed:
        return True, "this node can build and restore templates"
    c = failed[0]
    return False, f"this node cannot build and restore templates: {c.name}: {c.detail}"


def as_json(checks: list[Check], facts: dict) -> dict:
    ok, reason = verdict(checks)
    return {"ok": ok, "reason": reason, **facts, "checks": [asdict(c) for c in checks]}
