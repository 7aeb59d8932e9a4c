"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the service's /metrics; we query it back.
Also: every panel of examples/grafana-dashboard.json answers (no query error, no empty panel) and
examples/alerts.yml passes promtool and loads into that Prometheus."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from tlscerts import Cluster

from pool.cli.demo import LocalService
from pool.errors import PoolError

pytestmark = pytest.mark.integration
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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
    metrics_port = free_port()
    with LocalService(session_store.root, tmp_path, "[templates.py-hello]\nmin_warm = 2\n",
                      extra=("--metrics", f"127.0.0.1:{metrics_port}")) as svc:
        with svc.client() as c:
            assert c.stats()["metrics"] == f"127.0.0.1:{metrics_port}"
            svc.wait_warm("py-hello", 2)
            for _ in range(3):
                c.spawn("py-hello").kill(grace=0)
        with prometheus(tmp_path, metrics_port) as prom_port:
            deadline = time.monotonic() + 30
            expr = 'sum(pool_spawn_latency_seconds_count{template="py-hello"})'
            while not (result := answers(prom_port, expr)) or float(result[0]["value"][1]) < 3:
                if time.monotonic() > deadline:
                    pytest.fail("no pool_spawn_latency_seconds_count in Prometheus within 30 s:\n"
                                + (tmp_path / "prom.log").read_text(errors="replace")[-2000:])
                time.sleep(0.5)
            assert float(result[0]["value"][1]) == 3
            warm = query(prom_port, 'pool_warm_copies{template="py-hello"}')
            assert warm and float(warm[0]["value"][1]) >= 0
            image = query(prom_port, 'pool_template_image_bytes{template="py-hello"}')
            assert float(image[0]["value"][1]) > 1e6
            restores = query(prom_port, 'pool_restore_duration_seconds_count{template="py-hello"}')
            assert float(restores[0]["value"][1]) >= 5   # 2 warm + 3 refills
    # the service stopped its metrics server with it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()


@contextmanager
def prometheus(tmp_path: Path, metrics_port: int, rules: Path | None = None):
    """A real Prometheus scraping 127.0.0.1:metrics_port every second; yields its HTTP port."""
    port = free_port()
    config = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
              + (f"rule_files: ['{rules}']\n" if rules else "")
              + "scrape_configs:\n  - job_name: pool\n    static_configs:\n"
              f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    (tmp_path / "prom.yml").write_text(config)
    with open(tmp_path / "prom.log", "wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'prom-tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(port: int, expr: str) -> list:
    """The query's non-NaN samples ([] while Prometheus starts or has nothing)."""
    try:
        return [r for r in query(port, expr) if r["value"][1] not in ("NaN", "+Inf", "-Inf")]
    except OSError:
        return []


def test_alert_rules_pass_promtool():
    res = subprocess.run([PROMTOOL, "check", "rules", str(EXAMPLES / "alerts.yml")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout


def test_every_dashboard_panel_answers_from_a_real_prometheus(session_store, built, criu, tmp_path):
    """Spawns, kills, a template whose image breaks (restore failures, quarantine, refused spawns)
    while Prometheus scrapes; then every panel's query must succeed and return a sample."""
    from pool.templates.build import build
    from pool.templates.spec import load_spec

    built("py-hello")
    # a second template whose image we break after the build: its restores fail (template_corrupt)
    # until it is quarantined, and spawns of it then fail (quarantined)
    folder = tmp_path / "breaks"
    folder.mkdir()
    (folder / "app.py").write_text("import time\nimport pool.runtime\npool.runtime.checkpoint()\n"
                                   "time.sleep(3600)\n")
    (folder / "template.toml").write_text('command = ["python3", "app.py"]\n[ready]\nsdk = true\n')
    broken = build(load_spec(folder), session_store, criu).template
    pages = max(broken.image_dir.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.write(b"\xff" * 64)
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "node", "template"]
    exprs = {f"{p['title']} [{t['refId']}]": t["expr"].replace("$template", ".*").replace("$node", ".*")
             for p in dashboard["panels"] for t in p.get("targets", [])}
    metrics_port = free_port()
    config = "[templates.py-hello]\nmin_warm = 2\n[templates.breaks]\nmin_warm = 1\n"
    with prometheus(tmp_path, metrics_port, rules=EXAMPLES / "alerts.yml") as prom_port, \
            LocalService(session_store.root, tmp_path, config,
                         extra=("--metrics", f"127.0.0.1:{metrics_port}")) as svc, svc.client() as c:
        svc.wait_warm("py-hello", 2)
        deadline = time.monotonic() + 60
        empty = dict(exprs)
        while empty and time.monotonic() < deadline:
            for _ in range(3):                       # traffic between scrapes, so rates are > 0
                c.spawn("py-hello").kill(grace=0)
            try:
                c.spawn("breaks", timeout=5).kill(grace=0)
            except PoolError:
                pass                                 # expected: its restores fail, then quarantine
            time.sleep(1)
            empty = {name: e for name, e in empty.items() if not answers(prom_port, e)}
        assert not empty, f"dashboard panels with no data: {sorted(empty)}\n" + \
            (tmp_path / "prom.log").read_text(errors="replace")[-1500:]
        assert c.stats()["templates"]["breaks"]["quarantined"]
        rules = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5))
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "PoolTemplateQuarantined" in names and len(names) == 6


def test_an_agent_serves_its_own_metrics_to_prometheus(tmp_path):
    """`pool agent --metrics`: the node's capacity, free slots and build info, scraped for real."""
    token = tmp_path / "token"
    token.write_text("agent-metrics-test-token")
    token.chmod(0o600)
    metrics_port, agent_port = free_port(), free_port()
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "pool.cli", "agent", "--listen", f"127.0.0.1:{agent_port}",
             "--token-file", str(token), "--store", str(tmp_path / "store"),
             "--run-dir", str(tmp_path / "run"), "--name", "edge-1",
             "--tls-dir", str(Cluster(tmp_path / "certs").dir("edge-1")),
             "--metrics", f"127.0.0.1:{metrics_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with prometheus(tmp_path, metrics_port) as prom_port:
            deadline = time.monotonic() + 30
            while not answers(prom_port, 'pool_node_capacity{node="edge-1"}'):
                assert agent.poll() is None, (tmp_path / "agent.log").read_text()
                assert time.monotonic() < deadline, "no pool_node_capacity from the agent in 30 s"
                time.sleep(0.5)
            assert float(answers(prom_port, 'pool_node_capacity{node="edge-1"}')[0]["value"][1]) == 64
            assert float(answers(prom_port, 'pool_node_free{node="edge-1"}')[0]["value"][1]) == 64
            assert answers(prom_port, "pool_build_info")[0]["metric"]["version"]
            # every series of the agent carries its node: the dashboard's node dimension
            assert answers(prom_port, 'pool_build_info{node="edge-1"}')
            assert not answers(prom_port, '{__name__=~"pool_.*", node=""}')
    finally:
        agent.terminate()
        assert agent.wait(30) == 0, (tmp_path / "agent.log").read_text()
    with pytest.raises(OSError):      # the agent stopped its metrics server with it
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
