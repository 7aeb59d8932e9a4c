"""A miss that does not wait for all memory: jvm-app and node-app, miss to first correct answer,
full CRIU restore vs lazy restore with the build's working set fetched first, interleaved in one
run (bench/interleave.py), medians with spread.

    full   Restorer.spawn of the template as built (`[restore] method = "criu"`), then the
           template's probe request (pool.cli.demo.PROBES) inside the copy's network namespace
    lazy   the same app built with `[restore] method = "lazy"` (a bench-time override of the
           spec, named BASE-lazy): lazy-pages daemon, lazy restore, working set fetched, then the
           same request while the rest of the memory streams in

The goal (issue 11) is lazy <= 0.6x of full; docs/restore-profile.md explains the figures.
BENCH_QUICK=1 cuts the cycles. No timed asserts; wrong answers fail.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
from conftest import QUICK, ROOT
from firstanswer import first_answer, in_ns
from interleave import ANSWER, Mode, Sample, measure_interleaved

from pool.cli.demo import PROBES
from pool.copies.restore import Identity, Restorer, new_instance_id
from pool.templates.build import build
from pool.templates.spec import load_spec

TEMPLATES = ("jvm-app", "node-app")
CYCLES, WARMUP = (2, 0) if QUICK else (15, 1)


@pytest.fixture(scope="module")
def lazy_template(lazy_pages_ok, bench_store, criu):
    """lazy_template(base): base built with [restore] method = "lazy", once."""
    cache = {}

    def get(base: str):
        if base not in cache:
            spec = load_spec(ROOT / "templates" / base)
            spec = dataclasses.replace(spec, name=f"{base}-lazy",
                                       restore=dataclasses.replace(spec.restore, method="lazy"))
            cache[base] = build(spec, bench_store, criu).template
        return cache[base]
    return get


def miss_to_answer(restorer: Restorer, name: str, base: str, steps: dict) -> Sample:
    t0 = time.perf_counter()
    inst = restorer.spawn(name, Identity(new_instance_id()))

    def kill() -> None:
        inst.kill(grace=0)
        inst.close()

    try:
        took = first_answer(in_ns(inst.netns_fd, inst.port), PROBES[base], t0,
                            alive=lambda: inst.poll() is None, why=inst.output_tail)
    except BaseException:
        kill()
        raise
    return Sample(took, kill, {f"step_{k}_ms": v * 1000 for k, v in steps.items()})


@pytest.mark.parametrize("base", TEMPLATES)
def test_lazy_vs_full_miss(benchmark, base, template, lazy_template, bench_store, criu, bench_dir):
    full, lazy = template(base), lazy_template(base)
    steps: dict[str, float] = {}
    restorer = Restorer(bench_store, criu, bench_dir / f"lazy-run-{base}",
                        on_step=lambda name, s: steps.__setitem__(name, s))
    modes = [Mode("full", lambda: miss_to_answer(restorer, full.name, base, steps)),
             Mode("lazy", lambda: miss_to_answer(restorer, lazy.name, base, steps))]
    samples = measure_interleaved(benchmark, base, modes, CYCLES, WARMUP, lazy_bench=True,
                                  working_set_pages=lazy.manifest.extra.get("working_set_pages"),
                                  image_mb=round(full.image_bytes / 2**20, 1))
    ratio = statistics.median(samples["lazy"][ANSWER]) / statistics.median(
        samples["full"][ANSWER])
    benchmark.extra_info["lazy_over_full"] = round(ratio, 3)
