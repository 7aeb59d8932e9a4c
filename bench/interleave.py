"""Measure several ways to the same end point in one run, round-robin.

A cycle runs every mode once; the order rotates by one mode each cycle, so neither a mode's place in
the cycle nor a slow drift of the shared machine (other work, page cache, a concurrent refill) lands
on one mode more than another. Every sample is cleaned up (copy killed) right after it answered, and
each mode's `prepare` (untimed, e.g. "wait until the pool holds one idle warm copy") runs before its
start, so a sample measures its own path and nothing left over from the previous one.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ANSWER = "answer_s"  # the end point every mode is measured to: its first correct answer


@dataclass
class Sample:
    answer_s: float                       # from the path's first action to the first correct answer
    cleanup: Callable[[], None]
    extra: dict[str, float] = field(default_factory=dict)  # e.g. spawn_call_s, service_spawn_ms


def _nothing() -> None:
    return None


@dataclass
class Mode:
    name: str
    start: Callable[[], Sample]
    prepare: Callable[[], None] = _nothing


def spread(xs: list[float]) -> dict[str, float | int]:
    """Median with the quartiles and the extremes (quartiles: inclusive method, so n = 2 works)."""
    s = sorted(xs)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"n": len(s), "median": q[1], "p25": q[0], "p75": q[2], "min": s[0], "max": s[-1]}


def nearest_rank(xs: list[float], pct: float) -> float:
    """p99 of 200 samples is the second slowest: nearest rank, no interpolation."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, -(-len(s) * pct // 100) - 1))]


class Interleaved:
    """run_cycle() is what pytest-benchmark times (one cycle of all modes); the per-mode samples,
    after `warmup` discarded cycles, are in info()."""

    def __init__(self, modes: list[Mode], warmup: int) -> None:
        self.modes, self.warmup, self.cycles = modes, warmup, 0
        self.samples: dict[str, dict[str, list[float]]] = {m.name: {ANSWER: []} for m in modes}

    def run_cycle(self) -> None:
        k = self.cycles % len(self.modes)
        keep = self.cycles >= self.warmup
        for mode in self.modes[k:] + self.modes[:k]:
            mode.prepare()
            sample = mode.start()
            sample.cleanup()
            if keep:
                got = self.samples[mode.name]
                got[ANSWER].append(round(sample.answer_s, 6))
                for key, value in sample.extra.items():
                    got.setdefault(key, []).append(round(value, 6))
        self.cycles += 1

    def info(self) -> dict:
        return {"modes": self.samples, "warmup_cycles": self.warmup,
                "order": "round-robin, rotated by one mode per cycle"}


def measure_interleaved(benchmark, template: str, modes: list[Mode], cycles: int, warmup: int,
                        kind: str = "first-answer", **info) -> dict[str, dict[str, list[float]]]:
    """Run `cycles` kept cycles (+ `warmup`) under pytest-benchmark; record the samples in extra_info
    as `kind` (bench/report.py reads them: "first-answer" is the section of the ways to a first
    answer, another kind keeps a run of the same template out of it)."""
    run = Interleaved(modes, warmup)
    t0 = time.perf_counter()
    benchmark.pedantic(run.run_cycle, rounds=cycles, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update(kind=kind, template=template, cycles=cycles,
                                run_s=round(time.perf_counter() - t0, 1), **run.info(), **info)
    return run.samples
