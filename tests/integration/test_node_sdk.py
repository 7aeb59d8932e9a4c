"""The Node SDK through real CRIU: copies of one Node template (tests/apps/node-sdk) each get their own
identity, env, argv, hostname, Math.random stream and crypto randomness, and run the after-restore
hooks once; the same app runs without the pool."""
from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.templates.build import app_environment
from pool.templates.spec import load_spec

APP = Path(__file__).resolve().parents[1] / "apps" / "node-sdk"
COPIES = 3


@pytest.fixture(scope="module")
def answers(node_sdk, session_store, criu, tmp_path_factory):
    """What each of COPIES restored copies answers on GET / (the copies are gone once it returns)."""
    restorer = Restorer(session_store, criu, tmp_path_factory.mktemp("node-sdk-run"))
    instances = []
    try:
        for i in range(COPIES):
            instances.append(restorer.spawn("node-sdk", Identity(
                f"node-{i}", env={"GREETING": f"hello {i}"}, args=[f"--copy={i}", "a b"],
                hostname=f"node-host-{i}")))
        out = []
        for inst in instances:
            status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:{inst.port}/", timeout=10)
            assert status == 200, body[:300]
            out.append(json.loads(body))
        return out
    finally:
        for inst in instances:
            inst.kill()
            inst.close()


def test_each_copy_gets_its_identity(answers):
    assert [a["instance"] for a in answers] == [f"node-{i}" for i in range(COPIES)]
    for i, a in enumerate(answers):
        assert a["restored"] is True and a["poolInstanceId"] == f"node-{i}"
        assert a["greeting"] == f"hello {i}"
        assert a["argv"] == [f"--copy={i}", "a b"]                 # the template's own arg replaced
        assert Path(a["argv01"][1]).name == "app.js"                # argv[0..1] kept
        assert a["hostname"] == a["identityHostname"] == f"node-host-{i}"
        assert a["hooks"] == {"before": 1, "after": [f"node-{i}"]}  # once per copy
    assert len({a["boot"]["uuid"] for a in answers}) == 1           # the state from before the checkpoint


@pytest.mark.parametrize("key", ["random", "bytes", "fill", "uuid", "webUuid", "values", "int"])
def test_each_copy_draws_its_own_randomness(answers, key):
    draws = [json.dumps(a[key]) for a in answers]
    assert len(set(draws)) == COPIES, draws


def test_unwrapped_generators_are_shared_by_every_copy(answers):
    """The control: references taken before the SDK was loaded are not wrapped, and every copy draws
    the same from them. The SDK's wrappers, not luck, make the draws above differ."""
    assert len({a["raw"]["bytes"] for a in answers}) == 1
    assert len({a["raw"]["random"] for a in answers}) == 1


def test_the_app_runs_without_the_pool():
    spec = load_spec(APP)
    env = {**app_environment(spec), "PORT": "0"}
    proc = subprocess.Popen([*spec.command, "own-arg"], cwd=spec.cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # printed once listening, before checkpoint()
        assert line.startswith("node-sdk: listening on "), (line, proc.stderr.read())
        port = int(line.rsplit(" ", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            a = json.loads(resp.read())
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert a["instance"] == "local" and a["restored"] is False
    assert a["argv"] == ["template-arg", "own-arg"] and a["greeting"] == "hello from the template"
    assert a["hooks"] == {"before": 1, "after": ["local"]}
