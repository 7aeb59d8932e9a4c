"""Prometheus metrics of the service, built on a CollectorRegistry passed in (nothing is registered at
import, so tests and several services in one process never collide), and the /metrics HTTP server.

Gauges that mirror pool state (warm, live, quarantined) read it at scrape time through
set_function, so they can never drift from the pools they describe.

Every series served carries `node` (the node's name: an agent's, or the coordinator's local node
"local"), so one Prometheus scraping every agent tells the nodes apart (NodeLabelled).
"""
from __future__ import annotations

import platform
import threading
from importlib import metadata
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

# 0.1 ms .. 10 s: a warm spawn is well under a millisecond, a restore tens to hundreds of ms, a
# restore of a big JVM under load seconds.
SPAWN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0)
# 0.5 ms .. 5 s, fine where restores land: a fork of a zygote in ms, py-hello ~50-100 ms, heavy
# templates (JVM, Node, torch) 150-400 ms.
RESTORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3,
                   0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    """The service's (or an agent's) metrics. `info` labels pool_build_info (version, python, ...)."""

    def __init__(self, registry: CollectorRegistry, info: dict[str, str] | None = None,
                 node: str = "local") -> None:
        self.registry = registry
        self.node = node
        self.exposed = NodeLabelled(registry, node)   # what /metrics serves
        info = {"version": _version(), "python": platform.python_version(), **(info or {})}
        self.build_info = Gauge("pool_build_info", "Always 1; the labels say what is running",
                                sorted(info), registry=registry)
        self.build_info.labels(**info).set(1)
        self.spawn_latency = Histogram(
            "pool_spawn_latency_seconds", "Time from a spawn request to its reply, by path "
            "(warm: a prewarmed copy; restore: restored on a miss; fork: forked from a zygote on a "
            "miss)", ["template", "path"],
            buckets=SPAWN_BUCKETS, registry=registry)
        self.restore_duration = Histogram(
            "pool_restore_duration_seconds", "Time to make one warm copy: a CRIU restore, or a fork in fork mode",
            ["template"], buckets=RESTORE_BUCKETS, registry=registry)
        self.spawn_failures = Counter(
            "pool_spawn_failures_total", "Spawns that failed, by error code", ["template", "reason"],
            registry=registry)
        self.exits = Counter(
            "pool_instance_exits_total",
            "Copies that ended, by cause (exited, killed, failed, zygote_died)",
            ["template", "cause"], registry=registry)
        self.warm = Gauge("pool_warm_copies", "Restored copies waiting for a spawn", ["template"],
                          registry=registry)
        self.live = Gauge("pool_live_instances", "Copies handed out and not yet ended", ["template"],
                          registry=registry)
        self.quarantined = Gauge("pool_quarantined", "1 if the template is quarantined",
                                 ["template"], registry=registry)
        self.image_bytes = Gauge("pool_template_image_bytes", "Size of the template's image",
                                 ["template"], registry=registry)
        self.restore_failures = Counter(
            "pool_restore_failures_total", "Restores that failed, by error code (a refill or a "
            "restore on a miss)", ["template", "reason"], registry=registry)
        self.warm_target = Gauge("pool_warm_target", "How many copies the pool keeps ready now "
                                 "(warm or restoring): follows demand, at least min_warm",
                                 ["template"], registry=registry)
        self.hits = Counter("pool_warm_hits", "Spawns served by a warm copy", ["template"],
                            registry=registry)
        self.misses = Counter("pool_warm_misses", "Spawns that waited for a copy to be made "
                              "(a restore on a miss)", ["template"], registry=registry)
        self.restarts = Counter(
            "pool_instance_restarts_total", "Instances restored from their last checkpoint after "
            "they died (restart = \"on-failure\")", ["template"], registry=registry)
        self.capacity = Gauge("pool_node_capacity", "Copies the node takes, all templates together",
                              ["node"], registry=registry)
        self.free = Gauge("pool_node_free", "Copies the node can still take (capacity - live)",
                          ["node"], registry=registry)

    def watch_pool(self, template: str, warm: Callable[[], float], live: Callable[[], float],
                   quarantined: Callable[[], float], target: Callable[[], float]) -> None:
        self.warm.labels(template).set_function(warm)
        self.live.labels(template).set_function(live)
        self.quarantined.labels(template).set_function(quarantined)
        self.warm_target.labels(template).set_function(target)

    def watch_node(self, node: str, capacity: Callable[[], float], free: Callable[[], float]) -> None:
        self.capacity.labels(node).set_function(capacity)
        self.free.labels(node).set_function(free)

    def spawned(self, template: str, path: str, seconds: float) -> None:
        self.spawn_latency.labels(template, path).observe(seconds)
        (self.hits if path == "warm" else self.misses).labels(template).inc()

    def restored(self, template: str, seconds: float) -> None:
        self.restore_duration.labels(template).observe(seconds)

    def spawn_failed(self, template: str, reason: str) -> None:
        self.spawn_failures.labels(template, reason).inc()

    def restore_failed(self, template: str, reason: str) -> None:
        self.restore_failures.labels(template, reason).inc()

    def exited(self, template: str, cause: str) -> None:
        self.exits.labels(template, cause).inc()

    def restarted(self, template: str) -> None:
        self.restarts.labels(template).inc()


def _version() -> str:
    try:
        return metadata.version("prewarm-pool")
    except metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


class NodeLabelled:
    """registry's metrics with node=NAME on every sample that lacks a node label."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        self.node = node

    def collect(self):
        for m in self.registry.collect():
            out = Metric(m.name, m.documentation, m.type, m.unit)
            out.samples = [s if "node" in s.labels else
                           Sample(s.name, {**s.labels, "node": self.node}, s.value, s.timestamp,
                                  s.exemplar)
                           for s in m.samples]
            yield out


class MetricsServer:
    """/metrics on HOST:PORT in a daemon thread; stop() closes the socket and joins the thread."""

    def __init__(self, registry: CollectorRegistry | NodeLabelled, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host, self.port = self._server.server_address[:2]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=5)
