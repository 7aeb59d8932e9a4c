"""Running instances' settings ([templates.NAME] of the service config) and the snapshot area's
bookkeeping (pool/copies/snapshots.py: listing, lookup by id or tag, retention, totals)."""
from __future__ import annotations

import json

import pytest

from pool.cluster.config import load_config
from pool.copies.snapshots import META, Snapshots
from pool.errors import SnapshotNotFound, SpecError
from pool.node.live import LiveSettings


def config(tmp_path, body: str):
    p = tmp_path / "service.toml"
    p.write_text("[templates.counter]\n" + body)
    return load_config(p)


def test_the_settings_are_read_per_template_with_defaults(tmp_path):
    cfg = config(tmp_path, 'idle_timeout = 5\nidle_action = "suspend"\nrestart = "on-failure"\n'
                           "checkpoint_every = 30\nkeep_snapshots = 3\n")
    ls = cfg.node_settings().live_settings("counter")
    assert (ls.idle_action, ls.restart, ls.checkpoint_every, ls.keep_snapshots) == \
        ("suspend", "on-failure", 30.0, 3)
    assert cfg.node_settings().live_settings("other") == LiveSettings()


@pytest.mark.parametrize("body,field", [('idle_action = "sleep"\n', "idle_action"),
                                        ('restart = "always"\n', "restart"),
                                        ("keep_snapshots = -1\n", "keep_snapshots"),
                                        ("checkpoint_every = -2\n", "checkpoint_every")])
def test_bad_values_name_their_field(tmp_path, body, field):
    with pytest.raises(SpecError) as e:
        config(tmp_path, body)
    assert field in str(e.value)


def fake_snapshot(snaps: Snapshots, iid: str, sid: str, created: float, tag=None, size=10):
    d = snaps.instance_dir(iid) / sid
    (d / "build").mkdir(parents=True)
    (d / "build" / "x.img").write_bytes(b"x" * size)
    (d / META).write_text(json.dumps({"id": sid, "tag": tag, "created": created,
                                      "freeze_ms": 1.0, "dump_ms": 2.0}))


def test_lookup_retention_and_totals(tmp_path):
    snaps = Snapshots(tmp_path / "snapshots")
    assert snaps.list("i1") == [] and snaps.totals() == (0, 0)
    for n in range(4):
        fake_snapshot(snaps, "i1", f"s{n}", created=100 + n, tag="base" if n == 1 else None)
    fake_snapshot(snaps, "i2", "t0", created=50)
    assert [s.id for s in snaps.list("i1")] == ["s0", "s1", "s2", "s3"]
    assert snaps.get("i1").id == "s3" and snaps.get("i1", "base").id == "s1"
    with pytest.raises(SnapshotNotFound):
        snaps.get("i1", "nope")
    with pytest.raises(SnapshotNotFound):
        snaps.get("i3")
    assert snaps.prune("i1", 2) == ["s0", "s1"] and [s.id for s in snaps.list("i1")] == ["s2", "s3"]
    assert snaps.prune("i1", 0) == []                       # 0: keep all
    count, size = snaps.totals()
    assert count == 3 and size > 30
    assert snaps.clean({"i1"}) == 1 and snaps.list("i2") == []
    snaps.remove_instance("i1")
    assert snaps.totals() == (0, 0)
