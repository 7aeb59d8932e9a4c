"""`pool restore NAME -n N`: restore copies on this node without the service, for trying a template.

The copies run in the foreground: their host ports are published while this command runs, their
output is echoed, and Ctrl-C (or SIGTERM) kills them all and cleans up.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from pool import config
from pool.copies.portproxy import PortProxy
from pool.copies.restore import Identity, Restorer, new_instance_id
from pool.cr.criu import Criu
from pool.errors import PoolError
from pool.templates.store import Store


def run(args, store: Store) -> int:
    if args.count < 1:
        raise PoolError(f"--count must be at least 1, got {args.count}")
    restorer = Restorer(store, Criu.locate(), config.run_dir())
    return asyncio.run(_main(args, restorer))


def _identity(args) -> Identity:
    iid = new_instance_id()
    host = args.hostname.replace("{id}", iid) if args.hostname else None
    return Identity(iid, env=dict(args.env), args=list(args.args), hostname=host)


async def _main(args, restorer: Restorer) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # only enqueue: the loop below does the work
    pool = ThreadPoolExecutor(max_workers=min(8, args.count))
    results = await asyncio.gather(
        *(loop.run_in_executor(pool, restorer.spawn, args.name, _identity(args))
          for _ in range(args.count)), return_exceptions=True)
    pool.shutdown()
    instances = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    proxies = []
    try:
        for inst in instances:
            if inst.port:
                proxy = PortProxy(inst.netns_fd, inst.port)
                inst.address = await proxy.start()
                proxies.append(proxy)
        rows = [i.describe() for i in instances]
        if args.json:
            json.dump(rows, sys.stdout, indent=2, default=str)
            print()
        else:
            for r in rows:
                print(f"{r['id']}  pid {r['pid']}  restored in {r['restore_s'] * 1000:.0f} ms"
                      + (f"  http://{r['address']}/" if r["address"] else ""))
        sys.stdout.flush()
        for e in errors:
            print(f"pool restore: {e.message if isinstance(e, PoolError) else e}", file=sys.stderr)
        if errors and not instances:
            raise errors[0]
        offsets = {(i.id, s): 0 for i in instances for s in ("stdout", "stderr")}
        while not stop.is_set() and any(i.poll() is None for i in instances):
            _echo(instances, offsets)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        _echo(instances, offsets)
        return 1 if errors else 0
    finally:
        for proxy in proxies:
            await proxy.close()
        for inst in instances:
            await loop.run_in_executor(None, inst.kill, 3.0)
            inst.close()


def _echo(instances, offsets: dict) -> None:
    """Print what each copy wrote since last time, prefixed with its id."""
    for inst in instances:
        for stream in ("stdout", "stderr"):
            data = inst.read_log(stream, offsets[(inst.id, stream)], 1 << 16)
            if not data:
                continue
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                continue
            offsets[(inst.id, stream)] += cut
            for line in data[:cut].decode(errors="replace").splitlines():
                print(f"[{inst.id}] {line}", file=sys.stderr if stream == "stderr" else sys.stdout,
                      flush=True)
