"""The shapes of the service's replies, as TypedDicts: what `Client.info()`, `stats()`, `list()` and the
other client methods return, and what the node and the coordinator build.

On the wire a reply is a msgpack map; these give it a static type on both sides (the service annotates
its handlers with them, the client's methods return them), so a type checker sees a typo in a key.
tests/integration/test_reply_types.py checks the replies of a real service against them, key for key,
so a key added on one side and not here fails a test instead of drifting. NotRequired keys are absent
in some replies (said on each).

No `from __future__ import annotations` here: TypedDict finds NotRequired keys only in evaluated
annotations (Python 3.11), and the test reads __required_keys__.
"""
from typing import NotRequired, TypedDict


class Pong(TypedDict):
    pong: bool
    pid: int
    node: str           # "coordinator", or the node's name
    draining: bool


class FetchResult(TypedDict):
    """A template shipped to a node (push, or a first spawn there)."""

    name: str
    build_id: NotRequired[str]
    already_current: bool                    # the node held this build already: nothing moved
    node: NotRequired[str]                   # push of a build the node already held
    files_sent: NotRequired[int]
    files_reused: NotRequired[int]
    bytes_raw: NotRequired[int]
    bytes_wire: NotRequired[int]
    codec: NotRequired[str]
    seconds: NotRequired[float]


class SpawnReply(TypedDict):
    """spawn's reply (the client makes an Instance of it)."""

    id: str
    template: str
    pid: int
    address: str | None        # "127.0.0.1:PORT" of the copy's published port, if it has one
    path: str                  # how it was served: "warm", "restore", "fork", "lazy"
    node: str
    spawn_ms: float            # inside the node
    total_ms: NotRequired[float]             # inside the coordinator (set by it)
    shipped: NotRequired[FetchResult]        # the template was shipped to the node first
    skipped: NotRequired[dict[str, str]]     # node -> why it was not chosen


class CopyStats(TypedDict):
    """Summed over a live copy's processes."""

    rss_bytes: int
    pss_bytes: int
    cpu_s: float
    processes: int
    memory_bytes: int | None        # charged to its cgroup, what its memory limit counts (None:
    #                                 it has no cgroup)
    memory_limit_bytes: int | None  # its cgroup's memory limit (None: no limit, or no cgroup)


class CopyInfo(TypedDict):
    """One copy: an entry of list(), and the reply of info, kill and wait."""

    id: str
    template: str
    build_id: str
    pid: int
    state: str
    path: str
    address: str | None
    port: int | None
    exit_status: int | None    # None while it runs
    created: float             # unix time
    restore_s: float
    hostname: str | None
    args: list[str]
    env_keys: list[str]        # the names of its spawn env; the values are never returned
    owner: int | None          # uid that spawned it on the unix socket; None over TCP
    node: str
    exited_at: float | None
    end_cause: str | None      # "exited", "killed", "failed", "oom" (out of memory) once it ended
    uptime_s: NotRequired[float]             # handed out and still running
    idle_s: NotRequired[float]               # ... and its port is published
    stats: NotRequired[CopyStats]            # info() of a running copy
    restarts: NotRequired[int]               # restored after it died (restart = "on-failure")
    crash_loop: NotRequired[bool]            # died too often to be restarted again


class LogChunk(TypedDict):
    data: bytes
    offset: int                # where the next read starts
    exited: bool
    rotated_away: int          # bytes from the asked offset on that were cut from the log unread
    node: NotRequired[str]     # where the copy is (the coordinator adds it)


class ZygoteFigures(TypedDict):
    """A fork-mode template's zygote on a node (pool/copies/zygote.py)."""

    id: str
    pid: int
    build_id: str
    forks: int                 # copies forked from it so far
    copies: int                # its forked copies still running
    retired: bool              # a newer build replaced it: it ends with its last copy
    rss_bytes: int             # its own processes, not its copies'
    pss_bytes: int


class PoolFigures(TypedDict):
    """One template's warm pool on a node (stats()["templates"][name], set_warm's reply)."""

    min_warm: int
    max_warm: int              # the demand-sized target's cap (pool.node.demand)
    max_live: int
    ttl: float
    idle_timeout: float
    warm: int
    live: int
    target: int                # copies it keeps ready now: min_warm, raised by demand
    hits: int                  # spawns served warm
    misses: int                # spawns that waited for a restore or a fork
    demand_per_s: float        # the arrival rate the target follows
    refill_ms: float           # how long a refill takes, smoothed
    restoring: int
    dying: int
    waiting: int
    quarantined: bool
    failures_in_a_row: int
    unbuilt: bool
    build: str | None
    last_error: str | None
    spawns: dict[str, int]     # path ("warm", "restore", ...) -> spawns served so
    restores: int
    restore_failures: int
    zygote: NotRequired[ZygoteFigures | None]   # fork-mode templates: None until one is restored


