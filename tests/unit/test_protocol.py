import struct

import msgpack
import pytest

from pool import errors
from pool.config import Limits
from pool.errors import AuthError, BadRequest, ProtocolError
from pool.wire import protocol as P


# --- framing ----------------------------------------------------------------------------------------
def test_round_trip():
    msgs = [P.make_request(1, "ping"), P.make_result(7, {"a": [1, 2.5, None, True, b"\x00"]}),
            P.make_error(3, errors.NoCapacity("full", node="n1")), P.make_hello("t", "c")]
    dec = P.FrameDecoder()
    for m in msgs:
        assert dec.feed(P.encode_frame(m)) == [m]
    assert dec.pending == 0


def test_frame_layout_is_u32_big_endian_plus_msgpack():
    frame = P.encode_frame({"id": 1})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert msgpack.unpackb(frame[4:]) == {"id": 1}


def test_byte_by_byte_and_many_in_one_feed():
    msgs = [P.make_request(i, "info", {"id": "x" * i}) for i in range(1, 6)]
    data = b"".join(P.encode_frame(m) for m in msgs)
    dec = P.FrameDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert got == msgs
    assert P.FrameDecoder().feed(data) == msgs
    # Split in the middle of the second header.
    dec = P.FrameDecoder()
    cut = len(P.encode_frame(msgs[0])) + 2
    assert dec.feed(data[:cut]) == msgs[:1]
    assert dec.pending == 2
    assert dec.feed(data[cut:]) == msgs[1:]


def test_encode_refuses_oversized_and_unencodable():
    with pytest.raises(ProtocolError, match="exceeds"):
        P.encode_frame({"x": "y" * 200}, max_frame=100)
    with pytest.raises(ProtocolError, match="cannot encode"):
        P.encode_frame({"x": object()})


def test_oversized_length_rejected_before_payload():
    dec = P.FrameDecoder(max_frame=1000)
    assert dec.feed(b"\x00\x00") == []  # half a header: nothing to decide yet
    with pytest.raises(ProtocolError, match="over the limit") as e:
        dec.feed(b"\x03\xe9")  # 1001, and not a byte of payload sent
    assert e.value.data == {"size": 1001, "limit": 1000}
    with pytest.raises(ProtocolError):
        P.FrameDecoder().feed(b"\xff\xff\xff\xff")
    assert P.FrameDecoder(max_frame=1000).feed(P.encode_frame({"a": "b" * 900}))  # at the limit: fine


@pytest.mark.parametrize("payload", [
    msgpack.packb([1, 2]), msgpack.packb("s"), msgpack.packb(None), msgpack.packb(3),
])
def test_non_map_payload(payload):
    with pytest.raises(ProtocolError, match="not a map"):
        P.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\x81\xa1",                   # empty, reserved byte, truncated map
    msgpack.packb({"a": 1}) + b"\x00",           # trailing data inside the frame
    b"\x81\x01\x01",                             # int map key
    b"\x81\xa1a\xa2\xff\xfe",                    # invalid utf-8
    b"\xdd\xff\xff\xff\xff",                     # array announcing 4 G elements
    b"\x91" * 5000,                              # absurd nesting
    msgpack.packb({"a": msgpack.ExtType(5, b"x")}),
])
def test_garbage_payload(payload):
    with pytest.raises(ProtocolError, match="undecodable"):
        P.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


# --- requests and schemas ---------------------------------------------------------------------------
def req(method, params=None, rid=1):
    return P.validate_request(P.make_request(rid, method, params))


def test_defaults_are_filled_and_fresh():
    r = req("spawn", {"template": "py"})
    assert r == P.Request(1, "spawn", {"template": "py", "env": {}, "args": [], "timeout": 30.0,
                                       "node": None, "hostname": None, "owner": None})
    r.params["env"]["X"] = "1"
    assert req("spawn", {"template": "py"}).params["env"] == {}  # the default was copied
    assert req("ping").params == {}
    assert req("logs", {"id": "i"}).params == {"id": "i", "stream": "stdout", "offset": 0, "limit": 65536}
    assert req("wait", {"id": "i"}).params == {"id": "i", "timeout": None}
    assert req("kill", {"id": "i"}).params == {"id": "i", "grace": 3.0}


