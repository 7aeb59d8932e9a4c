"""Template spec: read `templates/NAME/template.toml` into a frozen, validated `Spec`.

Every problem is a SpecError naming the file and the dotted field (e.g. "ready.tcp"), so a user can
fix the spec without reading this code. Nothing is run or probed here; only `cwd` is checked to exist.
"""
from __future__ import annotations

import hashlib
import json
import pwd
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pool.cr.cgroups import Limits
from pool.cr.sandbox import RunAs
from pool.errors import SpecError, TemplateNotFound
from pool.names import NAME_RULE, is_name
from pool.tomlfields import Check, Table, at_least, load_toml, one_of, port, positive

TOML_NAME = "template.toml"
READY_MODES = ("sdk", "tcp", "http", "stdout", "delay")
NETWORK_MODES = ("none", "isolated")
WARMUP_METHODS = ("GET", "POST")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
ID_LEN = 12  # length of an instance id, which replaces "{id}" in restore.hostname

HOST_MODE_PROBLEM = (
    'mode = "host" is not supported: copies restored into one network namespace would share the '
    "listening socket, so one copy would take every connection and another be silently starved; "
    'use "isolated" (each copy gets its own network namespace, its port published on 127.0.0.1)')

_TOP_KEYS = ("name", "command", "cwd", "description", "env", "ready", "warmup", "network",
             "checkpoint", "restore", "limits", "user")
_READY_KEYS = READY_MODES + ("timeout", "interval")
_WARMUP_KEYS = ("http", "repeat", "timeout", "method", "body")
_NETWORK_KEYS = ("mode", "port")
_CHECKPOINT_KEYS = ("tcp_close", "ghost_limit")
_RESTORE_KEYS = ("identity_timeout", "hostname", "method")
LIMITS_KEYS = ("memory", "cpus", "pids")
MIN_MEMORY = 4 << 20   # below this not even tini and a shell fit
# How a node makes each copy: "criu" restores the whole image; "fork" restores it once as a zygote
# and forks copies from it (SDK templates whose runtime can fork: Python); "lazy" restores with
# CRIU lazy pages, the build's recorded working set first.
RESTORE_METHODS = ("criu", "fork", "lazy")


# --- the parsed spec ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    mode: str          # one of READY_MODES
    value: object      # sdk: True, tcp: int port, http: str URL, stdout: str regex, delay: float seconds
    timeout: float
    interval: float


@dataclass(frozen=True)
class Warmup:
    urls: tuple[str, ...]
    repeat: int
    timeout: float
    method: str
    body: str | None


@dataclass(frozen=True)
class Network:
    mode: str          # "none" | "isolated"
    port: int | None   # the app's port, published on the host when isolated


@dataclass(frozen=True)
class CheckpointOpts:
    tcp_close: bool
    ghost_limit: int | None


@dataclass(frozen=True)
class RestoreOpts:
    identity_timeout: float
    hostname: str | None   # may contain "{id}", replaced by the instance id
    method: str = "criu"   # one of RESTORE_METHODS


