"""Restoring copies with their own identity: many at once, Java, incompatible and corrupt images,
copies that crash or never ack. Every test must leave nothing behind (tests/conftest.py checks)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pool.copies.portproxy import PortProxy
from pool.copies.restore import Identity, Restorer, hand_over_async
from pool.errors import Incompatible, RestoreError, TemplateCorrupt
from pool.templates.build import build
from pool.templates.spec import load_spec
from pool.templates.store import MANIFEST

ROOT = Path(__file__).resolve().parents[2]


def http_get_json(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/", timeout=10) as resp:
        return json.loads(resp.read())


def test_eight_copies_at_once(built, restorer):
    built("py-hello")
    ids = [Identity(f"copy-{i}", env={"GREETING": f"hello {i}"}, args=["--n", str(i)],
                    hostname=f"host-{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ident: _try(restorer.spawn, "py-hello", ident), ids))
    instances = [r for r in results if not isinstance(r, BaseException)]
    try:
        assert len(instances) == 8, [r for r in results if isinstance(r, BaseException)]
        answers = asyncio.run(_ask_through_host_ports(instances))
        assert {a["instance"] for a in answers} == {f"copy-{i}" for i in range(8)}
        for a in answers:
            i = int(a["instance"].split("-")[1])
            assert a["greeting"] == f"hello {i}" and a["args"] == ["--n", str(i)]
            assert a["hostname"] == f"host-{i}"
        assert len({a["random"] for a in answers}) == 8  # reseeded: no two copies agree
        assert len({i.pid for i in instances}) == 8
        assert all(a["pid"] == answers[0]["pid"] for a in answers)  # same PID inside each namespace
    finally:
        for inst in instances:
            inst.kill()
            inst.close()


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return e


async def _ask_through_host_ports(instances) -> list[dict]:
    proxies = [PortProxy(i.netns_fd, i.port) for i in instances]
    try:
        addresses = [await p.start() for p in proxies]
        assert len(set(addresses)) == len(instances)
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, http_get_json, a)
                                           for a in addresses)))
    finally:
        for p in proxies:
            await p.close()


@pytest.fixture(scope="module")
def java_hello(session_store, criu):
    subprocess.run(["bash", str(ROOT / "templates/java-hello/build.sh")], check=True,
                   capture_output=True, timeout=300)
    return build(load_spec(ROOT / "templates/java-hello"), session_store, criu).template


def test_java_template_three_copies(java_hello, restorer):
    instances = [restorer.spawn("java-hello", Identity(f"java-{i}", args=[f"arg{i}"]))
                 for i in range(3)]
    try:
        answers = asyncio.run(_ask_through_host_ports(instances))
        assert {a["instance"] for a in answers} == {"java-0", "java-1", "java-2"}
        assert len({a["random"] for a in answers}) == 3
        assert all(a["greeting"] == "hello from java" for a in answers)
    finally:
        for inst in instances:
            inst.kill()
            inst.close()


def _copy_template(store, name: str, new: str) -> Path:
    """A second published template, identical but for its name, to tamper with."""
    src = store.get(name)
    dst = store.root / new
    shutil.copytree(src.build_dir.parent.parent, dst, symlinks=True)
    m = json.loads((dst / "current" / MANIFEST).read_text())
    m["name"] = new
    (dst / "current" / MANIFEST).write_text(json.dumps(m))
    return dst / "current"


@pytest.mark.parametrize("field,value,reason", [
    ("criu_version", "9.9.0", "dumped by CRIU 9.9.0"),
    ("arch", "riscv64", "image is for riscv64"),
    ("kernel", "99.0.0", "older"),
])
def test_incompatible_manifest_refused_before_criu(built, session_store, criu, tmp_path, field,
                                                   value, reason):
    built("py-hello")
    name = f"incompat-{field.replace('_', '-')}"
    cur = _copy_template(session_store, "py-hello", name)
    try:
        m = json.loads((cur / MANIFEST).read_text())
        m[field] = value
        (cur / MANIFEST).write_text(json.dumps(m))
        r = Restorer(session_store, criu, tmp_path / "run")
        with pytest.raises(Incompatible, match=reason):
            r.restore(name)
        assert not (tmp_path / "run" / "instances").exists()  # refused before anything was made
    finally:
        session_store.remove(name)


def test_cpu_features_missing_refused(built, session_store, criu, tmp_path):
    """A cpuinfo.img from a CPU with features this one lacks: CRIU's cpuinfo check refuses."""
    built("py-hello")
    name = "incompat-cpu"
    cur = _copy_template(session_store, "py-hello", name)
    try:
        import pycriu.images as images

        path = cur / "image" / "cpuinfo.img"
        with open(path, "rb") as f:
            img = images.load(f)
        cpu = img["entries"][0]["x86_entry"][0]
        cpu["capability"] = [0xFFFFFFFF for _ in cpu["capability"]]  # claim every feature bit
        with open(path, "wb") as f:
            images.dump(img, f)
        r = Restorer(session_store, criu, tmp_path / "run", verify=False)
        with pytest.raises(Incompatible, match="CPU lacks features"):
            r.restore(name)
    finally:
        session_store.remove(name)


