"""WarmPool's logic with fakes: a restore coroutine that makes numbered copies (or fails), a fake
clock. No CRIU, no processes. Also the classification of failures (pool.node.faults)."""
import asyncio
import errno

import pytest

from pool.errors import (BadRequest, CriuFailed, CriuTimeout, CriuUnavailable, NoCapacity, NodeUnavailable,
                         NoReply, PoolTimeout, Quarantined, RestoreError, ShuttingDown, TemplateNotFound)
from pool.node.faults import counts_against_template, handover_counts_against_template
from pool.node.warm import EXITED, FAILED, KILLED, WarmPool, WarmSettings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Copy:
    def __init__(self, n, build="b1"):
        self.n = n
        self.build = build

    def __repr__(self):
        return f"Copy({self.n})"


class Fakes:
    """restore() makes Copy(n) of `build` after `delay` seconds, or raises `fail` (an exception,
    or True for a RestoreError of the template) while it is set. `started`/`cancelled` count the
    restores that began and those cancelled before they finished."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.fail = False
        self.build = "b1"
        self.made = 0
        self.started = 0
        self.cancelled = 0
        self.discarded = []

    async def restore(self):
        self.started += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail:
            raise RestoreError("restoring with CRIU", "boom")
        self.made += 1
        return Copy(self.made, self.build)

    def discard(self, copy):
        self.discarded.append(copy)


def make(fakes, clock=None, node_room=None, build="b1", unbuilt=False, **settings):
    return WarmPool("t", WarmSettings(**settings), fakes.restore, fakes.discard,
                    clock=clock or Clock(), backoff_s=0.0, node_room=node_room,
                    build_of=lambda c: c.build, build=build, unbuilt=unbuilt)


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


def test_no_copy_ready_in_time_is_a_timeout_not_a_restore_failure():
    async def go():
        f = Fakes(delay=60)                # the restore cannot finish within the spawn's timeout
        p = make(f, min_warm=0, max_live=2, max_warm=0)  # fixed: no copy restored in advance
        with pytest.raises(PoolTimeout, match="no copy was ready within 0.01 s") as e:
            await p.acquire(0.01)
        assert isinstance(e.value, TimeoutError) and e.value.data == {"template": "t", "timeout": 0.01}
        assert p.waiting == 0 and p.failures == 0 and not p.quarantined
        await p.close()
    run(go())


def test_a_closing_pool_fails_waiting_and_new_spawns_with_shutting_down():
    async def go():
        f = Fakes(delay=60)
        p = make(f, min_warm=0, max_live=2)
        waiter = asyncio.ensure_future(p.acquire(30))
        await settle()
        assert p.waiting == 1
        await p.close()
        for pending in (waiter, p.acquire(1)):
            with pytest.raises(ShuttingDown, match="shutting down"):
                await pending
        assert p.failures == 0
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
        p = make(f, min_warm=0, max_live=2, max_warm=0)  # fixed: demand would keep the copy
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


def test_close_fails_waiters_discards_warm_and_cancels_restores_without_waiting_for_them():
    async def go():
        f = Fakes(delay=0.02)
        p = make(f, min_warm=1, max_live=3)
        p.refill()
        await asyncio.sleep(0.05)
        assert p.warm == 1
        f.delay = 3600                    # a restore that would take an hour
        p.set_min_warm(2)
        await settle()
        assert p.restoring == 1
        await p.close()                   # returns at once (run() allows 5 s)
        assert p.warm == 0 and p.restoring == 0 and len(f.discarded) == 1 and f.cancelled == 1
        with pytest.raises(Exception, match="shutting down"):
            await p.acquire(1)

        q = make(f, min_warm=0, max_live=3, max_warm=0)  # fixed: one restore, for the waiter
        waiter = asyncio.ensure_future(q.acquire(30))
        await settle()
        assert q.restoring == 1
        await q.close()
        assert q.restoring == 0 and f.cancelled == 2 and f.made == 1
        with pytest.raises(Exception, match="shutting down"):
            await waiter
    run(go())


# --- whose fault: only the template's failures count toward quarantine ------------------------------
def _raised_from(outer, inner):
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:  # noqa: BLE001
        return e


def _criu_restore_error(**kw):
    return _raised_from(RestoreError("restoring with CRIU", "criu failed"),
                        CriuFailed("restore", "failed", **kw))


@pytest.mark.parametrize("exc", [
    _criu_restore_error(errno=errno.EMFILE),
    _criu_restore_error(log_tail="Error (criu/files.c:1): Can't open: Too many open files"),
    _criu_restore_error(log_tail="Error (criu/mem.c:9): mmap: Cannot allocate memory"),
    _raised_from(RestoreError("restoring with CRIU", "x"), OSError(errno.ENOSPC, "full")),
    OSError(errno.ENFILE, "Too many open files in system"),
    _raised_from(RestoreError("restoring with CRIU", "x"), CriuUnavailable("no criu")),
    asyncio.CancelledError(),
    NoCapacity("full"),
    NodeUnavailable("shutting down"),
    ShuttingDown("template 't': the pool is shutting down", template="t"),
    _raised_from(RestoreError("restoring on a node", "x"), ShuttingDown("node n1 is shutting down")),
    PoolTimeout("template 't': no copy was ready within 1 s", template="t", timeout=1.0),
    NoReply("spawn got no reply within 5 s", method="spawn", timeout=5.0),
    TemplateNotFound("t"),
    BadRequest("bad hostname", param="hostname"),
], ids=lambda e: type(e).__name__)
def test_node_and_caller_faults_do_not_count_against_the_template(exc):
    assert not counts_against_template(exc)
    assert not handover_counts_against_template(exc)


@pytest.mark.parametrize("exc", [
    RestoreError("restoring with CRIU", "boom"),
    _criu_restore_error(errno=errno.ENOENT, log_tail="Error: no such file"),
    RestoreError("handing over the identity", "the copy exited with status 1 before it acked"),
    _raised_from(RestoreError("handing over the identity", "x"), OSError(errno.EPIPE, "pipe")),
    _raised_from(RestoreError("restoring with CRIU", "no answer within 30 s"),   # CRIU hung on the image
                 CriuTimeout("restore", "no answer within 30 s; CRIU was killed")),
], ids=["restore", "criu-enoent", "no-ack", "epipe", "criu-timeout"])
def test_template_faults_count(exc):
    assert counts_against_template(exc)
    assert handover_counts_against_template(exc)


@pytest.mark.parametrize("exc", [
    _raised_from(RestoreError("handing over the identity", "Invalid argument"),
                 OSError(errno.EINVAL, "Invalid argument")),          # sethostname refused it
    TypeError("can not serialize 'object' object"),                     # env not encodable
], ids=["sethostname-einval", "unencodable"])
def test_a_handover_failed_by_the_callers_identity_does_not_count(exc):
    assert not handover_counts_against_template(exc)


def test_restores_failed_by_the_node_back_off_but_never_quarantine():
    async def go():
        f = Fakes()
        f.fail = _criu_restore_error(errno=errno.EMFILE)
        p = make(f, min_warm=1, max_live=4)
        with pytest.raises(RestoreError):   # the spawn still learns why
            await p.acquire(1)
        for _ in range(10):
            p.tick()
            await settle()
        assert not p.quarantined and p.failures == 0 and p.node_faults >= 5
        assert "criu failed" in p.last_error
        f.fail = False                      # fds are back: the pool recovers by itself
        p.tick()
        await settle()
        assert p.warm == 1 and p.node_faults == 0
    run(go())


# --- bounds -----------------------------------------------------------------------------------------
def test_set_min_warm_beyond_max_live_is_refused_and_changes_nothing():
    async def go():
        f = Fakes()
        p = make(f, min_warm=1, max_live=4)
        with pytest.raises(BadRequest) as e:
            p.set_min_warm(100000)
        assert e.value.data["param"] == "min_warm" and e.value.data["max_live"] == 4
        assert "min_warm" in e.value.message and "max_live" in e.value.message
        assert (p.settings.min_warm, p.settings.max_live) == (1, 4)
        with pytest.raises(BadRequest):
            p.set_min_warm(-1)
        p.set_min_warm(4)
        await settle()
        assert p.warm == 4
    run(go())


def test_set_min_warm_down_cancels_queued_restores():
    async def go():
        f = Fakes(delay=3600)               # restores that would not finish on their own
        p = make(f, min_warm=8, max_live=8)
        p.refill()
        await settle()
        assert p.restoring == 8
        p.set_min_warm(2)
        await settle()
        assert p.restoring == 2 and f.cancelled == 6 and f.made == 0
        assert p.snapshot()["restoring"] == 2
    run(go())


def test_node_room_caps_every_pool_of_the_node():
    async def go():
        capacity = 3
        pools = []

        def node_room():
            return capacity - sum(q.total() for q in pools)

        f = Fakes()
        a = make(f, node_room=node_room, min_warm=2, max_live=10)
        b = make(f, node_room=node_room, min_warm=0, max_live=10)
        pools += [a, b]
        a.refill()
        await settle()
        first, _ = await b.acquire(1)
        await settle()
        assert (a.warm, b.live) == (2, 1) and a.room() == 0 and b.room() == 0
        assert a.wanted() == 0               # a's copies are its own min_warm: refill stops at 3
        with pytest.raises(NoCapacity) as e:
            await b.acquire(0.05)
        assert e.value.data["limit"] == "capacity"
        waiter = asyncio.ensure_future(b.acquire(5))
        await settle()
        assert b.restoring == 0              # no room: it waits, no restore
        b.exited(first, KILLED)              # a copy of the node ends: room for the waiter
        copy, path = await waiter
        assert path == "restore" and sum(q.total() for q in pools) == 3
    run(go())


def test_draining_restores_only_for_waiting_spawns():
    async def go():
        f = Fakes(delay=3600)
        p = make(f, min_warm=3, max_live=5)
        p.refill()
        await settle()
        waiter = asyncio.ensure_future(p.acquire(30))
        await settle()
        assert p.restoring == 4
        p.begin_drain()
        await settle()
        assert p.restoring == 1 and f.cancelled == 3   # the waiter's restore goes on
        assert p.wanted() == 0
        f.delay = 0
        waiter.cancel()
        await p.close()
    run(go())


# --- builds -----------------------------------------------------------------------------------------
def test_an_unbuilt_template_is_not_found_not_quarantined_and_a_new_build_brings_it_up():
    async def go():
        f = Fakes()
        p = make(f, build=None, unbuilt=True, min_warm=2, max_live=4)
        for _ in range(5):
            with pytest.raises(TemplateNotFound):
                await p.acquire(1)
            p.tick()
            await settle()
        assert f.started == 0 and not p.quarantined and p.failures == 0
        assert p.snapshot()["unbuilt"] is True
        p.new_build("b1")
        await settle()
        assert p.warm == 2 and not p.unbuilt
        copy, path = await p.acquire(1)
        assert path == "warm" and copy.build == "b1"
    run(go())


def test_a_newer_build_replaces_warm_copies_of_the_older_one():
    async def go():
        f = Fakes()
        p = make(f, min_warm=2, max_live=6)
        p.refill()
        await settle()
        old = list(p._warm)
        f.build = "b2"
        p.new_build("b2")
        await settle()
        assert f.discarded == old
        assert [c.build for c in p._warm] == ["b2", "b2"] and p.snapshot()["build"] == "b2"
    run(go())


def test_a_build_that_vanished_makes_the_pool_unbuilt_and_waiters_learn_it():
    async def go():
        f = Fakes(delay=0.01)
        f.fail = TemplateNotFound("t")
        p = make(f, min_warm=0, max_live=2)
        with pytest.raises(TemplateNotFound):
            await p.acquire(5)
        assert p.unbuilt and not p.quarantined and p.failures == 0
        f.fail = False
        p.new_build("b1")
        copy, path = await p.acquire(5)
        assert path == "restore"
    run(go())


def test_current_build_is_one_readlink_of_the_stores_current_link(tmp_path):
    from pool.templates.store import Store

    store = Store(tmp_path)
    assert store.current_build_id("t") is None                  # never built
    (tmp_path / "t" / "builds" / "20261130-abc").mkdir(parents=True)
    assert store.current_build_id("t") is None                  # staged, not published
    (tmp_path / "t" / "current").symlink_to("builds/20261130-abc")
    assert store.current_build_id("t") == "20261130-abc"
    (tmp_path / "u").write_text("not a template")
    assert store.current_build_id("u") is None
