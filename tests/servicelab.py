"""Helpers for tests against a real `pool serve` (the `service` fixture is in tests/integration/conftest.py)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
POOL = str(ROOT / ".venv" / "bin" / "pool")


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(svc, *args, check=True):
    """`pool ARGS` against svc; raises unless it succeeded (with check)."""
    r = subprocess.run([POOL, *args], env=svc.env, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"pool {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def copies_of(pid):
    """The copies (tini, PID 1 of each) that are children of process pid."""
    return {p.pid for p in psutil.Process(pid).children() if p.name() == "tini"}


def cgroup_name(pid: int) -> str:
    """The name of the memory cgroup pid is in (a copy's: named after its run dir)."""
    line = next(ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if "memory" in ln.split(":")[1].split(","))
    return line.rsplit("/", 1)[1]
