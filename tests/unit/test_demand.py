"""The demand-following target (pool/node/demand.py) and a WarmPool that follows it, on a fake clock:
bursts raise the target, idleness decays it to the floor, caps and the memory budget hold, a slower
refill raises it."""
import asyncio
import math

import pytest

from pool.node.demand import Demand, MemoryBudget, copies_for
from pool.node.warm import WarmPool, WarmSettings


class Clock:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


def burst(demand, clock, n, per_s):
    for _ in range(n):
        clock.now += 1 / per_s
        demand.arrived()


def test_copies_for_is_the_95th_percentile_of_poisson_arrivals():
    assert copies_for(0, 10) == 0
    assert copies_for(0.05, 10) == 0           # P(any arrival) < 5 %: nothing kept
    assert copies_for(0.06, 10) == 1
    assert copies_for(1.0, 10) == 3            # P(N > 3) = 1.9 %, P(N > 2) = 8 %
    assert copies_for(10.0, 100) == 15
    assert copies_for(10.0, 4) == 4            # the limit holds
    assert copies_for(1000.0, 5000) == math.ceil(1000 + 1.645 * math.sqrt(1000))


def test_a_burst_raises_the_target_within_a_second():
    clock = Clock()
    d = Demand(clock)
    d.refilled(0.1)
    assert d.wanted(32) == 0
    burst(d, clock, 50, per_s=100)             # half a second at 100 spawns/s
    assert d.rate() > 25                       # 100 x (1 - 2^-0.5)
    assert d.wanted(32) >= 5
    before = d.wanted(32)
    burst(d, clock, 100, per_s=100)
    assert d.wanted(32) > before               # still rising toward 100/s x 0.1 s


def test_idleness_decays_the_target_to_zero_and_a_pause_keeps_it():
    clock = Clock()
    d = Demand(clock)
    d.refilled(0.2)
    burst(d, clock, 300, per_s=50)
    peak = d.wanted(64)
    assert peak >= 10
    clock.now += 5                              # a pause between bursts: most copies stay
    assert d.wanted(64) >= peak * 0.8
    clock.now += 60
    assert 0 < d.wanted(64) < peak / 2
    clock.now += 600                            # ten quiet minutes: back to nothing
    assert d.wanted(64) == 0 and d.rate() < 0.01


def test_a_refill_that_gets_slower_raises_the_target():
    clock = Clock()
    d = Demand(clock)
    d.refilled(0.05)
    burst(d, clock, 100, per_s=20)
    fast = d.wanted(64)
    for _ in range(10):
        d.refilled(0.5)                         # the node got busy: refills take 10x longer
    assert d.refill_s > 0.4
    assert d.wanted(64) > fast


def test_the_memory_budget_caps_extras_after_every_floor():
    gib = 1 << 30
    b = MemoryBudget(10 * gib)
    b.set_copy_bytes("a", gib)
    b.set_copy_bytes("b", 2 * gib)
    assert b.cap("b", 1, 1) == 1                # b's floor: 2 GiB reserved
    assert b.cap("a", 2, 20) == 2 + 6           # 10 - 2 (b's floor) - 2 (a's floor) = 6 more of a
    assert b.cap("b", 1, 5) == 1                # a's extras hold the rest: b keeps its floor only
    assert b.used() <= 10 * gib
    assert b.cap("a", 2, 2) == 2                # a's demand fell: its extras are released
    assert b.cap("b", 1, 5) == 1 + 3            # (10 - 2 - 2) // 2
    assert b.used() <= 10 * gib
    assert b.cap("a", 12, 12) == 12             # a floor is the operator's: never cut
    b.set_copy_bytes("c", None)                 # cost unknown: not capped
    assert b.cap("c", 0, 7) == 7
    assert MemoryBudget(None).cap("a", 0, 30) == 30


# -- a WarmPool following demand, in simulated time ----------------------------------------------------
# The clock advances by TICK_S each time the loop goes round (a task of its own), so refills overlap
# spawns as they do on a node: deterministic, and no wall-clock time is measured.
TICK_S = 0.001


class Fakes:
    """restore() makes numbered copies in refill_s of simulated time."""

    def __init__(self, clock, refill_s=0.1):
        self.clock, self.refill_s = clock, refill_s
        self.made, self.discarded = 0, []

    async def restore(self):
        await until(self.clock, self.clock.now + self.refill_s)
        self.made += 1
        return self.made

    def discard(self, copy):
        self.discarded.append(copy)


async def until(clock, t):
    while clock.now < t:
        await asyncio.sleep(0)


