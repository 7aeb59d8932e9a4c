"""`pool` commands on running instances: checkpoint, snapshots, rollback, suspend, resume,
migrate (docs/service.md, "Running instances"). Each has --json; the client is imported when one runs."""
from __future__ import annotations

import argparse
import time

from pool.cli import tables
from pool.cli.service import _client, _print_json


def cmd_checkpoint(args) -> int:
    with _client(args) as c:
        r = c.checkpoint(args.id, tag=args.tag, keep=args.keep, timeout=args.timeout)
    if args.json:
        _print_json(r)
        return 0
    s = r["snapshot"]
    print(f"{s['id']}  instance {r['id']}  {s['bytes'] / 2**20:.1f} MB  frozen "
          f"{s['freeze_ms'] if s['freeze_ms'] is not None else '?'} ms  (dump {s['dump_ms']:.0f} ms)")
    if r["published"]:
        print(f"published as template {r['published']}")
    for note in ("pre_dump", "hooks"):
        print(f"{note.replace('_', '-')}: {r[note]}")
    return 0


def cmd_snapshots(args) -> int:
    with _client(args) as c:
        rows = c.snapshots(args.id)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"instance {args.id} has no snapshots")
        return 0
    print(tables.render(["ID", "TAG", "TIME", "MB", "FROZEN MS"],
                        [[r["id"], r["tag"] or "", time.strftime("%Y-%m-%d %H:%M:%S",
                                                                 time.localtime(r["created"])),
                          f"{r['bytes'] / 2**20:.1f}", r["freeze_ms"]] for r in rows],
                        right={3, 4}))
    return 0


def _restored(args, r) -> int:
    if args.json:
        _print_json(r)
    else:
        print(f"{r['id']}  {r['state']}  pid {r['pid']}  from snapshot {r['snapshot']}  "
              f"in {r['restore_ms']:.0f} ms  {r['address'] or ''}")
    return 0


def cmd_rollback(args) -> int:
    with _client(args) as c:
        return _restored(args, c.rollback(args.id, args.snapshot, timeout=args.timeout))


def cmd_resume(args) -> int:
    with _client(args) as c:
        return _restored(args, c.resume(args.id, timeout=args.timeout))


def cmd_suspend(args) -> int:
    with _client(args) as c:
        r = c.suspend(args.id, timeout=args.timeout)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['id']}  suspended (snapshot {r['snapshot']['id']}, "
              f"{r['snapshot']['bytes'] / 2**20:.1f} MB); a connection to {r['address']} wakes it")
    return 0


def cmd_migrate(args) -> int:
    with _client(args) as c:
        r = c.migrate(args.id, args.node, lazy=args.lazy, timeout=args.timeout)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['id']}  moved {r['from_node']} -> {r['node']}  pid {r['pid']}  {r['address'] or ''}"
              f"  (frozen {r['freeze_ms']} ms, {r['image_bytes'] / 2**20:.1f} MB, "
              f"{r['migrate_ms']:.0f} ms in all)")
    return 0


def add_commands(sub, socket_opt) -> None:
    def common(s: argparse.ArgumentParser, timeout: float) -> None:
        socket_opt(s)
        s.add_argument("id", help="the instance")
        s.add_argument("--timeout", type=float, default=timeout)
        s.add_argument("--json", action="store_true")

    s = sub.add_parser("checkpoint", help="checkpoint a running instance without stopping it; "
                                          "prints the snapshot's id and how long the app was frozen")
    common(s, 120.0)
    s.add_argument("--tag", help="a name for the snapshot (rollback takes it in place of the id)")
    s.add_argument("--keep", action="store_true",
                   help="also publish it as a new template, which outlives the instance")
    s.set_defaults(func=cmd_checkpoint)

    s = sub.add_parser("snapshots", help="an instance's snapshots: id, tag, time, size")
    socket_opt(s)
    s.add_argument("id", help="the instance")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_snapshots)

    s = sub.add_parser("rollback", help="replace an instance's process by a restore of a snapshot "
                                        "(default the latest): same id, same address")
    common(s, 60.0)
    s.add_argument("snapshot", nargs="?", help="snapshot id or tag")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("suspend", help="checkpoint an instance to disk and end its process; its "
                                       "address stays open and the next connection wakes it")
    common(s, 120.0)
    s.set_defaults(func=cmd_suspend)

    s = sub.add_parser("resume", help="restore a suspended instance now")
    common(s, 60.0)
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("migrate", help="move a running instance to another node (same id, a new "
                                       "address); a failed move leaves it where it was")
    common(s, 120.0)
    s.add_argument("--node", required=True, help="the node to move it to")
    s.add_argument("--lazy", action="store_true", help="run it on the node at once, its memory "
                                                       "following on demand (fs.pipe-max-size >= 4 MiB)")
    s.set_defaults(func=cmd_migrate)
