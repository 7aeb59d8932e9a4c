"""Benchmark fixtures: real CRIU, a private store, templates built once per session.

BENCH_QUICK=1 (set by the tests that check the benchmarks still run) shrinks every count.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pool.templates.build import build
from pool.cr.criu import Criu
from pool.templates.spec import load_spec
from pool.templates.store import Store

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("BENCH_QUICK") == "1"


def rounds(full: int) -> int:
    return 2 if QUICK else full


@pytest.fixture(scope="session")
def bench_dir():
    d = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def criu() -> Criu:
    return Criu.locate()


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
