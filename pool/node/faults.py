"""Whose fault is a failed copy: the template's, the node's or the caller's.

Only faults of the template count toward its quarantine (warm.WarmPool). A restore or hand-over that
fails because the node ran out of something (fds, memory, disk, processes), because CRIU is missing,
because the request was cancelled or the service is shutting down, because the template is not
built, or because of what the caller sent (a hostname the kernel refuses) says nothing about the
template: quarantining it would take it away from every user for one busy moment or one bad request.

The cause chain (`raise ... from e`) is walked, so a RestoreError raised from a CriuFailed with errno
EMFILE, or from an OSError(EINVAL) of sethostname, is classified by what it came from.
"""
from __future__ import annotations

import asyncio
import errno
import os
from typing import Iterator

from pool.errors import (BadRequest, CriuFailed, CriuUnavailable, NoCapacity, NodeUnavailable, PoolError,
                         PoolTimeout, TemplateNotFound)

# The node ran out of a shared resource: another template would have failed the same way.
NODE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EAGAIN,
                         errno.EDQUOT})
# What CRIU writes into its log for them (its errno is not always known to us).
_NODE_STRERRORS = tuple(os.strerror(n) for n in NODE_ERRNOS)
# Not about the template: the caller, the node or the service's own state (NodeUnavailable includes
# ShuttingDown; PoolTimeout is a deadline of the node's, not CRIU hanging on an image: CriuTimeout).
_NOT_THE_TEMPLATE = (asyncio.CancelledError, BadRequest, NoCapacity, NodeUnavailable,
                     CriuUnavailable, TemplateNotFound, PoolTimeout)
# The kernel refused what the caller asked for (sethostname of a name it does not take).
_CALLER_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def node_fault(exc: BaseException) -> bool:
    """exc (or what it was raised from) is the node's or the service's state, not the template's."""
    for e in _chain(exc):
        if isinstance(e, _NOT_THE_TEMPLATE):
            return True
        if isinstance(e, (OSError, CriuFailed)) and e.errno in NODE_ERRNOS:
            return True
        if isinstance(e, CriuFailed) and any(s in e.log_tail for s in _NODE_STRERRORS):
            return True
    return False


def counts_against_template(exc: BaseException) -> bool:
    """Whether a failed restore counts toward the template's quarantine."""
    return not node_fault(exc)


def handover_counts_against_template(exc: BaseException) -> bool:
    """Whether a failed identity hand-over counts: not when the node or the caller's identity
    caused it (an OSError EINVAL from applying it, or an identity that cannot be encoded)."""
    if isinstance(exc, (TypeError, ValueError, OverflowError)):
        return False  # the caller's env/args could not be encoded into the identity message
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CALLER_ERRNOS:
            return False
    return counts_against_template(exc)


def describe(e: BaseException) -> str:
    """The first line of an error, for last_error."""
    text = e.message if isinstance(e, PoolError) else f"{type(e).__name__}: {e}"
    return text.splitlines()[0] if text else type(e).__name__
