"""The in-app SDK: make an application a template, and give each restored copy its identity.

    import pool.runtime
    identity = pool.runtime.checkpoint()   # returns in every restored copy
    print(identity.instance_id, identity.env, identity.args)

The app boots and warms up, then calls checkpoint(): the builder is told "ready" and checkpoints the
process while it waits here; in each restored copy this call returns with that copy's identity after
the SDK applied it (os.environ, sys.argv; the pool has already set the copy's hostname) and reseeded
what copies would otherwise share (Python `random`, numpy's global generator, tempfile's name
sequence). str hashing (PYTHONHASHSEED) is fixed at interpreter start and stays shared. Outside the pool (no control channel) it returns a local identity
at once, so the same app runs unchanged without the pool.

Standard library and msgpack only: applications import this, the service never does.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from typing import Callable

from pool.wire import control
from pool.wire.control import Identity  # the app's side of the identity frame; public here too

_before: list[Callable[[], None]] = []
_after: list[Callable[["Identity"], None]] = []


def before_checkpoint(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run fn just before the checkpoint (close connections, flush caches, ...)."""
    _before.append(fn)
    return fn


def after_restore(fn: Callable[[Identity], None]) -> Callable[[Identity], None]:
    """Decorator: run fn(identity) in each restored copy, after the identity is applied."""
    _after.append(fn)
    return fn


def _control_fds() -> tuple[int, int] | None:
    raw = os.environ.get(control.ENV_VAR)
    if not raw:
        return None
    try:
        r, w = (int(x) for x in raw.split(","))
    except ValueError as e:
        raise RuntimeError(f"{control.ENV_VAR}={raw!r} is not 'R,W'") from e
    return r, w


def checkpoint() -> Identity:
    """Signal readiness, get checkpointed, return this copy's identity (see the module doc)."""
    fds = _control_fds()
    if fds is None:
        return Identity(instance_id="local", env={}, args=sys.argv[1:], seed=0)
    rfd, wfd = fds
    for fn in _before:
        fn()
    control.write_frame(wfd, {"type": "ready", "pid": os.getpid(), "runtime": "python"})
    msg = control.read_frame(rfd)  # CRIU checkpoints us here; each copy continues from this read
    if msg["type"] != "identity":
        raise control.ControlError(f"expected an identity message, got {msg['type']!r}")
    ident = Identity.from_message(msg)
    try:
        _apply(ident)
        for fn in _after:
            fn(ident)
    except Exception as e:
        control.write_frame(wfd, {"type": "error", "message": f"{type(e).__name__}: {e}"})
        raise
    control.write_frame(wfd, {"type": "ack", "instance_id": ident.instance_id, "pid": os.getpid()})
    return ident


def _apply(ident: Identity) -> None:
    os.environ.update(ident.env)
    os.environ["POOL_INSTANCE_ID"] = ident.instance_id
    if ident.args:
        sys.argv[1:] = ident.args
    reseed(ident.seed)


def reseed(seed: int) -> None:
    """Give this copy its own random state: every copy restored from one image starts identical."""
    random.seed(seed)
    # tempfile caches a name generator seeded before the checkpoint; a new one draws from os.urandom.
    tempfile._name_sequence = None  # type: ignore[attr-defined]
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))