@dataclass(frozen=True)
class Spec:
    name: str
    dir: Path
    path: Path
    command: tuple[str, ...]
    cwd: Path
    env: tuple[tuple[str, str], ...]
    description: str
    ready: Ready
    warmup: Warmup | None
    network: Network
    checkpoint: CheckpointOpts
    restore: RestoreOpts
    # [env] entries given as { secret_file = PATH }: name -> file. Never in the image or the manifest:
    # the node reads the files and hands the values to each copy at spawn (SDK templates only).
    secret_env: tuple[tuple[str, str], ...] = ()
    limits: Limits = Limits()      # unset ones come from the node's defaults at restore
    user: RunAs | None = None      # None: the app runs as root (as the builder)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        # Hash the parsed, defaulted values, so reformatting the file never looks like a change.
        canonical = json.dumps(self._body(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def sdk(self) -> bool:
        return self.ready.mode == "sdk"

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def to_dict(self) -> dict[str, Any]:
        return {**self._body(), "digest": self.digest}

    def _body(self) -> dict[str, Any]:
        warmup = None if self.warmup is None else {**asdict(self.warmup), "urls": list(self.warmup.urls)}
        return {
            "name": self.name, "dir": str(self.dir), "path": str(self.path),
            "command": list(self.command), "cwd": str(self.cwd), "env": dict(self.env),
            "description": self.description, "ready": asdict(self.ready), "warmup": warmup,
            "network": asdict(self.network), "checkpoint": asdict(self.checkpoint),
            "restore": self._restore_body(),
            **({"secret_env": dict(self.secret_env)} if self.secret_env else {}),
            # left out when unset, so templates written before them keep their digest
            **({"limits": self.limits.to_dict()} if self.limits.to_dict() else {}),
            **({"user": asdict(self.user)} if self.user is not None else {}),
        }

    def _restore_body(self) -> dict[str, Any]:
        # the default method is left out, so templates written before it keep their digest
        body = asdict(self.restore)
        if body["method"] == "criu":
            del body["method"]
        return body


def _name(v: str) -> str | None:
    return None if is_name(v) else f"{v!r} is not a valid name: {NAME_RULE}"


def _command(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must not be empty: the program and its arguments"
    empty = [i for i, s in enumerate(v) if not s]
    return f"item {empty[0]} is an empty string" if empty else None


def _url(v: str) -> str | None:
    try:
        u = urlsplit(v)
        port = u.port  # raises ValueError on a bad port
    except ValueError as e:
        return f"{v!r} is not a valid URL: {e}"
    if u.scheme != "http" or not u.hostname:
        return f"must be an http:// URL, got {v!r}"
    if u.hostname not in LOOPBACK_HOSTS:
        # probes and warmup talk to the copy's own loopback, never to another host
        return f"host must be 127.0.0.1 or localhost, got {u.hostname!r} in {v!r}"
    return f"{v!r} has port 0" if port == 0 else None


def _urls(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must list at least one URL"
    return next((p for p in map(_url, v) if p), None)


def _regex(v: str) -> str | None:
    if not v:
        return "must not be empty (it would match any line)"
    try:
        re.compile(v)
    except re.error as e:
        return f"not a valid regular expression: {e}"
    return None


def _sdk(v: bool) -> str | None:
    return None if v else "set sdk = true, or leave it out and pick another mode"


def _network_mode(v: str) -> str | None:
    return HOST_MODE_PROBLEM if v == "host" else one_of(NETWORK_MODES)(v)


def _hostname(v: str) -> str | None:
    filled = v.replace("{id}", "x" * ID_LEN)
    if not re.fullmatch(r"[A-Za-z0-9.{}-]+", v) or "{" in filled or "}" in filled:
        return f"may only contain letters, digits, '.', '-' and the placeholder {{id}}, got {v!r}"
    if len(filled) > 63:
        return f"is {len(filled)} chars with {{id}} filled in ({ID_LEN} chars); at most 63"
    return None


def parse_limits(table: Table | None) -> Limits:
    """A [limits] table (a template's, or the service's defaults): memory = "512M" (or bytes),
    cpus = 1.5, pids = 256; each optional."""
    if table is None:
        return Limits()
    memory = table.size("memory")
    if memory is not None and memory < MIN_MEMORY:
        table.fail("memory", f"{memory} bytes is too little to run anything; at least 4M")
    return Limits(memory=memory,
                  cpus=table.get("cpus", "float", None, at_least_cpus),
                  pids=table.get("pids", "int", None, at_least(2)))  # tini and the app


def at_least_cpus(v: float) -> str | None:
    return positive(v) or (None if v >= 0.01 else f"must be at least 0.01, got {v}")


def parse_user(top: Table) -> RunAs | None:
    """user = "NAME" (an account on this machine) or "UID:GID"; never root."""
    text = top.get("user", "str", None)
    if text is None:
        return None
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        run_as = RunAs(uid=int(m.group(1)), gid=int(m.group(2)))
    else:
        try:
            pw = pwd.getpwnam(text)
        except KeyError:
            top.fail("user", f"no user {text!r} on this machine; give an existing account or "
                             '"UID:GID"')
        run_as = RunAs(uid=pw.pw_uid, gid=pw.pw_gid, name=text, home=pw.pw_dir)
    if run_as.uid == 0:
        top.fail("user", f"{text!r} is root: leave user out to run as root")
    return run_as


def _url_port(url: str) -> int:
    return urlsplit(url).port or 80


_READY_VALUE: dict[str, tuple[str, Check]] = {
    "sdk": ("bool", _sdk), "tcp": ("int", port), "http": ("str", _url),
    "stdout": ("str", _regex), "delay": ("float", positive),
}


# --- loading -----------------------------------------------------------------------------------------
def load_spec(path: str | Path) -> Spec:
    """Read and validate a template; `path` is the template folder or its template.toml."""
    p = Path(path).expanduser()
    toml = p if p.is_file() else p / TOML_NAME
    toml = toml.resolve()
    if not toml.is_file():
        raise SpecError(str(toml.parent), None, f"no {TOML_NAME} here")
    raw = load_toml(toml)
    return _parse(toml, raw)


def _parse(toml: Path, raw: dict) -> Spec:
    folder = toml.parent
    top = Table(toml, raw, "", _TOP_KEYS)
    empty = lambda prefix: Table(toml, {}, prefix, ())  # noqa: E731 - an absent table reads as defaults

    name = top.get("name", "str", None, _name)
    if name is None:
        name = folder.name
        if _name(name):
            top.fail("name", f"not given, and the folder name {name!r} is not a valid name "
                             f"({NAME_RULE}); set name = \"...\"")

    if isinstance(raw.get("command"), str):
        try:
            argv = shlex.split(raw["command"])
        except ValueError:
            argv = [raw["command"]]
        top.fail("command", f"expected a list of strings, got string; use a list: command = {json.dumps(argv)}")
    command = top.get("command", "strs", check=_command)

    cwd = (folder / top.get("cwd", "str", ".")).resolve()
    if not cwd.is_dir():
        top.fail("cwd", f"{cwd} {'is not a directory' if cwd.exists() else 'does not exist'}")

    env_table = top.table("env", None) or empty("env")
    plain = [k for k in env_table.data if not isinstance(env_table.data[k], dict)]
    env = tuple(sorted((k, env_table.get(k, "str")) for k in plain))
    secret_env = tuple(sorted((k, _secret_file(env_table, k, folder))
                              for k in env_table.data if k not in plain))
    for k, v in env + secret_env:
        if not k or "=" in k or "\0" in k or "\0" in v:
            env_table.fail(k, "not a valid environment variable (empty name, '=' in the name, or a NUL byte)")

    rt = top.table("ready", _READY_KEYS)
    if rt is None:
        top.fail("ready", "missing [ready] table: say how to tell the app has booted, with one of "
                          + ", ".join(READY_MODES))
    given = [m for m in READY_MODES if m in rt.data]
    if len(given) != 1:
        rt.fail(None, f"give exactly one readiness mode ({', '.join(READY_MODES)}), got "
                      + (", ".join(given) if given else "none"))
    kind, check = _READY_VALUE[given[0]]
    ready = Ready(mode=given[0], value=rt.get(given[0], kind, check=check),
                  timeout=rt.get("timeout", "float", 120.0, positive),
                  interval=rt.get("interval", "float", 0.05, positive))

    wt = top.table("warmup", _WARMUP_KEYS)
    warmup = None if wt is None else Warmup(
        urls=wt.get("http", "strs", check=_urls),
        repeat=wt.get("repeat", "int", 1, at_least(1)),
        timeout=wt.get("timeout", "float", 10.0, positive),
        method=wt.get("method", "str", "GET", one_of(WARMUP_METHODS)),
        body=wt.get("body", "str", None))

    nt = top.table("network", _NETWORK_KEYS) or empty("network")
    network = Network(mode=nt.get("mode", "str", "none", _network_mode), port=nt.get("port", "int", None, port))
    if network.mode == "isolated" and network.port is None:
        nt.fail("port", 'required with mode = "isolated": the port the app listens on, published on the host')
    if network.mode == "none" and network.port is not None:
        nt.fail("port", 'only used with mode = "isolated"; with mode = "none" nothing is published')
    if network.mode == "isolated" and ready.mode in ("tcp", "http"):
        # the probe reaches the app through the published port, so it must be the same one
        probed = ready.value if ready.mode == "tcp" else _url_port(str(ready.value))
        if probed != network.port:
            rt.fail(ready.mode, f"probes port {probed} but network.port is {network.port}; "
                                'with mode = "isolated" they must be the same')

    ct = top.table("checkpoint", _CHECKPOINT_KEYS) or empty("checkpoint")
    checkpoint = CheckpointOpts(tcp_close=ct.get("tcp_close", "bool", False),
                                ghost_limit=ct.get("ghost_limit", "int", None, at_least(0)))

    st = top.table("restore", _RESTORE_KEYS) or empty("restore")
    if "identity_timeout" in st.data and ready.mode != "sdk":
        st.fail("identity_timeout", "only used by sdk templates (ready.sdk = true): "
                                    "no other app acknowledges its identity")
    restore = RestoreOpts(identity_timeout=st.get("identity_timeout", "float", 10.0, positive),
                          hostname=st.get("hostname", "str", None, _hostname),
                          method=st.get("method", "str", "criu", one_of(RESTORE_METHODS)))
    if restore.method == "fork" and ready.mode != "sdk":
        st.fail("method", '"fork" needs an SDK template (ready.sdk = true): the zygote forks each '
                          "copy when asked over its control channel, which only the SDK speaks")

    if secret_env and ready.mode != "sdk":
        env_table.fail(secret_env[0][0], "a secret is handed over at spawn, which only SDK templates "
                                         "(ready.sdk = true) take; other templates get [env] at boot")
    return Spec(name=name, dir=folder, path=toml, command=command, cwd=cwd, env=env, secret_env=secret_env,
                description=top.get("description", "str", ""), ready=ready, warmup=warmup,
                network=network, checkpoint=checkpoint, restore=restore,
                limits=parse_limits(top.table("limits", LIMITS_KEYS)), user=parse_user(top))


def _secret_file(env_table: Table, key: str, folder: Path) -> str:
    """The file of a secret [env] entry, `KEY = { secret_file = "PATH" }` (relative to the template)."""
    t = env_table.table(key, ("secret_file",))
    return str((folder / t.get("secret_file", "str", check=_not_empty)).resolve())


def _not_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def find_template_dir(name_or_path: str, search: list[Path]) -> Path:
    """The template folder for a path (folder or its template.toml) or a name looked up in `search`."""
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.name == TOML_NAME:
        return p.parent.resolve()
    # A bare name is only taken as a folder here when it holds a template, so a stray local folder
    # named like a template does not shadow the search path.
    path_like = "/" in name_or_path or name_or_path.startswith(".")
    if p.is_dir() and (path_like or (p / TOML_NAME).is_file()):
        return p.resolve()
    if path_like:
        raise TemplateNotFound(name_or_path)
    for d in search:
        if (Path(d) / name_or_path / TOML_NAME).is_file():
            return (Path(d) / name_or_path).resolve()
    raise TemplateNotFound(name_or_path, where=", ".join(map(str, search)) or None)
