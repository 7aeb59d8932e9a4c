"""The node's supervisor: ONE task consumes events and acts on them, so nothing about a copy's end
races with anything else.

Events: a copy exited (its pidfd became readable: the loop's reader only enqueues), a pool wants a
refill, a tick (every TICK_S: pools' outcomes and backoffs, ttl and idle limits, every second the
copies' logs and stray children). The Restorer makes this process a child subreaper, so every copy
is our child: we reap only pids we know (RestoredCopy.poll: waitpid(pid, WNOHANG)), never waitpid(-1),
which would steal exit statuses from subprocess/CRIU.

Kill policy: SIGTERM, then SIGKILL after the grace (0: SIGKILL now); a second kill of a copy already
SIGKILLed sends SIGKILL again. A copy being handed over is SIGKILLed at once (it never started).
Whether an exit was early (a bad outcome for its template) is the pool's to judge (warm.WarmPool).

Out of memory: a copy that ended by itself after the kernel's OOM killer struck in its cgroup
(RestoredCopy.oom_killed) ends with cause OOM. A handed-out copy that outgrew its memory limit says
nothing bad about its template (it is not quarantined for it); a warm copy that did is a bad
outcome, as any warm copy dying by itself (the template does not fit its limit).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Callable

from pool.copies import journal
from pool.cr import criu
from pool.node.table import Copy, CopyState, CopyTable
from pool.node.warm import EXITED, FAILED, KILLED, WarmPool

log = logging.getLogger(__name__)

TICK_S = 0.25
SWEEP_TICKS = 4            # every second: rotate copies' logs, look for stray children
REAP_RETRY_S = 0.01        # a readable pidfd means exited; reapable a moment later
OOM = "oom"                # end cause: the kernel killed it for its cgroup's memory limit
ASLEEP = ("suspended", "restarting", "migrating")   # a live instance without a process (pool/node/live.py)


class Supervisor:
    """Events, reaping and the kill policy over a CopyTable and the node's pools.

    clock is the time spawns are stamped with (the loop's by default), monotonic the scale of a
    port proxy's last_activity, call_later schedules a SIGKILL after its grace: tests give fakes."""

    def __init__(self, table: CopyTable, pools: dict[str, WarmPool], metrics: Any, *,
                 kill_grace: float, max_log_bytes: int,
                 on_tick: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 call_later: Callable[..., Any] | None = None) -> None:
        self.table = table
        self.pools = pools
        self.metrics = metrics
        self.kill_grace = kill_grace
        self.max_log_bytes = max_log_bytes
        self._on_tick = on_tick
        self._loop = asyncio.get_running_loop()
        self.clock = clock or self._loop.time
        self._monotonic = monotonic
        self._call_later = call_later or self._loop.call_later
        self._events: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._handovers = 0                      # spawns between acquire and reply
        self._deferred_refills: set[str] = set()
        self._ticks = 0
        self._strays_seen: set[int] = set()
        # running instances (pool/node/live.py) set these: a copy that died by itself is
        # restarted (True: taken care of), an idle one suspended (True) rather than killed
        self.on_crash: Callable[[Copy], bool] = lambda c: False
        self.on_idle: Callable[[Copy], bool] = lambda c: False

    # -- life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [self._loop.create_task(self._run(), name="supervisor"),
                       self._loop.create_task(self._ticker(), name="ticker")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)

    def background(self, coro) -> None:
        """Run coro beside the supervisor; stop() waits for it."""
        task = self._loop.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- events ---------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            event = await self._events.get()
            try:
                kind = event[0]
                if kind == "exited":
                    self.reap(event[1], event[2] if len(event) > 2 else None)
                elif kind == "refill":
                    self._refill(event[1])
                elif kind == "tick":
                    self.tick()
            except Exception:  # noqa: BLE001  one bad event must not stop the supervisor
                log.exception("supervisor: handling %r failed", event[0])

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._events.put_nowait(("tick",))

    def watch(self, c: Copy) -> None:
        """Enqueue c's exit when its pidfd becomes readable. The event names the process: once a
        rollback or restart has put another one under c, the old one's exit is not c's."""
        fd, pid = c.inst.pidfd, c.inst.pid

        def ready() -> None:
            self._loop.remove_reader(fd)
            self._events.put_nowait(("exited", c, pid))
        self._loop.add_reader(fd, ready)

    def unwatch(self, c: Copy) -> None:
        """Stop watching c's process (it is about to be replaced or suspended by us)."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(c.inst.pidfd)

    def exited(self, c: Copy) -> None:
        """c's process is known to have exited (while unwatched): reap it as usual."""
        self._events.put_nowait(("exited", c, c.inst.pid))

    def request_refill(self, template: str) -> None:
        self._events.put_nowait(("refill", template))

    def _refill(self, template: str) -> None:
        # A restore starting in a worker thread competes for the GIL (and the CPU) with a warm
        # spawn's handshake and reply: start it once those are out.
        if self._handovers:
            self._deferred_refills.add(template)
        elif template in self.pools:
            self.pools[template].refill()

    def handover_begun(self) -> None:
        self._handovers += 1

    def handover_ended(self) -> None:
        self._handovers -= 1
        if not self._handovers:  # queued now, run after the spawn's reply is written
            for name in self._deferred_refills:
                self.request_refill(name)
            self._deferred_refills.clear()

    # -- reaping --------------------------------------------------------------------------------------
    def reap(self, c: Copy, pid: int | None = None) -> None:
        """c's pidfd was readable: collect its status, tell its pool, retire it (or, restart =
        "on-failure", have it restarted: on_crash)."""
        if c.exited or (pid is not None and pid != c.inst.pid):
            return
        inst = c.inst
        status = inst.poll()
        if status is None:
            self._call_later(REAP_RETRY_S, self._events.put_nowait, ("exited", c, inst.pid))
            return
        if c.kill_timer is not None:
            c.kill_timer.cancel()
        if c.cause == EXITED:  # not ended by us: maybe by something beyond it (its zygote)
            c.cause = inst.exit_cause() or EXITED
        if c.cause == EXITED and c.state is CopyState.LIVE and self.on_crash(c):
            return  # being restored from its last checkpoint: same Copy, a new process
        self.retire(c, status)

    def retire(self, c: Copy, status: int | None) -> None:
        """c has ended (reaped, or suspended and killed): tell its pool, release it."""
        inst = c.inst
        if c.cause == FAILED:
            inst.state = "failed"
        elif inst.state in ASLEEP:
            inst.state = "exited"
        if c.cause == EXITED and inst.oom_killed:
            c.cause = OOM
        handing_over = c.state is CopyState.HANDING_OVER
        c.move(CopyState.EXITED)
        c.exited_at = time.time()
        detail = f"a copy exited with status {status} " + (
            "while warm" if not c.handed_out else
            f"{self.clock() - c.handed_at:.2f}s after its spawn")
        if c.cause == OOM:
            detail = f"out of memory: {detail}"
        # the pool judges causes it knows: a warm copy killed for memory died by itself
        c.pool.exited(inst, EXITED if c.cause == OOM and not c.handed_out else c.cause, detail)
        self.metrics.exited(inst.template, c.cause)
        journal.forget(inst.run_dir)
        self.background(close_proxy(c))
        if c.on_end is not None:
            with contextlib.suppress(Exception):
                c.on_end()
        if not handing_over:  # else the spawn closes them once its hand-over has let go
            inst.release_fds()
        self.table.retire(c, close=not handing_over)
        c.done.set_result(status)

    async def all_reaped(self) -> None:
        """Until every copy still ours has been reaped."""
        while watched := self.table.watched():
            await asyncio.gather(*(asyncio.shield(c.done) for c in watched),
                                 return_exceptions=True)

    # -- the kill policy ------------------------------------------------------------------------------
    def kill(self, c: Copy, grace: float, cause: str) -> None:
        """SIGTERM then SIGKILL after grace (0: SIGKILL now); reap() collects it. A copy without a
        process (suspended, or its restart failed) ends at once."""
        if not c.watched:
            return
        if c.cause != FAILED:
            c.cause = cause
        inst = c.inst
        if inst.exit_status is not None and c.state is CopyState.LIVE:
            self.retire(c, inst.exit_status)
            return
        if c.state is CopyState.HANDING_OVER:
            inst.signal(signal.SIGKILL)
            return
        if grace <= 0 or c.state is CopyState.KILLING and c.kill_timer is None:
            inst.signal(signal.SIGKILL)
        else:
            inst.signal(signal.SIGTERM)
            if c.kill_timer is None:
                c.kill_timer = self._call_later(grace, inst.signal, signal.SIGKILL)
        if c.state is not CopyState.KILLING:
            c.move(CopyState.KILLING)

    def leave(self, c: Copy) -> None:
        """on_shutdown = "leave": stop watching a live copy; it outlives the node."""
        if c.state is not CopyState.LIVE:
            return
        c.move(CopyState.LEFT)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(c.inst.pidfd)
        log.info("leaving instance %s (pid %d) running", c.inst.id, c.inst.pid)

    def end_copies(self, force: bool, leave_live: bool) -> None:
        """Shutdown: kill every copy (warm ones and force: at once; live ones: with grace), or leave
        live ones running (leave_live)."""
        for c in self.table:
            if c.state is CopyState.LIVE and leave_live:
                self.leave(c)
            else:
                self.kill(c, 0 if force or not c.handed_out else self.kill_grace, KILLED)

    # -- ticks ----------------------------------------------------------------------------------------
    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % SWEEP_TICKS == 0:
            self.sweep()
        self._on_tick()
        now = self.clock()
        for c in self.table:
            if c.state is not CopyState.LIVE:
                continue
            s = c.pool.settings
            if s.ttl and now - c.handed_at >= s.ttl:
                log.info("instance %s: ttl of %gs reached", c.inst.id, s.ttl)
                self.kill(c, self.kill_grace, KILLED)
            elif s.idle_timeout and c.proxy is not None and c.inst.state not in ASLEEP \
                    and self.idle_s(c, now) >= s.idle_timeout:
                log.info("instance %s: idle for %gs", c.inst.id, s.idle_timeout)
                if not self.on_idle(c):
                    self.kill(c, self.kill_grace, KILLED)

    def idle_s(self, c: Copy, now: float | None = None) -> float:
        """Seconds since the last traffic through c's port (or since its spawn, if none since).
        The proxy counts on the monotonic scale, spawns on the clock's (asyncio's and uvloop's
        clocks are monotonic, not necessarily of the same origin)."""
        now = self.clock() if now is None else now
        mono = self._monotonic()
        handed = mono - (now - c.handed_at)
        return mono - max(c.proxy.last_activity, handed)

    def sweep(self) -> None:
        """Cap copies' logs; kill and reap stray children (the half-restored tree of a CRIU that
        died) seen on two sweeps in a row."""
        for c in self.table:
            c.inst.rotate_logs(self.max_log_bytes)
        strays = criu.stray_children({c.inst.pid for c in self.table})
        doomed = strays & self._strays_seen
        if doomed:
            log.warning("killing %d stray processes (left by a CRIU that died): %s",
                        len(doomed), sorted(doomed))
            self.background(asyncio.to_thread(criu.kill_strays, doomed))
        self._strays_seen = strays - doomed


async def close_proxy(c: Copy) -> None:
    if c.proxy is not None:
        proxy, c.proxy = c.proxy, None
        await proxy.close()
