"""Fixtures for integration tests: a real CRIU, a private store and run dir per test session."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pool.cli.demo import LocalService
from pool.cr.criu import Criu
from pool.templates.store import Store

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"


@pytest.fixture(scope="session")
def criu() -> Criu:
    return Criu.locate()  # no skip: `make test` installs CRIU, so its absence is a failure


@pytest.fixture(scope="session")
def session_dir():
    d = Path(tempfile.mkdtemp(prefix="pool-test-session-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def session_store(session_dir) -> Store:
    """A store shared by tests that only read templates (built once per session)."""
    return Store(session_dir / "store")


@pytest.fixture(scope="session")
def built(session_store, criu):
    """Build a template from templates/ once per session: built('py-hello') -> Template."""
    from pool.templates.build import build
    from pool.templates.spec import load_spec

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(load_spec(TEMPLATES / name), session_store, criu).template
        return cache[name]

    return get


@pytest.fixture
def py_hello(built):
    return built("py-hello")


@pytest.fixture
def service(session_store, py_hello, tmp_path):
    """start(config) -> LocalService (a real `pool serve`) on the session store; every started service
    is stopped."""
    started = []

    def start(config: str = "[templates.py-hello]\nmin_warm = 2\nmax_live = 32\n", **kw):
        svc = LocalService(session_store.root, tmp_path, config, **kw)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture
def restorer(session_store, criu, tmp_path):
    from pool.copies.restore import Restorer

    return Restorer(session_store, criu, tmp_path / "run")


# --- multi-node labs (test_nodes.py, test_crash_recovery.py) ----------------------------------------
COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"


@pytest.fixture(scope="module")
def counter(session_store, criu):
    """tests/apps/counter, a copy with state (a counter served over HTTP). Built per module: some
    modules build variants of it into the same store, so a session-wide build would go stale."""
    from pool.templates.build import build  # noqa: PLC0415
    from pool.templates.spec import load_spec  # noqa: PLC0415

    return build(load_spec(COUNTER), session_store, criu).template


@pytest.fixture
def pool_lab(session_store, counter, tmp_path):
    """start(store_root=None, **kw) -> a running PoolLab on a fresh NetLab(3)."""
    from netlab import NetLab  # noqa: PLC0415
    from poollab import PoolLab  # noqa: PLC0415

    made = []

    def start(store_root=None, **kw):
        lab = NetLab(3).__enter__()
        made.append(lab)
        pl = PoolLab(lab, store_root or session_store.root, tmp_path / "pool", **kw)
        made.append(pl)
        return pl.start()

    yield start
    for x in reversed(made):
        if isinstance(x, PoolLab):
            x.close()
        else:
            x.cleanup()


# --- the SDK test apps (test_java_sdk_restore.py, test_node_sdk.py, test_live_sdk_hooks.py) ------------
APPS = Path(__file__).resolve().parents[1] / "apps"


@pytest.fixture(scope="module")
def java_sdk(session_store, criu, tmp_path_factory):
    """tests/apps/java-sdk compiled with the SDK in a copy of its folder (build/ stays out of the source
    tree), built as a template."""
    from pool.templates.build import build  # noqa: PLC0415
    from pool.templates.spec import load_spec  # noqa: PLC0415

    folder = tmp_path_factory.mktemp("apps") / "java-sdk"
    shutil.copytree(APPS / "java-sdk", folder)
    subprocess.run(["javac", "--release", "17", "-d", str(folder / "build"), str(folder / "App.java"),
                    str(ROOT / "pool" / "java" / "PoolRuntime.java")],
                   check=True, capture_output=True, timeout=300)
    return build(load_spec(folder), session_store, criu).template


@pytest.fixture(scope="module")
def node_sdk(session_store, criu):
    """tests/apps/node-sdk built as a template."""
    from pool.templates.build import build  # noqa: PLC0415
    from pool.templates.spec import load_spec  # noqa: PLC0415

    return build(load_spec(APPS / "node-sdk"), session_store, criu).template
