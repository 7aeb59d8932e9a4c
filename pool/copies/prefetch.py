"""Fetch a lazily restored copy's working set first: read its pages from our side.

process_vm_readv(2) on a page the copy has not got yet faults through the copy's userfaultfd
(remote access with retry allowed), so the lazy-pages daemon serves it as if the copy had touched
it, while its background copy of the rest goes on. (/proc/PID/mem does not: its remote access may
not retry, and a missing page reads as EIO.) Pages are read in batches; a run the copy has unmapped
since the build is skipped.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator

from pool.templates.workingset import PAGE, Run

BATCH_BYTES = 4 << 20
IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]


def host_pids(root: int) -> dict[int, int]:
    """{pid inside the copy's pid namespace: host pid} for root and its descendants."""
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()
            found[int(nspid[-1])] = pid
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(p) for p in f.read().split())
    return found


def fetch(root: int, runs: Iterable[Run]) -> int:
    """Read every page of runs in the copy rooted at root; returns the bytes read."""
    pids = host_pids(root)
    total = 0
    by_pid: dict[int, list[Run]] = {}
    for run in runs:
        by_pid.setdefault(run.pid, []).append(run)
    buf = ctypes.create_string_buffer(BATCH_BYTES)
    for ns_pid, pid_runs in by_pid.items():
        host = pids.get(ns_pid)
        if host is None:
            continue  # that process has exited since the build's trial
        for batch in _batches(pid_runs):
            total += _read(host, batch, buf)
    return total


def _batches(runs: list[Run]) -> Iterator[list[tuple[int, int]]]:
    """(address, length) pieces, each batch at most BATCH_BYTES and IOV_MAX pieces."""
    batch: list[tuple[int, int]] = []
    size = 0
    for run in runs:
        addr, left = run.address, run.pages * PAGE
        while left:
            piece = min(left, BATCH_BYTES - size)
            batch.append((addr, piece))
            size += piece
            addr += piece
            left -= piece
            if size == BATCH_BYTES or len(batch) == IOV_MAX:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _read(pid: int, pieces: list[tuple[int, int]], buf) -> int:
    """process_vm_readv of pieces; a piece that cannot be read (unmapped) is skipped."""
    done = 0
    while pieces:
        length = sum(n for _, n in pieces)
        local = _Iovec(ctypes.addressof(buf), length)
        remote = (_Iovec * len(pieces))(*[_Iovec(a, n) for a, n in pieces])
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(pieces), 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == 3:      # ESRCH: the process is gone
                return done
            got = 0           # EFAULT on the first piece: skip it below
        done += got
        # partial reads stop at a piece boundary (or inside the piece that failed): drop what
        # was read and the piece that could not be
        while pieces and got >= pieces[0][1]:
            got -= pieces.pop(0)[1]
        if pieces:
            pieces.pop(0)
    return done
