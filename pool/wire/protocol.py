"""The wire protocol: framing, message shapes and the table of methods. Pure: no I/O.

A frame is a big-endian u32 payload length followed by one msgpack map.

    hello (client first)  {"v": 1, "hello": "pool", "token": str | nil, "client": str}
    hello reply           {"hello": "pool", "v": 1, "server": str}
    request               {"v": 1, "id": int > 0, "method": str, "params": map}
    reply                 {"id": int, "result": any} | {"id": int, "error": {"code", "message", "data"}}

Errors about the connection as a whole (bad frame, failed hello) use id 0 and are followed by a close.
On TCP all of it travels inside mutual TLS (pool/wire/tls.py); the hello's token is a second factor.
`source_name` (fetch_template, fork_restore) is the node name the source's certificate must carry.
"""
from __future__ import annotations

import copy
import hmac
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import msgpack

from pool import errors
from pool.config import Limits
from pool.errors import AuthError, BadRequest, PoolError, ProtocolError
from pool.names import NAME_RE, NAME_RULE, STORED_NAME_RE

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
_LIMITS = Limits()
MAX_FRAME = _LIMITS.max_frame
HELLO_MAX_FRAME = 64 * 1024  # before authentication nobody gets to send us megabytes


# --- framing ----------------------------------------------------------------------------------------
def encode_frame(obj: Any, max_frame: int = MAX_FRAME) -> bytes:
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode message: {e}") from e
    if len(payload) > max_frame:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the limit of {max_frame}",
                            size=len(payload), limit=max_frame)
    return HEADER.pack(len(payload)) + payload


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


def decode_payload(payload: bytes) -> dict:
    """One frame's payload to a map. unpackb caps every container and string at the payload's own
    length, so a few hostile bytes cannot announce a huge array; nesting depth is capped by msgpack."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError/StackError/UnicodeError
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is not a map but {_kind(obj)}")
    return obj


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole messages back.

    The declared length is checked as soon as the 4 header bytes are in, so an oversized frame is
    refused before its payload is buffered. After a ProtocolError the decoder is unusable."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame  # public: the server lowers it until the hello is done
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out: list[dict] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self.max_frame:
                raise ProtocolError(f"frame declares {size} bytes, over the limit of {self.max_frame}",
                                    size=size, limit=self.max_frame)
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            out.append(decode_payload(payload))
        return out


# --- parameter types ----------------------------------------------------------------------------------
def _kind(v: Any) -> str:
    return "None" if v is None else type(v).__name__


def _got(v: Any) -> str:
    # Scalars show their value (a negative count, a nan); containers only their kind.
    if v is None or isinstance(v, (bool, int, float)):
        return f"got {_kind(v)} {v!r}" if v is not None else "got None"
    return f"got {_kind(v)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Type:
    name: str                                # as shown in error messages
    problem: Callable[[Any], str | Problem | None]  # None if the value is acceptable, else what is wrong
    convert: Callable[[Any], Any] = lambda v: v


def _scalar(name: str, ok: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v) -> Type:
    return Type(name, lambda v: None if ok(v) else _got(v), convert)


def optional(t: Type) -> Type:
    return Type(f"{t.name} | None",
                lambda v: None if v is None else t.problem(v),
                lambda v: None if v is None else t.convert(v))


def one_of(*choices: str) -> Type:
    return _scalar(" | ".join(map(repr, choices)), lambda v: isinstance(v, str) and v in choices)


STR = _scalar("str", lambda v: isinstance(v, str))
INT = _scalar("int", _is_int)
BOOL = _scalar("bool", lambda v: isinstance(v, bool))
MAX_COUNT = 2 ** 53  # offsets and counts beyond this overflow a file offset or are typos
COUNT = _scalar("int in [0, 2**53]", lambda v: _is_int(v) and 0 <= v <= MAX_COUNT)
FLOAT = _scalar("float", _is_num, float)
DURATION = _scalar(f"float in [0, {_LIMITS.max_duration:g}]",
                   lambda v: _is_num(v) and 0 <= v <= _LIMITS.max_duration, float)
MIN_WARM = _scalar(f"int in [0, {_LIMITS.max_min_warm}]",
                   lambda v: _is_int(v) and 0 <= v <= _LIMITS.max_min_warm)


# --- names and identity: what a caller hands to a copy -------------------------------------------------
class Problem(NamedTuple):
    """What is wrong with a value and where inside it (an env key, an arg index), for the error's data."""

    text: str
    where: dict[str, Any]


def _show(v: Any) -> str:
    """A caller's string in an error, cut short: the error goes back to them and into logs."""
    text = repr(v)
    return text if len(text) <= 66 else text[:60] + "...'" + f" ({len(v)} chars)"


def _text_problem(ok: Callable[[str], Any]) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, str) and ok(v) else (
        f"got {_show(v)}" if isinstance(v, str) else _got(v))