class TemplateInfo(TypedDict):
    name: str
    build_id: str
    image_bytes: int
    pool: PoolFigures | None
    nodes: list[str]           # the nodes holding this build
    sdk: NotRequired[bool]     # this and the rest: when the coordinator has a local node
    built_at: NotRequired[str | None]
    port: NotRequired[int | None]
    node: NotRequired[str]


class NodeLease(TypedDict):
    """An agent's registration in etcd (a coordinator on etcd)."""

    id: str                    # the lease, hex
    ttl: int | None            # seconds left; -1: gone
    registered: float | None   # when the agent started
    metrics: str | None        # HOST:PORT of its /metrics, if served


class NodeView(TypedDict):
    """A node as the coordinator sees it (nodes(), stats()["nodes"])."""

    name: str
    healthy: bool
    address: str | None        # HOST:PORT of an agent; None for the local node
    local: bool
    templates: dict[str, str]  # template -> build id held there
    free: int
    live: NotRequired[int | None]            # agents only
    down_since: NotRequired[float | None]    # agents only
    last_error: NotRequired[str | None]      # agents only
    lease: NotRequired[NodeLease | None]     # on etcd: its registration (None: not registered)


class SnapshotTotals(TypedDict):
    count: int
    bytes: int


class NodeStats(TypedDict):
    """One node's figures (an agent's stats)."""

    node: str
    store: str
    draining: bool
    spawns_in_flight: int
    live: int
    copies: int                # the copies the node holds: warm, live and ending
    exited_kept: int           # ended copies kept for info/logs
    templates: dict[str, PoolFigures]
    snapshots: NotRequired[SnapshotTotals]   # snapshots of running instances held (0600 files)


class EtcdMember(TypedDict):
    name: str
    id: str
    client_urls: list[str]
    learner: bool


class CoordinatorView(TypedDict):
    id: str                    # HOST-PID
    host: str
    pid: int
    tcp: str | None
    lease: str                 # hex
    ttl: int                   # seconds left; -1: gone
    me: bool                   # the coordinator that answered


class ClusterView(TypedDict):
    """The etcd view of a coordinator on etcd: members, coordinators that are up, agents' leases."""

    endpoints: list[str]
    prefix: str
    me: str
    members: list[EtcdMember]
    coordinators: list[CoordinatorView]
    leases: dict[str, int]     # agent -> seconds left on its lease
    error: str | None          # etcd could not be read


class ServiceStats(NodeStats):
    """The coordinator's stats: its local node's figures and its own."""

    pid: int
    uptime_s: float
    socket: str
    metrics: str | None        # HOST:PORT of /metrics, if served
    nodes: dict[str, NodeView]
    cluster: NotRequired[ClusterView | None]   # None without etcd


class ForkedFrom(TypedDict):
    id: str
    template: str
    node: str


class ForkReply(TypedDict):
    """fork's reply: the new copy, on its node."""

    id: str
    template: str
    pid: int
    address: str | None
    path: str                  # "restore", or "lazy"
    node: str
    spawn_ms: float
    forked_from: ForkedFrom
    image_bytes: int
    lazy: bool
    fetched: FetchResult       # the forked build, shipped to the node


# --- running instances: checkpoint, snapshots, rollback, suspend, resume -------------------------------
class SnapshotInfo(TypedDict):
    """One snapshot of a running instance (snapshots' rows; checkpoint's and suspend's snapshot)."""

    id: str
    instance: str
    tag: str | None
    created: float             # unix time
    bytes: int                 # on disk
    freeze_ms: float | None    # how long the app was frozen (CRIU's own measure)
    dump_ms: float             # the whole dump
    pre_dumped: bool


class CheckpointReply(TypedDict):
    id: str                    # the instance
    node: str
    snapshot: SnapshotInfo
    pre_dump: str              # whether an iterative pre-dump shortened the freeze, and why not
    hooks: str                 # "ran" (the app's before/after_checkpoint), "skipped: why", "failed: ..."
    published: str | None      # --keep: the template it was published as
    pruned: list[str]          # snapshots removed by keep_snapshots


class SuspendReply(TypedDict):
    id: str
    node: str
    state: str                 # "suspended"
    address: str | None        # still published: a connection wakes it
    snapshot: SnapshotInfo


class InstanceRestored(TypedDict):
    """rollback's and resume's reply: the instance, same id and address, on a new process."""

    id: str
    node: str
    pid: int
    state: str
    address: str | None
    snapshot: str | None       # the snapshot it was restored from
    restore_ms: float
    hooks: NotRequired[str]    # rollback: "ran" (after_checkpoint in the app), or why not


class MigrateReply(TypedDict):
    """migrate's reply: the same instance, now on node."""

    id: str
    node: str
    from_node: str
    pid: int
    address: str | None        # its new address, on node
    template: str
    freeze_ms: float | None    # how long the app was frozen for the checkpoint (None: lazy)
    image_bytes: int           # shipped up front (lazy: without the memory, which follows)
    lazy: bool
    migrate_ms: float          # the whole move, as the coordinator saw it
