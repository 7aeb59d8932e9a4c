"""The `pool` command: one module per group of verbs, plus `make demo`."""