def _pattern(name: str, regex: re.Pattern) -> Type:
    return Type(name, _text_problem(regex.fullmatch))


# template.toml's rule for node names; templates may also be forks of live copies (TEMPLATE+fork-HEX,
# the store's rule); instance ids and hostnames have their own.
NAME = _pattern(f"a name ({NAME_RULE})", NAME_RE)
TEMPLATE = _pattern(f"a template name ({NAME_RULE}; a fork's: NAME+fork-16 hex digits)",
                    STORED_NAME_RE)
INSTANCE_ID = _pattern("an instance id (letters, digits, '.', '_' or '-', at most 64 chars)",
                       re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"))
# sethostname(2) takes at most 64 bytes; the charset is what a resolver and a shell prompt accept.
HOSTNAME = _pattern("a hostname (1-64 letters, digits, '-' or '.', not starting with '-' or '.')",
                    re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}"))
SNAPSHOT = _pattern("a snapshot id or tag (letters, digits, '.', '_' or '-', at most 64 chars)",
                    re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"))
# what a migrated instance keeps of its identity (the source node's record of it)
MIGRATED = Type("a map of the instance's template, hostname, owner, env_keys, args, created",
                lambda v: None if isinstance(v, dict) and set(v) <= {
                    "template", "hostname", "owner", "env_keys", "args", "created"} else _got(v))
TEXT = Type("str of at most 4096 chars", _text_problem(lambda v: len(v) <= 4096))


def _utf8_len(texts: Any) -> int:
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def _env_problem(v: Any) -> str | Problem | None:
    """What execve and the SDKs' os.environ would refuse, refused before a copy gets it."""
    if not isinstance(v, dict):
        return _got(v)
    if len(v) > _LIMITS.max_env_vars:
        return f"got {len(v)} variables, over the limit of {_LIMITS.max_env_vars}"
    for k, x in v.items():
        if not isinstance(k, str) or not isinstance(x, str):
            return Problem(f"got dict with a {_kind(k)} key and a {_kind(x)} value",
                           {"key": k[:64] if isinstance(k, str) else _kind(k)})
        if not k or "=" in k or "\0" in k:
            return Problem(f"got the variable name {_show(k)}: names are non-empty, without '=' or NUL",
                           {"key": k[:64]})
        if "\0" in x:
            return Problem(f"the value of {_show(k)} contains a NUL", {"key": k[:64]})
    return None


def _args_problem(v: Any) -> str | Problem | None:
    if not isinstance(v, list):
        return _got(v)
    if len(v) > _LIMITS.max_args:
        return f"got {len(v)} arguments, over the limit of {_LIMITS.max_args}"
    for i, x in enumerate(v):
        if not isinstance(x, str):
            return Problem(f"got list with a {_kind(x)} at index {i}", {"index": i})
        if "\0" in x:
            return Problem(f"the argument at index {i} contains a NUL", {"index": i})
    return None


ENV = Type("dict[str, str]", _env_problem, dict)
ARGS = Type("list[str]", _args_problem, list)


def _identity_bytes(env: dict[str, str], args: list[str]) -> int:
    """What the identity's env and args weigh (UTF-8), as capped by Limits.max_identity_bytes."""
    return _utf8_len(env) + _utf8_len(env.values()) + _utf8_len(args)


def _identity_too_large(method: str, params: dict[str, Any]) -> BadRequest | None:
    size = _identity_bytes(params.get("env") or {}, params.get("args") or [])
    if size <= _LIMITS.max_identity_bytes:
        return None
    return BadRequest(f"{method}: env and args together are {size} bytes, over the limit of "
                      f"{_LIMITS.max_identity_bytes}", method=method, param="env",
                      size=size, limit=_LIMITS.max_identity_bytes)


class Param(NamedTuple):
    type: Type
    required: bool = False
    default: Any = None
    internal: bool = False   # set by the coordinator for its nodes, not offered to clients


def req(t: Type) -> Param:
    return Param(t, True)


def opt(t: Type, default: Any = None) -> Param:
    return Param(t, False, default)


def internal(t: Type) -> Param:
    return Param(t, False, None, internal=True)


OPT_NAME, OPT_TEMPLATE, OPT_HOSTNAME = optional(NAME), optional(TEMPLATE), optional(HOSTNAME)
METHODS: dict[str, dict[str, Param]] = {
    "ping": {},
    "spawn": {"template": req(TEMPLATE), "env": opt(ENV, {}), "args": opt(ARGS, []),
              "timeout": opt(DURATION, 30.0), "node": opt(OPT_NAME), "hostname": opt(OPT_HOSTNAME),
              # the spawning uid: the coordinator sets it from the caller's credentials
              "owner": internal(optional(COUNT))},
    "kill": {"id": req(INSTANCE_ID), "grace": opt(DURATION, 3.0)},
    "wait": {"id": req(INSTANCE_ID), "timeout": opt(optional(DURATION))},
    "list": {"template": opt(OPT_TEMPLATE)},
    "info": {"id": req(INSTANCE_ID)},
    "logs": {"id": req(INSTANCE_ID), "stream": opt(one_of("stdout", "stderr"), "stdout"),
             "offset": opt(COUNT, 0), "limit": opt(COUNT, 65536)},
    "templates": {},
    "stats": {},
    "set_warm": {"template": req(TEMPLATE), "min_warm": req(MIN_WARM)},
    # coordinator: its nodes, shipping a template to one, forking an instance onto one
    "nodes": {},
    "push": {"template": req(TEMPLATE), "node": req(NAME), "timeout": opt(DURATION, 600.0)},
    "fork": {"id": req(INSTANCE_ID), "node": opt(OPT_NAME), "lazy": opt(BOOL, False),
             "hostname": opt(OPT_HOSTNAME), "timeout": opt(DURATION, 120.0)},
    # running instances: checkpoint, time-travel, suspend and resume
    "checkpoint": {"id": req(INSTANCE_ID), "tag": opt(optional(SNAPSHOT)), "keep": opt(BOOL, False),
                   "timeout": opt(DURATION, 120.0)},
    "snapshots": {"id": req(INSTANCE_ID)},
    "rollback": {"id": req(INSTANCE_ID), "snapshot": opt(optional(SNAPSHOT)),
                 "timeout": opt(DURATION, 60.0)},
    "suspend": {"id": req(INSTANCE_ID), "timeout": opt(DURATION, 120.0)},
    "resume": {"id": req(INSTANCE_ID), "timeout": opt(DURATION, 60.0)},
    "migrate": {"id": req(INSTANCE_ID), "node": req(NAME), "lazy": opt(BOOL, False),
                "timeout": opt(DURATION, 120.0)},
    # node (`pool agent`), asked by a coordinator
    "migrate_out": {"id": req(INSTANCE_ID), "lazy": opt(BOOL, False), "timeout": opt(DURATION, 120.0)},
    "migrate_in": {"id": req(INSTANCE_ID), "template": req(TEMPLATE), "source": req(TEXT),
                   "build_id": req(TEXT), "token": req(TEXT), "instance": req(MIGRATED),
                   "timeout": opt(DURATION, 60.0), "source_name": opt(optional(TEXT)),
                   "page_server": opt(optional(TEXT))},
    "migrate_done": {"id": req(INSTANCE_ID), "moved": req(BOOL), "template": req(TEMPLATE),
                     "timeout": opt(DURATION, 60.0)},
    "facts": {},
    "fetch_template": {"name": req(TEMPLATE), "source": req(TEXT), "build_id": opt(optional(TEXT)),
                       "token": opt(optional(TEXT)), "timeout": opt(DURATION, 600.0),
                       "source_name": opt(optional(TEXT))},
    "fork_checkpoint": {"id": req(INSTANCE_ID), "lazy": opt(BOOL, False),
                        "timeout": opt(DURATION, 120.0)},
    "fork_release": {"template": req(TEMPLATE), "abort": opt(BOOL, False)},
    "fork_restore": {"template": req(TEMPLATE), "source": req(TEXT), "build_id": req(TEXT),
                     "token": req(TEXT), "page_server": opt(optional(TEXT)),
                     "hostname": opt(OPT_HOSTNAME), "timeout": opt(DURATION, 60.0),
                     "source_name": opt(optional(TEXT))},
}
# Which side answers which methods (both share the table above).
NODE_METHODS = frozenset({"ping", "spawn", "kill", "wait", "list", "info", "logs", "templates",
                          "stats", "set_warm", "facts", "fetch_template", "fork_checkpoint",
                          "fork_release", "fork_restore",
                          "checkpoint", "snapshots", "rollback", "suspend", "resume",
                          "migrate_out", "migrate_in", "migrate_done"})
COORDINATOR_METHODS = frozenset(set(METHODS) - {"facts", "fetch_template", "fork_checkpoint",
                                                "fork_release", "fork_restore", "migrate_out",
                                                "migrate_in", "migrate_done"})


# --- messages -------------------------------------------------------------------------------------------
class Request(NamedTuple):
    id: int
    method: str
    params: dict[str, Any]


def validate_params(method: Any, params: Any) -> dict[str, Any]:
    """Check params against METHODS[method]; returns them with defaults filled in."""
    schema = METHODS.get(method) if isinstance(method, str) else None
    if schema is None:
        known = sorted(METHODS)
        raise BadRequest(f"unknown method {method!r}; known methods: {', '.join(known)}",
                         method=method if isinstance(method, str) else _kind(method), known=known)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"{method}: params must be a map, {_got(params)}", method=method)
    for name in params:
        if name not in schema:
            raise BadRequest(f"{method}: unknown parameter {name!r}; accepted: {', '.join(schema) or 'none'}",
                             method=method, param=str(name), accepted=list(schema))
    out: dict[str, Any] = {}
    for name, p in schema.items():
        if name not in params:
            if p.required:
                raise BadRequest(f"{method}: missing required parameter {name!r} ({p.type.name})",
                                 method=method, param=name, expected=p.type.name)
            out[name] = copy.deepcopy(p.default)  # defaults may be mutable ({} and [])
            continue
        problem = p.type.problem(params[name])
        if problem:
            text, where = problem if isinstance(problem, Problem) else (problem, {})
            raise BadRequest(f"{method}: parameter {name!r} must be {p.type.name}, {text}",
                             method=method, param=name, expected=p.type.name, got=text, **where)
        out[name] = p.type.convert(params[name])
    if "env" in schema and (too_large := _identity_too_large(method, out)):
        raise too_large
    return out


def _check_version(msg: dict) -> None:
    v = msg.get("v")
    if not (_is_int(v) and v == PROTOCOL_VERSION):
        raise ProtocolError(f"unsupported protocol version {v!r}; this side speaks {PROTOCOL_VERSION}",
                            supported=[PROTOCOL_VERSION])


def validate_request(msg: Any) -> Request:
    """ProtocolError if msg is not a request at all (the connection is then closed);
    BadRequest if it is one with a wrong method or parameters (msg["id"] is then valid)."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"request is not a map but {_kind(msg)}")
    _check_version(msg)
    rid = msg.get("id")
    if not (_is_int(rid) and rid > 0):
        raise ProtocolError(f"request id must be an int > 0, {_got(rid)}")
    method = msg.get("method")
    return Request(rid, method, validate_params(method, msg.get("params")))


def make_request(rid: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "method": method, "params": params or {}}


def make_result(rid: int, result: Any) -> dict[str, Any]:
    return {"id": rid, "result": result}


def make_error(rid: int, err: PoolError) -> dict[str, Any]:
    return {"id": rid, "error": err.to_wire()}


class Reply(NamedTuple):
    id: int
    result: Any
    error: PoolError | None


def error_from_wire(err: Any) -> PoolError:
    """errors.from_wire, made safe against whatever a peer puts in an error map."""
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        return ProtocolError(f"malformed error in reply: {_kind(err)}")
    data = err.get("data")
    if not isinstance(data, dict) or not all(isinstance(k, str) and k.isidentifier() for k in data):
        err = {**err, "data": {}}
    try:
        return errors.from_wire(err)
    except Exception:  # e.g. a data key that clashes with an attribute
        return errors.from_wire({**err, "data": {}})


def parse_reply(msg: dict) -> Reply:
    rid = msg.get("id")
    if not _is_int(rid):
        raise ProtocolError(f"reply id must be an int, {_got(rid)}")
    if "error" in msg:
        return Reply(rid, None, error_from_wire(msg["error"]))
    if "result" not in msg:
        raise ProtocolError("reply has neither result nor error")
    return Reply(rid, msg["result"], None)


# --- hello ---------------------------------------------------------------------------------------------
def make_hello(token: str | None, client: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "hello": "pool", "token": token, "client": client}


def make_hello_reply(server: str) -> dict[str, Any]:
    return {"hello": "pool", "v": PROTOCOL_VERSION, "server": server}


def _token_ok(token: Any, tokens: set[str]) -> bool:
    if not isinstance(token, str):
        return False
    given = token.encode("utf-8", "surrogatepass")
    ok = False
    for t in tokens:  # no early exit: every token costs the same
        ok |= hmac.compare_digest(given, t.encode("utf-8", "surrogatepass"))
    return ok


def check_hello(msg: Any, tokens: set[str] | None) -> str:
    """Server side: returns the client's name; ProtocolError or AuthError otherwise.
    With no tokens configured the token is ignored."""
    if not isinstance(msg, dict) or msg.get("hello") != "pool":
        raise ProtocolError("expected a hello frame first")
    _check_version(msg)
    client = msg.get("client", "")
    if not isinstance(client, str):
        raise ProtocolError(f"hello: client must be str, {_got(client)}")
    if tokens and not _token_ok(msg.get("token"), tokens):
        raise AuthError("authentication failed: missing or wrong token")
    return client


def check_hello_reply(msg: dict) -> str:
    """Client side: returns the server's name; raises the server's refusal as a typed error."""
    if "error" in msg:
        raise error_from_wire(msg["error"])
    if msg.get("hello") != "pool":
        raise ProtocolError("server did not answer the hello")
    _check_version(msg)
    server = msg.get("server", "")
    return server if isinstance(server, str) else ""
