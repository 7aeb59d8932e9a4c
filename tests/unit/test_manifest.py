"""Manifest: the on-disk JSON round-trips unchanged; a bad field is refused by name."""
from __future__ import annotations

import copy
import json

import pytest

from pool.errors import TemplateCorrupt
from pool.templates.manifest import ImageFile, Manifest
from pool.templates.store import MANIFEST, Store, seal

SHA = "ab" * 32
BUILD = {  # as pool/templates/build.py writes it
    "format": 1, "name": "py-hello", "build_id": "20260101T000000-abcdef",
    "spec": {"name": "py-hello", "command": ["python3", "app.py"], "sdk": True,
             "network": {"mode": "isolated", "port": 8080},
             "restore": {"identity_timeout": 5.0, "hostname": "copy-{id}"}},
    "spec_digest": "d" * 64, "criu_version": "4.2.1", "kernel": "6.18.44-fc", "arch": "x86_64",
    "pipes": {"stdout": 101, "stderr": 102, "ctl_in": 103, "ctl_out": 104},
    "rss_bytes": 30_000_000, "boot_to_ready_s": 0.5, "warmup_s": 0.0, "dump_s": 0.2,
    "built_at": "2026-01-01T00:00:00Z", "build_s": 1.1,
    "files": {"inventory.img": {"size": 10, "sha256": SHA}, "pages-1.img": {"size": 20, "sha256": SHA}},
    "image_bytes": 30,
}
FORK = {  # as pool/copies/fork.py writes it (lazily)
    **{k: v for k, v in BUILD.items() if k not in ("rss_bytes", "boot_to_ready_s", "warmup_s",
                                                    "build_s")},
    "name": "py-hello+fork-1", "spec_digest": None, "pipes": {},
    "stdio_keys": {"stdout": "run/i/stdout.log", "stderr": "run/i/stderr.log"},
    "forked_from": {"template": "py-hello", "build_id": "b0", "instance": "i"},
    "lazy_pages": True,
}


@pytest.mark.parametrize("raw", [BUILD, FORK], ids=["build", "fork"])
def test_round_trip_is_the_same_json(raw):
    m = Manifest.from_dict(copy.deepcopy(raw))
    assert m.to_dict() == raw
    assert json.dumps(m.to_dict(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_what_restores_ask_of_it():
    m = Manifest.from_dict(copy.deepcopy(BUILD), "py-hello")
    assert m.sdk and m.port == 8080 and not m.tcp_close and not m.has_ghost_files
    assert m.restore_spec["hostname"] == "copy-{id}"
    assert m.stdio_key("stdout") == "pipe:[101]" and m.pipe_key("ctl_out") == "pipe:[104]"
    assert m.files["pages-1.img"] == ImageFile(size=20, sha256=SHA)
    f = Manifest.from_dict(copy.deepcopy(FORK))
    assert not f.sdk and f.lazy_pages and f.stdio_key("stderr") == "run/i/stderr.log"


def test_unknown_keys_of_a_newer_node_are_carried_through():
    raw = {**copy.deepcopy(BUILD), "future_field": {"x": 1}}
    m = Manifest.from_dict(raw)
    assert m.extra == {"future_field": {"x": 1}} and m.to_dict() == raw


def test_to_dict_is_a_copy():
    m = Manifest.from_dict(copy.deepcopy(BUILD))
    m.to_dict()["spec"]["network"]["port"] = 1
    assert m.port == 8080


@pytest.mark.parametrize("change,field", [
    (lambda m: m.update(format=2), "format"),
    (lambda m: m.update(name="other"), "name"),
    (lambda m: m.pop("build_id"), "build id"),
    (lambda m: m.update(build_id="../x"), "build id"),
    (lambda m: m.pop("criu_version"), "criu_version"),
    (lambda m: m.update(kernel=6), "kernel"),
    (lambda m: m.update(spec=[]), "spec"),
    (lambda m: m["spec"].update(network="isolated"), "spec.network"),
    (lambda m: m.update(pipes={"stdout": "x"}), "pipes"),
    (lambda m: m.update(files={}), "no image files"),
    (lambda m: m["files"].update({"a/b": {"size": 1, "sha256": SHA}}), "bad image file name"),
    (lambda m: m["files"].update({"parent": {"size": 1, "sha256": SHA}}), "bad image file name"),
    (lambda m: m["files"].update({"parent/../x": {"size": 1, "sha256": SHA}}), "bad image file"),
    (lambda m: m["files"].update({"parent/parent/x": {"size": 1, "sha256": SHA}}), "bad image file"),
    (lambda m: m["files"]["inventory.img"].update(size=True), "bad size or sha256 for inventory"),
    (lambda m: m.update(image_bytes=31), "image_bytes"),
    (lambda m: m.update(dump_s="fast"), "dump_s"),
    (lambda m: m.update(stdio_keys={"stdout": 1}), "stdio_keys"),
    (lambda m: m.update(lazy_pages="yes"), "lazy_pages"),
    (lambda m: m.update(built_at=1), "built_at"),
])
def test_a_bad_field_is_refused_by_name(change, field):
    raw = copy.deepcopy(BUILD)
    change(raw)
    with pytest.raises(TemplateCorrupt, match=field) as e:
        Manifest.from_dict(raw, "py-hello")
    assert e.value.reason.startswith(MANIFEST)


def test_an_iterative_dump_lists_its_pre_dump_files_under_parent():
    raw = copy.deepcopy(FORK)
    raw["files"]["parent/pages-1.img"] = {"size": 5, "sha256": SHA}
    raw["image_bytes"] = 35
    m = Manifest.from_dict(raw, raw["name"])
    assert m.files["parent/pages-1.img"] == ImageFile(size=5, sha256=SHA)
    assert json.dumps(m.to_dict(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_not_a_map():
    with pytest.raises(TemplateCorrupt, match="not a map"):
        Manifest.from_dict(["x"], "py-hello")


def test_a_missing_pipe_is_corrupt_not_a_key_error():
    m = Manifest.from_dict({**copy.deepcopy(BUILD), "pipes": {"stdout": 1, "stderr": 2}})
    with pytest.raises(TemplateCorrupt, match="pipes has no ctl_in"):
        m.pipe_key("ctl_in")


def test_seal_writes_what_the_store_reads(tmp_path):
    store = Store(tmp_path / "store")
    with store.staging("py-hello") as staged:
        (staged / "image").mkdir()
        (staged / "image" / "inventory.img").write_bytes(b"0123456789")
        facts = {k: v for k, v in BUILD.items() if k not in ("format", "name", "files", "image_bytes")}
        published = store.publish("py-hello", staged, facts)
    read = store.get("py-hello")
    assert read.manifest == published.manifest and read.manifest.image_bytes == 10
    on_disk = json.loads((read.build_dir / MANIFEST).read_text())
    assert on_disk == {**facts, "format": 1, "name": "py-hello", "image_bytes": 10,
                       "files": {"inventory.img": read.manifest.files["inventory.img"].to_dict()}}
    read.verify(full=True)
    bad = tmp_path / "bad"
    (bad / "image").mkdir(parents=True)
    (bad / "image" / "x.img").write_bytes(b"")
    with pytest.raises(TemplateCorrupt, match="criu_version"):
        seal(bad, "bad", {k: v for k, v in facts.items() if k != "criu_version"})
    assert not (bad / MANIFEST).exists()
