"""Node SDK (pool/js): msgpack codec, the checkpoint() handshake and the randomness wrappers, without
CRIU (tests/integration/test_node_sdk.py restores real copies)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from sdkwire import (CASES, IDENTITY, TIMEOUT, assert_failed_hook_reported, control_app,
                     drive_checkpoint_hooks, frame, parse_output,
                     recv, send, split_frames, unpack)

HERE = Path(__file__).resolve().parent
CHECK = HERE / "js" / "sdk_check.js"
JS = HERE.parents[1] / "pool" / "js"


def echo(data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(CHECK), "echo"], input=data, capture_output=True, timeout=60)


def has_integral_float(value) -> bool:
    """JS has one number type: 0.0 comes back as the int 0 (equal, but other bytes)."""
    if isinstance(value, float):
        return value.is_integer() and abs(value) <= 2**53
    if isinstance(value, dict):
        return any(has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_integral_float(v) for v in value)
    return False


# ---------------------------------------------------------------- codec

def test_codec_round_trip_matches_python_msgpack():
    proc = echo(b"".join(frame(c) for c in CASES))
    assert proc.returncode == 0, proc.stderr.decode()
    bodies = split_frames(proc.stdout)
    assert len(bodies) == len(CASES)
    for case, body in zip(CASES, bodies):
        assert unpack(body) == case
        if not has_integral_float(case):
            # Both encoders pick the smallest representation, so even the bytes agree.
            assert body == msgpack.packb(case, use_bin_type=True)


def test_codec_keeps_negative_zero_and_big_floats_as_floats():
    case = {"f": [-0.0, 1e300, 2.0**53 + 2, 0.5]}
    (body,) = split_frames(echo(frame(case)).stdout)
    back = unpack(body)["f"]
    assert [type(x) for x in back] == [float, float, float, float]
    assert back == case["f"] and str(back[0]) == "-0.0"


def test_codec_decodes_float32():
    case = {"f32": [1.5, 0.1, -3.0e38]}
    proc = echo(frame(case, use_single_float=True))
    assert proc.returncode == 0, proc.stderr.decode()
    (body,) = split_frames(proc.stdout)
    assert unpack(body) == unpack(msgpack.packb(case, use_single_float=True))


@pytest.mark.parametrize("body, needle", [
    (b"\xd4\x01\x02", "0xd4"),                        # fixext 1
    (b"\x81\xa1k\xc7\x01\x05x", "0xc7"),              # ext 8, inside a map
    (b"\xc1", "0xc1"),                                # never used
    (b"\x93\x01\x02", "truncated"),                   # array of 3 holding 2
    (b"\xdb\xff\xff\xff\xff", "truncated"),           # str32 longer than the frame
    (b"\xdd\xff\xff\xff\xff", "truncated"),           # array32 of 4G items: refused before allocating
    (b"\xa2\xc3\x28", "UTF-8"),                       # invalid UTF-8 in a str
    (b"\x01\x02", "trailing"),
])
def test_codec_rejects_bad_input(body, needle):
    proc = echo(struct.pack(">I", len(body)) + body)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "MsgpackError" in proc.stderr.decode() and needle in proc.stderr.decode()


def test_codec_u64_past_safe_integers_is_a_bigint():
    script = (f"const m = require({json.dumps(str(JS / 'pool-msgpack'))});"
              "const v = m.decode(Buffer.from('cf' + 'ff'.repeat(8), 'hex'));"
              "const w = m.decode(Buffer.from('cf001fffffffffffff', 'hex'));"
              "console.log(typeof v, String(v), typeof w, w);"
              "try { m.encode(1n << 64n); } catch (e) { console.log(e.name); }"
              "try { m.encode(() => 1); } catch (e) { console.log(e.name); }")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bigint", str(2**64 - 1), "number", str(2**53 - 1),
                                  "MsgpackError", "MsgpackError"]


# ---------------------------------------------------------------- checkpoint() handshake

def checkpoint_app(*args: str, env_extra: dict[str, str] | None = None):
    return control_app(["node", str(CHECK), "checkpoint", *args], env_extra)


def identity(**overrides) -> dict:
    return {**IDENTITY, "seed": 42, **overrides}


def run_copy(ident: dict, env_extra=None):
    """One restored copy, minus CRIU: ready -> identity -> ack -> the app's own report."""
    with checkpoint_app("template-arg", env_extra=env_extra) as (proc, pool_r, pool_w, _):
        ready = recv(pool_r)
        send(pool_w, ident)
        ack = recv(pool_r)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        return proc.pid, ready, ack, parse_output(out)


