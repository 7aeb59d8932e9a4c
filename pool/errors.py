"""One hierarchy of errors for the whole package.

Every error carries a stable `code` (used on the wire) and the structured facts a caller needs
(`data`), so a client can act on an error without parsing its message. A client rebuilds the same
class from an error reply (from_wire); a code it does not know becomes RemoteError.

Whose fault an error is decides two things: whether a caller should retry, and whether a failed copy
counts toward its template's quarantine (pool.node.faults: only the template's own faults do).

| class                          | code               | whose fault                              | retry?                            |
|--------------------------------|--------------------|------------------------------------------|-----------------------------------|
| PoolError                      | pool_error         | (base of all)                            |                                   |
| CriuError                      | criu_error         | (base of the CRIU errors)                |                                   |
| CriuUnavailable(CriuError)     | criu_unavailable   | the node: CRIU missing or unreachable     | after fixing the node / elsewhere |
| CriuFailed(CriuError)          | criu_failed        | the template, unless its errno or log is a node resource (EMFILE, ENOMEM, ENOSPC, ...) | node resource: later; else no |
| CriuTimeout(CriuFailed)        | criu_timeout       | the template (CRIU hung on its image)     | no                                |
| SpecError                      | spec_error         | the template's spec file                  | no: fix the named field           |
| TemplateNotFound               | template_not_found | the caller (or not built yet)             | after `pool build`                |
| TemplateCorrupt                | template_corrupt   | the store                                 | after a rebuild                   |
| Incompatible                   | incompatible       | this node vs the image (CRIU, kernel, CPU) | on another node                   |
| BuildError                     | build_failed       | the app, at the named step (errno ENOSPC: the disk) | after fixing it          |
| RestoreError                   | restore_failed     | the template, unless raised from a node fault | yes, a few times                |
| InstanceNotFound               | instance_not_found | the caller (or the copy is gone)          | no                                |
| SnapshotNotFound               | snapshot_not_found | the caller (or retention removed it)      | no                                |
| CheckpointError                | checkpoint_failed  | the app (a resource CRIU cannot dump) or the node (ENOSPC); the instance still runs | after fixing it |
| NoCapacity                     | no_capacity        | load: every allowed copy is in use        | yes, later                        |
| Quarantined                    | quarantined        | the template (failed N times in a row)    | after `pool set-warm`             |
| NodeUnavailable                | node_unavailable   | the node or the network                   | yes, later or on another node     |
| ShuttingDown(NodeUnavailable)  | shutting_down      | nobody: the service is stopping           | yes, on a restarted service       |
| Conflict                       | conflict           | another node or coordinator got there first (an etcd transaction lost: a node name already registered) | no: fix the names, or wait for the other's lease |
| TransferError                  | transfer_failed    | the network or the peer                   | yes                               |
| PoolTimeout (a TimeoutError)   | timeout            | load: it did not finish within its deadline (no copy ready in time, the server's request_timeout) | yes, maybe with a longer timeout |
| NoReply(PoolTimeout)           | no_reply           | the peer or the network: no reply within the caller's deadline | yes, if the request is safe to repeat (it may have run) |
| ProtocolError                  | protocol_error     | the peer (not a pool, or a bug); an idle close by the server | reconnect (clients do it for an idle close) |
| AuthError                      | auth_failed        | the caller's token                        | no                                |
| PermissionDenied               | permission_denied  | the caller: its uid may not do this (names the method) | no: ask an admin   |
| TlsError(AuthError)            | tls_failed         | a peer's certificate (another CA, not the node named) or ours | no: fix the certificates |
| BadRequest                     | bad_request        | the caller: names the method and param    | no                                |
| InternalError                  | internal           | the service (a bug; it logged a traceback) | maybe; report it                 |
| RemoteError                    | the peer's code    | unknown: a code this side does not know   | unknown                           |

`except TimeoutError` catches PoolTimeout and NoReply; `except NodeUnavailable` catches ShuttingDown.
"""
from __future__ import annotations

from typing import Any


class PoolError(Exception):
    """Base of every error prewarm-pool raises on purpose."""

    code = "pool_error"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = {k: v for k, v in data.items() if v is not None}

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


# --- CRIU -------------------------------------------------------------------------------------------
class CriuError(PoolError):
    code = "criu_error"


class CriuUnavailable(CriuError):
    """CRIU could not be found, started or talked to (as opposed to CRIU refusing a request)."""

    code = "criu_unavailable"


class CriuFailed(CriuError):
    """CRIU ran and refused or failed an operation; errno and the log's last error lines come along."""

    code = "criu_failed"

    def __init__(self, op: str, message: str, *, errno: int | None = None,
                 log_tail: str = "", log_path: str | None = None) -> None:
        text = f"criu {op} failed: {message}"
        if log_tail:
            text += "\n" + log_tail
        super().__init__(text, op=op, errno=errno, log_tail=log_tail, log_path=log_path)
        self.op = op
        self.errno = errno
        self.log_tail = log_tail
        self.log_path = log_path


class CriuTimeout(CriuFailed):
    code = "criu_timeout"


# --- templates --------------------------------------------------------------------------------------
class SpecError(PoolError):
    """A template spec is wrong: names the file, the field and the problem."""

    code = "spec_error"

    def __init__(self, path: str, field: str | None, problem: str) -> None:
        where = f"{path}: {field}" if field else str(path)
        super().__init__(f"{where}: {problem}", path=str(path), field=field, problem=problem)
        self.path = str(path)
        self.field = field
        self.problem = problem


