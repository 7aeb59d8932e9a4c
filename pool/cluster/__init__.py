"""The coordinator and its nodes: `pool serve` (service), its configuration, who may use its socket
(access), the node registry (a static list, or etcd: registry, etcd, etcdstate) with heartbeats, the
scheduler, `pool agent`, and metrics."""
