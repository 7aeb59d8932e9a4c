"""The coordinator and its nodes: `pool serve` (service), its configuration, the node registry with
heartbeats, the scheduler, `pool agent`, and metrics."""
