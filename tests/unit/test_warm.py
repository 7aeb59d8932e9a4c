"""WarmPool's logic with fakes: a restore coroutine that makes numbered copies (or fails), a fake
clock. No CRIU, no processes."""
import asyncio

import pytest

from pool.errors import NoCapacity, Quarantined, RestoreError
from pool.warm import EXITED, FAILED, KILLED, WarmPool, WarmSettings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Copy:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Copy({self.n})"


class Fakes:
    """restore() makes Copy(n) after `delay` seconds, or raises while `fail` is set."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.fail = False
        self.made = 0
        self.discarded = []

    async def restore(self):
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RestoreError("restoring with CRIU", "boom")
        self.made += 1
        return Copy(self.made)

    def discard(self, copy):
        self.discarded.append(copy)


def make(fakes, clock=None, **settings):
    return WarmPool("t", WarmSettings(**settings), fakes.restore, fakes.discard,
                    clock=clock or Clock(), backoff_s=0.0)


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_refills_to_min_warm_and_hands_out_warm_then_refills():
    async def go():
        f = Fakes()
        p = make(f, min_warm=2, max_live=5)
        p.refill()
        await settle()
        assert (p.warm, p.live, f.made) == (2, 0, 2)
        copy, path = await p.acquire(1)
        assert path == "warm" and copy.n == 1
        await settle()
        assert (p.warm, p.live, f.made) == (2, 1, 3)  # refilled behind the hand-out
    run(go())


def test_miss_restores_for_the_waiting_spawn():
    async def go():
        f = Fakes(delay=0.01)
        p = make(f, min_warm=0, max_live=2)
        copy, path = await p.acquire(1)
        assert path == "restore" and p.live == 1 and p.warm == 0
    run(go())


def test_capacity_queue_then_no_capacity_and_a_freed_slot_serves_the_next_waiter():
    async def go():
        f = Fakes()
        p = make(f, min_warm=0, max_live=1)
        first, _ = await p.acquire(1)
        with pytest.raises(NoCapacity):
            await p.acquire(0.05)
        assert p.waiting == 0
        waiter = asyncio.ensure_future(p.acquire(1))
        await settle()
        assert p.waiting == 1 and p.restoring == 0   # no room: nothing restoring for it yet
        p.exited(first, KILLED)
        copy, path = await waiter
        assert path == "restore" and p.live == 1
    run(go())


def test_max_live_counts_restoring_warm_and_live():
    async def go():
        f = Fakes(delay=0.01)
        p = make(f, min_warm=3, max_live=3)
        p.refill()
        assert p.restoring == 3 and p.wanted() == 0
        await asyncio.sleep(0.05)
        await p.acquire(1)
        await settle()
        assert (p.warm, p.live, p.restoring) == (2, 1, 0)  # full: no refill beyond max_live
    run(go())


def test_restore_failures_quarantine_and_fail_fast_and_set_warm_clears():
    async def go():
        f = Fakes()
        f.fail = True
        p = make(f, min_warm=1, max_live=4)
        with pytest.raises(RestoreError):   # the spawn gets the restore's own error
            await p.acquire(1)
        for _ in range(5):
            p.tick()
            await settle()
        assert p.quarantined and p.failures == 3 and "boom" in p.last_error
        assert p.snapshot()["quarantined"] is True
        with pytest.raises(Quarantined):
            await p.acquire(1)
        assert p.refill() == 0
        f.fail = False
        p.set_min_warm(1)
        assert not p.quarantined
        await settle()
        assert p.warm == 1
    run(go())


def test_copies_dying_right_after_spawn_quarantine_but_healthy_ones_reset_the_count():
    async def go():
        clock = Clock()
        f = Fakes()
        p = make(f, clock=clock, min_warm=1, max_live=4)
        p.refill()
        await settle()
        for i in range(2):
            copy, _ = await p.acquire(1)
            clock.now += 0.5
            p.exited(copy, EXITED)
            await settle()
        assert p.failures == 2 and not p.quarantined
        good, _ = await p.acquire(1)
        clock.now += 2.5
        p.tick()                       # alive 2.5 s after its spawn: proven healthy
        assert p.failures == 0
        p.exited(good, EXITED)         # a late exit is not a failure
        assert p.failures == 0
        for i in range(3):
            await settle()
            copy, _ = await p.acquire(1)
            p.exited(copy, EXITED)
        assert p.quarantined
        with pytest.raises(Quarantined):
            await p.acquire(1)
    run(go())


def test_warm_copy_dying_counts_killed_never_counts_failed_always_counts():
    async def go():
        f = Fakes()
        p = make(f, min_warm=2, max_live=4)
        p.refill()
        await settle()
        warm = p._warm[0]
        p.exited(warm, EXITED)
        assert p.failures == 1 and p.warm == 1
        copy, _ = await p.acquire(1)
        p.exited(copy, KILLED)
        assert p.failures == 1
        copy, _ = await p.acquire(1)
        p.exited(copy, FAILED, "no ack")
        assert p.failures == 2 and p.last_error == "no ack"
    run(go())


def test_set_min_warm_lower_discards_extra_warm_copies_and_they_count_until_exited():
    async def go():
        f = Fakes()
        p = make(f, min_warm=3, max_live=3)
        p.refill()
        await settle()
        p.set_min_warm(1)
        assert p.warm == 1 and len(f.discarded) == 2
        assert p.room() == 0            # dying copies still hold their slots
        for c in f.discarded:
            p.exited(c, KILLED)
        assert p.room() == 2 and p.failures == 0
    run(go())


def test_cancelled_waiter_leaves_the_queue_and_its_late_copy_is_not_kept_above_min_warm():
    async def go():
        f = Fakes(delay=0.02)
        p = make(f, min_warm=0, max_live=2)
        task = asyncio.ensure_future(p.acquire(1))
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert (p.waiting, p.live, p.warm) == (0, 0, 0)
        assert len(f.discarded) == 1      # min_warm is 0: the copy nobody waits for goes
        p.set_min_warm(1)
        await asyncio.sleep(0.05)
        copy, path = await p.acquire(1)
        assert path == "warm"
    run(go())


def test_close_fails_waiters_and_discards_warm_and_late_restores():
    async def go():
        f = Fakes(delay=0.02)
        p = make(f, min_warm=1, max_live=3)
        p.refill()
        await asyncio.sleep(0.05)
        assert p.warm == 1
        p.set_min_warm(2)
        await settle()
        assert p.restoring == 1
        await p.close(timeout=1)
        assert p.warm == 0 and p.restoring == 0 and len(f.discarded) == 2
        with pytest.raises(Exception, match="shutting down"):
            await p.acquire(1)
    run(go())
