"""Per-template warm pools: keep restored copies waiting (at least min_warm, more while spawns arrive
faster than refills can follow), cap warm + live at max_live, and quarantine a template whose copies
keep failing.

Pure pool logic, no CRIU and no processes: a WarmPool is given a `restore()` coroutine that makes one
warm copy (any object), a `discard(copy)` callback that gets rid of one it no longer wants, and a
clock. The node (pools.py, supervisor.py) tells it what happened to its copies (`exited`) and when
time passes (`tick`); tests/unit/test_warm.py drives it with fakes.

Counting. Every copy is in exactly one place: restoring (a restore() in flight), warm (restored,
waiting for a spawn), live (handed out), dying (discarded by the pool, not yet reported exited).
All four count against max_live, so the pool never has more copies than that at any moment.

Spawns. acquire() hands out a warm copy at once (path "warm"). On a miss the request waits in a FIFO
queue for the next copy a restore produces (path "restore"): a restore is started for it if there is
room under max_live; otherwise it waits until a copy exits, and fails with NoCapacity at its timeout.

Room. A pool has room for max_live copies, and no more than its node has left (`node_room`, the
node's capacity minus the copies of all its pools): a spawn beyond either waits, then NoCapacity.

Target. The copies a pool keeps ready (warm or restoring) follow demand (pool/node/demand.py): every
spawn is an arrival, every refill's duration a sample, and the target is what the spawns expected
within one refill need, never below min_warm (the floor), never above max_warm (default max_live),
the room, or the node's memory budget. Spawns already waiting add one each. tick() trims warm copies
beyond a target that has decayed, once spawns have paused for TRIM_AFTER_QUIET_S. Hits are spawns served warm, misses those that waited.

Quarantine. Each copy has one outcome. Bad: its restore failed because of the template, it died by
itself while warm, it failed its identity hand-over (the node says whether that was the template's
fault), or it exited by itself within `early_death_s` of being handed out. Good: it was still alive
`early_death_s` after being handed out (seen by tick()). After `quarantine_after` bad outcomes in a
row the template is quarantined: no more restores, acquire() fails fast with Quarantined, waiting
spawns fail with it too. It is cleared by set_min_warm() (the operator's `pool set-warm`), by a new
build, or by a good outcome of a copy that was already out. A restore that failed because of the node
(faults.counts_against_template: fds, memory, disk, CRIU missing, cancelled) only backs off.

Builds. A pool is "unbuilt" while its template has no build in the store: no restores, acquire()
fails with TemplateNotFound. new_build() (the node noticed a published build) clears that and the
quarantine, and replaces warm copies of an older build (`build_of`).

Cancelling. Restores are tasks; those beyond the target (set_min_warm down, drain, close) are
cancelled, newest first. The `restore()` given must be safe to cancel at any point (the node's
cancels a restore still queued for its executor, and discards what a running one produces).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Generic, TypeVar

from pool.errors import (BadRequest, NoCapacity, PoolError, PoolTimeout, Quarantined, ShuttingDown,
                         TemplateNotFound)
from pool.node.demand import Demand, MemoryBudget
from pool.node.faults import counts_against_template, describe

T = TypeVar("T")

TRIM_AFTER_QUIET_S = 5.0  # copies beyond the target are let go once no spawn came for this long
EXITED = "exited"   # the copy ended by itself
KILLED = "killed"   # we ended it (client kill, ttl, idle, discard, shutdown): never a failure
FAILED = "failed"   # its identity hand-over failed


@dataclass(frozen=True)
class WarmSettings:
    min_warm: int = 0             # copies to keep restored and waiting, at least (the floor)
    max_live: int = 32            # cap on restoring + warm + live copies
    max_warm: int | None = None   # cap on the demand-following target (None: max_live; <= min_warm: fixed)
    ttl: float = 0.0              # seconds a handed-out copy may live (0: no limit); service enforces
    idle_timeout: float = 0.0     # seconds without traffic through its port (0: no limit); service


class WarmPool(Generic[T]):
    def __init__(self, name: str, settings: WarmSettings, restore: Callable[[], Awaitable[T]],
                 discard: Callable[[T], None], *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None,
                 request_refill: Callable[[], None] | None = None, quarantine_after: int = 3,
                 early_death_s: float = 2.0, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 node_room: Callable[[], int] | None = None,
                 build_of: Callable[[T], str | None] = lambda copy: None,
                 build: str | None = None, unbuilt: bool = False,
                 miss_path: str = "restore", memory: MemoryBudget | None = None) -> None:
        self.name = name
        self.settings = settings
        self._restore = restore
        self._discard = discard
        self._clock = clock
        self._on_change = on_change or (lambda: None)
        # The service routes refills through its supervisor; tests let the pool refill at once.
        self._request_refill = request_refill or self.refill
        self.quarantine_after = quarantine_after
        self.early_death_s = early_death_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._node_room = node_room
        self._build_of = build_of
        self.build = build                         # the build new restores make
        self.unbuilt = unbuilt                     # the store has no build of it (yet)
        self.miss_path = miss_path                 # a miss's path: "restore", or "fork" (fork mode)
        self.demand = Demand(clock)
        self._memory = memory

        self._warm: deque[T] = deque()
        self._live: dict[int, T] = {}             # id(copy) -> copy
        self._dying: dict[int, T] = {}
        self._restoring = 0
        self._tasks: dict[asyncio.Task, None] = {}  # restores in flight, oldest first
        self._waiters: deque[asyncio.Future] = deque()
        self._on_probation: dict[int, float] = {}  # id(copy) -> when handed out; outcome pending

        self.failures = 0                           # bad outcomes in a row
        self.node_faults = 0                        # restores failed by the node, in a row
        self.last_error: str | None = None
        self.quarantined = False
        self._not_before = 0.0                      # no restore before this time (after a failure)
        self._closing = False
        self._draining = False
        self.handed_out = {"warm": 0, miss_path: 0}
        self.restores = 0
        self.restore_failures = 0

    # -- figures ----------------------------------------------------------------------------------
    @property
    def warm(self) -> int:
        return len(self._warm)

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def restoring(self) -> int:
        return self._restoring

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def total(self) -> int:
        return len(self._warm) + len(self._live) + len(self._dying) + self._restoring

    def room(self) -> int:
        """Copies this pool may still add: within max_live and within what the node has left."""
        own = self.settings.max_live - self.total()
        return own if self._node_room is None else min(own, self._node_room())

    def snapshot(self) -> dict[str, Any]:
        s = self.settings
        return {"min_warm": s.min_warm, "max_live": s.max_live, "ttl": s.ttl,
                "idle_timeout": s.idle_timeout, "warm": self.warm, "live": self.live,
                "max_warm": self.ceiling, "target": self.target, "hits": self.hits,
                "misses": self.misses, "demand_per_s": round(self.demand.rate(), 3),
                "refill_ms": round(self.demand.refill_s * 1000, 3),
                "restoring": self.restoring, "dying": len(self._dying),
                "waiting": self.waiting,
                "quarantined": self.quarantined, "failures_in_a_row": self.failures,
                "unbuilt": self.unbuilt, "build": self.build,
                "last_error": self.last_error, "spawns": dict(self.handed_out),
                "restores": self.restores, "restore_failures": self.restore_failures}

    # -- spawning ---------------------------------------------------------------------------------
    async def acquire(self, timeout: float) -> tuple[T, str]:
        """A copy for one spawn and the path that served it ("warm" or "restore"). The copy counts as
        live from now on; tell the pool when it ends (exited)."""
        self._check_usable()
        self.demand.arrived()
        if self._warm:
            copy = self._warm.popleft()
            self._hand_out(copy, "warm")
            return copy, "warm"
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._request_refill()
        try:
            copy = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                copy = fut.result()  # it arrived just as the timeout fired: keep it
            else:
                self._drop_waiter(fut)
                raise self._timeout_error(timeout) from None
        except asyncio.CancelledError:
            self._drop_waiter(fut)
            raise
        return copy, self.miss_path

    def _check_usable(self) -> None:
        if self._closing:
            raise ShuttingDown(f"template {self.name!r}: the pool is shutting down", template=self.name)
        if self.unbuilt:
            raise TemplateNotFound(self.name, where="the store (configured, not built yet: "
                                                    f"`pool build {self.name}`)")
        if self.quarantined:
            raise Quarantined(f"template {self.name!r} is quarantined after {self.failures} failures "
                              f"in a row (last: {self.last_error}); `pool set-warm {self.name} N` "
                              "clears it", template=self.name, failures=self.failures,
                              last_error=self.last_error)

    def _timeout_error(self, timeout: float) -> PoolError:
        # copies restoring (for demand or other spawns) do not make a pool full: they come warm
        if self.settings.max_live - len(self._live) - len(self._dying) <= 0:
            return NoCapacity(f"template {self.name!r}: all {self.settings.max_live} copies are in "
                              f"use; none freed up within {timeout:g} s", template=self.name,
                              max_live=self.settings.max_live, timeout=timeout)
        if self.room() <= 0:
            return NoCapacity(f"template {self.name!r}: the node's capacity is used up by the "
                              f"copies of all its templates; none freed up within {timeout:g} s",
                              template=self.name, timeout=timeout, limit="capacity")
        return PoolTimeout(f"template {self.name!r}: no copy was ready within {timeout:g} s",
                           template=self.name, timeout=timeout)

    def _drop_waiter(self, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            # A copy was handed to us but nobody will use it: it goes back to the warm queue.
            copy = fut.result()
            self._live.pop(id(copy), None)
            self._on_probation.pop(id(copy), None)
            self.handed_out[self.miss_path] -= 1
            self._warm.appendleft(copy)
        elif not fut.done():
            fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass
        self._on_change()

    def _hand_out(self, copy: T, path: str) -> None:
        self._live[id(copy)] = copy
        self._on_probation[id(copy)] = self._clock()
        self.handed_out[path] = self.handed_out.get(path, 0) + 1
        self._on_change()
        self._request_refill()

    def take_live(self, copy: T) -> None:
        """A copy handed out by an earlier life of the node, adopted again: it counts as live."""
        self._live[id(copy)] = copy
        self._on_change()

    def _give_to_waiter(self, copy: T) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if fut.done():
                continue
            fut.set_result(copy)
            self._hand_out(copy, self.miss_path)
            return True
        return False

    # -- refilling --------------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        """Spawns served by a warm copy."""
        return self.handed_out["warm"]

    @property
    def misses(self) -> int:
        """Spawns that waited for a copy to be made."""
        return sum(self.handed_out.values()) - self.handed_out["warm"]

    @property
    def ceiling(self) -> int:
        """The most copies demand may keep ready: max_warm, within max_live, never below min_warm."""
        s = self.settings
        top = s.max_live if s.max_warm is None else s.max_warm
        return min(s.max_live, max(s.min_warm, top))

    @property
    def target(self) -> int:
        """Copies wanted warm or restoring: what demand asks (pool/node/demand.py) between min_warm
        and the ceiling, within the memory budget (none once draining), plus the waiting spawns.
        The room (max_live, the node's capacity) bounds the restores started for it (wanted())."""
        floor = self.settings.min_warm
        if self._draining:
            ready = 0
        else:
            ceiling = self.ceiling
            ready = max(floor, self.demand.wanted(ceiling)) if ceiling > floor else floor
            if self._memory is not None:
                ready = self._memory.cap(self.name, floor, ready)
        return ready + self.waiting

    def wanted(self) -> int:
        """How many restores to start now: enough for the target, within the room, none while
        unbuilt, quarantined, closing or backing off after a failure."""
        if self._closing or self.unbuilt or self.quarantined or self._clock() < self._not_before:
            return 0
        want = self.target - len(self._warm) - self._restoring
        return max(0, min(want, self.room()))

    def refill(self) -> int:
        """Start the restores wanted(); returns how many were started."""
        n = self.wanted()
        for _ in range(n):
            self._restoring += 1
            task = asyncio.get_running_loop().create_task(self._restore_one())
            self._tasks[task] = None
            task.add_done_callback(self._tasks.pop)
        if n:
            self._on_change()
        return n

    def _cancel_surplus(self) -> int:
        """Cancel the newest restores beyond the target (those most likely still queued)."""
        surplus = self._restoring - max(0, self.target - len(self._warm))
        cancelled = 0
        for task in reversed(list(self._tasks)):
            if cancelled >= surplus:
                break
            if not task.done() and task.cancel():
                cancelled += 1
        return cancelled

    async def _restore_one(self) -> None:
        started = self._clock()
        try:
            copy = await self._restore()
        except asyncio.CancelledError:
            self._restoring -= 1
            self._on_change()
            raise
        except Exception as e:  # noqa: BLE001  every failure is classified; the error goes to a waiter
            self._restoring -= 1
            self.restore_failures += 1
            self._restore_failed(e)
            self._on_change()
            return
        self._restoring -= 1
        self.restores += 1
        self.node_faults = 0
        self.demand.refilled(self._clock() - started)
        if self._closing:
            self._discard_one(copy)
        elif not self._give_to_waiter(copy):
            if len(self._warm) < self.target and not self._stale(copy):
                self._warm.append(copy)
            else:  # the target went down, its spawn gave up, or a newer build was published
                self._discard_one(copy)
        self._on_change()

    def _restore_failed(self, e: Exception) -> None:
        if isinstance(e, TemplateNotFound):  # its build went away: waiting spawns learn so
            self._mark_unbuilt(e)
            return
        if counts_against_template(e):
            self._bad(describe(e))
        else:  # the node's fault: back off, but it says nothing about the template
            self.last_error = describe(e)
            self.node_faults += 1
            self._back_off(self.node_faults)
        for fut in list(self._waiters):  # the oldest waiting spawn learns why
            if not fut.done():
                fut.set_exception(e)
                break

    def _stale(self, copy: T) -> bool:
        built = self._build_of(copy)
        return self.build is not None and built is not None and built != self.build

    # -- what happened to copies ------------------------------------------------------------------
    def exited(self, copy: T, cause: str, detail: str = "") -> None:
        """A copy of this pool has ended: cause is EXITED, KILLED or FAILED (see the module doc)."""
        key = id(copy)
        was_warm = any(c is copy for c in self._warm)
        if was_warm:
            self._warm = deque(c for c in self._warm if c is not copy)
        self._live.pop(key, None)
        self._dying.pop(key, None)
        handed_at = self._on_probation.pop(key, None)
        if cause == FAILED:
            self._bad(detail or "the copy failed its identity hand-over")
        elif cause == EXITED and was_warm:
            self._bad(detail or "a warm copy died before it was handed out")
        elif cause == EXITED and handed_at is not None \
                and self._clock() - handed_at < self.early_death_s:
            self._bad(detail or f"a copy exited within {self.early_death_s:g} s of its spawn")
        self._on_change()
        self._request_refill()

    def tick(self) -> None:
        """Resolve copies that proved healthy; let go of copies beyond a target that decayed;
        restart refills after a backoff."""
        now = self._clock()
        proven = [k for k, t in self._on_probation.items() if now - t >= self.early_death_s]
        for k in proven:
            del self._on_probation[k]
        if proven:
            self._good()
        # Only once spawns have paused: while they come, copies above a target that wobbles (a
        # refill-time sample) are used up by the next spawns; discarding them would be churn.
        if self.demand.quiet_s() >= TRIM_AFTER_QUIET_S and self._trim():
            self._on_change()
        self.refill()

    def _trim(self) -> int:
        """Discard the newest warm copies beyond the target, cancel restores beyond it."""
        target, trimmed = self.target, 0
        while len(self._warm) > target:
            self._discard_one(self._warm.pop())
            trimmed += 1
        return trimmed + self._cancel_surplus()

    def _back_off(self, streak: int) -> None:
        self._not_before = self._clock() + min(self._max_backoff_s,
                                               self._backoff_s * 2 ** (streak - 1))

    def _bad(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self._back_off(self.failures)
        if self.failures >= self.quarantine_after and not self.quarantined:
            self.quarantined = True
            err = Quarantined(f"template {self.name!r} was quarantined after {self.failures} "
                              f"failures in a row (last: {why})", template=self.name,
                              failures=self.failures, last_error=why)
            for fut in self._waiters:
                if not fut.done():
                    fut.set_exception(err)
            self._waiters.clear()

    def _good(self) -> None:
        self.failures = 0
        self._not_before = 0.0
        if self.quarantined:
            self.quarantined = False
            self._on_change()

    # -- control ----------------------------------------------------------------------------------
    def set_min_warm(self, n: int) -> None:
        """New floor (0..max_live); clears a quarantine. Warm copies beyond the new target are
        discarded and restores beyond it cancelled."""
        self.check_min_warm(n)
        self.settings = replace(self.settings, min_warm=n)
        self._clear_failures()
        self._trim()
        self._on_change()
        self._request_refill()

    def check_min_warm(self, n: int) -> None:
        if not 0 <= n <= self.settings.max_live:
            raise BadRequest(f"template {self.name!r}: min_warm must be 0..max_live "
                             f"({self.settings.max_live}), got {n}", param="min_warm",
                             min_warm=n, max_live=self.settings.max_live)

    def _clear_failures(self) -> None:
        self.quarantined = False
        self.failures = 0
        self.node_faults = 0
        self._not_before = 0.0

    def new_build(self, build: str) -> None:
        """The store published a new build: use it (no longer unbuilt, a clean slate of failures),
        and replace warm copies of an older build."""
        self.build = build
        self.unbuilt = False
        self._clear_failures()
        for copy in [c for c in self._warm if self._stale(c)]:
            self._warm.remove(copy)
            self._discard_one(copy)
        self._on_change()
        self._request_refill()

    def build_removed(self) -> None:
        """The store has no build of it any more: unbuilt again."""
        self.build = None
        self._mark_unbuilt(TemplateNotFound(self.name, where="the store (its build was removed)"))
        while self._warm:
            self._discard_one(self._warm.popleft())
        self._cancel_surplus()
        self._on_change()

    def _mark_unbuilt(self, err: TemplateNotFound) -> None:
        self.unbuilt = True
        self.last_error = describe(err)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    def begin_drain(self) -> int:
        """Shutdown began: keep restoring only for spawns already waiting. Returns how many
        restores were cancelled."""
        self._draining = True
        cancelled = self._cancel_surplus()
        self._on_change()
        return cancelled

    def _discard_one(self, copy: T) -> None:
        self._dying[id(copy)] = copy
        self._discard(copy)

    async def close(self) -> None:
        """Stop refilling, fail waiting spawns, cancel restores (what a running one produces is the
        restore()'s to discard), discard warm copies. Does not wait for restores to finish."""
        self._closing = True
        err = ShuttingDown(f"template {self.name!r}: the service is shutting down", template=self.name)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()
        while self._warm:
            self._discard_one(self._warm.popleft())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._on_change()

