"""The node's supervisor and copy table with fakes (tests/nodefakes.py): copies whose process is a
pipe, a real WarmPool on a fake clock, timers fired by hand. No CRIU, no processes."""
import asyncio
import signal

import pytest
from nodefakes import Clock, FakeInstance, FakeMetrics, Timers

from pool.errors import InstanceNotFound
from pool.node.supervisor import OOM, Supervisor
from pool.node.table import Copy, CopyState, CopyStateError, CopyTable
from pool.node.warm import EXITED, FAILED, KILLED, WarmPool, WarmSettings

KILL_GRACE = 3.0


class Node:
    """A supervisor over one pool "t" of FakeInstances; copies are made warm, then spawned."""

    def __init__(self, tmp_path, history=10, **settings):
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.metrics = FakeMetrics()
        self.table = CopyTable(capacity=8, exited_history=history)
        self.tmp = tmp_path
        # a fixed pool (max_warm = min_warm): these tests count copies; demand is test_warm's
        settings.setdefault("max_warm", settings.get("min_warm", 0))
        self.pool = WarmPool("t", WarmSettings(**settings), self._restore, self._discard,
                             clock=self.clock, early_death_s=2.0, quarantine_after=3,
                             backoff_s=0.0)
        self.sup = Supervisor(self.table, {"t": self.pool}, self.metrics, kill_grace=KILL_GRACE,
                              max_log_bytes=1 << 20, clock=self.clock, monotonic=self.clock,
                              call_later=self.timers.call_later)

    async def _restore(self):
        inst = FakeInstance.make("t", self.tmp)
        c = Copy(inst, self.pool, asyncio.get_running_loop().create_future())
        self.table.add(c)
        self.sup.watch(c)
        return inst

    def _discard(self, inst):
        self.sup.kill(self.table.get(inst.id), 0, KILLED)

    async def close(self):
        """End every copy and release its fds (the test checks for leaked fds)."""
        await self.pool.close()
        for c in self.table:
            self.sup.kill(c, 0, KILLED)
            if c.watched:
                self.sup.reap(c)
            c.inst.release_fds()

    async def spawn(self) -> Copy:
        """A copy acquired from the pool and handed out now (as the node API does)."""
        inst, _ = await self.pool.acquire(5)
        c = self.table.get(inst.id)
        c.move(CopyState.HANDING_OVER)
        c.move(CopyState.LIVE)
        c.handed_at = self.clock()
        return c


def run(node, test):
    """test(node) on a fresh Node (made on the loop), then the node closed whatever happened."""
    async def go():
        n = node()
        try:
            await test(n)
        finally:
            await n.close()
    asyncio.run(asyncio.wait_for(go(), 10))


def test_reaping_marks_the_copy_exited_and_keeps_it_in_the_history(tmp_path):
    async def go(n):
        n.sup.start()
        try:
            c = await n.spawn()
            assert n.table.find(c.inst.id) is c and n.table.live_count() == 1
            c.inst.die(7)
            assert await asyncio.wait_for(c.done, 5) == 7  # the loop saw the pidfd, reap() ran
            assert c.state is CopyState.EXITED and c.exited_at is not None
            assert c.cause == EXITED and c.inst.state == "exited"
            assert n.table.get(c.inst.id) is None and len(n.table) == 0
            assert n.table.find(c.inst.id) is c           # still answers info/logs
            assert list(n.table.history) == [c.inst.id]
            assert c.inst.released and c.inst.run_dir.exists()  # its logs stay while kept
            assert n.metrics.exits == [("t", EXITED)]
            assert n.pool.live == 0
        finally:
            await n.sup.stop()
    run(lambda: Node(tmp_path), go)


def test_the_history_drops_and_closes_the_oldest_beyond_its_limit(tmp_path):
    async def go(n):
        first, second = await n.spawn(), await n.spawn()
        for c in (first, second):
            c.inst.die(0)
            n.sup.reap(c)
        assert list(n.table.history) == [second.inst.id]
        assert not first.inst.run_dir.exists()
        with pytest.raises(InstanceNotFound):
            n.table.find(first.inst.id)
    run(lambda: Node(tmp_path, history=1), go)


