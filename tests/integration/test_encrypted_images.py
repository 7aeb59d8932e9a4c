"""Images encrypted at rest (`[service] encrypt_images`), with real CRIU: a built template's files
hold none of a marker its app keeps in memory while a copy restored from it answers with it; a
tampered chunk is refused (TemplateCorrupt naming the file) and nothing decrypted is left; a
transfer to a node with another key works; a real service decrypts into RAM and leaves nothing
there once stopped."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from pool.cli.demo import LocalService
from pool.copies.restore import Restorer
from pool.cr import netns
from pool.errors import TemplateCorrupt
from pool.templates import imagecrypt, transfer
from pool.templates.build import build
from pool.templates.imagecrypt import ImageKey
from pool.templates.spec import load_spec
from pool.templates.store import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAME = "py-marked"


def marked_template(tmp_path: Path, marker: str) -> Path:
    """py-hello that reads a marker from a file of its folder at boot and answers with it: the
    marker is in its memory (so in a plain image), in neither its spec nor its manifest."""
    d = tmp_path / NAME
    shutil.copytree(ROOT / "templates" / "py-hello", d)
    (d / "marker.txt").write_text(marker)
    app = (d / "app.py").read_text()
    app = app.replace('TABLE = {', 'MARKER = open("marker.txt").read()\nTABLE = {', 1)
    app = app.replace('"greeting": os.environ.get("GREETING")', '"greeting": MARKER', 1)
    (d / "app.py").write_text(app)
    (d / "template.toml").write_text(f'name = "{NAME}"\n' + (d / "template.toml").read_text())
    return d


def greeting(address: str) -> str:
    """A service's copy, at its published address."""
    with urllib.request.urlopen(f"http://{address}/", timeout=30) as r:
        return json.loads(r.read())["greeting"]


def greeting_of(inst) -> str:
    """A copy restored in this process, asked inside its network namespace."""
    status, body = netns.http_in(f"/proc/{inst.pid}/ns/net", "http://127.0.0.1:8080/", timeout=30)
    assert status == 200
    return json.loads(body)["greeting"]


def ram_dirs(pid: int) -> list[Path]:
    """Plaintext dirs process pid has in RAM (decrypted cache, build dumps)."""
    return sorted(p for prefix in (imagecrypt.CACHE_PREFIX, imagecrypt.DUMP_PREFIX)
                  for p in imagecrypt.RAM_ROOT.glob(f"{prefix}{pid}.*"))


def files_holding(root: Path, marker: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and marker in p.read_bytes()]


@pytest.fixture
def marker() -> str:
    return "marker-" + os.urandom(12).hex()


@pytest.fixture
def sealed_store(tmp_path):
    st = Store(tmp_path / "store", key=ImageKey.load_or_create(tmp_path / "keys" / "a.key",
                                                               tmp_path / "store"))
    yield st
    st.close()


def test_an_encrypted_build_holds_no_marker_and_its_copies_answer_with_it(tmp_path, criu, marker,
                                                                          sealed_store):
    t = build(load_spec(marked_template(tmp_path, marker)), sealed_store, criu).template
    assert files_holding(sealed_store.root, marker.encode()) == []  # image, manifest, all
    assert ram_dirs(os.getpid()) == []                                # the dump left RAM too
    with sealed_store.readable(t) as plain:  # the same search finds it in the plaintext
        assert files_holding(plain.image_dir, marker.encode())

    restorer = Restorer(sealed_store, criu, tmp_path / "run")
    inst = restorer.spawn(NAME)
    try:
        assert greeting_of(inst) == marker
    finally:
        inst.kill(grace=0)
        inst.close()
    sealed_store.close()
    assert ram_dirs(os.getpid()) == []


def test_a_tampered_chunk_is_refused_and_nothing_is_left(tmp_path, criu, marker, sealed_store):
    t = build(load_spec(marked_template(tmp_path, marker)), sealed_store, criu).template
    pages = max(t.manifest.files, key=lambda f: t.manifest.files[f].size)
    path = t.stored_dir / pages
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    restorer = Restorer(sealed_store, criu, tmp_path / "run")
    with pytest.raises(TemplateCorrupt, match=rf"{pages}: chunk \d+ of \d+ fails authentication"):
        restorer.spawn(NAME)
    assert sealed_store.cache.entries() == []  # nothing half-decrypted
    assert not list((tmp_path / "run").glob("instances/*"))
    sealed_store.close()
    assert ram_dirs(os.getpid()) == []


def test_a_node_with_another_key_receives_and_restores_it(tmp_path, criu, marker, sealed_store):
    t = build(load_spec(marked_template(tmp_path, marker)), sealed_store, criu).template
    other = Store(tmp_path / "store-b", key=ImageKey.load_or_create(tmp_path / "keys" / "b.key",
                                                                  tmp_path / "store-b"))

    async def ship():
        src = transfer.TemplateSource(sealed_store)
        addr = await src.start("127.0.0.1", 0)
        try:
            return await transfer.fetch(other, NAME, addr)
        finally:
            await src.close()

    res = asyncio.run(ship())
    assert res.template.build_id == t.build_id and res.bytes_raw == t.image_bytes
    assert files_holding(other.root, marker.encode()) == []
    with pytest.raises(TemplateCorrupt, match="encrypted with another key"):  # resealed with b's
        Store(other.root, key=sealed_store.key).get(NAME).verify(full=True)
    inst = Restorer(other, criu, tmp_path / "run-b").spawn(NAME)
    try:
        assert greeting_of(inst) == marker
    finally:
        inst.kill(grace=0)
        inst.close()
    other.close()
    assert ram_dirs(os.getpid()) == []


def test_a_service_makes_its_key_decrypts_into_ram_and_leaves_nothing_there(tmp_path, criu, marker):
    key, store = tmp_path / "etc" / "image.key", tmp_path / "store"
    config = (f'[service]\nencrypt_images = true\nimage_key = "{key}"\n'
              f'[templates.{NAME}]\nmin_warm = 1\n')
    (tmp_path / "svc").mkdir()
    with LocalService(store, tmp_path / "svc", config) as svc, svc.client() as c:
        assert key.stat().st_mode & 0o777 == 0o600
        assert "created the image key" in svc.log.read_text()
        builder = Store(store, key=ImageKey.load_or_create(key, store))
        t = build(load_spec(marked_template(tmp_path, marker)), builder, criu).template
        assert files_holding(store, marker.encode()) == []
        svc.wait_warm(NAME, 1)
        inst = c.spawn(NAME)
        assert greeting(inst.address) == marker
        cache = [d for d in ram_dirs(svc.pid) if d.name.startswith(imagecrypt.CACHE_PREFIX)]
        assert [p.name for d in cache for p in d.iterdir()] == [f"{NAME}@{t.build_id}"]
        assert oct(cache[0].stat().st_mode & 0o777) == "0o700"
        inst.kill(grace=0)
    assert svc.proc.returncode == 0
    assert ram_dirs(svc.pid) == []
