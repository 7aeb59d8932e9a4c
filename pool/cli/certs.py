"""`pool certs`: the cluster's CA and its nodes' certificates, for mutual TLS on every TCP link
(pool/wire/tls.py, docs/security.md).

    pool certs init [--dir D]                      # D/ca.crt, D/ca.key (0600), D 0700
    pool certs issue NODE [--ip A] [--dir D]       # D/NODE/{ca.crt,node.crt,node.key}: NODE's --tls-dir
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pool.names import NAME_RULE, is_name

DEFAULT_DIR = "/etc/pool/certs"
EXIT_ERROR = 1


def _report(args, obj: dict, text: str) -> int:
    if args.json:
        json.dump(obj, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0


def _fail(args, e: BaseException) -> int:
    print(f"pool certs {args.certs_command}: {e}", file=sys.stderr)
    return EXIT_ERROR


def cmd_init(args) -> int:
    from pool.wire import tls  # noqa: PLC0415

    d = Path(args.dir)
    try:
        path = tls.make_ca(d, days=args.days, force=args.force)
    except (OSError, ValueError) as e:
        return _fail(args, e)
    info = tls.describe(path)
    return _report(args, {"ca": info, "dir": str(d)},
                   f"cluster CA made in {d} (valid until {info['not_after']}); keep {d / tls.CA_KEY} "
                   f"secret.\nNext: pool certs issue NODE --dir {d}")


def cmd_issue(args) -> int:
    from pool.wire import tls  # noqa: PLC0415

    if not is_name(args.node):
        return _fail(args, ValueError(f"{args.node!r} is not a node name ({NAME_RULE})"))
    d = Path(args.dir)
    try:
        out = tls.issue(d, args.node, ip=args.ip, days=args.days, force=args.force,
                        out=Path(args.out) if args.out else None)
    except (OSError, ValueError) as e:
        return _fail(args, e)
    info = tls.describe(out / tls.NODE_CERT)
    return _report(args, {"node": info, "tls_dir": str(out)},
                   f"{args.node}: certificate for {', '.join(info['san'])} (valid until "
                   f"{info['not_after']}) in {out}.\nCopy that directory to {args.node} (mode 700) "
                   f"and start it with --tls-dir pointing at it.")


def add_commands(sub) -> None:
    c = sub.add_parser("certs", help="the cluster CA and node certificates for TLS (docs/security.md)")
    verbs = c.add_subparsers(dest="certs_command", required=True, metavar="VERB")

    def common(s: argparse.ArgumentParser, days: int) -> None:
        s.add_argument("--dir", default=DEFAULT_DIR, help=f"the CA's directory (default {DEFAULT_DIR})")
        s.add_argument("--days", type=int, default=days, help=f"validity in days (default {days})")
        s.add_argument("--force", action="store_true", help="replace existing files")
        s.add_argument("--json", action="store_true", help="print one JSON object")

    s = verbs.add_parser("init", help="make the cluster CA (ca.crt, ca.key)")
    common(s, 3650)
    s.set_defaults(func=cmd_init)

    s = verbs.add_parser("issue", help="make a node's key and certificate, signed by the CA")
    s.add_argument("node", help="the node's name: [nodes.NAME] in the coordinator's config, "
                                "--name of its agent")
    s.add_argument("--ip", help="also put this address in the certificate")
    s.add_argument("--out", metavar="DIR", help="write the node's TLS directory here "
                                                "(default: DIR/NODE under the CA's directory)")
    common(s, 825)
    s.set_defaults(func=cmd_issue)