def test_a_warm_copy_that_exits_is_closed_not_kept(tmp_path):
    async def go(n):
        n.pool.refill()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        (c,) = n.table
        assert c.state is CopyState.WARM
        with pytest.raises(InstanceNotFound):  # a warm copy is nobody's instance yet
            n.table.find(c.inst.id)
        c.inst.die(1)
        n.sup.reap(c)
        assert not n.table.history and not c.inst.run_dir.exists()
        assert n.pool.failures == 1 and "while warm" in n.pool.last_error
    run(lambda: Node(tmp_path, min_warm=1), go)


def test_ttl_kills_with_grace_then_sigkill(tmp_path):
    async def go(n):
        c = await n.spawn()
        c.inst.obeys_term = False  # only SIGKILL ends it: the grace runs out
        n.clock.now += 4.9
        n.sup.tick()
        assert c.inst.signals == [] and c.state is CopyState.LIVE
        n.clock.now += 0.1
        n.sup.tick()
        assert c.inst.signals == [signal.SIGTERM] and c.state is CopyState.KILLING
        (timer,) = n.timers.pending
        assert timer.delay == KILL_GRACE
        n.sup.tick()  # a copy already being killed is not killed again
        assert c.inst.signals == [signal.SIGTERM]
        n.clock.now += KILL_GRACE
        assert n.timers.fire_due() == 1
        assert c.inst.signals == [signal.SIGTERM, signal.SIGKILL]
        n.sup.reap(c)
        assert c.cause == KILLED and c.done.result() == -signal.SIGKILL
        assert n.pool.failures == 0  # ending it ourselves is never the template's failure
    run(lambda: Node(tmp_path, ttl=5.0), go)


class Proxy:
    def __init__(self, last_activity):
        self.last_activity = last_activity

    async def close(self):
        pass


def test_idle_timeout_counts_from_the_last_traffic(tmp_path):
    async def go(n):
        c = await n.spawn()
        c.proxy = Proxy(last_activity=0.0)  # traffic before the spawn does not count
        n.clock.now += 9
        n.sup.tick()
        assert c.inst.signals == []
        c.proxy.last_activity = n.clock.now  # traffic at 9 s
        n.clock.now += 9.5
        n.sup.tick()
        assert c.inst.signals == [] and n.sup.idle_s(c) == 9.5
        n.clock.now += 0.5
        n.sup.tick()
        assert c.inst.signals == [signal.SIGTERM] and c.state is CopyState.KILLING
        assert [t.delay for t in n.timers.pending] == [KILL_GRACE]
    run(lambda: Node(tmp_path, idle_timeout=10.0), go)


def test_a_copy_that_dies_right_after_its_spawn_is_an_early_death(tmp_path):
    async def go(n):
        c = await n.spawn()
        n.clock.now += 0.5
        c.inst.die(1)
        n.sup.reap(c)
        assert n.pool.failures == 1
        assert n.pool.last_error == "a copy exited with status 1 0.50s after its spawn"
        # one that lived past early_death_s is a good outcome: its exit counts for nothing
        later = await n.spawn()
        n.clock.now += 2.0
        n.pool.tick()
        assert n.pool.failures == 0
        later.inst.die(0)
        n.sup.reap(later)
        assert n.pool.failures == 0
    run(lambda: Node(tmp_path), go)


def test_three_early_deaths_quarantine_the_template(tmp_path):
    async def go(n):
        for _ in range(3):
            c = await n.spawn()
            c.inst.die(1)
            n.sup.reap(c)
        assert n.pool.quarantined
    run(lambda: Node(tmp_path), go)


