"""The heavy templates (jvm-app, py-embed, node-app): each builds, restores and gives one correct
answer; and the heavy benchmark still runs end to end on reduced counts (BENCH_QUICK=1, ~2 minutes).

Their dependencies (Debian's Jackson and JDK, torch + sentence-transformers, typescript) are
installed by `make setup` (scripts/setup.sh, then scripts/setup-heavy.sh) before any test runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.templates.build import build
from pool.templates.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"

# (method, path, body) and what a correct answer holds
REQUESTS = {
    "jvm-app": ("GET", "/lookup?key=k0000042", None),
    "py-embed": ("POST", "/embed", b'{"text": "smoke test"}'),
    "node-app": ("POST", "/transpile", b'{"code": "let n: number = 4 * 2;", "check": true}'),
}


def correct(name: str, r: dict) -> bool:
    if name == "jvm-app":
        return r["key"] == "k0000042" and r["score"] == (42 * 2654435761) % 1000003
    if name == "py-embed":
        v = r["embedding"]
        return len(v) == 384 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3
    return "let n = 4 * 2;" in r["js"] and r["diagnostics"] == []


@pytest.mark.parametrize("name", ["jvm-app", "py-embed", "node-app"])
def test_heavy_template_build_restore_answer(store, criu, tmp_path, name):
    template = build(load_spec(TEMPLATES / name), store, criu).template
    inst = Restorer(store, criu, tmp_path / "run").spawn(name, Identity(f"smoke-{name}"))
    try:
        method, path, body = REQUESTS[name]
        status, answer = netns.http_in(inst.netns_fd, f"http://127.0.0.1:{inst.port}{path}",
                                       method=method, body=body, timeout=30)
        assert status == 200, answer[:500]
        assert correct(name, json.loads(answer)), answer[:500]
    finally:
        inst.kill(grace=0)
        inst.close()
    assert template.manifest.boot_to_ready_s >= 1.0, "a heavy template should take >= 1 s to boot"


def test_heavy_bench_runs(tmp_path):
    from test_bench_runs import report, run_quick

    out = tmp_path / "heavy.json"
    names = set(run_quick("test_heavy_bench.py", out, timeout=900))
    for t in ("jvm-app", "py-embed", "node-app"):
        for test in ("first_answer", "image", "page_cache"):
            assert f"test_{test}[{t}]" in names
    report(out)
    md = (tmp_path / "heavy.md").read_text()
    assert "spawn, warm pool" in md and "x vs cold" in md
    assert (tmp_path / "heavy-latency.png").stat().st_size > 0
