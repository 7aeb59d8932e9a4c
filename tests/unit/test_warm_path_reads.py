"""The coordinator's spawn path parses no manifest: Store.current() reads a build's manifest once
(a new publish is seen at the next call: one readlink says which build is current), and
Cluster.views(), what the scheduler decides by, asks only that. Manifest parsing is counted."""
from __future__ import annotations

import pytest

from pool.cluster.nodes import Cluster, LocalNode
from pool.cluster.registry import StaticRegistry
from pool.cluster.scheduler import choose_node
from pool.errors import TemplateNotFound
from pool.templates import manifest as manifest_module
from pool.templates.store import Store, new_build_id


def publish(store: Store, name: str = "tpl") -> str:
    with store.staging(name) as staged:
        (staged / "image").mkdir()
        (staged / "image" / "pages-1.img").write_bytes(b"x" * 100)
        t = store.publish(name, staged, {"build_id": new_build_id(), "arch": "x86_64",
                                         "kernel": "6.18.0", "criu_version": "4.2.1",
                                         "pipes": {}, "spec": {"name": name}})
    return t.build_id


@pytest.fixture
def parses(monkeypatch):
    """How many manifests were parsed (Manifest.from_dict) since the fixture was made."""
    count = [0]
    real = manifest_module.Manifest.from_dict.__func__

    def counted(cls, *a, **kw):
        count[0] += 1
        return real(cls, *a, **kw)

    monkeypatch.setattr(manifest_module.Manifest, "from_dict", classmethod(counted))
    return count


class Ops:
    """What LocalNode asks of a node: its store and free capacity."""

    def __init__(self, store):
        self.store = store
        self.runtime = type("Runtime", (), {"name": "local", "draining": False,
                                            "free": staticmethod(lambda: 3)})()


def test_store_current_parses_each_build_once_and_sees_a_new_publish_at_once(tmp_path, parses):
    store = Store(tmp_path)
    first = publish(store)
    reader = Store(tmp_path)                      # another process's view of the same store
    parses[0] = 0
    assert reader.current("tpl").build_id == first
    for _ in range(50):
        assert reader.current("tpl").build_id == first
    assert parses[0] == 1
    second = publish(store)                       # `pool build` elsewhere publishes a new build
    parses[0] = 0
    assert reader.current("tpl").build_id == second
    assert reader.current("tpl").build_id == second
    assert parses[0] == 1
    store.remove("tpl")
    assert reader.current("tpl") is None and store.current("tpl") is None
    assert reader.current("../etc") is None


def test_the_scheduler_view_of_a_spawn_parses_no_manifest(tmp_path, parses):
    coordinator_store, node_store = Store(tmp_path), Store(tmp_path)
    build = publish(coordinator_store)
    cluster = Cluster(coordinator_store, LocalNode(Ops(node_store)), StaticRegistry([]), None)
    views = cluster.views("tpl")                  # the first spawn fills both caches
    parses[0] = 0
    for _ in range(100):
        views = cluster.views("tpl")
        choice = choose_node(views, "tpl")
        assert choice.node == "local" and choice.cached
    assert parses[0] == 0
    assert cluster.nodes["local"].cached() == {"tpl": build}
    newer = publish(coordinator_store)
    assert cluster.views("tpl")[0].templates == frozenset({"tpl"})
    assert node_store.current("tpl").build_id == newer
    with pytest.raises(TemplateNotFound):
        cluster.views("nothing")