def test_kill_of_an_unknown_id_is_instance_not_found(tmp_path):
    n = CopyTable(capacity=1, exited_history=1)
    with pytest.raises(InstanceNotFound) as e:
        n.find("nope")
    assert e.value.data == {"id": "nope"} or "nope" in e.value.message


def test_a_copy_being_handed_over_is_sigkilled_and_its_fds_left_to_the_spawn(tmp_path):
    async def go(n):
        inst, _ = await n.pool.acquire(5)
        c = n.table.get(inst.id)
        c.move(CopyState.HANDING_OVER)
        n.sup.kill(c, KILL_GRACE, FAILED)
        assert inst.signals == [signal.SIGKILL] and not n.timers.pending
        assert c.state is CopyState.HANDING_OVER
        n.sup.reap(c)
        assert c.state is CopyState.EXITED and n.table.get(inst.id) is None
        assert not inst.released and inst.run_dir.exists()  # the spawn still holds them
        assert n.pool.failures == 1 and c.cause == FAILED and inst.state == "failed"
        inst.close()  # what the spawn does once its hand-over has let go
    run(lambda: Node(tmp_path), go)


def test_shutdown_kills_warm_copies_at_once_and_live_ones_with_grace(tmp_path):
    async def go(n):
        live = await n.spawn()
        n.pool.refill()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        (warm,) = [c for c in n.table if c.state is CopyState.WARM]
        live.inst.obeys_term = False
        n.sup.end_copies(force=False, leave_live=False)
        assert warm.inst.signals == [signal.SIGKILL]
        assert live.inst.signals == [signal.SIGTERM] and live.state is CopyState.KILLING
        assert [t.delay for t in n.timers.pending] == [KILL_GRACE]
        n.sup.end_copies(force=True, leave_live=False)  # a second signal: SIGKILL now
        assert live.inst.signals == [signal.SIGTERM, signal.SIGKILL]
    run(lambda: Node(tmp_path, min_warm=1), go)


def test_on_shutdown_leave_stops_watching_live_copies(tmp_path):
    async def go(n):
        live = await n.spawn()
        n.sup.end_copies(force=False, leave_live=True)
        assert live.state is CopyState.LEFT and live.inst.signals == []
        n.sup.kill(live, 0, KILLED)  # not ours any more: never signalled
        assert live.inst.signals == [] and n.table.watched() == []
    run(lambda: Node(tmp_path), go)


def test_transitions_are_checked(tmp_path):
    async def go():
        c = Copy(FakeInstance.make("t", tmp_path), None, asyncio.get_running_loop().create_future())
        with pytest.raises(CopyStateError):
            c.move(CopyState.LEFT)  # only a live copy is left running
        c.move(CopyState.KILLING)
        with pytest.raises(CopyStateError):
            c.move(CopyState.LIVE)
        c.move(CopyState.EXITED)
        for s in CopyState:
            with pytest.raises(CopyStateError):
                c.move(s)
        c.inst.release_fds()
    asyncio.run(go())


def test_an_oom_killed_copy_ends_with_cause_oom_and_costs_its_template_nothing(tmp_path):
    async def go(n):
        for _ in range(3):  # three early deaths would quarantine the template, were they its fault
            c = await n.spawn()
            c.inst.oom_killed = True
            c.inst.die(137)
            n.sup.reap(c)
            assert c.cause == OOM
        assert n.pool.failures == 0 and not n.pool.quarantined
    run(lambda: Node(tmp_path), go)


def test_a_warm_copy_killed_for_memory_is_a_bad_outcome(tmp_path):
    async def go(n):
        n.pool.set_min_warm(1)
        while not n.pool.warm:
            await asyncio.sleep(0)
        (c,) = [c for c in n.table if c.state is CopyState.WARM]
        c.inst.oom_killed = True
        c.inst.die(137)
        n.sup.reap(c)
        assert c.cause == OOM and n.pool.failures == 1
        assert n.pool.last_error.startswith("out of memory: ")
    run(lambda: Node(tmp_path, max_live=2), go)