def test_every_method_has_a_schema_entry():
    assert set(P.METHODS) == {"ping", "spawn", "kill", "wait", "list", "info", "logs", "templates",
                              "stats", "set_warm", "nodes", "push", "fork", "facts",
                              "fetch_template", "fork_checkpoint", "fork_release", "fork_restore",
                              "checkpoint", "snapshots", "rollback", "suspend", "resume",
                              "migrate", "migrate_out", "migrate_in", "migrate_done"}
    assert P.NODE_METHODS | P.COORDINATOR_METHODS == set(P.METHODS)


@pytest.mark.parametrize("method,params,expect", [
    ("spawn", {"template": "p", "timeout": 5}, {"timeout": 5.0}),           # int accepted as float
    ("spawn", {"template": "p", "node": "n", "hostname": None}, {"node": "n", "hostname": None}),
    ("spawn", {"template": "p", "env": {"A": "b"}, "args": ["-x"]}, {"env": {"A": "b"}, "args": ["-x"]}),
    ("wait", {"id": "i", "timeout": 0.5}, {"timeout": 0.5}),
    ("logs", {"id": "i", "stream": "stderr", "offset": 10, "limit": 0}, {"stream": "stderr"}),
    ("list", {"template": None}, {"template": None}),
    ("set_warm", {"template": "p", "min_warm": 0}, {"min_warm": 0}),
])
def test_valid_params(method, params, expect):
    got = req(method, params).params
    for k, v in expect.items():
        assert got[k] == v and type(got[k]) is type(v)


@pytest.mark.parametrize("method,params,param,expected", [
    ("spawn", {}, "template", P.TEMPLATE.name),                                # missing required
    ("spawn", {"template": 1}, "template", P.TEMPLATE.name),
    ("spawn", {"template": "p", "env": {"A": 1}}, "env", "dict[str, str]"),
    ("spawn", {"template": "p", "env": ["A"]}, "env", "dict[str, str]"),
    ("spawn", {"template": "p", "args": "ls"}, "args", "list[str]"),
    ("spawn", {"template": "p", "args": ["a", 2]}, "args", "list[str]"),
    ("spawn", {"template": "p", "timeout": "5"}, "timeout", P.DURATION.name),
    ("spawn", {"template": "p", "timeout": True}, "timeout", P.DURATION.name),  # bool is not a number
    ("spawn", {"template": "p", "timeout": float("nan")}, "timeout", P.DURATION.name),
    ("spawn", {"template": "p", "timeout": -1}, "timeout", P.DURATION.name),
    ("spawn", {"template": "p", "node": 3}, "node", P.OPT_NAME.name),
    ("kill", {"id": None}, "id", P.INSTANCE_ID.name),
    ("logs", {"id": "i", "stream": "stdin"}, "stream", "'stdout' | 'stderr'"),
    ("logs", {"id": "i", "offset": 1.0}, "offset", P.COUNT.name),
    ("logs", {"id": "i", "limit": False}, "limit", P.COUNT.name),
    ("logs", {"id": "i", "offset": -1}, "offset", P.COUNT.name),
    ("set_warm", {"template": "p"}, "min_warm", P.MIN_WARM.name),
    ("wait", {"id": "i", "timeout": "never"}, "timeout", P.DURATION.name + " | None"),
])
def test_wrong_params(method, params, param, expected):
    with pytest.raises(BadRequest) as e:
        req(method, params)
    assert e.value.data["method"] == method and e.value.data["param"] == param
    assert e.value.data["expected"] == expected
    assert method in e.value.message and repr(param) in e.value.message and expected in e.value.message


def test_wrong_type_message_says_expected_and_got():
    with pytest.raises(BadRequest) as e:
        req("kill", {"id": "i", "grace": "soon"})
    assert e.value.message == "kill: parameter 'grace' must be float in [0, 604800], got str"


