"""Java SDK (pool/java/PoolRuntime.java): msgpack codec and the checkpoint() handshake, without CRIU."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import msgpack
import pytest
from sdkwire import (CASES, IDENTITY, TIMEOUT, assert_failed_hook_reported, control_app,
                     drive_checkpoint_hooks, frame, parse_output,
                     recv, send, split_frames, unpack)

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "pool" / "java" / "PoolRuntime.java"
CODEC_CHECK = Path(__file__).resolve().parent / "java" / "CodecCheck.java"
TEMPLATE = ROOT / "templates" / "java-hello"
JAVA, JAVAC = "java", "javac"   # the JDK comes with `make setup` (scripts/setup.sh)
JVM_FLAGS = ["-XX:-UsePerfData", "-XX:+UseSerialGC", "-Xshare:auto"]

@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("java-sdk")
    proc = subprocess.run(
        [JAVAC, "--release", "17", "-Xlint:all", "-d", str(out), str(SDK), str(CODEC_CHECK)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    return out


def echo(classes: Path, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [JAVA, *JVM_FLAGS, "-cp", str(classes), "CodecCheck", "echo"],
        input=data, capture_output=True, timeout=120,
    )


def test_codec_round_trip_matches_python_msgpack(classes):
    proc = echo(classes, b"".join(frame(c) for c in CASES))
    assert proc.returncode == 0, proc.stderr.decode()
    bodies = split_frames(proc.stdout)
    assert len(bodies) == len(CASES)
    for case, body in zip(CASES, bodies):
        assert unpack(body) == case
        # Both encoders pick the smallest representation, so even the bytes agree.
        assert body == msgpack.packb(case, use_bin_type=True)


def test_codec_decodes_float32(classes):
    case = {"f32": [1.5, 0.1, -3.0e38]}
    proc = echo(classes, frame(case, use_single_float=True))
    assert proc.returncode == 0, proc.stderr.decode()
    (body,) = split_frames(proc.stdout)
    assert unpack(body) == unpack(msgpack.packb(case, use_single_float=True))


@pytest.mark.parametrize("body, needle", [
    (b"\xd4\x01\x02", "0xd4"),                        # fixext 1
    (b"\x81\xa1k\xc7\x01\x05x", "0xc7"),              # ext 8, inside a map
    (b"\xc1", "0xc1"),                                # never used
    (b"\xcf" + b"\xff" * 8, "uint64"),                # 2**64 - 1 does not fit a long
    (b"\x93\x01\x02", "truncated"),                   # array of 3 holding 2
    (b"\xdb\xff\xff\xff\xff", "truncated"),           # str32 longer than the frame
    (b"\x01\x02", "trailing"),
])
def test_codec_rejects_bad_input(classes, body, needle):
    proc = echo(classes, struct.pack(">I", len(body)) + body)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in proc.stderr.decode()


# ---------------------------------------------------------------- checkpoint() handshake

def check_cmd(classes: Path, *args: str) -> list[str]:
    return [JAVA, *JVM_FLAGS, "-cp", str(classes), "CodecCheck", "checkpoint", *args]


def run_copy(classes: Path, identity: dict, env_extra=None):
    """One restored copy, minus CRIU: ready -> identity -> ack -> the app's own report."""
    with control_app(check_cmd(classes, "template-arg"), env_extra) as (proc, pool_r, pool_w, _):
        ready = recv(pool_r)
        send(pool_w, identity)
        ack = recv(pool_r)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        return proc.pid, ready, ack, parse_output(out)


def identity(**overrides) -> dict:
    return {**IDENTITY, "seed": 42, **overrides}


def test_checkpoint_handshake(classes):
    deadline = time.time() + 10
    ident = identity(instance_id="copy-7", hostname="copy-7.pool", seed=2**63 - 1,
                     deadline=deadline, args=["serve", "a b", "", "ü"])
    pid, ready, ack, (out, args) = run_copy(
        classes, ident, env_extra={"CODEC_CHECK_FALLBACK": "from-process-env", "GREETING": "template"})

    assert ready == {"type": "ready", "pid": pid, "runtime": "java"}
    assert ack == {"type": "ack", "instance_id": "copy-7", "pid": pid, "serves": ["checkpoint"]}
    assert out["instance"] == "copy-7"
    assert out["greeting"] == "héllo wörld 日本"          # identity env wins
    assert out["fallback"] == "from-process-env"          # else the process env
    assert out["hostname"] == "copy-7.pool"
    assert out["seed"] == str(2**63 - 1)
    assert float(out["deadline"]) == pytest.approx(deadline)
    assert out["hooks"] == "before:B,before:A,after:A,after:B"
    assert out["same"] == "true"                          # a second checkpoint() is a no-op
    assert args == ["serve", "a b", "", "ü"]
    assert out["done"] == ""


def test_registered_randoms_reseeded_from_identity_seed(classes):
    def randoms(seed):
        _, _, _, (out, _) = run_copy(classes, identity(seed=seed))
        return out["random1"], out["random2"]

    first, again, other = randoms(42), randoms(42), randoms(43)
    assert first == again                 # same seed, same stream
    assert first[0] != other[0] and first[1] != other[1]
    assert first[0] != first[1]           # each registered Random gets its own seed


