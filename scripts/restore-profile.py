#!/usr/bin/env python3
"""Where one CRIU restore's time goes (docs/restore-profile.md): for each template in the store,
  1. the restore chain's steps, timed (Restorer's on_step), over N restores;
  2. one plain restore at CRIU log level 4 with time stamps: the largest gaps between log lines,
     which name CRIU's phases (kernel probes, network set-up, reading pages).
Usage (root): scripts/restore-profile.py [--store DIR] [-n N] TEMPLATE..."""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
from pathlib import Path

from pool import config
from pool.copies.restore import Restorer
from pool.cr.criu import Criu, RestoreOptions, become_subreaper
from pool.templates.store import Store

STAMP = re.compile(r"^\((\d+\.\d+)\)\s*(.*)")


def step_times(restorer: Restorer, name: str, n: int, steps: dict) -> None:
    for _ in range(n):
        copy = restorer.spawn(name)
        copy.kill(grace=0)
        copy.close()
    for step, times in steps.items():
        print(f"  {step:28s} {statistics.median(times) * 1000:8.1f} ms (median of {len(times)})")


def log_gaps(criu: Criu, template, top: int = 12) -> None:
    m = template.manifest
    with tempfile.TemporaryDirectory(prefix="pool-profile-") as tmp:
        fds = {m.stdio_key(s): os.open(Path(tmp) / f"{s}.log", os.O_WRONLY | os.O_CREAT, 0o600)
               for s in ("stdout", "stderr")}
        if m.sdk:
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            fds.update({m.pipe_key("ctl_in"): r1, m.pipe_key("ctl_out"): w2})
        pid = criu.restore(template.image_dir, log_dir=Path(tmp), opts=RestoreOptions(
            inherit_fds=fds, log_level=4, tcp_close=m.tcp_close))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        lines = [STAMP.match(ln) for ln in (Path(tmp) / "restore.log").read_text().splitlines()]
    stamped = [(float(x.group(1)), x.group(2)) for x in lines if x]
    gaps = sorted(((b[0] - a[0], a[1], b[1]) for a, b in zip(stamped, stamped[1:])), reverse=True)
    print(f"  CRIU's log: {stamped[-1][0] * 1000:.1f} ms from its first line to its last")
    for gap, before, after in gaps[:top]:
        print(f"  {gap * 1000:7.1f} ms  between: {before[:70]!r}\n{'':20s}and: {after[:70]!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(config.store_path()))
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("templates", nargs="+")
    args = ap.parse_args()
    become_subreaper()
    criu, store = Criu.locate(), Store(Path(args.store))
    with tempfile.TemporaryDirectory(prefix="pool-profile-run-") as run:
        for name in args.templates:
            steps: dict[str, list[float]] = {}
            restorer = Restorer(store, criu, Path(run),
                                on_step=lambda s, t: steps.setdefault(s, []).append(t))
            print(f"{name}: restore chain steps")
            step_times(restorer, name, args.n, steps)
            print(f"{name}: CRIU restore at -v4")
            log_gaps(criu, store.get(name))


if __name__ == "__main__":
    main()