# --- what a caller hands a copy: refused here, before any copy is touched -----------------------------
def bad(method, params):
    with pytest.raises(BadRequest) as e:
        req(method, params)
    return e.value


@pytest.mark.parametrize("hostname", [
    "a" * 65, "a" * 80, "", "-lead", ".lead", "under_score", "sp ace", "tab\t", "nul\0", "é", "a/b"])
@pytest.mark.parametrize("method,base", [
    ("spawn", {"template": "p"}), ("fork", {"id": "i"}),
    ("fork_restore", {"template": "p", "source": "h:1", "build_id": "b", "token": "t"})])
def test_bad_hostnames_are_refused(method, base, hostname):
    e = bad(method, {**base, "hostname": hostname})
    assert e.data["param"] == "hostname" and "hostname" in e.message


@pytest.mark.parametrize("hostname", ["a", "a" * 64, "copy-a", "n1.example.org", "A9-b.c"])
def test_good_hostnames_pass(hostname):
    assert req("spawn", {"template": "p", "hostname": hostname}).params["hostname"] == hostname


@pytest.mark.parametrize("env,key", [
    ({"A=B": "1"}, "A=B"), ({"": "1"}, ""), ({"A\0B": "1"}, "A\0B"), ({"OK": "v", "V": "a\0b"}, "V")])
def test_env_names_and_values_the_sdk_would_refuse_are_refused(env, key):
    e = bad("spawn", {"template": "p", "env": env})
    assert e.data["param"] == "env" and e.data["key"] == key


def test_args_with_nul_name_their_index():
    e = bad("spawn", {"template": "p", "args": ["ok", "b\0d"]})
    assert e.data["param"] == "args" and e.data["index"] == 1