def test_corrupt_image_refused(built, session_store, criu, tmp_path):
    built("py-hello")
    name = "corrupt"
    cur = _copy_template(session_store, "py-hello", name)
    try:
        pages = max((cur / "image").glob("pages-*.img"), key=lambda p: p.stat().st_size)
        with open(pages, "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(TemplateCorrupt, match="does not match its sha256"):
            Restorer(session_store, criu, tmp_path / "run").restore(name)
        assert not (tmp_path / "run" / "instances").exists() or \
            not any((tmp_path / "run" / "instances").iterdir())
    finally:
        session_store.remove(name)


CRASH_AFTER_RESTORE = """
import os, sys, pool.runtime

@pool.runtime.after_restore
def crash(identity):
    print("copy", identity.instance_id, "crashing now", file=sys.stderr, flush=True)
    os._exit(3)

pool.runtime.checkpoint()
"""

NEVER_ACKS = """
import time, pool.runtime

@pool.runtime.after_restore
def stuck(identity):
    print("after_restore hangs for", identity.instance_id, flush=True)
    time.sleep(3600)

pool.runtime.checkpoint()
"""

HOOK_FAILS = """
import pool.runtime

@pool.runtime.after_restore
def broken(identity):
    raise ValueError("no database for " + identity.instance_id)

pool.runtime.checkpoint()
"""


def failing_template(tmp_path, store, criu, app: str) -> Restorer:
    """Build app as the SDK template "failing"; a Restorer of the store."""
    d = tmp_path / "failing"
    d.mkdir()
    (d / "template.toml").write_text('command = ["python3", "app.py"]\n[ready]\nsdk = true\n')
    (d / "app.py").write_text(app)
    build(load_spec(d), store, criu)
    return Restorer(store, criu, tmp_path / "run")


@pytest.mark.parametrize("app,needle,output", [
    (CRASH_AFTER_RESTORE, "exited with status 3", "crashing now"),
    (NEVER_ACKS, "did not ack its identity within 1s", "after_restore hangs"),
    (HOOK_FAILS, "ValueError: no database for bad-1", None),
])
def test_failing_copy_is_reported_and_leaves_nothing(tmp_path, store, criu, app, needle, output):
    r = failing_template(tmp_path, store, criu, app)
    with pytest.raises(RestoreError) as info:
        r.spawn("failing", Identity("bad-1"), timeout=1.0)
    assert needle in info.value.message
    if output:
        assert output in info.value.output_tail
    assert list((tmp_path / "run" / "instances").iterdir()) == []
    store.get("failing").verify(full=True)  # the template is untouched


@pytest.mark.parametrize("app,needle", [
    (NEVER_ACKS, "did not ack its identity within 1s"),
    (HOOK_FAILS, "ValueError: no database for bad-2"),
])
def test_async_hand_over_kills_the_copy_too(tmp_path, store, criu, app, needle):
    """The sync and async hand-over agree: a copy whose hand-over fails is killed. The async one
    only signals it (its caller watches the pidfd), so the caller reaps and closes it."""
    r = failing_template(tmp_path, store, criu, app)
    inst = r.restore("failing", "bad-2")
    try:
        with pytest.raises(RestoreError) as info:
            asyncio.run(hand_over_async(inst, Identity("bad-2"), timeout=1.0))
        assert needle in info.value.message
        assert inst.wait(10) is not None          # killed, not left running for the caller
    finally:
        inst.kill(grace=0)
        inst.close()
