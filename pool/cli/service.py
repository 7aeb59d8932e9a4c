"""`pool` commands that run or talk to the service: serve, agent, spawn, ls, kill, logs, stats,
set-warm, nodes, push, fork (and, from pool/cli/live.py, those on running instances).

Client commands find the service at --socket, else $POOL_SOCKET, else /run/pool/pool.sock.

The client and the service are imported inside the commands: `pool` imports every command module at
start, and pool.client alone adds ~50 ms (asyncio, msgpack) to commands that never use it.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time

from pool import config
from pool.cli import tables
from pool.errors import PoolError

EXIT_ERROR = 1


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=_json_default)
    sys.stdout.write("\n")


def _json_default(o):
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    return str(o)


def _client(args):
    from pool.client import Client  # noqa: PLC0415

    return Client(args.socket or config.socket_path())


# -- serve -------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from pool.cluster.config import load_config  # noqa: PLC0415
    from pool.cluster.service import serve  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = load_config(args.config, socket=args.socket, store=args.serve_store or args.store, tcp=args.tcp,
                      token_file=args.token_file, metrics=args.metrics, tls_dir=args.tls_dir,
                      insecure_plain_tcp=args.insecure_plain_tcp or None, source=args.source,
                      etcd=args.etcd, agent_token_file=args.agent_token_file)
    return serve(cfg)


def cmd_agent(args) -> int:
    from pool.cluster.agent import run_agent  # noqa: PLC0415
    from pool.cluster.config import load_config, parse_hostport  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = load_config(args.config, store=args.agent_store or args.store, run_dir=args.run_dir,
                      metrics=args.metrics, tls_dir=args.tls_dir,
                      insecure_plain_tcp=args.insecure_plain_tcp or None, etcd=args.etcd)
    listen = parse_hostport(args.listen, "command line", "--listen")
    return run_agent(cfg, listen, args.token_file, args.name, socket.gethostname())


# -- client commands ---------------------------------------------------------------------------------
def cmd_spawn(args) -> int:
    with _client(args) as c:
        inst = c.spawn(args.name, env=dict(args.env), args=list(args.args), timeout=args.timeout,
                       hostname=args.hostname, node=args.node)
        if args.json:  # "path" too: the reply's name for served_by
            _print_json({**{k: v for k, v in vars(inst).items() if not k.startswith("_")},
                         "path": inst.served_by})
        else:
            addr = f"  http://{inst.address}/" if inst.address else ""
            print(f"{inst.id}  node {inst.node}  pid {inst.pid}  {inst.served_by} in "
                  f"{inst.spawn_ms:.2f} ms{addr}")
    return 0


def cmd_nodes(args) -> int:
    with _client(args) as c:
        rows = c.nodes()
        cluster = c.stats().get("cluster") if any("lease" in r for r in rows) else None
    if args.json:   # the rows (with each agent's lease on etcd); `pool stats --json` has "cluster"
        _print_json(rows)
        return 0
    etcd = cluster is not None
    print(tables.render(
        ["NODE", "STATE", "ADDRESS", "FREE"] + (["LEASE", "TTL"] if etcd else []) + ["TEMPLATES"],
        [[r["name"], "up" if r["healthy"] else "down", r["address"], r["free"]]
         + ([(r.get("lease") or {}).get("id", "-"), (r.get("lease") or {}).get("ttl")] if etcd else [])
         + [(", ".join(sorted(r["templates"])) or "-")
            + (f"  ({r['last_error']})" if r.get("last_error") else "")] for r in rows],
        right={3, 5} if etcd else {3}))
    if etcd:
        print(f"\netcd {', '.join(cluster['endpoints'])}, prefix {cluster['prefix']}"
              + (f": {cluster['error']}" if cluster.get("error") else ""))
        print(tables.render(["MEMBER", "ID", "CLIENT URLS"],
                            [[m["name"], m["id"], ", ".join(m["client_urls"])]
                             for m in cluster["members"]]))
        print()
        print(tables.render(["COORDINATOR", "HOST", "PID", "TCP", "LEASE", "TTL"],
                            [[co["id"] + (" (this one)" if co["me"] else ""), co["host"], co["pid"],
                              co["tcp"], co["lease"], co["ttl"]] for co in cluster["coordinators"]],
                            right={2, 5}))
    return 0


def cmd_push(args) -> int:
    with _client(args) as c:
        r = c.push(args.name, args.node, timeout=args.timeout)
    if args.json:
        _print_json(r)
    elif r.get("already_current"):
        print(f"{args.name}: node {args.node} already has this build")
    else:
        print(f"{args.name} -> {args.node}: {r['files_sent']} files, "
              f"{r['bytes_wire'] / 2**20:.1f} MB on the wire ({r['codec']}) in {r['seconds']:.2f}s")
    return 0


def cmd_fork(args) -> int:
    with _client(args) as c:
        r = c.fork(args.id, node=args.node, lazy=args.lazy, hostname=args.hostname,
                   timeout=args.timeout)
    if args.json:
        _print_json(r)
    else:
        addr = f"  http://{r['address']}/" if r.get("address") else ""
        print(f"{r['id']}  node {r['node']}  pid {r['pid']}  {r['path']} fork of {args.id}{addr}")
    return 0


def cmd_ls(args) -> int:
    with _client(args) as c:
        rows = c.list(args.template)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no instances")
        return 0
    print(tables.render(["ID", "TEMPLATE", "NODE", "PID", "STATE", "SERVED BY", "UPTIME S",
                         "RESTARTS", "ADDRESS"],
                        [[r["id"], r["template"], r.get("node"), r["pid"], r["state"], r["path"],
                          f"{r.get('uptime_s', 0):.1f}", r.get("restarts", 0), r.get("address")]
                         for r in rows],
                        right={3, 6, 7}))
    return 0


def cmd_kill(args) -> int:
    """Every ID is tried and reported, also after one fails; the exit status says if any did."""
    results = []
    with _client(args) as c:
        for iid in args.ids:
            try:
                d = c.kill(iid, args.grace)
                results.append({"id": iid, "ok": True, "exit_status": d["exit_status"]})
            except PoolError as e:
                results.append({"id": iid, "ok": False, "error": e.code, "message": e.message})
    if args.json:
        _print_json(results)
    else:
        for r in results:
            if r["ok"]:
                print(f"{r['id']}  exit status {r['exit_status']}")
            else:
                print(f"pool kill: {r['id']}: {r['message']}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else EXIT_ERROR


def cmd_logs(args) -> int:
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    if args.json:    # what there is now, as one object (--follow streams raw bytes only)
        with _client(args) as c:
            r = c.logs(args.id, stream, 0, 8 << 20)
        _print_json({"id": args.id, "stream": stream, "text": r["data"].decode(errors="replace"),
                     "offset": r["offset"], "exited": r["exited"],
                     "rotated_away": r.get("rotated_away", 0)})
        return 0
    with _client(args) as c:
        offset = 0
        while True:
            r = c.logs(args.id, stream, offset, 1 << 20)
            if r.get("rotated_away"):
                print(f"[pool logs: {r['rotated_away']} earlier bytes were cut from the log "
                      "(max_log_bytes)]", file=sys.stderr, flush=True)
            if r["data"]:
                out.write(r["data"])
                out.flush()
                offset = r["offset"]
                continue
            if not args.follow or r["exited"]:
                return 0
            time.sleep(0.2)


def cmd_stats(args) -> int:
    with _client(args) as c:
        s = c.stats()
    if args.json:
        _print_json(s)
        return 0
    print(f"service pid {s['pid']}, up {s['uptime_s']:.0f}s, {s['live']} live, "
          f"{s['spawns_in_flight']} spawning" + (f", metrics http://{s['metrics']}/metrics"
                                                  if s.get("metrics") else ""))
    if snaps := s.get("snapshots"):
        print(f"snapshots of running instances: {snaps['count']}, {snaps['bytes'] / 2**20:.1f} MB")
    if not s["templates"]:
        print("no templates in use")
        return 0
    rows = []
    for name, t in s["templates"].items():
        state = f"QUARANTINED: {t['last_error']}" if t["quarantined"] else "ok"
        rows.append([name, t["warm"], t.get("target", t["min_warm"]), t["min_warm"], t["live"],
                     t["max_live"], t["restoring"], f"{t.get('hits', 0)}/{t.get('misses', 0)}",
                     state])
    print(tables.render(["TEMPLATE", "WARM", "TARGET", "MIN", "LIVE", "MAX", "RESTORING",
                         "HITS/MISSES", "STATE"], rows, right={1, 2, 3, 4, 5, 6, 7}))
    return 0


def cmd_set_warm(args) -> int:
    if args.n < 0:
        raise SystemExit("pool set-warm: N must be >= 0")
    with _client(args) as c:
        t = c.set_warm(args.name, args.n)
    if args.json:
        _print_json(t)
        return 0
    print(f"{args.name}: min_warm {t['min_warm']} (warm now {t['warm']}, restoring {t['restoring']})")
    return 0


def add_commands(sub, env_pair) -> None:
    def socket_opt(s: argparse.ArgumentParser) -> None:
        s.add_argument("--socket", help="service socket (default $POOL_SOCKET or "
                                        f"{config.DEFAULT_SOCKET})")

    def tls_opts(s: argparse.ArgumentParser) -> None:
        s.add_argument("--tls-dir", metavar="DIR", help="this node's TLS files (ca.crt, node.crt, "
                       "node.key; `pool certs issue`): mutual TLS on every TCP link")
        s.add_argument("--insecure-plain-tcp", action="store_true",
                       help="allow TCP without TLS (tokens and images in clear): tests and local "
                            "development only")

    s = sub.add_parser("serve", help="run the pool service (warm pools, RPC API, metrics)")
    socket_opt(s)
    s.add_argument("--config", help="service TOML: [service] and [templates.NAME] min_warm, ...")
    s.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (needs --token-file)")
    s.add_argument("--token-file", help="file holding the shared token TCP clients must present")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    tls_opts(s)
    s.add_argument("--source", metavar="HOST:PORT", help="where agents fetch templates from "
                                                         "(default: the --tcp host, any port)")
    s.add_argument("--etcd", metavar="URL[,URL]", help="the cluster's state in etcd: agents join "
                   "by themselves, several coordinators may serve (docs/nodes.md)")
    s.add_argument("--agent-token-file", help="with --etcd: the token the agents were started with")
    s.add_argument("--store", dest="serve_store", metavar="STORE",
                   help=f"template store (default $POOL_STORE or {config.DEFAULT_STORE})")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("spawn", help="start a copy of a template through the service",
                       usage="pool spawn NAME [--env K=V] [--hostname H] [--json] [-- ARGS...]")
    socket_opt(s)
    s.add_argument("name")
    s.add_argument("--env", action="append", type=env_pair, default=[], metavar="K=V",
                   help="environment override (repeatable; SDK templates)")
    s.add_argument("--hostname", help="hostname of the copy")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a copy")
    s.add_argument("--node", help="spawn on this node (default: the scheduler picks)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_spawn, takes_args=True)

    s = sub.add_parser("agent", help="run a node agent a coordinator schedules onto (docs/nodes.md)")
    s.add_argument("--listen", required=True, metavar="HOST:PORT", help="TCP address to serve on")
    s.add_argument("--token-file", required=True, help="the token coordinators must present")
    s.add_argument("--store", dest="agent_store", metavar="STORE", help="this node's template cache")
    s.add_argument("--run-dir", help="instances' private dirs (default $POOL_RUN_DIR)")
    s.add_argument("--config", help="TOML: [service] capacity, max_live...; [templates.NAME]")
    s.add_argument("--name", help="this node's name in replies (default: the hostname)")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve this node's Prometheus /metrics there")
    s.add_argument("--etcd", metavar="URL[,URL]", help="join the cluster: register this node in "
                   "etcd with a lease (coordinators find it there)")
    tls_opts(s)
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_agent)

    s = sub.add_parser("nodes", help="the coordinator's nodes: health, cached templates, capacity")
    socket_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_nodes)

    s = sub.add_parser("push", help="ship a template to a node now (else: on its first spawn)")
    socket_opt(s)
    s.add_argument("name")
    s.add_argument("--node", required=True)
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("fork", help="checkpoint a running instance (it keeps running) and restore "
                                    "a copy of it, memory state included, on a node")
    socket_opt(s)
    s.add_argument("id")
    s.add_argument("--node", help="target node (default: the scheduler picks)")
    s.add_argument("--lazy", action="store_true", help="restore at once, memory on demand "
                                                       "(page server; fs.pipe-max-size >= 4 MiB)")
    s.add_argument("--hostname", help="hostname of the copy")
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fork)

    from pool.cli import live  # noqa: PLC0415  (it imports this module)

    live.add_commands(sub, socket_opt)

    s = sub.add_parser("ls", help="list running instances")
    socket_opt(s)
    s.add_argument("template", nargs="?", help="only this template's")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("kill", help="stop instances (SIGTERM, then SIGKILL after --grace)")
    socket_opt(s)
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--grace", type=float, default=3.0)
    s.add_argument("--json", action="store_true", help="one result per ID: ok, exit_status or error")
    s.set_defaults(func=cmd_kill)

    s = sub.add_parser("logs", help="print an instance's output")
    socket_opt(s)
    s.add_argument("id")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    s.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    s.add_argument("--json", action="store_true", help="the log so far as one JSON object")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("stats", help="warm pools, live instances, quarantines")
    socket_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("set-warm", help="set how many warm copies of a template to keep "
                                        "(also clears a quarantine)")
    socket_opt(s)
    s.add_argument("name")
    s.add_argument("n", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_set_warm)
