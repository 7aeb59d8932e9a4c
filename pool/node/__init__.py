"""One node's runtime (runtime.py: its phases, composing the parts): the copy table and copy states
(table.py), the supervisor (supervisor.py: events, reaping, kill policy), the warm pools (warm.py:
pure pool logic; demand.py: targets that follow demand; pools.py: wired to the restorer and the
zygotes), running instances (live.py: checkpoints, rollback, suspend and wake, restart, migrate),
the node API (api.py) and fetch/fork beside it (ops.py), whose fault a failure is (faults.py),
template secrets (secrets.py), code prefaulting (prefault.py) and the node's settings (settings.py)."""
