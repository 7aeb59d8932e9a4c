"""The peer the benchmark compares py-embed with: Python's own answer to slow start-up, a
multiprocessing forkserver that imported app (torch + the warmed-up model) once; every new worker is a
fork of it. Prints "ready preloaded yes|no" once the forkserver is up, then takes commands on stdin:

    spawn PORT  ->  pid PID threads N   (a worker serving app.Handler on 127.0.0.1:PORT)
    stop PID    ->  stopped PID

    python3 forkserver_peer.py --threads N

Run with the template folder on PYTHONPATH (Python 3.11's forkserver silently skips a preload module it
cannot import) and EMBED_THREADS=1: the forkserver loads and warms up the model on one thread, so it
never starts an OpenMP thread pool (a pool started before fork hangs the child on its first use).
Each worker then sets N intra-op threads, the count the pool's copies run with, and starts its own.
"""
import argparse
import multiprocessing as mp
import sys
from multiprocessing import forkserver, resource_tracker


def worker(port: int, threads: int) -> None:
    # here, not at the top: the controlling process never loads torch; in the worker both are
    # already imported (the forkserver's preload), so these are dictionary look-ups
    import app
    import torch

    torch.set_num_threads(threads)
    app.serve(port)


def report_preload(q) -> None:
    q.put("embedder" in sys.modules)  # before anything in this child imports it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads per worker")
    threads = parser.parse_args().threads
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["app"])
    q = ctx.SimpleQueue()
    p = ctx.Process(target=report_preload, args=(q,))
    p.start()  # starts the forkserver: the slow first start (imports, model, warm-up)
    preloaded = q.get()
    p.join()
    print(f"ready preloaded {'yes' if preloaded else 'no'}", flush=True)
    workers: dict[int, mp.Process] = {}
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "spawn":
            w = ctx.Process(target=worker, args=(int(arg), threads), daemon=True)
            w.start()
            workers[w.pid] = w
            print(f"pid {w.pid} threads {threads}", flush=True)
        elif cmd == "stop":
            w = workers.pop(int(arg))
            w.kill()
            w.join()
            print(f"stopped {arg}", flush=True)
    for w in workers.values():
        w.kill()
        w.join()
    # Stop the forkserver and the resource tracker and reap them here: left alone they exit a moment
    # after us, as orphans (zombies of whoever reaps orphans, e.g. a test run that is a subreaper).
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


if __name__ == "__main__":
    main()
