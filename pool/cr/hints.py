"""CRIU's errors for things a template or a copy cannot hold, translated into what a user can do.

A rule is (pattern over CRIU's log excerpt, advice). docs/limits.md explains each case at length.
"""
from __future__ import annotations

import re

Rules = list[tuple[re.Pattern[str], str]]

DUMP: Rules = [
    (re.compile(r"io_uring"), "the app uses io_uring, which CRIU cannot checkpoint; for Node "
                              "set UV_USE_IO_URING=0 (the builder sets it by default)"),
    (re.compile(r"Connected TCP|TCP connection|established", re.I),
     "the app holds an established TCP connection; close it in a before_checkpoint hook or set "
     "[checkpoint] tcp_close = true"),
    (re.compile(r"nvidia|/dev/dri|kfd", re.I), "the app holds a GPU device, which CRIU cannot "
                                               "checkpoint here; load models on the CPU"),
    # a unix socket to a server outside the tree: "External socket is used" once the server has
    # accepted, "Dangling connection" while the connection still waits in its backlog
    (re.compile(r"[Ee]xternal|unix.*peer|Can't dump.*unix|Dangling connection", re.I),
     "the app holds a socket or file connected to something outside its tree; open it after the "
     "restore instead, or close it in a before_checkpoint hook"),
    (re.compile(r"Can't dump ghost file"),
     "the app holds a deleted file bigger than the ghost file limit (1 MiB unless [checkpoint] "
     "ghost_limit says otherwise); close it before the checkpoint, or raise ghost_limit (the file "
     "is copied into the image and recreated by every restore)"),
]

RESTORE: Rules = [
    (re.compile(r"has bad size"),
     "a file the template had open has changed size since the checkpoint (CRIU refuses to restore "
     "it): leave files the template opens unchanged, open growing files with O_APPEND, or rebuild "
     "the template"),
    (re.compile(r"hsperfdata"),
     "the JVM's perf data file is gone (the first copy to exit removed it): run Java templates "
     "with -XX:-UsePerfData and rebuild"),
    (re.compile(r"ghost regfile: File exists|Couldn't unlink remap"),
     "a deleted file the template held (e.g. a multiprocessing semaphore in /dev/shm) collided "
     "with another restore's copy of it"),
]


def explain(rules: Rules, log: str) -> str | None:
    """The advice of the first rule whose pattern occurs in log, else None."""
    return next((advice for pattern, advice in rules if pattern.search(log)), None)