def test_checkpoint_handshake():
    deadline = time.time() + 10
    ident = identity(instance_id="copy-7", hostname="copy-7.pool", seed=2**63 - 1,
                     deadline=deadline, args=["serve", "a b", "", "ü"])
    pid, ready, ack, (out, args) = run_copy(
        ident, env_extra={"SDK_CHECK_FALLBACK": "from-process-env", "GREETING": "template"})

    assert ready == {"type": "ready", "pid": pid, "runtime": "node"}
    assert ack == {"type": "ack", "instance_id": "copy-7", "pid": pid, "serves": ["checkpoint"]}
    assert out["instance"] == "copy-7" and out["restored"] == "true"
    assert out["greeting"] == "héllo wörld 日本"          # identity env wins
    assert out["fallback"] == "from-process-env"          # else the process env
    assert out["pool_instance_id"] == "copy-7"
    assert out["hostname"] == "copy-7.pool"
    assert out["seed"] == str(2**63 - 1)
    assert float(out["deadline"]) == pytest.approx(deadline)
    assert out["hooks"] == "before:A,before:B,after:A:copy-7,after:B"
    assert out["same"] == "true"                          # a second checkpoint() is a no-op
    assert out["argv01"] == "node,sdk_check.js"           # argv[0..1] kept
    assert args == ["serve", "a b", "", "ü"]
    assert out["done"] == ""


def test_math_random_follows_the_identity_seed_crypto_does_not():
    def run(seed):
        _, _, _, (out, _) = run_copy(identity(seed=seed))
        return out

    first, again, other = run(42), run(42), run(43)
    assert first["random"] == again["random"]             # one seed, one stream (as Python's)
    assert first["random"] != other["random"]
    a, b = (float(x) for x in first["random"].split(","))
    assert a != b and 0 <= a < 1 and 0 <= b < 1
    assert first["bytes"] != again["bytes"]               # /dev/urandom on every call
    assert first["uuid"] != again["uuid"]
    assert first["uuid"][14] == "4" and first["uuid"][19] in "89ab"  # a version 4 UUID


def test_failing_hook_reports_error():
    with checkpoint_app() as (proc, pool_r, pool_w, _):
        assert recv(pool_r)["type"] == "ready"
        send(pool_w, identity(env={"FAIL_HOOK": "boom"}))
        error = recv(pool_r)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert error["type"] == "error"
    assert "after-restore hook failed" in error["message"]
    assert "hook asked to fail: boom" in error["message"]
    assert proc.returncode != 0 and "after-restore hook failed" in err


@pytest.mark.parametrize("message, needle", [
    ({"type": "bogus"}, 'expected an identity message, got "bogus"'),
    ({"type": "identity"}, "identity: instance_id is missing"),
    ({"type": "identity", "instance_id": "x", "env": {"A": 1}}, "identity: env must be"),
    ({"type": "identity", "instance_id": "x", "args": "a"}, "identity: args must be"),
    ({"type": "identity", "instance_id": "x", "seed": 1.5}, "identity: seed must be"),
])
def test_bad_message_reports_error(message, needle):
    with checkpoint_app() as (proc, pool_r, pool_w, _):
        assert recv(pool_r)["type"] == "ready"
        send(pool_w, message)
        error = recv(pool_r)
        proc.communicate(timeout=TIMEOUT)
    assert error["type"] == "error" and error["message"].startswith("ControlError: ")
    assert needle in error["message"]
    assert proc.returncode != 0


def test_channel_closed_before_identity():
    with checkpoint_app() as (proc, pool_r, pool_w, fds):
        assert recv(pool_r)["type"] == "ready"
        os.close(pool_w)
        fds[1] = -1
        error = recv(pool_r)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert error["type"] == "error" and "closed" in error["message"]
    assert proc.returncode != 0 and "ControlError" in err


def test_frame_over_the_limit_reports_error():
    with checkpoint_app() as (proc, pool_r, pool_w, _):
        assert recv(pool_r)["type"] == "ready"
        os.write(pool_w, struct.pack(">I", (1 << 20) + 1))
        error = recv(pool_r)
        proc.communicate(timeout=TIMEOUT)
    assert "over the 1048576 limit" in error["message"]