def test_identity_size_and_counts_are_capped():
    limits = Limits()
    e = bad("spawn", {"template": "p", "env": {"BIG": "x" * (2 << 20)}})
    assert e.data["param"] == "env" and e.data["limit"] == limits.max_identity_bytes
    half = "x" * (limits.max_identity_bytes // 2)
    e = bad("spawn", {"template": "p", "env": {"A": half}, "args": [half]})  # each fits, not together
    assert e.data["size"] == 2 * len(half) + 1
    at_limit = {"A": "x" * (limits.max_identity_bytes - 1)}
    assert req("spawn", {"template": "p", "env": at_limit}).params["env"] == at_limit
    assert "variables" in bad("spawn", {"template": "p",
                                        "env": {f"V{i}": "" for i in range(limits.max_env_vars + 1)}}).message
    assert "arguments" in bad("spawn", {"template": "p", "args": [""] * (limits.max_args + 1)}).message


@pytest.mark.parametrize("method,params,param", [
    ("spawn", {"template": "../etc"}, "template"),
    ("spawn", {"template": "Py-Hello"}, "template"),
    ("spawn", {"template": "a" * 64}, "template"),
    ("set_warm", {"template": "p/q", "min_warm": 1}, "template"),
    ("spawn", {"template": "p", "node": "../n"}, "node"),
    ("push", {"template": "p", "node": ""}, "node"),
    ("info", {"id": "../../etc"}, "id"),
    ("kill", {"id": "i" * 65}, "id"),
    ("fork_release", {"template": "-x"}, "template"),
    ("fetch_template", {"name": "p", "source": "h" * 5000}, "source"),
    ("set_warm", {"template": "p", "min_warm": 100000}, "min_warm"),
    ("wait", {"id": "i", "timeout": 1e300}, "timeout"),
    ("logs", {"id": "i", "offset": 2 ** 63}, "offset"),
])
def test_names_ids_and_sizes_are_checked(method, params, param):
    assert bad(method, params).data["param"] == param


def test_a_fork_of_a_live_copy_is_a_template_name_but_not_a_node_name():
    from pool.names import fork_name
    fork = fork_name("a" * 63)
    for method, params in [("spawn", {"template": fork}), ("fork_release", {"template": fork}),
                           ("fetch_template", {"name": fork, "source": "h:1"}),
                           ("fork_restore", {"template": fork, "source": "h:1", "build_id": "b",
                                             "token": "t"})]:
        assert req(method, params).params
    assert bad("push", {"template": "p", "node": fork}).data["param"] == "node"
    assert bad("spawn", {"template": "p+fork-xyz"}).data["param"] == "template"


def test_a_long_value_is_cut_short_in_the_error():
    e = bad("spawn", {"template": "p", "hostname": "h" * 100000})
    assert len(e.message) < 400 and "100000 chars" in e.message


def test_unknown_method_lists_known_ones():
    with pytest.raises(BadRequest) as e:
        req("explode")
    assert "'explode'" in e.value.message and "spawn" in e.value.message
    assert e.value.data["known"] == sorted(P.METHODS)
    with pytest.raises(BadRequest, match="unknown method"):
        P.validate_request({"v": 1, "id": 1, "method": 5, "params": {}})


def test_unknown_parameter_and_bad_params():
    with pytest.raises(BadRequest, match="unknown parameter 'colour'") as e:
        req("ping", {"colour": "red"})
    assert e.value.data["param"] == "colour"
    with pytest.raises(BadRequest, match="params must be a map"):
        P.validate_request({"v": 1, "id": 1, "method": "ping", "params": [1]})
    assert P.validate_request({"v": 1, "id": 1, "method": "ping"}).params == {}  # params may be left out


@pytest.mark.parametrize("msg", [
    {"id": 1, "method": "ping", "params": {}},                 # no version
    {"v": 2, "id": 1, "method": "ping", "params": {}},
    {"v": True, "id": 1, "method": "ping", "params": {}},
    {"v": 1, "method": "ping", "params": {}},                  # no id
    {"v": 1, "id": "1", "method": "ping", "params": {}},
    {"v": 1, "id": 0, "method": "ping", "params": {}},         # 0 is for connection errors
    [1],
])
def test_not_a_request_is_a_protocol_error(msg):
    with pytest.raises(ProtocolError):
        P.validate_request(msg)


def test_reply_parsing():
    assert P.parse_reply(P.make_result(4, [1])) == (4, [1], None)
    r = P.parse_reply(P.make_error(5, errors.InstanceNotFound("i-1")))
    assert isinstance(r.error, errors.InstanceNotFound) and r.error.data == {"instance_id": "i-1"}
    for bad in [{"id": "x", "result": 1}, {"id": 1}]:
        with pytest.raises(ProtocolError):
            P.parse_reply(bad)


@pytest.mark.parametrize("err", [
    None, 5, {"code": 3}, {"code": "no_capacity", "data": [1]}, {"code": "no_capacity", "data": {b"k": 1}},
    {"code": "no_capacity", "data": {"args": 5}}, {"code": "no_capacity", "data": {"not an ident": 1}},
])
def test_error_from_hostile_reply_is_still_a_pool_error(err):
    assert isinstance(P.error_from_wire(err), errors.PoolError)


# --- hello ------------------------------------------------------------------------------------------
def test_hello():
    assert P.check_hello(P.make_hello(None, "cli"), None) == "cli"
    assert P.check_hello(P.make_hello("whatever", "cli"), set()) == "cli"  # no tokens: not checked
    assert P.check_hello(P.make_hello("s2", "cli"), {"s1", "s2"}) == "cli"
    for token in [None, "s3", "", 5, "s1\u00e9"]:
        with pytest.raises(AuthError):
            P.check_hello({**P.make_hello(None, "c"), "token": token}, {"s1"})
    for bad in [P.make_request(1, "ping"), {**P.make_hello(None, "c"), "v": 2},
                {**P.make_hello(None, "c"), "client": 1}, []]:
        with pytest.raises(ProtocolError):
            P.check_hello(bad, None)


def test_hello_reply():
    assert P.check_hello_reply(P.make_hello_reply("node-1")) == "node-1"
    with pytest.raises(AuthError):
        P.check_hello_reply(P.make_error(0, AuthError("no")))
    with pytest.raises(ProtocolError):
        P.check_hello_reply({"id": 1, "result": 2})
