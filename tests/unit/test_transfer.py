"""Template transfer between two stores over loopback TCP: fake images (no CRIU), every codec,
verification against the sender's manifest, interrupted transfers that resume, refusals."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import zlib

import pytest
import zstandard

from pool.errors import AuthError, Incompatible, TemplateCorrupt, TemplateNotFound, TransferError
from pool.templates import transfer
from pool.templates.compat import NodeFacts
from pool.templates.manifest import Manifest
from pool.templates.store import MANIFEST, Store, new_build_id
from pool.wire import protocol

FACTS = NodeFacts(arch="x86_64", kernel="6.18.44", criu_version="4.2.1")


def publish_fake(store: Store, name: str = "fake", sizes=(3 << 20, 200_000, 0, 5000)) -> Manifest:
    """A published template whose image files are half compressible, half random."""
    rng = random.Random(name)
    with store.staging(name) as staged:
        image = staged / "image"
        image.mkdir()
        for i, size in enumerate(sizes):
            data = bytes(rng.getrandbits(8) for _ in range(min(size, 4096)))
            body = (data + bytes(size))[:size // 2] + os.urandom(size - size // 2)
            (image / f"pages-{i}.img").write_bytes(body)
        (image / "inventory.img").write_bytes(b"inventory")
        t = store.publish(name, staged, {"build_id": new_build_id(), "arch": "x86_64",
                                         "kernel": "6.18.0", "criu_version": "4.2.1",
                                         "pipes": {}, "spec": {"name": name}})
    return t.manifest


@contextlib.asynccontextmanager
async def source(store: Store, **kw):
    src = transfer.TemplateSource(store, **kw)
    addr = await src.start("127.0.0.1", 0)
    try:
        yield src, addr
    finally:
        await src.close()


def files_of(store: Store, name: str) -> dict[str, bytes]:
    t = store.get(name)
    return {p.name: p.read_bytes() for p in t.image_dir.iterdir()}


@pytest.mark.parametrize("codec", ["zstd", "zlib", "none"])
def test_round_trip_keeps_build_and_manifest(tmp_path, codec):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    manifest = publish_fake(a)

    async def main():
        async with source(a) as (src, addr):
            return await transfer.fetch(b, "fake", addr, facts=FACTS, codecs=(codec,))

    res = asyncio.run(main())
    assert res.codec == codec and not res.already_current
    got = b.get("fake")
    assert got.manifest == manifest  # the sender's build id and manifest, unchanged
    got.verify(full=True)
    assert files_of(a, "fake") == files_of(b, "fake")
    assert res.files_sent == len(manifest.files) and res.files_reused == 0
    assert res.bytes_raw == manifest.image_bytes
    if codec == "none":
        assert res.bytes_wire == manifest.image_bytes
    else:
        assert res.bytes_wire < 0.8 * manifest.image_bytes  # half of every file is zeros
    assert oct(os.stat(got.image_dir / "inventory.img").st_mode & 0o777) == "0o600"
    assert not list((tmp_path / "b" / ".partial").glob("fake@*"))  # partial dir became the build


def test_second_fetch_moves_nothing(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)

    async def main():
        async with source(a) as (src, addr):
            first = await transfer.fetch(b, "fake", addr)
            second = await transfer.fetch(b, "fake", addr)
            return first, second, src.transfers

    first, second, transfers = asyncio.run(main())
    assert second.already_current and second.bytes_wire == 0 and transfers == 1
    assert second.template.build_id == first.template.build_id


class CuttingProxy:
    """Forwards one connection to the source, but cuts it after `limit` bytes from the source."""

    def __init__(self, target, limit: int) -> None:
        self.target, self.limit = target, limit
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _handle(self, cr, cw):
        sr, sw = await asyncio.open_connection(*self.target)

        async def pump(r, w, limit=None):
            moved = 0
            try:
                while data := await r.read(65536):
                    if limit is not None and moved + len(data) > limit:
                        w.write(data[:limit - moved])
                        break
                    moved += len(data)
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                for x in (cw, sw):
                    x.close()

        await asyncio.gather(pump(cr, sw), pump(sr, cw, self.limit))

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


def test_interrupted_transfer_is_unusable_then_resumes(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    manifest = publish_fake(a, sizes=(2 << 20, 3 << 20, 1000))
    total = manifest.image_bytes

    async def main():
        async with source(a) as (src, addr):
            proxy = CuttingProxy(addr, limit=int(total * 0.75))
            paddr = await proxy.start()
            try:
                with pytest.raises(TransferError):
                    await transfer.fetch(b, "fake", paddr, codecs=("none",))
            finally:
                await proxy.close()
            assert b.names() == []  # nothing published, nothing restorable
            partial = next((tmp_path / "b" / ".partial").glob("fake@*"))
            kept = {p.name: p.stat().st_size for p in (partial / "image").iterdir()}
            assert any(n.endswith(".part") and size > 0 for n, size in kept.items()), kept
            res = await transfer.fetch(b, "fake", addr, codecs=("none",))
            return res, sum(kept.values())

    res, kept_bytes = asyncio.run(main())
    assert res.files_reused >= 1                     # verified files were not sent again
    assert res.bytes_raw == total - kept_bytes       # nor the part of the file in flight
    b.get("fake").verify(full=True)
    assert files_of(a, "fake") == files_of(b, "fake")


def test_resume_after_damage_in_the_partial_dir(tmp_path):
    """A kept file that no longer matches its sha256 is dropped and sent again."""
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    manifest = publish_fake(a, sizes=(1 << 20, 1 << 20))
    partial = b.partial_dir("fake", manifest.build_id)
    (partial / "image" / "pages-0.img").write_bytes(b"not the right bytes")
    (partial / "image" / "stray.img").write_bytes(b"x")

    async def main():
        async with source(a) as (_, addr):
            return await transfer.fetch(b, "fake", addr)

    res = asyncio.run(main())
    assert res.files_reused == 0 and res.files_sent == len(manifest.files)
    assert files_of(a, "fake") == files_of(b, "fake")


def test_altered_image_on_the_sender_is_refused(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)
    victim = a.get("fake").image_dir / "pages-1.img"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the sha256 tells
    victim.write_bytes(bytes(data))

    async def main():
        async with source(a) as (_, addr):
            await transfer.fetch(b, "fake", addr)

    with pytest.raises(TemplateCorrupt, match="pages-1.img"):
        asyncio.run(main())
    assert b.names() == []
    partial = next((tmp_path / "b" / ".partial").glob("fake@*"))
    assert "pages-1.img" not in os.listdir(partial / "image")
    assert "pages-1.img.part" not in os.listdir(partial / "image")


def test_incompatible_receiver_refused_before_any_data(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)
    old_criu = NodeFacts(arch="x86_64", kernel="6.18.44", criu_version="4.1.1")

    async def main():
        async with source(a) as (src, addr):
            with pytest.raises(Incompatible, match="CRIU 4.2.1"):
                await transfer.fetch(b, "fake", addr, facts=old_criu)
            # this side's own veto: the sender offers, the receiver cancels
            with pytest.raises(Incompatible, match="not today"):
                await transfer.fetch(b, "fake", addr, check=lambda m: "not today")
            return src.transfers, src.bytes_sent

    assert asyncio.run(main()) == (0, 0)
    assert b.names() == []


def test_refusals_are_typed(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)

    async def main():
        async with source(a, tokens={"s3cret"}) as (_, addr):
            with pytest.raises(AuthError):
                await transfer.fetch(b, "fake", addr, token="wrong")
            with pytest.raises(TemplateNotFound):
                await transfer.fetch(b, "nope", addr, token="s3cret")
            with pytest.raises(TemplateNotFound):
                await transfer.fetch(b, "fake", addr, token="s3cret", build_id="20000101T000000-0")
            res = await transfer.fetch(b, "fake", addr, token="s3cret")
            assert res.template is not None
        with pytest.raises(TransferError, match="cannot reach"):
            await transfer.fetch(b, "fake", addr, timeout=5)

    asyncio.run(main())


def test_a_big_frame_before_the_hello_is_refused_unread(tmp_path):
    """An unauthenticated peer may not make the source buffer megabytes: the hello frame is small."""
    a = Store(tmp_path / "a")

    async def main():
        async with source(a, tokens={"s3cret"}) as (_, (host, port)):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(protocol.HEADER.pack(protocol.MAX_FRAME) + b"x" * 100)  # the rest never comes
            try:
                frames = protocol.FrameDecoder().feed(await asyncio.wait_for(reader.read(), 5))
            finally:
                writer.close()
            assert frames[0]["op"] == "error" and frames[0]["error"]["code"] == "protocol_error"
            assert frames[0]["error"]["data"]["limit"] == protocol.HELLO_MAX_FRAME

    asyncio.run(main())


def test_concurrent_fetches_of_one_template(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)

    async def main():
        async with source(a) as (_, addr):
            return await asyncio.gather(*(transfer.fetch(b, "fake", addr) for _ in range(3)))

    results = asyncio.run(main())
    assert len({r.template.build_id for r in results}) == 1
    b.get("fake").verify(full=True)


def test_new_build_replaces_old_partial(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish_fake(a)
    b.partial_dir("fake", "20000101T000000-aaaaaa")
    b.partial_dir("fake.v2", "20000101T000000-bbbbbb")  # another template's: untouched

    async def main():
        async with source(a) as (_, addr):
            await transfer.fetch(b, "fake", addr)

    asyncio.run(main())
    left = sorted(p.name for p in (tmp_path / "b" / ".partial").iterdir() if p.is_dir())
    assert left == ["fake.v2@20000101T000000-bbbbbb"]


def test_decoder_refuses_more_bytes_than_the_manifest_says(tmp_path):
    """A small compressed chunk must not expand past the file's size (a decompression bomb)."""
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    for codec, data in (("zstd", bomb), ("zlib", zlib.compress(bytes(64 << 20))),
                        ("none", bytes(2 << 20))):
        sink = transfer._Sink(tmp_path / f"x-{codec}.part", __import__("hashlib").sha256(),
                              1 << 20, "fake")
        try:
            with pytest.raises(TemplateCorrupt, match="longer than its manifest size"):
                transfer._Decoder(codec, sink).feed(data)
        finally:
            sink.close()
        assert (tmp_path / f"x-{codec}.part").stat().st_size <= 1 << 20


