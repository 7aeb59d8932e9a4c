"""Fakes for the node's unit tests (tests/unit/test_supervisor.py, test_node_api.py): copies that
are no processes, a restorer without CRIU, a clock and timers the test moves by hand.

A FakeInstance is a real pool.copies.restored.RestoredCopy (its logs, describe(), journal record) whose
process is a pipe: its "pidfd" is the read end, readable once the copy has "exited", so the node's
supervisor watches it with the loop exactly as it watches a pidfd."""
from __future__ import annotations

import itertools
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from pool.copies.restored import RestoredCopy
from pool.errors import TemplateNotFound

NO_PID = (1 << 22) + 7       # above the kernel's pid_max: no process of ours can have it
_ids = itertools.count(1)


class FakeInstance(RestoredCopy):
    """obeys_term: SIGTERM ends it (else only SIGKILL does)."""

    @classmethod
    def make(cls, template: str, run_dir: Path, build_id: str = "b1", obeys_term: bool = True):
        iid = f"i{next(_ids):04d}"
        d = run_dir / iid
        d.mkdir(parents=True)
        r, w = os.pipe()
        inst = cls(id=iid, template=template, build_id=build_id, pid=NO_PID, pidfd=r, run_dir=d,
                   netns_fd=-1, sdk=False)
        inst._w = w
        inst.obeys_term = obeys_term
        inst.signals = []
        return inst

    def die(self, status: int = 0) -> None:
        """The copy's process ends: its pidfd becomes readable."""
        if self.exit_status is None and self._w is not None:
            self._status = status
            os.write(self._w, b"x")

    def poll(self):
        if self.exit_status is None and getattr(self, "_status", None) is not None:
            self.exit_status = self._status
            if self.state != "failed":
                self.state = "exited"
        return self.exit_status

    def signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or sig == signal.SIGTERM and self.obeys_term:
            self.die(-sig)

    def kill(self, grace: float = 3.0):
        self.signal(signal.SIGKILL)
        return self.poll()

    def release_fds(self) -> None:
        if self._w is not None:
            os.close(self._w)
            self._w = None
        super().release_fds()

    @property
    def released(self) -> bool:
        return self.pidfd == -1


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Timers:
    """call_later that keeps what it was asked to run; fire() runs what is due by then."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[Timer] = []

    def call_later(self, delay, fn, *args):
        t = Timer(self.clock.now + delay, delay, fn, args)
        self.pending.append(t)
        return t

    def fire_due(self) -> int:
        due = [t for t in self.pending if not t.cancelled and t.when <= self.clock.now]
        self.pending = [t for t in self.pending if t not in due and not t.cancelled]
        for t in due:
            t.fn(*t.args)
        return len(due)


@dataclass(eq=False)
class Timer:
    when: float
    delay: float
    fn: object
    args: tuple
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeMetrics:
    def __init__(self) -> None:
        self.exits: list[tuple[str, str]] = []
        self.spawns: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str]] = []

    def exited(self, template, cause):
        self.exits.append((template, cause))

    def spawned(self, template, path, seconds):
        self.spawns.append((template, path))

    def spawn_failed(self, template, reason):
        self.failures.append((template, reason))

    def restored(self, template, seconds):
        pass

    def watch_pool(self, *a):
        pass

    def watch_node(self, *a):
        pass

    def restore_failed(self, template, reason):
        self.failures.append((template, f"restore:{reason}"))

    class _Gauge:
        def labels(self, *a):
            return self

        def set(self, v):
            pass

    image_bytes = _Gauge()


@dataclass
class FakeManifest:
    spec: dict = field(default_factory=dict)   # a built spec (secret_env, ...)
    sdk: bool = True
    built_at: str | None = None
    port: int | None = None
    lazy_pages: bool | None = None
    restore_method: str = "criu"
    image_bytes: int = 1 << 20
    rss_bytes: int | None = 4 << 20     # what the memory budget counts per copy


@dataclass
class FakeTemplate:
    name: str
    build_id: str = "b1"
    image_bytes: int = 1 << 20
    manifest: FakeManifest = field(default_factory=FakeManifest)


class FakeStore:
    def __init__(self, *names: str) -> None:
        self.templates = {n: FakeTemplate(n) for n in names}

    def get(self, name):
        if name not in self.templates:
            raise TemplateNotFound(name)
        return self.templates[name]

    def current_build_id(self, name):
        t = self.templates.get(name)
        return t.build_id if t else None

    def all(self):
        return list(self.templates.values())

    def drop_readable(self, name, keep_build=None):  # a plain store: no decrypted builds
        pass

    def close(self):
        pass


class FakeRestorer:
    """restore(name) makes a FakeInstance of the store's current build (in the node's executor
    thread, as a real restore runs); every copy made is kept in `made`."""

    def __init__(self, run_dir: Path, *templates: str) -> None:
        self.store = FakeStore(*templates)
        self.criu = None
        self.instances_dir = run_dir / "instances"
        self.instances_dir.mkdir(parents=True)
        self.made: list[FakeInstance] = []

    def restore(self, name):
        inst = FakeInstance.make(name, self.instances_dir, self.store.get(name).build_id)
        self.made.append(inst)
        return inst
