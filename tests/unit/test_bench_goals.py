"""bench/report.py's goals table: each goal judged from the figure its benchmark recorded, and a goal
whose benchmark did not run is said to be missing, never judged."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import report  # noqa: E402 - bench/ is not a package


def bench(name: str, **extra) -> dict:
    return {"name": name, "extra_info": extra}


def test_each_goal_is_judged_from_its_figure():
    md = report.goals_markdown({"benchmarks": [
        bench("test_warm_round_trip", kind="demand-round-trip", spawn_call_s=[0.0004, 0.0003, 0.002]),
        bench("test_fork_miss", spawn_call_p50_ms={"fork-miss": 12.5, "criu-miss": 130.0}),
        bench("test_burst[fork]", kind="demand-burst", config="fork", spawns=400, copies_per_s=160.0,
              p99_ms=75.0),
        bench("test_lazy_vs_full_miss[jvm-app]", lazy_over_full=0.55),
    ]})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["warm spawn, client round trip p50"].endswith("| 0.40 ms | met |")
    assert lines["py-hello miss (fork), client round trip p50"].endswith("| 12.5 ms | **not met** |")
    assert lines["py-hello copies per second, concurrency 8 (fork mode)"].endswith("| 160/s | met |")
    assert "| 75 ms | **not met** |" in md
    assert lines["jvm-app miss to first answer, lazy / full restore"].endswith("| 0.55x | met |")
    assert lines["node-app miss to first answer, lazy / full restore"].endswith("| not in this run |  |")


def test_no_goal_benchmark_in_the_run_gives_no_section():
    assert report.goals_markdown({"benchmarks": [bench("test_other", kind="soak")]}) == ""
