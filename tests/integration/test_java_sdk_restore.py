"""The Java SDK through real CRIU: copies of one Java template (tests/apps/java-sdk) each get their own
identity, env, args and hostname, and run the after-restore hooks once, checked from the outside."""
from __future__ import annotations

import json

from pool.copies.restore import Identity, Restorer
from pool.cr import netns

COPIES = 3


def test_copies_get_env_args_hostname_and_run_hooks_once(java_sdk, session_store, criu, tmp_path):
    restorer = Restorer(session_store, criu, tmp_path / "run")
    instances, answers = [], []
    try:
        for i in range(COPIES):
            instances.append(restorer.spawn("java-sdk", Identity(
                f"java-{i}", env={"GREETING": f"hello {i}"}, args=[f"--copy={i}", "a b"],
                hostname=f"java-host-{i}")))
        for inst in instances:
            status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:{inst.port}/", timeout=10)
            assert status == 200, body[:300]
            answers.append(json.loads(body))
    finally:
        for inst in instances:
            inst.kill()
            inst.close()
    for i, a in enumerate(answers):
        assert a["instance"] == f"java-{i}"
        assert a["greeting"] == f"hello {i}"               # the identity's env wins over the template's
        assert a["args"] == [f"--copy={i}", "a b"]
        assert a["hostname"] == f"java-host-{i}"
        assert a["before"] == 1 and a["after"] == [f"java-{i}"]  # once per copy, after the identity
    assert len({a["random"] for a in answers}) == COPIES  # the registered Random, reseeded per copy