@pytest.mark.parametrize("change,problem", [
    (lambda m: m["files"].update({"../evil": {"size": 0, "sha256": "0" * 64}}), "bad image file"),
    (lambda m: m.update(build_id="../../etc"), "bad build id"),
    (lambda m: m["files"]["inventory.img"].update(size=-1), "bad size"),
    (lambda m: m["files"]["inventory.img"].update(sha256="xyz"), "bad size or sha256"),
    (lambda m: m.update(image_bytes=1), "image_bytes"),
    (lambda m: m.update(name="other"), "name"),
])
def test_manifest_from_a_peer_is_validated(tmp_path, change, problem):
    a = Store(tmp_path / "a")
    m = json.loads(json.dumps(publish_fake(a, sizes=(10,)).to_dict()))
    assert Manifest.from_dict(m, "fake").to_dict() == m
    change(m)
    with pytest.raises(TemplateCorrupt, match=problem):
        Manifest.from_dict(m, "fake")


def test_publish_received_checks_every_file(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    m = publish_fake(a, sizes=(1000,))
    staged = b.partial_dir("fake", m.build_id)
    for p in a.get("fake").image_dir.iterdir():
        (staged / "image" / p.name).write_bytes(p.read_bytes())
    (staged / "image" / "pages-0.img").write_bytes(b"\0" * 1000)
    with pytest.raises(TemplateCorrupt, match="sha256"):
        b.publish_received("fake", staged, m)
    assert b.names() == []
    (staged / "image" / "pages-0.img").write_bytes((a.get("fake").image_dir / "pages-0.img").read_bytes())
    t = b.publish_received("fake", staged, m)
    assert t.manifest == m and json.loads((t.build_dir / MANIFEST).read_text()) == m.to_dict()
