"""One hierarchy of errors for the whole package.

Every error carries a stable `code` (used on the wire) and the structured facts a caller needs
(`data`), so a client can act on an error without parsing its message.
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


class NoCapacity(PoolError):
    code = "no_capacity"


class Quarantined(PoolError):
    code = "quarantined"


class NodeUnavailable(PoolError):
    code = "node_unavailable"


class TransferError(PoolError):
    """Shipping a template between nodes failed (connection, peer, deadline); safe to retry."""

    code = "transfer_failed"


# --- wire -------------------------------------------------------------------------------------------
class ProtocolError(PoolError):
    """A peer sent something that is not a valid frame or message."""

    code = "protocol_error"


class AuthError(PoolError):
    code = "auth_failed"


class BadRequest(PoolError):
    """A well-formed request with a wrong method or parameter."""

    code = "bad_request"


class RemoteError(PoolError):
    """An error reply from a peer whose code this side does not know."""

    code = "remote_error"


def _all_subclasses(cls: type) -> list[type]:
    out = []
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
            exc = PoolError.__new__(cls)
            PoolError.__init__(exc, message, **data)
            for k, v in data.items():
                if not hasattr(cls, k):  # never shadow methods or BaseException.args
                    setattr(exc, k, v)
            return exc
    exc = RemoteError(message, **data)
    exc.code = str(code)
    return exc