class TemplateNotFound(PoolError):
    code = "template_not_found"

    def __init__(self, name: str, where: str | None = None) -> None:
        msg = f"no template named {name!r}" + (f" in {where}" if where else "")
        super().__init__(msg, name=name, where=where)
        self.name = name


class TemplateCorrupt(PoolError):
    """A published template's files do not match its manifest (missing, resized or altered)."""

    code = "template_corrupt"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"template {name!r} is corrupt: {reason}", name=name, reason=reason)
        self.reason = reason


class Incompatible(PoolError):
    """A template image cannot be restored on this node (CRIU version, kernel, CPU)."""

    code = "incompatible"

    def __init__(self, reason: str, **data: Any) -> None:
        super().__init__(f"template cannot be restored here: {reason}", reason=reason, **data)
        self.reason = reason


class BuildError(PoolError):
    """Building a template failed at a named step; the app's last output lines come along, and the
    errno when the step failed on one (e.g. ENOSPC: the store's disk is full)."""

    code = "build_failed"

    def __init__(self, step: str, problem: str, *, output_tail: str = "",
                 errno: int | None = None) -> None:
        text = f"build failed while {step}: {problem}"
        if output_tail:
            text += "\n--- last output of the app ---\n" + output_tail
        super().__init__(text, step=step, problem=problem, output_tail=output_tail, errno=errno)
        self.step = step
        self.problem = problem
        self.output_tail = output_tail
        self.errno = errno


# --- instances --------------------------------------------------------------------------------------
class RestoreError(PoolError):
    """A restore failed at a named step; whatever it had started is gone."""

    code = "restore_failed"

    def __init__(self, step: str, problem: str, *, output_tail: str = "") -> None:
        text = f"restore failed while {step}: {problem}"
        if output_tail:
            text += "\n--- last output of the copy ---\n" + output_tail
        super().__init__(text, step=step, problem=problem, output_tail=output_tail)
        self.step = step
        self.problem = problem
        self.output_tail = output_tail


class InstanceNotFound(PoolError):
    code = "instance_not_found"

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"no instance {instance_id!r}", instance_id=instance_id)


class SnapshotNotFound(PoolError):
    code = "snapshot_not_found"

    def __init__(self, instance_id: str, snapshot: str | None) -> None:
        what = f"no snapshot {snapshot!r}" if snapshot else "no snapshot"
        super().__init__(f"instance {instance_id!r} has {what} (`pool snapshots {instance_id}` lists them)",
                         instance_id=instance_id, snapshot=snapshot)


class CheckpointError(PoolError):
    """A checkpoint of a running instance failed at a named step; the instance still runs."""

    code = "checkpoint_failed"

    def __init__(self, step: str, problem: str) -> None:
        super().__init__(f"checkpoint failed while {step}: {problem} (the instance still runs)",
                         step=step, problem=problem)
        self.step = step
        self.problem = problem


class NoCapacity(PoolError):
    code = "no_capacity"


class Quarantined(PoolError):
    code = "quarantined"


class NodeUnavailable(PoolError):
    """A node or the service cannot be reached or cannot serve now."""

    code = "node_unavailable"


class ShuttingDown(NodeUnavailable):
    """The service (or a node, or a template's pool on it) is stopping and takes no new work."""

    code = "shutting_down"


class Conflict(PoolError):
    """A transaction on the cluster state (etcd) lost: what it would create is someone else's."""

    code = "conflict"


class TransferError(PoolError):
    """Shipping a template between nodes failed (connection, peer, deadline); safe to retry."""

    code = "transfer_failed"


# --- deadlines ------------------------------------------------------------------------------------
class PoolTimeout(PoolError, TimeoutError):
    """Something did not finish within its deadline: no copy was ready within a spawn's timeout, or
    a request ran past the server's request_timeout. Also a TimeoutError, so `except TimeoutError`
    catches it."""

    code = "timeout"


class NoReply(PoolTimeout):
    """A peer did not reply to a request within the caller's deadline (raised on the caller's side;
    the request may still have run)."""

    code = "no_reply"


# --- wire -------------------------------------------------------------------------------------------
class ProtocolError(PoolError):
    """A peer sent something that is not a valid frame or message."""

    code = "protocol_error"


class AuthError(PoolError):
    code = "auth_failed"


class PermissionDenied(PoolError):
    """The caller is known but may not do this (pool.cluster.access: roles from its credentials)."""

    code = "permission_denied"


class TlsError(AuthError):
    """A TLS handshake failed: names the peer, the node name expected and what was wrong."""

    code = "tls_failed"


class BadRequest(PoolError):
    """A well-formed request with a wrong method or parameter."""

    code = "bad_request"


class InternalError(PoolError):
    """A handler failed with something other than a PoolError (a bug); the server logged it."""

    code = "internal"


class RemoteError(PoolError):
    """An error reply from a peer whose code this side does not know."""

    code = "remote_error"


def _all_subclasses(cls: type[PoolError]) -> list[type[PoolError]]:
    out: list[type[PoolError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def from_wire(err: dict[str, Any]) -> PoolError:
    """Rebuild a typed error from an error reply; unknown codes become RemoteError."""
    code = err.get("code")
    message = str(err.get("message", ""))
    data = err.get("data") or {}
    for cls in _all_subclasses(PoolError):
        if cls.code == code:
            exc = cls.__new__(cls)  # (not PoolError.__new__: PoolTimeout's base is OSError's)
            PoolError.__init__(exc, message, **data)
            for k, v in data.items():
                if not hasattr(cls, k):  # never shadow methods or BaseException.args
                    setattr(exc, k, v)
            return exc
    exc = RemoteError(message, **data)
    exc.code = str(code)
    return exc
