"""Who may do what through the service's sockets, from the caller's kernel-verified credentials.

On the unix socket the kernel tells us the peer's uid and groups (SO_PEERCRED, SO_PEERGROUPS); they
cannot be forged by the client. Three roles:
- admin: root, and members of `[service] admin_group`: every method.
- user: members of `[service] users_group`: spawn, and manage only the copies they spawned (kill,
  wait, info, logs, checkpoint, snapshots, rollback, suspend, resume; list shows only theirs); read the templates. Node-wide state and operations
  (stats, nodes, set_warm, push, fork) are the admins'.
- anyone else: refused with PermissionDenied.
A TCP peer has passed the token (and TLS) check, so it is a node or an operator: admin.

Each copy records its owner's uid at spawn (the coordinator sets it; a value a client sends is
replaced), so ownership outlives a service restart (journal).
"""
from __future__ import annotations

import grp
from dataclasses import dataclass
from typing import Any

from pool.errors import PermissionDenied, SpecError

ADMIN, USER = "admin", "user"
# Methods a user may call; those taking an instance id act only on the user's own copies.
USER_METHODS = frozenset({"ping", "spawn", "kill", "wait", "info", "logs", "list", "templates",
                          "checkpoint", "snapshots", "rollback", "suspend", "resume"})
OWN_COPY_METHODS = frozenset({"kill", "wait", "info", "logs",
                              "checkpoint", "snapshots", "rollback", "suspend", "resume"})


def group_id(name: str | None, where: str, fld: str) -> int | None:
    """The gid of a group named in the config; a SpecError naming the field if there is none."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SpecError(where, fld, f"no group named {name!r} on this machine") from None


@dataclass(frozen=True)
class AccessPolicy:
    admin_gid: int | None = None
    users_gid: int | None = None

    @property
    def shared(self) -> bool:
        """Users other than root may connect: the socket is opened to all, and this policy decides."""
        return self.admin_gid is not None or self.users_gid is not None

    def role(self, ctx: Any) -> str | None:
        """ADMIN, USER or None for a connection (rpc.ConnContext)."""
        if ctx.transport != "unix":
            return ADMIN
        groups = {ctx.gid, *ctx.groups}
        if ctx.uid == 0 or (self.admin_gid is not None and self.admin_gid in groups):
            return ADMIN
        if self.users_gid is not None and self.users_gid in groups:
            return USER
        return None

    def check(self, method: str, ctx: Any) -> str:
        """The caller's role, if it may call method at all; else PermissionDenied."""
        role = self.role(ctx)
        if role == ADMIN or (role == USER and method in USER_METHODS):
            return role
        why = ("only the admins may" if role == USER else f"uid {ctx.uid} is neither root nor in the "
               "service's admin or users group, so it may not")
        raise PermissionDenied(f"{why} call {method}", method=method, uid=ctx.uid)

    @staticmethod
    def check_owner(info: dict, ctx: Any, method: str) -> None:
        """A user acts on a copy it spawned, or is refused (the copy's id is named, nothing else)."""
        if info.get("owner") != ctx.uid:
            raise PermissionDenied(f"instance {info['id']} was not spawned by uid {ctx.uid}: only "
                                   f"its owner and the admins may {method} it",
                                   method=method, uid=ctx.uid, id=info["id"])
