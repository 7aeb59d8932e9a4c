"""Fault a restored copy's code pages in while it waits warm, so its first spawn does not."""
from __future__ import annotations

import os

import psutil

PREFAULT_LIMIT = 32 << 20  # bytes of code per copy: the interpreter's own, not all of libtorch


def prefault_code(root_pid: int, limit: int = PREFAULT_LIMIT) -> None:
    """Map the code pages of a restored copy's processes into their page tables.

    CRIU maps the copy's executable files afresh, so the first instructions it runs after restore
    fault each code page in: ~60 minor faults and ~0.25 ms on the first (warm) spawn's handshake.
    Reading the pages through /proc/PID/mem faults them into the copy's page tables now, while it
    waits warm; only the first `limit` bytes of code (the executable and the first libraries
    mapped), since a big library's pages would cost far more than they save. Best effort: a copy
    that went away or a mapping we cannot read is skipped."""
    try:
        procs = [root_pid, *(p.pid for p in psutil.Process(root_pid).children(recursive=True))]
    except psutil.Error:
        return
    for pid in procs:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                for line in maps:
                    fields = line.split()
                    if fields[1] != "r-xp" or len(fields) < 6 or not fields[5].startswith("/"):
                        continue
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    end = min(end, start + limit)
                    limit -= end - start
                    if end <= start:
                        return
                    for addr in range(start, end, 4096):
                        try:
                            os.pread(mem.fileno(), 1, addr)
                        except OSError:
                            break
        except OSError:
            continue
