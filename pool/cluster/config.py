"""The service's configuration: `pool serve --config FILE` plus command-line overrides.

    [service]                      # all optional
    socket = "/run/pool/pool.sock"
    tcp = "127.0.0.1:7070"         # needs token_file (TCP is always authenticated) and tls_dir
    token_file = "/etc/pool/token" # 0600, at least 16 characters
    admin_group = "pool-admin"     # may do anything through the unix socket (root always may)
    users_group = "pool-users"     # may spawn, and manage only the copies they spawned
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
    tls_dir = "/etc/pool/tls"      # ca.crt, node.crt, node.key (pool certs): mutual TLS on every TCP link
    insecure_plain_tcp = false     # true: TCP without TLS (tests, local development; tokens in clear)
    memory_budget = "16G"          # warm copies of all templates together (K, M, G, T: powers of 1024)
    encrypt_images = false         # true: image files sealed at rest (AES-GCM; docs/security.md)
    image_key = "/etc/pool/image.key"  # the node's key (0600, not in the store): made if missing
    [limits]                       # every copy's cgroup limits, unless its template's [limits]
    memory = "1G"                  #   sets them (docs/limits.md); none by default
    cpus = 2.0
    pids = 1024
    [etcd]                         # the cluster's state in etcd (docs/nodes.md, "A cluster on etcd")
    endpoints = "http://10.0.0.9:2379,http://10.0.0.10:2379"   # or --etcd URL[,URL]
    cluster = "default"            # the key prefix /prewarm-pool/CLUSTER/: several clusters, one etcd
    ttl = 10                       # seconds a lease (an agent's, a coordinator's) outlives its last renewal
    agent_token_file = "/etc/pool/agent.token"  # coordinator: the token agents that join were started with
    [nodes.n2]                     # a `pool agent` (see docs/nodes.md)
    address = "10.0.0.2:7070"
    token_file = "/etc/pool/n2.token"
    [templates.py-hello]
    min_warm = 2                   # restored copies kept waiting for a spawn, at least
    max_warm = 32                  # at most, however fast spawns come (default max_live; 0: fixed at min_warm)
    max_live = 32                  # warm + live copies
    ttl = 0                        # seconds a spawned copy may live (0: no limit)
    idle_timeout = 0               # seconds without traffic through its port (0: no limit)
    idle_action = "kill"           # or "suspend": an idle instance is checkpointed to disk and
                                   # woken by the next connection to its address
    keep_snapshots = 0             # newest snapshots kept per instance (0: all)
    restart = "no"                 # or "on-failure": restored from its last checkpoint
    checkpoint_every = 0           # seconds between automatic checkpoints (0: none)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool import config, names
from pool.cluster.access import AccessPolicy, group_id
from pool.cluster.etcd import Endpoint, parse_endpoints
from pool.cr.cgroups import Limits
from pool.errors import SpecError
from pool.names import is_name
from pool.node.live import LiveSettings
from pool.node.settings import NodeSettings
from pool.node.warm import WarmSettings
from pool.templates.store import Store
from pool.templates.spec import LIMITS_KEYS, parse_limits
from pool.tomlfields import Table, at_least, load_toml, one_of
from pool.wire.tls import TlsFiles

SERVICE_KEYS = ("socket", "store", "run_dir", "tcp", "token_file", "metrics", "drain_timeout",
                "on_shutdown", "kill_grace", "restore_concurrency", "quarantine_after",
                "early_death_s", "exited_history", "max_live", "capacity", "local_node",
                "source", "heartbeat_s",
                # crash recovery and copies' logs
                "max_log_bytes", "restore_timeout",
                # warm pools that follow demand
                "memory_budget")
# RPC connection limits (floods)
SERVICE_KEYS += ("max_connections", "idle_connection_timeout")
# who may use the unix socket (pool.cluster.access)
SERVICE_KEYS += ("admin_group", "users_group")
# TLS on every TCP link (pool/wire/tls.py)
SERVICE_KEYS += ("tls_dir", "insecure_plain_tcp")
# images encrypted at rest (pool/templates/imagecrypt.py)
SERVICE_KEYS += ("encrypt_images", "image_key")
NODE_KEYS = ("address", "token_file")
ETCD_KEYS = ("endpoints", "cluster", "ttl", "agent_token_file")
TEMPLATE_KEYS = ("min_warm", "max_warm", "max_live", "ttl", "idle_timeout")
# running instances (pool/node/live.py)
TEMPLATE_KEYS += ("idle_action", "keep_snapshots", "restart", "checkpoint_every")
PATH_KEYS = ("socket", "store", "run_dir", "token_file", "tls_dir", "image_key")
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
    memory_budget: int | None = None     # bytes for the warm copies of all templates; None: no cap
    defaults: WarmSettings = WarmSettings()
    templates: dict[str, WarmSettings] = field(default_factory=dict)
    nodes: dict[str, "NodeConfig"] = field(default_factory=dict)
    etcd: "EtcdConfig | None" = None       # [etcd] / --etcd: nodes and routes in etcd
    # RPC connection limits (floods)
    max_connections: int = 1024          # per listener (unix socket, TCP, agent)
    idle_connection_timeout: float = 300.0  # after the hello, no request in flight; 0: never
    access: AccessPolicy = AccessPolicy()   # root only, unless admin_group / users_group are set
    # TLS on every TCP link: this node's TLS directory; without it TCP needs insecure_plain_tcp
    tls_dir: Path | None = None
    insecure_plain_tcp: bool = False
    live: dict[str, LiveSettings] = field(default_factory=dict)   # running instances, per template

    def tls(self, tcp: bool) -> TlsFiles | None:
        """This node's TLS files, loaded and checked (SpecError naming the file). Without a TLS
        directory a node with TCP links (tcp) refuses to start unless insecure_plain_tcp is set."""
        if self.tls_dir is not None:
            return TlsFiles.load(self.tls_dir)
        if tcp and not self.insecure_plain_tcp:
            raise SpecError("[service]", "tls_dir", "TCP links need TLS: give this node's TLS "
                            "directory (--tls-dir; `pool certs issue NODE` makes one), or "
                            "--insecure-plain-tcp for tests and local development (tokens in clear)")
        return None
    copy_limits: Limits = Limits()       # [limits]: each copy's, where its template sets none
    # images encrypted at rest: the store's image files sealed with this node's key
    encrypt_images: bool = False
    image_key: Path = config.DEFAULT_IMAGE_KEY

    def open_store(self) -> Store:
        """This node's store, with its image key if encrypt_images (made on first use)."""
        return self.node_settings().open_store()

    def node_settings(self) -> NodeSettings:
        """What this service's node runtime (the local node, or an agent's) is configured with."""
        return NodeSettings(
            store=self.store, run_dir=self.run_dir, capacity=self.capacity,
            kill_grace=self.kill_grace, drain_timeout=self.drain_timeout,
            on_shutdown=self.on_shutdown, restore_concurrency=self.restore_concurrency,
            quarantine_after=self.quarantine_after, early_death_s=self.early_death_s,
            exited_history=self.exited_history, max_log_bytes=self.max_log_bytes,
            restore_timeout=self.restore_timeout, memory_budget=self.memory_budget,
            defaults=self.defaults, templates=dict(self.templates), copy_limits=self.copy_limits,
            encrypt_images=self.encrypt_images, image_key=self.image_key, live=dict(self.live))

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


