"""`pool doctor` as a user runs it: the real node passes; broken CRIU set-ups fail with one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REAL_CRIU = "/opt/prewarm-pool/criu/bin/criu"


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pool.cli", "doctor", *args], capture_output=True,
                          text=True, env=full_env, timeout=120)


def fake_criu(tmp_path: Path, body: str) -> str:
    """A wrapper around the real CRIU that changes one answer (for failure modes we cannot cause)."""
    path = tmp_path / "criu"
    path.write_text(f"#!/bin/sh\n{body}\nexec {REAL_CRIU} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_doctor_json_passes_here(tmp_path):
    res = doctor("--json", env={"POOL_STORE": str(tmp_path / "store")})
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    major, minor = (int(x) for x in report["criu_version"].split(".")[:2])
    assert (major, minor) >= (4, 2)
    names = {c["name"]: c["status"] for c in report["checks"]}
    assert names["criu check"] == "OK" and names["pid namespaces"] == "OK"
    assert "userfaultfd" in names and "fs.pipe-max-size" in names and "subreaper" in names


def test_doctor_text_says_what_it_means(tmp_path):
    res = doctor(env={"POOL_STORE": str(tmp_path / "store")})
    assert res.returncode == 0
    assert res.stdout.strip().splitlines()[-1].startswith("OK: this node can build and restore")


def test_wrong_pool_criu_path(tmp_path):
    res = doctor("--json", env={"POOL_CRIU": str(tmp_path / "missing-criu")})
    assert res.returncode != 0
    report = json.loads(res.stdout)
    assert report["ok"] is False
    assert "POOL_CRIU=" in report["reason"] and "does not exist" in report["reason"]
    assert "\n" not in report["reason"]


def test_criu_that_fails_check(tmp_path):
    criu = fake_criu(tmp_path, 'if [ "$1" = check ] && [ -z "$2" ]; then '
                               'echo "Error: kernel too old" >&2; exit 1; fi')
    res = doctor(env={"POOL_CRIU": criu})
    assert res.returncode != 0
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL:") and "criu check" in last and "kernel too old" in last


def test_missing_kernel_feature(tmp_path):
    criu = fake_criu(tmp_path, 'if [ "$3" = ns_pid ]; then echo "Error: ns_pid unsupported"; '
                               'exit 1; fi')
    res = doctor("--json", env={"POOL_CRIU": criu})
    assert res.returncode != 0
    report = json.loads(res.stdout)
    assert "pid namespaces" in report["reason"]
    assert "own pid namespace" in report["reason"]


def test_missing_optional_feature_only_warns(tmp_path):
    criu = fake_criu(tmp_path, 'if [ "$3" = uffd-noncoop ]; then echo "Error: no uffd"; exit 1; fi')
    res = doctor("--json", env={"POOL_CRIU": criu, "POOL_STORE": str(tmp_path / "s")})
    assert res.returncode == 0
    check = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "userfaultfd")
    assert check["status"] == "WARN" and "lazy restore" in check["detail"]
