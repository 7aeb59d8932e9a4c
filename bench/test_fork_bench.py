"""Fork mode (`[restore] method = "fork"`, pool/copies/zygote.py) against a CRIU restore, through a
real `pool serve` with every pool fixed at none warm (min_warm 0, max_warm 0: every spawn a miss):

    test_fork_miss        templates/py-fork forked from its zygote (path "fork") and the same app
                          restored by CRIU (py-fork-criu: its copy with method "criu"), interleaved:
                          time to the first correct answer, the spawn call at the client (its round
                          trip) and the service's spawn_ms
    test_fork_memory      live forked copies of py-fork: each one's PSS, RSS and USS, the zygote's,
                          the template's RSS at build; PSS and USS per copy / template RSS, and the
                          live copies that would fit in 20 GiB (each more copy costs its USS)
    test_embed_fork       templates/py-embed-fork (torch + the model in the zygote): a forked miss to
                          its first embedding, and the same memory figures

    BENCH_QUICK=1 pytest bench/test_fork_bench.py   # a couple of samples: just check that it runs

The zygote is restored on the first fork of each template, before the kept samples. No timed
asserts: the figures are for the report; a wrong answer fails.
"""
from __future__ import annotations

import shutil
import statistics
import time

import psutil
import pytest

from conftest import QUICK
from firstanswer import first_answer, on_host
from interleave import Mode, Sample, measure_interleaved
from pool.cli.demo import PROBES, LocalService, Probe
from pool.templates.build import build
from pool.templates.spec import load_spec

FORK, CRIU, EMBED = "py-fork", "py-fork-criu", "py-embed-fork"
CYCLES, WARMUP = (2, 1) if QUICK else (40, 2)
LIVE_COPIES = 3 if QUICK else 16
EMBED_SAMPLES = 2 if QUICK else 10
BUDGET = 20 << 30  # the memory budget: live copies that fit in 20 GiB
HELLO = Probe("GET", "/", None, lambda r: bool(r.get("instance")))
PROBE = {FORK: HELLO, CRIU: HELLO, EMBED: PROBES["py-embed"]}


@pytest.fixture(scope="module")
def templates(template, bench_store, criu, bench_dir):
    """py-fork, its twin restored by CRIU, py-embed-fork: built once; name -> Template."""
    variant = bench_dir / CRIU
    shutil.copytree(template(FORK).manifest.spec["dir"], variant, dirs_exist_ok=True)
    toml = variant / "template.toml"
    toml.write_text(toml.read_text().replace('method = "fork"', 'method = "criu"'))
    return {FORK: template(FORK), EMBED: template(EMBED),
            CRIU: build(load_spec(variant), bench_store, criu).template}


@pytest.fixture(scope="module")
def service(templates, bench_store, bench_dir):
    workdir = bench_dir / "fork-svc"
    workdir.mkdir(exist_ok=True)
    config = "".join(f"[templates.{n}]\nmin_warm = 0\nmax_warm = 0\nmax_live = {LIVE_COPIES + 4}\n"
                     for n in templates)
    with LocalService(bench_store.root, workdir, config) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with service.client() as c:
        yield c


def miss_to_answer(client, name: str, want_path: str) -> Sample:
    """A spawn (a miss) to the first correct answer through the published port."""
    t0 = time.perf_counter()
    inst = client.spawn(name, timeout=120)
    spawn_call_s = time.perf_counter() - t0
    try:
        assert inst.path == want_path, f"expected a {want_path} spawn, got {inst.path}"
        took = first_answer(on_host(inst.address), PROBE[name], t0)
    except BaseException:
        inst.kill(grace=0)
        raise
    return Sample(took, lambda: inst.kill(grace=0),
                  {"spawn_call_s": spawn_call_s, "service_spawn_ms": inst.spawn_ms})


def test_fork_miss(benchmark, service, client):
    miss_to_answer(client, FORK, "fork").cleanup()  # the zygote is restored here, not in a sample
    modes = [Mode("fork-miss", lambda: miss_to_answer(client, FORK, "fork")),
             Mode("criu-miss", lambda: miss_to_answer(client, CRIU, "restore"))]
    samples = measure_interleaved(benchmark, FORK, modes, CYCLES, WARMUP,
                                  compared_with=CRIU)
    benchmark.extra_info["spawn_call_p50_ms"] = {
        m: round(statistics.median(s["spawn_call_s"]) * 1000, 3) for m, s in samples.items()}


def memory_figures(client, templates, name: str, insts: list) -> dict:
    """PSS, RSS and USS of each live forked copy, the zygote's, and what they say per copy. PSS
    splits shared pages among their sharers, so it falls as copies are added; what one more copy
    costs is its USS (its private pages): the copies that fit in 20 GiB are (20 GiB - the zygote's
    RSS) / USS."""
    stats = [client.info(i.id)["stats"] for i in insts]
    pss = [s["pss_bytes"] for s in stats]
    uss = [psutil.Process(i.pid).memory_full_info().uss for i in insts]
    zygote = client.stats()["templates"][name]["zygote"]
    template_rss = templates[name].manifest.rss_bytes
    assert all(0 < s["pss_bytes"] < s["rss_bytes"] for s in stats), stats  # pages are shared
    return {"kind": "fork-memory", "template": name, "copies": len(insts),
            "pss_bytes": pss, "rss_bytes": [s["rss_bytes"] for s in stats], "uss_bytes": uss,
            "zygote_rss_bytes": zygote["rss_bytes"], "zygote_pss_bytes": zygote["pss_bytes"],
            "template_rss_bytes": template_rss,
            "pss_per_copy_over_template_rss": round(statistics.mean(pss) / template_rss, 4),
            "uss_per_copy_over_template_rss": round(statistics.mean(uss) / template_rss, 4),
            "copies_in_20_gib": int((BUDGET - zygote["rss_bytes"]) // statistics.mean(uss))}


def test_fork_memory(benchmark, service, client, templates):
    insts: list = []

    def spawn_all() -> None:
        for _ in range(LIVE_COPIES):
            inst = client.spawn(FORK, timeout=120)
            insts.append(inst)
            first_answer(on_host(inst.address), HELLO, time.perf_counter())

    try:
        benchmark.pedantic(spawn_all, rounds=1, iterations=1)
        benchmark.extra_info.update(memory_figures(client, templates, FORK, insts))
    finally:
        for inst in insts:
            inst.kill(grace=0)


def test_embed_fork(benchmark, service, client, templates):
    miss_to_answer(client, EMBED, "fork").cleanup()  # the zygote is restored here
    answers: list[Sample] = []

    def one() -> None:
        answers.append(miss_to_answer(client, EMBED, "fork"))

    live: list = []
    try:
        benchmark.pedantic(one, rounds=EMBED_SAMPLES, iterations=1)
        answer_s = [s.answer_s for s in answers]
        live = [client.spawn(EMBED, timeout=120) for _ in range(2 if QUICK else 4)]
        for inst in live:
            first_answer(on_host(inst.address), PROBE[EMBED], time.perf_counter())
        figures = memory_figures(client, templates, EMBED, live)
        benchmark.extra_info.update(figures, kind="fork-embed",
                                    answer_s=[round(x, 6) for x in answer_s],
                                    answer_p50_ms=round(statistics.median(answer_s) * 1000, 2))
    finally:
        for s in answers:
            s.cleanup()
        for inst in live:
            inst.kill(grace=0)