def test_local_identity_without_pool():
    env = {k: v for k, v in os.environ.items() if k != "POOL_CONTROL_FDS"}
    proc = subprocess.run(["node", str(CHECK), "checkpoint", "a b", "", "c"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    out, args = parse_output(proc.stdout)
    assert out["instance"] == "local" and out["restored"] == "false"
    assert out["hostname"] == "null" and out["seed"] == "0"
    assert out["hooks"] == "before:A,before:B,after:A:local,after:B"  # in place, as Java's SDK
    assert args == ["checkpoint", "a b", "", "c"]  # the app's own argv[2..]


# ---------------------------------------------------------------- a running copy's checkpoint hooks
# (run_copy above already shows that the SDK's control reader does not keep a finished app alive: the
# app exits while the pool still holds the channel open)
RESTORED = "before:A,before:B,after:A:copy-7,after:B"  # the template's checkpoint and this copy's restore
CHECKPOINT_CMD = ["node", str(CHECK), "checkpoint"]


def serve(**identity_fields):
    return drive_checkpoint_hooks(CHECKPOINT_CMD, identity(instance_id="copy-7", **identity_fields),
                                  {"SDK_CHECK_SERVE": "1"})


def test_a_running_copy_runs_its_checkpoint_hooks_when_told():
    ack, replies, out, err, status = serve()
    assert status == 0 and "Error" not in err, err
    assert ack["serves"] == ["checkpoint"]
    assert replies == [{"type": "ok"}, {"type": "ok"},
                       {"type": "error", "message": 'unknown control message "bogus"'}]
    assert out["events"] == f"{RESTORED},before:A,before:B,checkpoint:A,checkpoint:B"


def test_a_failing_checkpoint_hook_is_reported_and_the_copy_serves_on():
    ack, replies, out, err, status = serve(env={"FAIL_CHECKPOINT_HOOK": "1"})
    assert status == 0, err
    assert_failed_hook_reported(replies, out, f"{RESTORED},before:A,before:B,checkpoint:A")

# ---------------------------------------------------------------- the randomness wrappers

WRAPPERS = r"""
const crypto = require('crypto');
const fresh = require(process.argv[1]);
const { randomBytes } = crypto;                 // kept from before install(): not covered
fresh.install();
const same = (f) => f() === f();
const out = {};
fresh.reseed(7n);
const kept = crypto.randomUUID;
out.errors = [];
for (const bad of [() => crypto.randomBytes(-1), () => crypto.randomFillSync('x'),
                   () => crypto.randomInt(5, 1), () => crypto.getRandomValues(new Float64Array(2)),
                   () => crypto.randomUUID({ disableEntropyCache: 'no' })]) {
  try { bad(); out.errors.push('none'); } catch (e) { out.errors.push(typeof e.code === 'string' ? e.code : e.name); }
}
const buf = Buffer.alloc(12);
crypto.randomFillSync(new Uint32Array(buf.buffer, buf.byteOffset, 3), 1, 1);
out.fillRegion = [buf.subarray(0, 4).equals(Buffer.alloc(4)), buf.subarray(8).equals(Buffer.alloc(4))];
out.ints = Array.from({ length: 200 }, () => crypto.randomInt(3, 6));
out.intMax = crypto.randomInt(1);
out.uuids = [kept(), crypto.webcrypto.randomUUID(), globalThis.crypto.randomUUID()];
out.values = Array.from(crypto.getRandomValues(new Uint8Array(4)));
out.webValues = Array.from(globalThis.crypto.getRandomValues(new Uint16Array(2)));
out.original = typeof randomBytes(4);
out.mathSeeded = (() => { fresh.reseed(7n); const a = Math.random(); fresh.reseed(7n); return a === Math.random(); })();
Promise.all([
  new Promise((ok) => crypto.randomBytes(8, (e, b) => ok(b.length))),
  new Promise((ok) => crypto.randomFill(new Uint8Array(8), 2, (e, b) => ok(b.length))),
  new Promise((ok) => crypto.randomInt(10, (e, n) => ok(n))),
]).then((async) => { out.async = async; console.log(JSON.stringify(out)); });
"""


def test_crypto_wrappers_keep_nodes_contract():
    proc = subprocess.run(["node", "-e", WRAPPERS, str(JS / "pool-fresh-random.js")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # Node's own argument errors, thrown by the original each wrapper calls first
    assert out["errors"] == ["ERR_OUT_OF_RANGE", "ERR_INVALID_ARG_TYPE", "ERR_OUT_OF_RANGE",
                             "TypeMismatchError", "ERR_INVALID_ARG_TYPE"]
    assert out["fillRegion"] == [True, True]       # offset and size count elements, as Node's
    assert set(out["ints"]) == {3, 4, 5} and out["intMax"] == 0
    assert len(set(out["uuids"])) == 3 and all(u[14] == "4" for u in out["uuids"])
    assert len(out["values"]) == 4 and len(out["webValues"]) == 2
    assert out["original"] == "object"
    assert out["mathSeeded"] is True
    assert out["async"][0] == 8 and out["async"][1] == 8 and 0 <= out["async"][2] < 10