async def run_clock(clock):
    while True:
        clock.now += TICK_S
        await asyncio.sleep(0)


def simulated(test):
    """Run test(clock) with the simulated clock running."""
    async def go():
        clock = Clock()
        ticker = asyncio.ensure_future(run_clock(clock))
        try:
            await asyncio.wait_for(test(clock), 30)
        finally:
            ticker.cancel()
    asyncio.run(go())


def pool(clock, fakes, memory=None, **settings):
    return WarmPool("t", WarmSettings(**settings), fakes.restore, fakes.discard, clock=clock,
                    backoff_s=0.0, memory=memory)


async def spawn_and_end(p, clock, n, per_s):
    """n spawns at per_s (simulated), each copy ended at once; returns the paths that served them."""
    paths, at = [], clock.now
    for _ in range(n):
        at += 1 / per_s
        await until(clock, at)
        copy, path = await p.acquire(5)
        paths.append(path)
        p.exited(copy, "killed")
    return paths


def test_a_pool_stocks_up_for_a_burst_and_returns_to_its_floor():
    async def go(clock):
        f = Fakes(clock)
        p = pool(clock, f, min_warm=1, max_live=16)
        p.refill()
        await until(clock, clock.now + 0.2)
        assert p.target == 1 and p.warm == 1
        paths = await spawn_and_end(p, clock, 200, per_s=50)
        assert p.target > 2 and p.warm > 2                         # stocked up: 50/s x 0.1 s
        assert p.hits == paths.count("warm") and p.misses == paths.count("restore")
        assert p.hits > 150 and p.hits + p.misses == 200
        snap = p.snapshot()
        assert (snap["hits"], snap["misses"], snap["target"]) == (p.hits, p.misses, p.target)
        clock.now += 3600
        await until(clock, clock.now + 0.2)                        # refills in flight land
        p.tick()                                                   # the trim lets go of extras
        assert p.target == 1 and p.warm == 1 and len(f.discarded) > 0
        await p.close()
    simulated(go)


def test_caps_hold_max_warm_max_live_and_the_node():
    async def go(clock):
        node = {}  # a node of capacity 5 whose only pool this is
        for settings, room, cap in ((dict(max_live=16, max_warm=3), None, 3),
                                    (dict(max_live=4), None, 4),
                                    (dict(max_live=16), lambda: 5 - node["pool"].total(), 5)):
            f = Fakes(clock)
            p = node["pool"] = WarmPool("t", WarmSettings(**settings), f.restore, f.discard,
                                        clock=clock, backoff_s=0.0, node_room=room)
            await spawn_and_end(p, clock, 300, per_s=200)
            assert p.warm + p.restoring == cap                     # demand wants more than that
            if room is None:
                assert p.target == cap
            else:                                                  # the room bounds the restores
                assert p.target > cap and p.wanted() == 0
            await p.close()
    simulated(go)


def test_max_warm_equal_to_min_warm_is_a_fixed_pool():
    async def go(clock):
        f = Fakes(clock)
        p = pool(clock, f, min_warm=2, max_warm=2, max_live=16)
        await spawn_and_end(p, clock, 100, per_s=100)
        assert p.target == 2
        await p.close()
    simulated(go)


def test_the_memory_budget_holds_across_pools():
    async def go(clock):
        budget = MemoryBudget(10 << 20)
        budget.set_copy_bytes("t", 1 << 20)
        budget.set_copy_bytes("u", 1 << 20)
        f, g = Fakes(clock), Fakes(clock)
        p = WarmPool("t", WarmSettings(min_warm=1, max_live=32), f.restore, f.discard,
                     clock=clock, backoff_s=0.0, memory=budget)
        q = WarmPool("u", WarmSettings(min_warm=2, max_live=32), g.restore, g.discard,
                     clock=clock, backoff_s=0.0, memory=budget)
        assert q.target == 2
        await spawn_and_end(p, clock, 300, per_s=500)
        assert p.target == 10 - 2                                  # all but u's floor
        await spawn_and_end(q, clock, 300, per_s=500)
        assert q.target == 2 and p.warm + q.warm <= 10             # p got there first
        assert budget.used() <= 10 << 20
        await p.close()
        await q.close()
    simulated(go)


@pytest.mark.parametrize("floor", [0, 3])
def test_a_draining_pool_wants_nothing_whatever_the_demand(floor):
    async def go(clock):
        f = Fakes(clock)
        p = pool(clock, f, min_warm=floor, max_live=16)
        await spawn_and_end(p, clock, 50, per_s=100)
        assert p.target > floor
        p.begin_drain()
        assert p.target == 0
        await p.close()
    simulated(go)
