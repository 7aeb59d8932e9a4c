"""`pool`: the command line. Node commands (doctor, build, templates, inspect, rm, restore) work
without the service; service commands (serve, spawn, ls, kill, logs, stats, set-warm) live in
pool/cli/service.py and talk to it over RPC."""
# Each command imports what it needs when it runs (the function-local imports below): loading the
# whole service side at start-up costs ~0.8 s that every `pool ls` or `pool --help` would pay.
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import argcomplete

from pool import config
from pool.cli import tables
from pool.errors import PoolError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _store(args):
    from pool.templates.store import Store  # noqa: PLC0415

    from pool.templates.imagecrypt import ImageKey  # noqa: PLC0415

    root = Path(args.store) if args.store else config.store_path()
    key_path = Path(args.image_key) if args.image_key else config.image_key_path()
    return Store(root, key=ImageKey.load_or_create(key_path, root) if key_path else None)


def _template_search() -> list[Path]:
    here = Path.cwd()
    return [here / "templates", here]


# -- doctor ----------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from pool.cli import doctor  # noqa: PLC0415

    checks, facts = doctor.run_checks(Path(args.store) if args.store else None)
    ok, reason = doctor.verdict(checks)
    if args.json:
        _print_json(doctor.as_json(checks, facts))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<8} {c.name:<{width}}  {c.detail}")
        print()
        print(("OK: " if ok else "FAIL: ") + reason)
    return 0 if ok else EXIT_ERROR


# -- templates -------------------------------------------------------------------------------------
def cmd_build(args) -> int:
    from pool.cr.criu import Criu  # noqa: PLC0415
    from pool.templates.build import build  # noqa: PLC0415
    from pool.templates.spec import find_template_dir, load_spec  # noqa: PLC0415

    spec = load_spec(find_template_dir(args.template, _template_search()))
    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{spec.name}] {msg}", file=sys.stderr, flush=True)
    echo = (lambda line: print(f"[{spec.name}:app] {line}", file=sys.stderr)) if args.verbose else None
    result = build(spec, _store(args), Criu.locate(), progress=progress, timeout=args.timeout,
                   echo=echo)
    if args.json:
        _print_json(result.manifest.to_dict())
    return 0


def _summary(t) -> dict:
    m = t.manifest.to_dict()
    return {"name": t.name, "build_id": m["build_id"], "built_at": m["built_at"],
            "image_mb": round(m["image_bytes"] / 2**20, 1), "ready_s": m["boot_to_ready_s"],
            "sdk": "ctl_in" in m["pipes"], "criu": m["criu_version"]}


def cmd_templates(args) -> int:
    rows = [_summary(t) for t in _store(args).all()]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no templates in {_store(args).root} (build one: pool build templates/py-hello)")
        return 0
    print(tables.render(["NAME", "IMAGE MB", "READY S", "SDK", "BUILT", "BUILD"],
                        [[r["name"], r["image_mb"], r["ready_s"], "yes" if r["sdk"] else "no",
                          r["built_at"], r["build_id"]] for r in rows], right={1, 2}))
    return 0


def cmd_inspect(args) -> int:
    t = _store(args).get(args.name)
    if args.verify:
        t.verify(full=True)
    if args.json:
        _print_json({**t.manifest.to_dict(), "path": str(t.build_dir)})
        return 0
    m = t.manifest.to_dict()
    print(f"template  {t.name}  (build {m['build_id']}, {t.build_dir})")
    print(f"command   {' '.join(m['spec']['command'])}")
    print(f"ready     {m['spec']['ready']['mode']} after {m['boot_to_ready_s']}s; warm-up "
          f"{m['warmup_s']}s; dump {m['dump_s']}s; build {m['build_s']}s")
    print(f"image     {m['image_bytes'] / 2**20:.1f} MB in {len(m['files'])} files; RSS at "
          f"checkpoint {m['rss_bytes'] / 2**20:.1f} MB")
    print(f"node      CRIU {m['criu_version']}, kernel {m['kernel']}, {m['arch']}")
    print(f"network   {m['spec']['network']}")
    if args.verify:
        print("verify    every file matches its sha256")
    return 0


def cmd_rm(args) -> int:
    _store(args).remove(args.name)
    if args.json:
        _print_json({"removed": args.name})
    else:
        print(f"removed {args.name}")
    return 0


# -- restore without the service -------------------------------------------------------------------
def cmd_restore(args) -> int:
    from pool.cli.restore import run  # noqa: PLC0415

    return run(args, _store(args))


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pool", description="prewarm-pool: boot an app once, checkpoint it with CRIU, and "
                                 "start copies of it in milliseconds.")
    p.add_argument("--version", action="version", version=f"%(prog)s (prewarm-pool) {_version()}")
    p.add_argument("--store", help=f"template store (default $POOL_STORE or {config.DEFAULT_STORE})")
    p.add_argument("--image-key", metavar="FILE",
                   help="the store's images are encrypted with this key (the node's [service] "
                        "image_key with encrypt_images; default $POOL_IMAGE_KEY; none: plain)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("doctor", help="can this node build and restore templates?")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("build", help="boot, warm up and checkpoint a template")
    s.add_argument("template", help="template name (templates/NAME) or folder")
    s.add_argument("--json", action="store_true", help="print the manifest")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds CRIU may take to dump")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    s.add_argument("-v", "--verbose", action="store_true", help="echo the app's output")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("templates", help="list published templates")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_templates)

    s = sub.add_parser("inspect", help="show a template's manifest")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.add_argument("--verify", action="store_true", help="check every image file's sha256")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("rm", help="remove a published template")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help='print {"removed": NAME}')
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("restore", help="restore copies here, without the service (Ctrl-C ends them)",
                       usage="pool restore NAME [-n N] [--env K=V] [--hostname H] [-- ARGS...]")
    s.add_argument("name")
    s.add_argument("-n", "--count", type=int, default=1, help="how many copies (default 1)")
    s.add_argument("--env", action="append", type=_env_pair, default=[], metavar="K=V",
                   help="environment override for SDK templates (repeatable)")
    s.add_argument("--hostname", help="hostname of the copies ({id} is replaced by the instance id)")
    s.add_argument("--json", action="store_true", help="print the instances as JSON")
    s.set_defaults(func=cmd_restore, takes_args=True)

    from pool.cli import certs  # noqa: PLC0415
    from pool.cli.service import add_commands  # noqa: PLC0415

    add_commands(sub, _env_pair)
    certs.add_commands(sub)
    return p


def _version() -> str:
    try:
        return metadata.version("prewarm-pool")
    except metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)        # answers only when bash's completion calls us
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is the copies' argv (argparse mishandles `--` inside subcommands).
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if extra and not getattr(args, "takes_args", False):
        parser.error(f"`pool {args.command}` takes no arguments after --")
    args.args = extra
    try:
        return args.func(args) or 0
    except PoolError as e:
        print(f"pool {args.command}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except PermissionError as e:  # the store and run dirs are root's (images hold process memory)
        print(f"pool {args.command}: permission denied: {e.filename}: the store and the copies' "
              "files are root's only; run pool as root", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
