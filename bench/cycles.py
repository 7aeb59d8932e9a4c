"""Spawn -> kill cycles through a real service from several clients at once: the loop the soak and the
demand benchmarks share."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pool.errors import PoolError


@dataclass
class Cycles:
    latencies: list[float] = field(default_factory=list)  # seconds of each spawn call that succeeded
    errors: dict[str, int] = field(default_factory=dict)   # code -> count ("kill:CODE" for kills)
    paths: dict[str, int] = field(default_factory=dict)    # served_by -> count
    seconds: float = 0.0                                    # wall time of all the cycles


def spawn_kill_cycles(svc, name: str, cycles: int, concurrency: int, prefix: str = "cycles") -> Cycles:
    """cycles spawn -> kill cycles of template name over concurrency workers, each on its own client."""
    out = Cycles()
    left = [cycles]
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            out.errors[key] = out.errors.get(key, 0) + 1

    def worker() -> None:
        with svc.client() as c:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                t0 = time.perf_counter()
                try:
                    inst = c.spawn(name, timeout=60)
                except PoolError as e:
                    count(e.code)
                    continue
                took = time.perf_counter() - t0
                try:
                    inst.kill(grace=0)
                except PoolError as e:
                    count(f"kill:{e.code}")
                with lock:
                    out.latencies.append(took)
                    out.paths[inst.served_by] = out.paths.get(inst.served_by, 0) + 1

    threads = [threading.Thread(target=worker, name=f"{prefix}-{i}") for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds = time.perf_counter() - t0
    return out
