"""The pool service (`pool serve`): RPC API, warm pools, copies' lifecycles, metrics, on one node.

Phases, each an explicit method: start() (restorer, pools, RPC listeners, metrics, supervisor),
serve() (until SIGTERM/SIGINT), drain() (stop accepting, finish in-flight spawns, stop refills,
kill warm copies and live instances or leave them), stop() (close listeners and socket, metrics,
executor, files). run() is all four.

Concurrency model. Everything runs on one event loop (uvloop under `pool serve`). Signal handlers only
enqueue an event; ONE supervisor task consumes events: a copy exited (its pidfd became readable),
a pool wants a refill, a tick (ttl, idle, quarantine outcomes), a signal. Blocking CRIU restores run
in a small ThreadPoolExecutor. The Restorer makes this process a child subreaper, so every copy is our
child: we reap only pids we know (Instance.poll: waitpid(pid, WNOHANG)), never waitpid(-1), which
would steal exit statuses from subprocess/CRIU.

A spawn served from the warm pool does no thread hop and no I/O but two pipe writes/reads: pop a warm
copy, write its identity, await the SDK's ack on the loop (restore.hand_over_async), reply.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (InstanceNotFound, NodeUnavailable, PoolError, RestoreError, TemplateNotFound)
from .service_config import ServiceConfig, read_token
from .warm import EXITED, FAILED, KILLED, WarmPool

log = logging.getLogger("pool.service")

TICK_S = 0.25
MAX_LOG_CHUNK = 1 << 20


# --- one copy, as the service sees it -----------------------------------------------------------------
@dataclass(eq=False)
class Copy:
    inst: Any                              # pool.instance.Instance
    pool: WarmPool
    done: asyncio.Future                   # exit status once reaped
    proxy: Any = None                      # PortProxy publishing its port, if any
    cause: str = EXITED                    # why it ended: set to KILLED/FAILED by us
    handed_at: float | None = None         # loop time of its spawn
    handing_over: bool = False
    ending: bool = False                   # a kill is under way (ttl, idle, request, shutdown)
    kill_timer: asyncio.TimerHandle | None = None
    exited_at: float | None = None
    left: bool = False                     # on_shutdown = "leave": not ours to kill or clean


# --- the service ------------------------------------------------------------------------------------------
class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.pools: dict[str, WarmPool] = {}
        self.copies: dict[str, Copy] = {}                  # restored and not yet reaped
        self.history: collections.OrderedDict[str, Copy] = collections.OrderedDict()
        self.metrics = None
        self.metrics_server = None
        self.restorer = None
        self.socket_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._rpcs: list = []
        self._events: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._handovers = 0                      # spawns between acquire and reply
        self._deferred_refills: set[str] = set()
        self._started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- phase 1: start ---------------------------------------------------------------------------
    async def start(self) -> None:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        from .criu import Criu  # noqa: PLC0415
        from .metrics import Metrics, MetricsServer  # noqa: PLC0415
        from .restore import Restorer  # noqa: PLC0415
        from .rpc import RpcServer  # noqa: PLC0415
        from .store import Store  # noqa: PLC0415

        cfg = self.cfg
        self._loop = loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._events.put_nowait, ("signal", sig))
        tokens = {read_token(cfg.token_file)} if cfg.tcp and cfg.token_file else None
        self.restorer = Restorer(Store(cfg.store), Criu.locate(), cfg.run_dir)
        self._executor = ThreadPoolExecutor(cfg.restore_concurrency, thread_name_prefix="restore")
        self.metrics = Metrics(CollectorRegistry())
        try:
            if cfg.metrics:
                self.metrics_server = MetricsServer(self.metrics.registry, *cfg.metrics)
            self._tasks = [loop.create_task(self._supervise(), name="supervisor"),
                           loop.create_task(self._ticker(), name="ticker")]
            for name in cfg.templates:
                self._pool(name, must_exist=False)
            unix = RpcServer(self.handle, name="prewarm-pool")
            self._rpcs.append(unix)
            self.socket_path = await unix.start_unix(cfg.socket, mode=0o660)
            if cfg.tcp:
                tcp = RpcServer(self.handle, tokens=tokens, name="prewarm-pool")
                self._rpcs.append(tcp)
                self.tcp_address = await tcp.start_tcp(*cfg.tcp)
        except BaseException:
            await self.stop()
            raise
        log.info("serving on %s%s%s; store %s", self.socket_path,
                 f", tcp {self.tcp_address[0]}:{self.tcp_address[1]}" if self.tcp_address else "",
                 f", metrics http://{self.metrics_server.address}/metrics" if self.metrics_server else "",
                 cfg.store)

    # -- phase 2: serve ---------------------------------------------------------------------------
    async def serve(self) -> None:
        await self._stop_requested.wait()

    def request_stop(self) -> None:
        """What a first SIGTERM does; a second one (or force=True) skips the graceful parts."""
        assert self._events is not None
        self._events.put_nowait(("signal", signal.SIGTERM))

    # -- phase 3: drain ---------------------------------------------------------------------------
    async def drain(self) -> None:
        cfg = self.cfg
        self._draining = True
        for rpc in self._rpcs:
            rpc.stop_accepting()
        log.info("draining: %d spawn(s) in flight, %d copies", self._inflight, len(self.copies))
        if self._inflight:
            self._idle.clear()
            await self._until(self._idle.wait(), cfg.drain_timeout)
        await self._until(asyncio.gather(*(p.close(timeout=60) for p in self.pools.values())), 60)
        self._end_live(force=self._force.is_set())
        await self._until(self._all_reaped(), cfg.kill_grace + 10)
        if self._force.is_set():
            self._end_live(force=True)
            await self._until(self._all_reaped(), 10, forceable=False)

    def _end_live(self, force: bool) -> None:
        for c in list(self.copies.values()):
            if c.handed_at is not None and self.cfg.on_shutdown == "leave":
                self._leave(c)
            else:
                self._kill(c, 0 if force or c.handed_at is None else self.cfg.kill_grace, KILLED)

    async def _until(self, aw, timeout: float, forceable: bool = True) -> None:
        """Await aw for up to timeout seconds, or until a second signal forces the shutdown."""
        task = asyncio.ensure_future(aw)
        waits = {task}
        if forceable:
            waits.add(asyncio.ensure_future(self._force.wait()))
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for t in waits:
            if not t.done():
                t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)

    async def _all_reaped(self) -> None:
        while any(not c.left for c in self.copies.values()):
            await asyncio.gather(*(asyncio.shield(c.done) for c in list(self.copies.values())
                                   if not c.left), return_exceptions=True)

    # -- phase 4: stop ----------------------------------------------------------------------------
    async def stop(self) -> None:
        for rpc in self._rpcs:
            await rpc.close()  # cancels connections; a spawn cut short kills its copy
        self._rpcs.clear()
        if self.copies:  # whatever is still ours (a restore that finished late): kill, reap
            self._end_live(force=True)
            await self._until(self._all_reaped(), 10, forceable=False)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
        for c in list(self.copies.values()):  # left running (or unkillable): release our side only
            await self._close_proxy(c)
            _release_fds(c.inst)
        self.copies.clear()
        for c in self.history.values():
            c.inst.close()
        self.history.clear()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)
        log.info("stopped")

    async def run(self) -> int:
        await self.start()
        try:
            await self.serve()
            await self.drain()
        finally:
            await self.stop()
        return 0

    # -- the supervisor ---------------------------------------------------------------------------
    async def _supervise(self) -> None:
        assert self._events is not None
        while True:
            event = await self._events.get()
            try:
                kind = event[0]
                if kind == "exited":
                    self._reap(event[1])
                elif kind == "refill":
                    # A restore starting in a worker thread competes for the GIL (and the CPU)
                    # with a warm spawn's handshake and reply: start it once those are out.
                    if self._handovers:
                        self._deferred_refills.add(event[1])
                    elif event[1] in self.pools:
                        self.pools[event[1]].refill()
                elif kind == "tick":
                    self._tick()
                elif kind == "signal":
                    self._on_signal(event[1])
            except Exception:  # noqa: BLE001  one bad event must not stop the supervisor
                log.exception("supervisor: handling %r failed", event[0])

    async def _ticker(self) -> None:
        assert self._events is not None
        while True:
            await asyncio.sleep(TICK_S)
            self._events.put_nowait(("tick",))

    def _on_signal(self, sig: int) -> None:
        if not self._stop_requested.is_set():
            log.info("%s: draining (again to force)", signal.Signals(sig).name)
            self._stop_requested.set()
        elif not self._force.is_set():
            log.info("%s again: forcing the shutdown", signal.Signals(sig).name)
            self._force.set()
            self._end_live(force=True)

    def _tick(self) -> None:
        now = self._loop.time()
        for pool in self.pools.values():
            pool.tick()
        for c in list(self.copies.values()):
            if c.handed_at is None or c.ending:
                continue
            s = c.pool.settings
            if s.ttl and now - c.handed_at >= s.ttl:
                log.info("instance %s: ttl of %gs reached", c.inst.id, s.ttl)
                self._kill(c, self.cfg.kill_grace, KILLED)
            elif s.idle_timeout and c.proxy is not None \
                    and time.monotonic() - max(c.proxy.last_activity, _mono(c.handed_at, now)) \
                    >= s.idle_timeout:
                log.info("instance %s: idle for %gs", c.inst.id, s.idle_timeout)
                self._kill(c, self.cfg.kill_grace, KILLED)

    def _reap(self, c: Copy) -> None:
        inst = c.inst
        if c.done.done():
            return
        status = inst.poll()
        if status is None:  # pidfd readable means it has exited; reapable a moment later
            self._loop.call_later(0.01, self._events.put_nowait, ("exited", c))
            return
        if c.kill_timer is not None:
            c.kill_timer.cancel()
        if c.cause == FAILED:
            inst.state = "failed"
        c.exited_at = time.time()
        detail = f"a copy exited with status {status} " + (
            "while warm" if c.handed_at is None else
            f"{self._loop.time() - c.handed_at:.2f}s after its spawn")
        c.pool.exited(inst, c.cause, detail)
        self.metrics.exited(inst.template, c.cause)
        self.copies.pop(inst.id, None)
        self._background(self._close_proxy(c))
        if not c.handing_over:  # else the spawn closes them once its handshake has let go
            _release_fds(inst)
        if c.handed_at is None or self.cfg.exited_history == 0:
            inst.close()
        else:
            self.history[inst.id] = c
            while len(self.history) > self.cfg.exited_history:
                _, old = self.history.popitem(last=False)
                old.inst.close()
        c.done.set_result(status)

    def _watch(self, c: Copy) -> None:
        fd = c.inst.pidfd
        def ready() -> None:
            self._loop.remove_reader(fd)
            self._events.put_nowait(("exited", c))
        self._loop.add_reader(fd, ready)

    def _kill(self, c: Copy, grace: float, cause: str) -> None:
        """SIGTERM then SIGKILL after grace (0: SIGKILL now); the supervisor reaps it."""
        if c.done.done() or c.left:
            return
        if c.cause != FAILED:
            c.cause = cause
        inst = c.inst
        if grace <= 0 or c.ending and c.kill_timer is None:
            inst.signal(signal.SIGKILL)
        else:
            inst.signal(signal.SIGTERM)
            if c.kill_timer is None:
                c.kill_timer = self._loop.call_later(grace, inst.signal, signal.SIGKILL)
        c.ending = True

    def _leave(self, c: Copy) -> None:
        """on_shutdown = "leave": stop watching a live instance; it outlives the service."""
        if c.left or c.done.done():
            return
        c.left = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(c.inst.pidfd)
        log.info("leaving instance %s (pid %d) running", c.inst.id, c.inst.pid)

    async def _close_proxy(self, c: Copy) -> None:
        if c.proxy is not None:
            proxy, c.proxy = c.proxy, None
            await proxy.close()

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- pools ------------------------------------------------------------------------------------
    def _pool(self, name: str, must_exist: bool = True) -> WarmPool:
        pool = self.pools.get(name)
        if pool is not None:
            return pool
        if self._draining:
            raise NodeUnavailable("the pool service is shutting down")
        image_bytes = None
        try:
            image_bytes = self.restorer.store.get(name).image_bytes
        except TemplateNotFound:
            if must_exist:
                raise
            log.warning("template %s is configured but not in the store %s: its restores will "
                        "fail until it is built", name, self.cfg.store)
        except PoolError as e:
            if must_exist:
                raise
            log.warning("template %s: %s", name, e.message)
        settings = self.cfg.templates.get(name, self.cfg.defaults)
        pool = WarmPool(name, settings, lambda: self._restore_copy(name), self._discard,
                        request_refill=lambda: self._events.put_nowait(("refill", name)),
                        quarantine_after=self.cfg.quarantine_after,
                        early_death_s=self.cfg.early_death_s)
        self.pools[name] = pool
        self.metrics.watch_pool(name, lambda: pool.warm, lambda: pool.live,
                                lambda: 1.0 if pool.quarantined else 0.0)
        if image_bytes is not None:
            self.metrics.image_bytes.labels(name).set(image_bytes)
        self._events.put_nowait(("refill", name))
        return pool

    async def _restore_copy(self, name: str):
        from .portproxy import PortProxy  # noqa: PLC0415

        t0 = time.perf_counter()
        inst = await self._loop.run_in_executor(self._executor, self._restore_blocking, name)
        self.metrics.restored(name, time.perf_counter() - t0)
        c = Copy(inst, self.pools[name], self._loop.create_future())
        self.copies[inst.id] = c
        self._watch(c)
        if inst.port:
            try:
                c.proxy = PortProxy(inst.netns_fd, inst.port)
                inst.address = await c.proxy.start()
            except OSError as e:
                c.proxy = None
                self._kill(c, 0, FAILED)
                raise RestoreError("publishing the copy's port", str(e)) from e
        return inst

    def _restore_blocking(self, name: str):
        inst = self.restorer.restore(name)
        prefault_code(inst.pid)  # in the worker thread, so the spawn later does not pay for it
        return inst

    def _discard(self, inst) -> None:
        c = self.copies.get(inst.id)
        if c is not None:
            self._kill(c, 0, KILLED)

    # -- RPC --------------------------------------------------------------------------------------
    async def handle(self, method: str, params: dict, ctx) -> Any:
        return await getattr(self, f"rpc_{method}")(**params)

    async def rpc_ping(self) -> dict:
        return {"pong": True, "pid": os.getpid(), "node": "local", "draining": self._draining}

    async def rpc_spawn(self, template: str, env: dict, args: list, timeout: float,
                        node: str | None, hostname: str | None) -> dict:
        from .restore import Identity, hand_over_async  # noqa: PLC0415

        t0 = time.perf_counter()
        if self._draining:
            raise NodeUnavailable("the pool service is shutting down")
        if node not in (None, "local"):
            raise NodeUnavailable(f"no node {node!r}: this service runs only the local node",
                                  node=node)
        try:
            pool = self._pool(template)
        except PoolError as e:
            self.metrics.spawn_failed(template if template in self.pools else "", e.code)
            raise
        self._inflight += 1
        try:
            try:
                inst, path = await pool.acquire(timeout)
            except PoolError as e:
                self.metrics.spawn_failed(template, e.code)
                raise
            c = self.copies[inst.id]
            c.handing_over = True
            self._handovers += 1
            try:
                left = max(1.0, timeout - (time.perf_counter() - t0))
                await hand_over_async(inst, Identity(inst.id, env=env, args=args,
                                                     hostname=hostname),
                                      min(inst.identity_timeout, left))
            except BaseException as e:
                cancelled = isinstance(e, asyncio.CancelledError)
                self._kill(c, 0, KILLED if cancelled else FAILED)
                if not cancelled:
                    self.metrics.spawn_failed(template, getattr(e, "code", "internal"))
                if isinstance(e, RestoreError):
                    raise RestoreError(e.step, e.problem, output_tail=inst.output_tail()) from e
                raise
            finally:
                c.handing_over = False
                if c.done.done():
                    _release_fds(inst)
                self._handovers -= 1
                if not self._handovers:  # queued now, run after this reply is written
                    for name in self._deferred_refills:
                        self._events.put_nowait(("refill", name))
                    self._deferred_refills.clear()
            inst.path = path
            c.handed_at = self._loop.time()
            spawn_s = time.perf_counter() - t0
            self.metrics.spawned(template, path, spawn_s)
            return {"id": inst.id, "template": template, "pid": inst.pid, "address": inst.address,
                    "path": path, "node": "local", "spawn_ms": round(spawn_s * 1000, 3)}
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _find(self, iid: str) -> Copy:
        c = self.copies.get(iid)
        if c is not None and c.handed_at is not None:
            return c
        c = self.history.get(iid)
        if c is None:
            raise InstanceNotFound(iid)
        return c

    def _describe(self, c: Copy) -> dict:
        d = c.inst.describe()
        d.update(node="local", exited_at=c.exited_at,
                 end_cause=c.cause if c.done.done() else None)
        if c.handed_at is not None and not c.done.done():
            d["uptime_s"] = round(self._loop.time() - c.handed_at, 3)
            if c.proxy is not None:
                d["idle_s"] = round(time.monotonic() - c.proxy.last_activity, 3)
        return d

    async def rpc_kill(self, id: str, grace: float) -> dict:  # noqa: A002
        c = self._find(id)
        if not c.done.done():
            self._kill(c, grace, KILLED)
            await asyncio.wait_for(asyncio.shield(c.done), grace + 15)
        return self._describe(c)

    async def rpc_wait(self, id: str, timeout: float | None) -> dict:  # noqa: A002
        c = self._find(id)
        if not c.done.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.done), timeout)
        return self._describe(c)

    async def rpc_list(self, template: str | None) -> list:
        return [self._describe(c) for c in self.copies.values()
                if c.handed_at is not None and (template is None or c.inst.template == template)]

    async def rpc_info(self, id: str) -> dict:  # noqa: A002
        c = self._find(id)
        d = self._describe(c)
        if not c.done.done():
            d["stats"] = c.inst.stats()
        return d

    async def rpc_logs(self, id: str, stream: str, offset: int, limit: int) -> dict:  # noqa: A002
        c = self._find(id)
        data = c.inst.read_log(stream, offset, min(limit, MAX_LOG_CHUNK))
        return {"data": data, "offset": offset + len(data), "exited": c.done.done()}

    async def rpc_templates(self) -> list:
        out = []
        for t in self.restorer.store.all():
            m = t.manifest
            pool = self.pools.get(t.name)
            out.append({"name": t.name, "build_id": t.build_id, "image_bytes": t.image_bytes,
                        "sdk": "ctl_in" in m.get("pipes", {}), "built_at": m.get("built_at"),
                        "port": (m.get("spec", {}).get("network") or {}).get("port"),
                        "pool": pool.snapshot() if pool else None})
        return out

    async def rpc_stats(self) -> dict:
        return {"pid": os.getpid(), "node": "local", "uptime_s": round(time.time() - self._started, 3),
                "socket": str(self.socket_path), "store": str(self.cfg.store),
                "metrics": self.metrics_server.address if self.metrics_server else None,
                "draining": self._draining, "spawns_in_flight": self._inflight,
                "live": sum(1 for c in self.copies.values() if c.handed_at is not None),
                "copies": len(self.copies), "exited_kept": len(self.history),
                "templates": {n: p.snapshot() for n, p in sorted(self.pools.items())}}

    async def rpc_set_warm(self, template: str, min_warm: int) -> dict:
        pool = self._pool(template)
        pool.set_min_warm(min_warm)
        log.info("template %s: min_warm = %d", template, min_warm)
        return pool.snapshot()


def _release_fds(inst) -> None:
    """Close a copy's fds at once (its files stay for info/logs until inst.close())."""
    for name in ("ctl_w", "ctl_r", "netns_fd", "pidfd"):
        fd = getattr(inst, name)
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            setattr(inst, name, None if name.startswith("ctl") else -1)


def prefault_code(root_pid: int) -> None:
    """Map the code pages of a restored copy's processes into their page tables.

    CRIU maps the copy's executable files afresh, so the first instructions it runs after restore
    fault each code page in: ~60 minor faults and ~0.25 ms on the first (warm) spawn's handshake.
    Reading the pages through /proc/PID/mem faults them into the copy's page tables now, while it
    waits warm. Best effort: a copy that went away or a mapping we cannot read is skipped."""
    import psutil  # noqa: PLC0415

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
                    for addr in range(start, end, 4096):
                        try:
                            os.pread(mem.fileno(), 1, addr)
                        except OSError:
                            break
        except OSError:
            continue


def _mono(loop_time: float, loop_now: float) -> float:
    """A loop.time() value on the time.monotonic() scale (asyncio and uvloop both use monotonic
    clocks, but not necessarily the same origin)."""
    return time.monotonic() - (loop_now - loop_time)


def serve(cfg: ServiceConfig) -> int:
    """Run a service on uvloop until SIGTERM/SIGINT; returns the exit code."""
    import uvloop  # noqa: PLC0415

    return uvloop.run(Service(cfg).run())
