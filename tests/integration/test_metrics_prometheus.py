"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the service's /metrics; we query it back."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from pool.cli.demo import LocalService

pytestmark = pytest.mark.integration
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_spawn_metrics(session_store, built, tmp_path):
    built("py-hello")
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: pool\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    with LocalService(session_store.root, tmp_path, "[templates.py-hello]\nmin_warm = 2\n",
                      extra=("--metrics", f"127.0.0.1:{metrics_port}")) as svc:
        with svc.client() as c:
            assert c.stats()["metrics"] == f"127.0.0.1:{metrics_port}"
            svc.wait_warm("py-hello", 2)
            for _ in range(3):
                c.spawn("py-hello").kill(grace=0)
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            result = []
            while time.monotonic() < deadline:
                try:
                    result = query(prom_port, 'sum(pool_spawn_latency_seconds_count{template="py-hello"})')
                except OSError:
                    result = []  # Prometheus still starting
                if result and float(result[0]["value"][1]) >= 3:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("no pool_spawn_latency_seconds_count in Prometheus within 30 s:\n"
                            + (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:])
            assert float(result[0]["value"][1]) == 3
            warm = query(prom_port, 'pool_warm_copies{template="py-hello"}')
            assert warm and float(warm[0]["value"][1]) >= 0
            image = query(prom_port, 'pool_template_image_bytes{template="py-hello"}')
            assert float(image[0]["value"][1]) > 1e6
            restores = query(prom_port, 'pool_restore_duration_seconds_count{template="py-hello"}')
            assert float(restores[0]["value"][1]) >= 5   # 2 warm + 3 refills
        finally:
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
    # the service stopped its metrics server with it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
