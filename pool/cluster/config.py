"""The service's configuration: `pool serve --config FILE` plus command-line overrides.

    [service]                      # all optional
    socket = "/run/pool/pool.sock"
    tcp = "127.0.0.1:7070"         # needs token_file: TCP is always authenticated
    token_file = "/etc/pool/token" # 0600, at least 16 characters
    metrics = "127.0.0.1:9464"
    drain_timeout = 10.0           # seconds in-flight spawns get on SIGTERM
    on_shutdown = "kill"           # or "leave": live instances outlive the service
    max_live = 32                  # default cap per template
    capacity = 64                  # copies this node holds in all templates together (enforced)
    local_node = true              # false: a pure coordinator; spawns go to [nodes.*] only
    source = "10.0.0.1:0"          # where the coordinator serves templates to agents (HOST:PORT)
    heartbeat_s = 1.0              # nodes are pinged this often; down after 3 missed
    max_connections = 1024         # per listener; more get an error and are closed
    idle_connection_timeout = 300  # seconds a connection may idle after its hello (0: no limit)
    max_log_bytes = 8388608        # each copy's stdout.log and stderr.log: oldest bytes cut beyond
    restore_timeout = 60.0         # seconds one CRIU restore may take before it is killed
    [nodes.n2]                     # a `pool agent` (see docs/nodes.md)
    address = "10.0.0.2:7070"
    token_file = "/etc/pool/n2.token"
    [templates.py-hello]
    min_warm = 2                   # restored copies kept waiting for a spawn
    max_live = 32                  # warm + live copies
    ttl = 0                        # seconds a spawned copy may live (0: no limit)
    idle_timeout = 0               # seconds without traffic through its port (0: no limit)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool import config, names
from pool.errors import SpecError
from pool.names import is_name
from pool.node.settings import NodeSettings
from pool.node.warm import WarmSettings
from pool.tomlfields import Table, at_least, load_toml, one_of

SERVICE_KEYS = ("socket", "store", "run_dir", "tcp", "token_file", "metrics", "drain_timeout",
                "on_shutdown", "kill_grace", "restore_concurrency", "quarantine_after",
                "early_death_s", "exited_history", "max_live", "capacity", "local_node",
                "source", "heartbeat_s",
                # crash recovery and copies' logs
                "max_log_bytes", "restore_timeout")
# RPC connection limits (floods)
SERVICE_KEYS += ("max_connections", "idle_connection_timeout")
NODE_KEYS = ("address", "token_file")
TEMPLATE_KEYS = ("min_warm", "max_live", "ttl", "idle_timeout")
PATH_KEYS = ("socket", "store", "run_dir", "token_file")
HOSTPORT_KEYS = ("tcp", "metrics", "source")


@dataclass(frozen=True)
class ServiceConfig:
    socket: Path = field(default_factory=config.socket_path)
    store: Path = field(default_factory=config.store_path)
    run_dir: Path = field(default_factory=config.run_dir)
    tcp: tuple[str, int] | None = None
    token_file: Path | None = None
    metrics: tuple[str, int] | None = None
    drain_timeout: float = 10.0
    on_shutdown: str = "kill"            # "kill" | "leave" live instances
    kill_grace: float = 3.0
    restore_concurrency: int = 4
    quarantine_after: int = 3
    early_death_s: float = 2.0
    exited_history: int = 1000           # exited instances kept for info/logs
    capacity: int = 64                   # copies this node takes in all templates together
    local_node: bool = True              # the coordinator also runs copies itself (node "local")
    source: tuple[str, int] | None = None  # template source for agents; default: host of tcp, port 0
    heartbeat_s: float = 1.0
    # crash recovery and copies' logs
    max_log_bytes: int = 8 << 20         # per stream of a copy; beyond it the oldest bytes are cut
    restore_timeout: float = 60.0        # one CRIU restore; CRIU is killed after it
    defaults: WarmSettings = WarmSettings()
    templates: dict[str, WarmSettings] = field(default_factory=dict)
    nodes: dict[str, "NodeConfig"] = field(default_factory=dict)
    # RPC connection limits (floods)
    max_connections: int = 1024          # per listener (unix socket, TCP, agent)
    idle_connection_timeout: float = 300.0  # after the hello, no request in flight; 0: never

    def node_settings(self) -> NodeSettings:
        """What this service's node runtime (the local node, or an agent's) is configured with."""
        return NodeSettings(
            store=self.store, run_dir=self.run_dir, capacity=self.capacity,
            kill_grace=self.kill_grace, drain_timeout=self.drain_timeout,
            on_shutdown=self.on_shutdown, restore_concurrency=self.restore_concurrency,
            quarantine_after=self.quarantine_after, early_death_s=self.early_death_s,
            exited_history=self.exited_history, max_log_bytes=self.max_log_bytes,
            restore_timeout=self.restore_timeout, defaults=self.defaults,
            templates=dict(self.templates))

    def connection_limits(self) -> dict[str, Any]:
        """RpcServer keyword arguments for the connection limits."""
        return {"max_connections": self.max_connections,
                "idle_timeout": self.idle_connection_timeout or None}


@dataclass(frozen=True)
class NodeConfig:
    """A remote node (`pool agent`) the coordinator schedules onto."""

    name: str
    address: tuple[str, int]
    token_file: Path


def parse_hostport(text: str, path: str, fld: str) -> tuple[str, int]:
    try:
        return names.parse_hostport(text)
    except ValueError as e:
        raise SpecError(path, fld, str(e)) from None


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be more than 0, got {v}"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServiceConfig:
    """Read a service TOML file (optional) and apply overrides (CLI flags; None means unset)."""
    where = Path(path) if path else Path("<defaults>")
    top = Table(where, load_toml(where) if path else {}, "", ("service", "templates", "nodes"))
    s = top.table("service", SERVICE_KEYS) or Table(where, {}, "service", ())
    max_live_default = s.get("max_live", "int", 32, at_least(1))
    kw: dict[str, Any] = dict(
        drain_timeout=s.get("drain_timeout", "float", 10.0, _non_negative),
        on_shutdown=s.get("on_shutdown", "str", "kill", one_of(("kill", "leave"))),
        kill_grace=s.get("kill_grace", "float", 3.0, _non_negative),
        restore_concurrency=s.get("restore_concurrency", "int", 4, at_least(1)),
        quarantine_after=s.get("quarantine_after", "int", 3, at_least(1)),
        early_death_s=s.get("early_death_s", "float", 2.0, _non_negative),
        exited_history=s.get("exited_history", "int", 1000, at_least(0)),
        capacity=s.get("capacity", "int", 64, at_least(1)),
        local_node=s.get("local_node", "bool", True),
        heartbeat_s=s.get("heartbeat_s", "float", 1.0, _positive),
        max_connections=s.get("max_connections", "int", 1024, at_least(1)),
        idle_connection_timeout=s.get("idle_connection_timeout", "float", 300.0, _non_negative),
        # crash recovery and copies' logs
        max_log_bytes=s.get("max_log_bytes", "int", 8 << 20, at_least(4096)),
        restore_timeout=s.get("restore_timeout", "float", 60.0, _positive),
        defaults=WarmSettings(0, max_live_default))
    for key in PATH_KEYS:
        if v := s.get(key, "str", None):
            kw[key] = Path(v)
    for key in HOSTPORT_KEYS:
        if v := s.get(key, "str", None):
            kw[key] = parse_hostport(v, str(where), f"service.{key}")
    templates = top.table("templates", None) or Table(where, {}, "templates", ())
    kw["templates"] = {}
    for name in templates.data:
        if not is_name(name):
            templates.fail(name, "not a valid template name (a-z, 0-9, . _ -)")
        t = templates.table(name, TEMPLATE_KEYS)
        ws = WarmSettings(min_warm=t.get("min_warm", "int", 0, at_least(0)),
                          max_live=t.get("max_live", "int", max_live_default, at_least(1)),
                          ttl=t.get("ttl", "float", 0.0, _non_negative),
                          idle_timeout=t.get("idle_timeout", "float", 0.0, _non_negative))
        if ws.min_warm > ws.max_live:
            t.fail("min_warm", f"{ws.min_warm} is more than max_live ({ws.max_live})")
        kw["templates"][name] = ws
    nodes = top.table("nodes", None) or Table(where, {}, "nodes", ())
    kw["nodes"] = {}
    for name in nodes.data:
        if not is_name(name) or name == "local":
            nodes.fail(name, "not a valid node name (a-z, 0-9, . _ -; not 'local')")
        n = nodes.table(name, NODE_KEYS)
        kw["nodes"][name] = NodeConfig(
            name, parse_hostport(n.get("address", "str"), str(where), f"nodes.{name}.address"),
            Path(n.get("token_file", "str")))
    for key, v in overrides.items():
        if v is None:
            continue
        if key in HOSTPORT_KEYS and isinstance(v, str):
            v = parse_hostport(v, "command line", f"--{key}")
        elif key in PATH_KEYS:
            v = Path(v)
        kw[key] = v
    if kw.get("tcp") and not kw.get("token_file"):
        raise SpecError(str(where), "service.token_file",
                        "a TCP listener needs authentication: give a token file (--token-file)")
    # pools: every template's warm copies together must fit the node's (enforced) capacity
    warm = sum(ws.min_warm for ws in kw["templates"].values())
    if warm > kw["capacity"]:
        raise SpecError(str(where), "service.capacity",
                        f"the templates' min_warm add up to {warm}, more than capacity "
                        f"({kw['capacity']}): the node would never hold them all")
    return ServiceConfig(**kw)


def read_token(path: Path) -> str:
    try:
        st = path.stat()
        token = path.read_text().strip()
    except OSError as e:
        raise SpecError(str(path), None, f"cannot read the token file: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise SpecError(str(path), None, "the token file is readable by others; chmod 600 it")
    if len(token) < 16:
        raise SpecError(str(path), None, "the token must be at least 16 characters")
    return token
