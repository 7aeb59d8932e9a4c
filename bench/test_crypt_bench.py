"""What encrypting images at rest costs a restore (`[service] encrypt_images`), for py-hello and
jvm-app, interleaved (bench/interleave.py), each sample a restore through pool.copies.restore to the
copy's first correct answer:

    plain           a plain store
    sealed-cached   an encrypted store, its build already decrypted in the node's RAM cache (what
                    a node does: one decryption per build, when it is first restored)
    sealed-decrypt  an encrypted store, the cache dropped first: the restore decrypts the build
                    (what decrypting per restore would cost every restore)

extra_info: the image's size, the RAM the decrypted cache holds for it, and the decryption alone.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import QUICK, rounds
from interleave import Mode, Sample, measure_interleaved
from pool.cli.demo import PROBES
from pool.copies.restore import Identity, Restorer, new_instance_id
from pool.cr import netns
from pool.templates import transfer
from pool.templates.imagecrypt import ImageKey
from pool.templates.store import Store

TEMPLATES = ("py-hello", "jvm-app")


@pytest.fixture(scope="module")
def sealed_store(bench_dir):
    st = Store(bench_dir / "store-sealed",
               key=ImageKey.load_or_create(bench_dir / "keys" / "image.key",
                                           bench_dir / "store-sealed"))
    yield st
    st.close()


def copy_into(dst: Store, src: Store, name: str) -> None:
    """The same build, sealed with dst's key (a transfer, as between two nodes)."""
    async def ship():
        source = transfer.TemplateSource(src)
        addr = await source.start("127.0.0.1", 0)
        try:
            await transfer.fetch(dst, name, addr)
        finally:
            await source.close()
    asyncio.run(ship())


def first_answer(restorer: Restorer, name: str) -> Sample:
    probe = PROBES[name]
    t0 = time.perf_counter()
    inst = restorer.spawn(name, Identity(new_instance_id()))
    try:
        status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:{inst.port}{probe.path}",
                                     method=probe.method, body=probe.body, timeout=60)
        assert status == 200, body[:200]
        took = time.perf_counter() - t0
    except BaseException:
        inst.kill(grace=0)
        inst.close()
        raise

    def cleanup() -> None:
        inst.kill(grace=0)
        inst.close()
    return Sample(took, cleanup)


def decrypt_seconds(st: Store, name: str, times: int) -> list[float]:
    """The decryption alone (every chunk authenticated, every sha256 checked) into the RAM cache."""
    out = []
    for _ in range(times):
        st.drop_readable(name)
        t0 = time.perf_counter()
        with st.readable(st.get(name)):
            out.append(round(time.perf_counter() - t0, 6))
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_encrypted_restore(benchmark, template, bench_store, sealed_store, criu, bench_dir, name):
    template(name)
    copy_into(sealed_store, bench_store, name)
    plain = Restorer(bench_store, criu, bench_dir / "run-plain")
    sealed = Restorer(sealed_store, criu, bench_dir / "run-sealed")
    for r in (plain, sealed):
        r.prepare(name)  # first-use checks are not part of a restore
    decrypts = decrypt_seconds(sealed_store, name, rounds(5))
    with sealed_store.readable(sealed_store.get(name)) as t:
        cache_bytes = sum(p.stat().st_size for p in t.image_dir.iterdir())
    modes = [Mode("plain", lambda: first_answer(plain, name)),
             Mode("sealed-cached", lambda: first_answer(sealed, name)),
             Mode("sealed-decrypt", lambda: first_answer(sealed, name),
                  prepare=lambda: sealed_store.drop_readable(name))]
    measure_interleaved(benchmark, name, modes, cycles=rounds(10), warmup=0 if QUICK else 1,
                        image_bytes=sealed_store.get(name).image_bytes,
                        sealed_bytes=sum(p.stat().st_size
                                         for p in sealed_store.get(name).stored_dir.iterdir()),
                        ram_cache_bytes=cache_bytes, decrypt_s=decrypts)
    sealed_store.drop_readable(name)