@dataclass(frozen=True)
class EtcdConfig:
    """[etcd]: where the cluster's state lives (pool.cluster.registry.EtcdRegistry)."""

    endpoints: tuple[Endpoint, ...]
    cluster: str = "default"
    ttl: int = 10
    agent_token_file: Path | None = None    # the coordinator's token for agents that join


def parse_etcd(t: Table | None, where: str, endpoints: str | None,
               agent_token_file: str | None) -> EtcdConfig | None:
    """The [etcd] table with --etcd / --agent-token-file over it; None without any endpoint."""
    data = t.data if t is not None else {}
    text = endpoints or (t.get("endpoints", "str", None) if t is not None else None)
    if not text:
        if data:
            raise SpecError(where, "etcd.endpoints", "[etcd] needs endpoints (or --etcd URL)")
        return None
    try:
        eps = tuple(parse_endpoints(text))
    except ValueError as e:
        raise SpecError("command line" if endpoints else where,
                        "--etcd" if endpoints else "etcd.endpoints", str(e)) from None
    cluster = t.get("cluster", "str", "default") if t is not None else "default"
    if not is_name(cluster):
        t.fail("cluster", "not a valid cluster name (a-z, 0-9, . _ -)")
    token = agent_token_file or (t.get("agent_token_file", "str", None) if t is not None else None)
    return EtcdConfig(eps, cluster, t.get("ttl", "int", 10, at_least(2)) if t is not None else 10,
                      Path(token) if token else None)


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
    top = Table(where, load_toml(where) if path else {}, "", ("service", "templates", "nodes",
                                                              "limits", "etcd"))
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
        access=AccessPolicy(
            admin_gid=group_id(s.get("admin_group", "str", None), str(where), "service.admin_group"),
            users_gid=group_id(s.get("users_group", "str", None), str(where), "service.users_group")),
        insecure_plain_tcp=s.get("insecure_plain_tcp", "bool", False),
        encrypt_images=s.get("encrypt_images", "bool", False),
        defaults=WarmSettings(0, max_live_default))
    if "memory_budget" in s.data:  # a string with a unit: a bare number of bytes is too easy to misread
        s.get("memory_budget", "str")
        kw["memory_budget"] = s.size("memory_budget")
        if kw["memory_budget"] == 0:
            s.fail("memory_budget", "must be more than 0")
    kw["copy_limits"] = parse_limits(top.table("limits", LIMITS_KEYS))
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
                          max_warm=t.get("max_warm", "int", None, at_least(0)),
                          ttl=t.get("ttl", "float", 0.0, _non_negative),
                          idle_timeout=t.get("idle_timeout", "float", 0.0, _non_negative))
        if ws.min_warm > ws.max_live:
            t.fail("min_warm", f"{ws.min_warm} is more than max_live ({ws.max_live})")
        if ws.max_warm is not None and ws.max_warm > ws.max_live:  # <= min_warm: a fixed pool
            t.fail("max_warm", f"{ws.max_warm} is more than max_live ({ws.max_live})")
        kw["templates"][name] = ws
        kw.setdefault("live", {})[name] = _live_settings(t)
    nodes = top.table("nodes", None) or Table(where, {}, "nodes", ())
    kw["nodes"] = {}
    for name in nodes.data:
        if not is_name(name) or name == "local":
            nodes.fail(name, "not a valid node name (a-z, 0-9, . _ -; not 'local')")
        n = nodes.table(name, NODE_KEYS)
        kw["nodes"][name] = NodeConfig(
            name, parse_hostport(n.get("address", "str"), str(where), f"nodes.{name}.address"),
            Path(n.get("token_file", "str")))
    kw["etcd"] = parse_etcd(top.table("etcd", ETCD_KEYS), str(where), overrides.pop("etcd", None),
                            overrides.pop("agent_token_file", None))
    if kw["etcd"] is not None:
        # every node must be reachable by every coordinator: none of them runs copies itself
        if s.get("local_node", "bool", False):
            s.fail("local_node", "with [etcd] (several coordinators) copies run on agents only: "
                                 "set local_node = false, or run a `pool agent` here")
        kw["local_node"] = False
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


def _live_settings(t: Table) -> LiveSettings:
    """[templates.NAME]'s settings for its running instances."""
    return LiveSettings(
        keep_snapshots=t.get("keep_snapshots", "int", 0, at_least(0)),
        idle_action=t.get("idle_action", "str", "kill", one_of(("kill", "suspend"))),
        restart=t.get("restart", "str", "no", one_of(("no", "on-failure"))),
        checkpoint_every=t.get("checkpoint_every", "float", 0.0, _non_negative))


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