def test_failing_hook_reports_error(classes):
    with control_app(check_cmd(classes)) as (proc, pool_r, pool_w, _):
        assert recv(pool_r)["type"] == "ready"
        send(pool_w, identity(env={"FAIL_HOOK": "boom"}))
        error = recv(pool_r)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert error["type"] == "error"
    assert "after-restore hook failed" in error["message"]
    assert "hook asked to fail: boom" in error["message"]
    assert proc.returncode != 0 and "RuntimeException" in err


def test_unexpected_message_reports_error(classes):
    with control_app(check_cmd(classes)) as (proc, pool_r, pool_w, _):
        assert recv(pool_r)["type"] == "ready"
        send(pool_w, {"type": "bogus"})
        error = recv(pool_r)
        proc.communicate(timeout=TIMEOUT)
    assert error == {"type": "error", "message": "unexpected control message type: bogus"}
    assert proc.returncode != 0


def test_channel_closed_before_identity(classes):
    with control_app(check_cmd(classes)) as (proc, pool_r, pool_w, fds):
        assert recv(pool_r)["type"] == "ready"
        os.close(pool_w)
        fds[1] = -1
        error = recv(pool_r)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert error["type"] == "error" and "closed" in error["message"]
    assert proc.returncode != 0 and "UncheckedIOException" in err


def test_local_identity_without_pool(classes):
    env = {k: v for k, v in os.environ.items() if k != "POOL_CONTROL_FDS"}
    proc = subprocess.run(check_cmd(classes, "a b", "", "c"), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    out, args = parse_output(proc.stdout)
    assert out["instance"] == "local"
    assert out["hostname"] == "null" and out["seed"] == "0"
    assert out["hooks"] == "before:B,before:A,after:A,after:B"
    assert args == ["checkpoint", "a b", "", "c"]  # the app's own args, exactly


# ---------------------------------------------------------------- a running copy's checkpoint hooks
# (run_copy above already shows that the SDK's control reader does not keep a finished app alive: the
# app exits while the pool still holds the channel open)
RESTORED = "before:B,before:A,after:A,after:B"  # the template's checkpoint and this copy's restore


def serve(classes, **identity_fields):
    return drive_checkpoint_hooks(check_cmd(classes), identity(instance_id="copy-7", **identity_fields),
                                  {"CODEC_CHECK_SERVE": "1"})


def test_a_running_copy_runs_its_checkpoint_hooks_when_told(classes):
    ack, replies, out, err, status = serve(classes)
    assert status == 0 and "Exception" not in err, err
    assert ack["serves"] == ["checkpoint"]
    assert replies == [{"type": "ok"}, {"type": "ok"},
                       {"type": "error", "message": "unknown control message 'bogus'"}]
    assert out["events"] == f"{RESTORED},before:B,before:A,checkpoint:A,checkpoint:B"


def test_a_failing_checkpoint_hook_is_reported_and_the_copy_serves_on(classes):
    ack, replies, out, err, status = serve(classes, env={"FAIL_CHECKPOINT_HOOK": "1"})
    assert status == 0, err
    assert_failed_hook_reported(replies, out, f"{RESTORED},before:B,before:A,checkpoint:A")

# ---------------------------------------------------------------- templates/java-hello

def test_java_hello_template(tmp_path):
    spec = tomllib.loads((TEMPLATE / "template.toml").read_text())
    assert spec["command"][0] == "java" and "-XX:-UsePerfData" in spec["command"]
    assert spec["ready"]["sdk"] is True and spec["network"]["port"] == 8080

    # Build a copy laid out like the repo, so build/ lands in tmp_path.
    (tmp_path / "pool" / "java").mkdir(parents=True)
    shutil.copy(SDK, tmp_path / "pool" / "java")
    tdir = tmp_path / "templates" / "java-hello"
    tdir.mkdir(parents=True)
    for name in ("App.java", "build.sh"):
        shutil.copy(TEMPLATE / name, tdir)
    build = subprocess.run([str(tdir / "build.sh")], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert (tdir / "build" / "App.class").exists()
    again = subprocess.run([str(tdir / "build.sh")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout

    cmd = [c if c != "build" else str(tdir / "build") for c in spec["command"]]
    with control_app(cmd, env_extra={"PORT": "0", **spec["env"]}) as (proc, pool_r, pool_w, _):
        assert recv(pool_r, timeout=60)["type"] == "ready"
        line = proc.stdout.readline()  # printed before the ready frame
        assert line.startswith("ready: listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1].split()[0])

        send(pool_w, identity(instance_id="hello-1", env={"GREETING": "hi from copy"}, args=["x", "y z"]))
        assert recv(pool_r) == {"type": "ack", "instance_id": "hello-1", "pid": proc.pid,
                                "serves": ["checkpoint"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as resp:
            body = json.loads(resp.read())
    assert body["instance"] == "hello-1"
    assert body["greeting"] == "hi from copy"
    assert body["args"] == ["x", "y z"]
    assert 0.0 <= body["random"] < 1.0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
