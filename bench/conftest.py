"""Benchmark fixtures: real CRIU, a private store, templates built once per session.

BENCH_QUICK=1 (set by the tests that check the benchmarks still run) shrinks every count.
The JSON's machine_info.git says which commit ran and whether the tree was clean: bench/report.py
refuses figures from a dirty tree unless told otherwise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pool.templates.build import build
from pool.cr.criu import Criu
from pool.templates.spec import load_spec
from pool.templates.store import Store

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("BENCH_QUICK") == "1"
RESULTS = "bench/results/"


def rounds(full: int) -> int:
    return 2 if QUICK else full


def git_state() -> dict:
    """The commit checked out and the uncommitted changes (untracked files count: they can be code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout
    # "XY path": X may be a space, so no strip. bench/results/ holds the outputs (earlier runs'
    # results not yet committed), not code: changes there do not make the tree dirty.
    changes = [line for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith(RESULTS)]
    return {"commit": git("rev-parse", "HEAD").strip(), "clean": not changes, "changes": changes[:30]}


AT_START = git_state()  # conftest is imported before the first benchmark runs


def pytest_benchmark_update_machine_info(config, machine_info):
    """Clean only if the tree was clean, on the same commit, both when the run began and at its end."""
    now = git_state()
    machine_info["git"] = {"commit": AT_START["commit"],
                           "clean": AT_START["clean"] and now["clean"]
                           and now["commit"] == AT_START["commit"],
                           "changes": AT_START["changes"] or now["changes"],
                           "commit_at_end": now["commit"]}


@pytest.fixture(scope="session")
def bench_dir():
    d = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def criu() -> Criu:
    return Criu.locate()


@pytest.fixture(scope="session")
def lazy_pages_ok():
    """The CRIU notes: CRIU cannot grow its pipes here, so lazy pages need fs.pipe-max-size >= 4 MiB;
    raised for the session, put back after."""
    knob = Path("/proc/sys/fs/pipe-max-size")
    old = knob.read_text().strip()
    if int(old) < 4 << 20:
        knob.write_text(str(4 << 20))
    yield
    knob.write_text(old)


@pytest.fixture(scope="session")
def bench_store(bench_dir) -> Store:
    return Store(bench_dir / "store")


@pytest.fixture(scope="session")
def template(bench_store, criu):
    """template('py-hello') builds templates/py-hello once and returns the published Template."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(load_spec(ROOT / "templates" / name), bench_store, criu).template
        return cache[name]

    return get
