"""Building templates for real: an SDK template and a probe template, each restored once; the store's
atomic publish, permissions and integrity; the template CLI."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.errors import TemplateCorrupt, TemplateNotFound
from pool.templates.build import build
from pool.templates.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]

TCP_APP = """
import socket, os
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000)); s.listen()
state = sum(range(10**6))  # boot-time work the copies keep
while True:
    c, _ = s.accept()
    c.sendall(f"state={state} pid={os.getpid()}\\n".encode()); c.close()
"""


def write_template(root: Path, name: str, toml: str, app: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "template.toml").write_text('command = ["python3", "app.py"]\n' + toml)
    (d / "app.py").write_text(app)
    return d


def test_sdk_template_builds_and_restores(built, restorer, session_store):
    t = built("py-hello")
    m = t.manifest.to_dict()
    assert m["spec"]["name"] == "py-hello" and m["spec_digest"]
    for key in ("criu_version", "kernel", "arch", "rss_bytes", "boot_to_ready_s", "build_s",
                "dump_s", "image_bytes", "files", "pipes"):
        assert key in m, key
    assert m["rss_bytes"] > 10 * 2**20
    assert "cpuinfo.img" in m["files"]
    inst = restorer.spawn("py-hello", Identity("t-sdk", env={"GREETING": "restored"}, args=["a"]))
    try:
        status, body = netns.http_in(inst.netns_fd, "http://127.0.0.1:8080/")
        answer = json.loads(body)
        assert status == 200
        assert answer["instance"] == "t-sdk" and answer["greeting"] == "restored"
        assert answer["args"] == ["a"] and answer["table"] == 200_000
    finally:
        inst.kill()
        inst.close()


def test_probe_template_builds_and_restores(tmp_path, store, criu):
    d = write_template(tmp_path, "tcp-probe", '[ready]\ntcp = 9000\ntimeout = 20\n'
                       '[network]\nmode = "isolated"\nport = 9000\n', TCP_APP)
    t = build(load_spec(d), store, criu).template
    assert "ctl_in" not in t.manifest.pipes  # transparent: no control channel
    inst = Restorer(store, criu, tmp_path / "run").spawn("tcp-probe", Identity("t-probe",
                                                                               hostname="probe-1"))
    try:
        s = netns.connect_in(inst.netns_fd, 9000, timeout=5)
        line = s.makefile().readline()
        s.close()
        assert line.startswith(f"state={sum(range(10**6))} ")
        uts = os.readlink(f"/proc/{inst.pid}/ns/uts")
        assert uts != os.readlink("/proc/self/ns/uts")
        assert netns.run_in(f"/proc/{inst.pid}/ns/uts", netns.CLONE_NEWUTS,
                            lambda: __import__("socket").gethostname()) == "probe-1"
    finally:
        inst.kill()
        inst.close()


def test_store_is_private_and_verified(built, session_store):
    t = built("py-hello")
    assert stat.S_IMODE(session_store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(t.build_dir.stat().st_mode) == 0o700
    for f in t.image_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE((t.build_dir / "manifest.json").stat().st_mode) == 0o600
    t.verify(full=True)


def test_rebuild_replaces_atomically_and_keeps_one_previous(tmp_path, store, criu):
    d = write_template(tmp_path, "rebuilt", '[ready]\ntcp = 9000\n[network]\nmode = "isolated"\n'
                       'port = 9000\n', TCP_APP)
    first = build(load_spec(d), store, criu).template
    second = build(load_spec(d), store, criu).template
    assert store.get("rebuilt").build_id == second.build_id != first.build_id
    assert first.build_dir.exists()  # a restore that started before the swap can still read it
    third = build(load_spec(d), store, criu).template
    assert not first.build_dir.exists() and second.build_dir.exists()
    assert store.get("rebuilt").build_id == third.build_id
    assert list((store.root / ".staging").iterdir()) == []


def test_tampered_image_is_refused(tmp_path, store, criu):
    d = write_template(tmp_path, "tampered", '[ready]\ntcp = 9000\n[network]\nmode = "isolated"\n'
                       'port = 9000\n', TCP_APP)
    t = build(load_spec(d), store, criu).template
    victim = t.image_dir / "pstree.img"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(TemplateCorrupt, match="pstree.img does not match its sha256"):
        t.verify(full=True)


def test_unknown_template():
    from pool.templates.store import Store

    with pytest.raises(TemplateNotFound):
        Store(Path("/nonexistent-store")).get("nope")


def pool_cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pool.cli", "--store", str(store), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_build_templates_inspect_rm(tmp_path):
    store = tmp_path / "store"
    res = pool_cli("build", "py-hello", "--json", store=store)
    assert res.returncode == 0, res.stderr
    manifest = json.loads(res.stdout)
    assert manifest["name"] == "py-hello"
    assert "ready after" in res.stderr and "checkpointing" in res.stderr  # progress lines
    listing = json.loads(pool_cli("templates", "--json", store=store).stdout)
    assert [r["name"] for r in listing] == ["py-hello"]
    res = pool_cli("inspect", "py-hello", "--verify", store=store)
    assert res.returncode == 0 and "every file matches its sha256" in res.stdout
    assert pool_cli("rm", "py-hello", store=store).returncode == 0
    res = pool_cli("inspect", "py-hello", store=store)
    assert res.returncode == 1 and "no template named 'py-hello'" in res.stderr


def test_cli_bad_spec_is_one_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "template.toml").write_text('command = "python3 app.py"\n[ready]\nsdk = true\n')
    res = pool_cli("build", str(d), store=tmp_path / "store")
    assert res.returncode == 1
    assert "command" in res.stderr and "list" in res.stderr
    assert not (tmp_path / "store").exists()  # rejected before anything was started or made
