"""Images encrypted at rest without CRIU: the sealed format (chunks that cannot be altered, moved,
reordered or dropped), the node's key file, an encrypted store (sealed files, plaintext only in
RAM, the decrypted cache and its leases), and transfers between stores with different keys."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from pathlib import Path

import pytest

from pool.errors import SpecError, TemplateCorrupt, TransferError
from pool.templates import imagecrypt, transfer
from pool.templates.imagecrypt import CHUNK, ImageKey, Sealer
from pool.templates.store import Store
from test_transfer import CuttingProxy, publish_fake, source

MARKER = b"plaintext-marker-7f3a"


def key_at(path: Path, store: Path | None = None) -> ImageKey:
    return ImageKey.load_or_create(path, store or path.parent / "store")


def sealed_bytes(key: ImageKey, data: bytes, rel: str = "pages-1.img") -> bytes:
    out = io.BytesIO()
    s = Sealer(key, rel, out)
    for i in range(0, len(data), 300_000):  # fed in pieces that straddle chunks
        s.write(data[i:i + 300_000])
    s.finish()
    return out.getvalue()


def opened(key: ImageKey, sealed: bytes, size: int, rel: str = "pages-1.img") -> bytes:
    read_at = lambda off, n: sealed[off:off + n]  # noqa: E731
    return b"".join(imagecrypt.open_chunks(key, read_at, rel, size, "t"))


@pytest.fixture
def key(tmp_path) -> ImageKey:
    return key_at(tmp_path / "keys" / "image.key")


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 2 * CHUNK + CHUNK // 2])
def test_sealed_files_round_trip_and_have_the_predicted_size(key, size):
    data = os.urandom(size)
    sealed = sealed_bytes(key, data)
    assert len(sealed) == imagecrypt.sealed_size(size)
    assert opened(key, sealed, size) == data


def test_no_plaintext_in_a_sealed_file(key):
    sealed = sealed_bytes(key, MARKER * 100_000)
    assert MARKER not in sealed and MARKER[:8] not in sealed


def test_an_altered_chunk_is_refused_naming_the_file_and_chunk(key):
    data = os.urandom(3 * CHUNK)
    sealed = bytearray(sealed_bytes(key, data))
    sealed[imagecrypt.HEADER.size + CHUNK + 100] ^= 1  # inside chunk 0's ciphertext... or 1's
    with pytest.raises(TemplateCorrupt, match=r"pages-1.img: chunk \d of 3 fails authentication"):
        opened(key, bytes(sealed), len(data))


def test_chunks_cannot_be_reordered_dropped_moved_or_cut(key):
    data = os.urandom(3 * CHUNK)
    sealed = sealed_bytes(key, data)
    h, step = imagecrypt.HEADER.size, CHUNK + imagecrypt.NONCE + imagecrypt.TAG
    c = [sealed[h + i * step:h + (i + 1) * step] for i in range(3)]
    with pytest.raises(TemplateCorrupt, match="fails authentication"):   # reordered
        opened(key, sealed[:h] + c[1] + c[0] + c[2], len(data))
    with pytest.raises(TemplateCorrupt, match="fails authentication"):   # last chunk dropped
        opened(key, sealed[:h] + c[0] + c[1], 2 * CHUNK)
    with pytest.raises(TemplateCorrupt, match="cut short"):              # truncated
        opened(key, sealed[:-1], len(data))
    with pytest.raises(TemplateCorrupt, match="pages-2.img: chunk 0 of 3 fails"):  # moved
        opened(key, sealed, len(data), rel="pages-2.img")


def test_another_key_and_a_plain_file_are_told_apart(key, tmp_path):
    other = key_at(tmp_path / "other.key")
    sealed = sealed_bytes(key, b"x" * 10)
    with pytest.raises(TemplateCorrupt, match="encrypted with another key"):
        opened(other, sealed, 10)
    with pytest.raises(TemplateCorrupt, match="is not encrypted"):
        opened(key, b"\x00" * 100, 10)


def test_the_key_file_is_made_private_and_checked(tmp_path, caplog):
    path = tmp_path / "etc" / "image.key"
    made = key_at(path, tmp_path / "store")
    assert "created the image key" in caplog.text
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert key_at(path, tmp_path / "store") == made  # loaded again, not remade
    os.chmod(path, 0o640)
    with pytest.raises(SpecError, match="readable by others"):
        key_at(path, tmp_path / "store")
    os.chmod(path, 0o600)
    with pytest.raises(SpecError, match="must not be inside the store"):
        ImageKey.load_or_create(tmp_path / "store" / "image.key", tmp_path / "store")
    (tmp_path / "short.key").write_bytes(b"x" * 5)
    os.chmod(tmp_path / "short.key", 0o600)
    with pytest.raises(SpecError, match="32 bytes, this file has 5"):
        key_at(tmp_path / "short.key")
    (tmp_path / "link.key").symlink_to(path)
    with pytest.raises(SpecError, match="cannot open"):
        key_at(tmp_path / "link.key")


# --- an encrypted store ---------------------------------------------------------------------------
@pytest.fixture
def ram(tmp_path) -> Path:
    """Stands in for /dev/shm: the test can see every plaintext dir the store makes."""
    d = tmp_path / "ram"
    d.mkdir()
    return d


def sealed_store(tmp_path: Path, ram: Path, name: str = "a", key_name: str = "a.key") -> Store:
    return Store(tmp_path / name, key=key_at(tmp_path / "keys" / key_name, tmp_path / name),
                 ram_root=ram)


def publish_marked(store: Store, name: str = "fake"):
    with store.staging(name) as staged:
        assert staged.parent == store.ram_root  # dumps go to RAM
        image = staged / "image"
        image.mkdir()
        (image / "pages-1.img").write_bytes(os.urandom(CHUNK) + MARKER * 50_000)
        (image / "core-1.img").write_bytes(MARKER)
        (image / "empty.img").write_bytes(b"")
        return store.publish(name, staged, {"build_id": f"20000101T000000-{os.urandom(3).hex()}",
                                            "arch": "x86_64", "kernel": "6.18.0",
                                            "criu_version": "4.2.1", "pipes": {},
                                            "spec": {"name": name}})


def test_an_encrypted_store_holds_no_plaintext_and_reads_through_ram(tmp_path, ram):
    st = sealed_store(tmp_path, ram)
    t = publish_marked(st)
    assert list(ram.iterdir()) == []  # the dump's RAM dir went with the staging dir
    for p in (tmp_path / "a").rglob("*"):
        assert not p.is_file() or MARKER not in p.read_bytes(), p
    meta = t.manifest.files["core-1.img"]
    assert meta.size == len(MARKER) and meta.sha256 == hashlib.sha256(MARKER).hexdigest()
    t.verify(full=True)
    with pytest.raises(RuntimeError, match="encrypted"):
        _ = t.image_dir  # CRIU must never be handed the sealed files
    with st.readable(st.get("fake")) as plain:
        assert (plain.image_dir / "core-1.img").read_bytes() == MARKER
        assert plain.image_dir.stat().st_mode & 0o777 == 0o700
        assert plain.image_dir.parent.parent == ram
        plain.verify(full=True)  # the stored files, still
    st.close()
    assert list(ram.iterdir()) == []


def test_a_tampered_file_is_refused_and_leaves_nothing_decrypted(tmp_path, ram):
    st = sealed_store(tmp_path, ram)
    t = publish_marked(st)
    path = t.stored_dir / "pages-1.img"
    data = bytearray(path.read_bytes())
    data[imagecrypt.HEADER.size + 20] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(TemplateCorrupt, match="pages-1.img: chunk 0 of 3 fails authentication"):
        with st.readable(st.get("fake")):
            pass
    with pytest.raises(TemplateCorrupt, match="pages-1.img"):
        st.get("fake").verify(full=True)
    cache = st.cache.path
    assert cache is not None and list(cache.iterdir()) == []  # no half-decrypted build
    st.close()
    assert list(ram.iterdir()) == []


def test_another_nodes_key_cannot_read_the_store(tmp_path, ram):
    publish_marked(sealed_store(tmp_path, ram))
    thief = Store(tmp_path / "a", key=key_at(tmp_path / "keys" / "b.key", tmp_path / "a"),
                  ram_root=ram)
    with pytest.raises(TemplateCorrupt, match="encrypted with another key"):
        thief.get("fake").verify(full=True)
    with pytest.raises(TemplateCorrupt, match=r"is \d+ bytes, manifest says"):
        Store(tmp_path / "a").get("fake").verify(full=False)  # no key: sizes do not match


def test_a_replaced_build_leaves_ram_once_its_last_reader_is_done(tmp_path, ram):
    st = sealed_store(tmp_path, ram)
    old = publish_marked(st)
    entered, release = threading.Event(), threading.Event()

    def reader():
        with st.readable(old):
            entered.set()
            release.wait(10)
    th = threading.Thread(target=reader)
    th.start()
    assert entered.wait(10)
    new = publish_marked(st)
    with st.readable(new):
        pass
    st.drop_readable("fake", keep_build=new.build_id)
    assert set(st.cache.entries()) == {f"fake@{old.build_id}", f"fake@{new.build_id}"}  # leased
    release.set()
    th.join()
    assert st.cache.entries() == [f"fake@{new.build_id}"]
    st.remove("fake")
    assert st.cache.entries() == []
    st.close()
    assert list(ram.iterdir()) == []


def test_after_close_each_reader_decrypts_its_own_and_removes_it(tmp_path, ram):
    st = sealed_store(tmp_path, ram)
    t = publish_marked(st)
    st.close()
    with st.readable(t) as plain:
        assert (plain.image_dir / "core-1.img").read_bytes() == MARKER
    assert list(ram.iterdir()) == []


def test_stale_plaintext_of_dead_processes_is_removed(tmp_path, ram):
    dead = ram / f"{imagecrypt.CACHE_PREFIX}999999999.x1"
    alive = ram / f"{imagecrypt.CACHE_PREFIX}{os.getpid()}.x2"
    other = ram / "pool-unrelated.1.x"
    for d in (dead, alive, other):
        d.mkdir()
    assert imagecrypt.remove_stale(ram) == [dead]
    assert alive.exists() and other.exists()


# --- transfers between keys ---------------------------------------------------------------------
def fetch(dst: Store, src: Store, **kw):
    async def main():
        async with source(src) as (_, addr):
            return await transfer.fetch(dst, "fake", addr, **kw)
    return asyncio.run(main())


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_a_transfer_between_different_keys_reseals_with_the_receivers(tmp_path, ram, codec):
    a = sealed_store(tmp_path, ram, "a", "a.key")
    b = sealed_store(tmp_path, ram, "b", "b.key")
    t = publish_marked(a)
    res = fetch(b, a, codecs=(codec,))
    assert res.bytes_raw == t.image_bytes  # the plaintext travels (inside TLS on a real link)
    got = b.get("fake")
    assert got.manifest == t.manifest
    got.verify(full=True)
    for p in (tmp_path / "b").rglob("*"):
        assert not p.is_file() or MARKER not in p.read_bytes(), p
    with b.readable(got) as plain:
        assert (plain.image_dir / "core-1.img").read_bytes() == MARKER
    for s in (a, b):
        s.close()


def test_plain_and_encrypted_stores_exchange_templates(tmp_path, ram):
    plain, sealed = Store(tmp_path / "p"), sealed_store(tmp_path, ram, "s")
    m = publish_fake(plain)
    fetch(sealed, plain)
    sealed.get("fake").verify(full=True)
    back = Store(tmp_path / "p2")
    fetch(back, sealed)
    assert back.get("fake").manifest == m
    assert {p.name: p.read_bytes() for p in back.get("fake").image_dir.iterdir()} == \
        {p.name: p.read_bytes() for p in plain.get("fake").image_dir.iterdir()}
    sealed.close()


def test_an_interrupted_transfer_into_an_encrypted_store_resumes_at_a_whole_chunk(tmp_path, ram):
    a, b = Store(tmp_path / "a"), sealed_store(tmp_path, ram, "b")
    m = publish_fake(a, sizes=(3 << 20, 2 << 20, 1000))

    async def main():
        async with source(a) as (_, addr):
            proxy = CuttingProxy(addr, limit=int(m.image_bytes * 0.5))
            paddr = await proxy.start()
            try:
                with pytest.raises(TransferError):
                    await transfer.fetch(b, "fake", paddr, codecs=("none",))
            finally:
                await proxy.close()
            partial = next((tmp_path / "b" / ".partial").glob("fake@*"))
            parts = [p for p in (partial / "image").iterdir() if p.name.endswith(".part")]
            assert parts and all(imagecrypt.is_sealed(p) for p in parts if p.stat().st_size)
            return await transfer.fetch(b, "fake", addr, codecs=("none",))

    res = asyncio.run(main())
    assert res.bytes_raw < m.image_bytes  # what was kept was not sent again
    b.get("fake").verify(full=True)
    b.close()
