"""prewarm-pool: boot an app once, checkpoint it with CRIU, start copies of it in milliseconds.

Public API (imported lazily, so `import pool.runtime` inside applications stays light):

    pool.spawn(name, env=..., args=..., timeout=..., hostname=..., node=...) -> pool.Instance
    pool.Client, pool.AsyncClient, pool.Instance, pool.AsyncInstance
    pool.errors and its classes: pool.PoolError, pool.NoCapacity, pool.Quarantined, ... (the
    taxonomy, with whose fault each is and whether to retry: pool.errors' docstring)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers (at run time it stays lazy)
    from pool import errors
    from pool.client import AsyncClient, AsyncInstance, Client, Instance, close_default, spawn
    from pool.errors import *  # noqa: F403 - every error class, as _FROM_ERRORS lists them

_FROM_CLIENT = {"spawn", "Client", "AsyncClient", "Instance", "AsyncInstance", "close_default"}
# Every error class of pool.errors (pool.errors stays importable on its own; this list is checked
# against it by tests/unit/test_errors.py).
_FROM_ERRORS = {"PoolError", "CriuError", "CriuUnavailable", "CriuFailed", "CriuTimeout", "SpecError",
                "TemplateNotFound", "TemplateCorrupt", "Incompatible", "BuildError", "RestoreError",
                "InstanceNotFound", "NoCapacity", "Quarantined", "NodeUnavailable", "ShuttingDown", "Conflict",
                "TransferError", "PoolTimeout", "NoReply", "ProtocolError", "AuthError", "TlsError",
                "PermissionDenied", "BadRequest", "InternalError", "RemoteError",
                "SnapshotNotFound", "CheckpointError"}

__all__ = sorted(_FROM_CLIENT | _FROM_ERRORS | {"errors"})


def __getattr__(name: str) -> Any:
    if name in _FROM_CLIENT:
        from pool import client  # noqa: PLC0415

        return getattr(client, name)
    if name in _FROM_ERRORS:
        from pool import errors  # noqa: PLC0415

        return getattr(errors, name)
    if name == "errors":
        import importlib  # noqa: PLC0415

        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'pool' has no attribute {name!r}")
