"""File descriptors: the process's limit, and waiting on one fd.

The service and the agent raise their soft RLIMIT_NOFILE to the hard limit at start: every copy, every
connection and every restore in flight holds fds, and the usual soft limit of 1024 is reached long before
the machine's. Fds then go past 1023, where select() fails (FD_SETSIZE): wait on single fds with
readable() (poll), never select.select.
"""
from __future__ import annotations

import logging
import resource
import select

log = logging.getLogger(__name__)


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. a hard limit of RLIM_INFINITY the kernel refuses
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft, hard


def readable(fd: int, timeout: float | None) -> bool:
    """Wait up to timeout seconds (None: for ever) until fd is readable, hung up or in error."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLPRI)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
