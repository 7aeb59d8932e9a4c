"""The node's copies: one Copy per restored copy, its state, and the history of handed-out copies
that have exited (kept for info and logs).

A copy's life is one CopyState; every change goes through Copy.move, which refuses a transition the
node never makes (a bug, not a request to answer):

    WARM ──► HANDING_OVER ──► LIVE ──► KILLING ──► EXITED
      ├──► LIVE (adopted again from the journal, or a lazy fork)
      └──► KILLING, EXITED;   HANDING_OVER ──► KILLING, EXITED;   LIVE ──► LEFT, EXITED

The spawn handing a copy over owns its control fds until it lets go: a copy killed meanwhile is
SIGKILLed at once (it never started as a spawn) and stays HANDING_OVER until the spawn moves it on
(to KILLING when the hand-over failed), so the reaper knows whether the fds are its to release.
LEFT is on_shutdown = "leave": no longer watched, not ours to kill or clean.
"""
from __future__ import annotations

import asyncio
import collections
import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pool.errors import InstanceNotFound
from pool.node.warm import EXITED, WarmPool


class CopyState(enum.Enum):
    WARM = "warm"                  # restored, waiting in its pool
    HANDING_OVER = "handing_over"  # a spawn is writing its identity
    LIVE = "live"                  # handed out
    KILLING = "killing"            # SIGTERM sent (ttl, idle, request, shutdown, discard)
    LEFT = "left"                  # left running at shutdown (on_shutdown = "leave")
    EXITED = "exited"              # reaped


S = CopyState
TRANSITIONS: dict[CopyState, frozenset[CopyState]] = {
    S.WARM: frozenset({S.HANDING_OVER, S.LIVE, S.KILLING, S.EXITED}),
    S.HANDING_OVER: frozenset({S.LIVE, S.KILLING, S.EXITED}),
    S.LIVE: frozenset({S.KILLING, S.LEFT, S.EXITED}),
    S.KILLING: frozenset({S.EXITED}),
    S.LEFT: frozenset(),
    S.EXITED: frozenset(),
}


class CopyStateError(RuntimeError):
    """A transition the node never makes: a bug in the node."""


@dataclass(eq=False)
class Copy:
    inst: Any                              # pool.copies.restored.RestoredCopy
    pool: WarmPool
    done: asyncio.Future                   # exit status once reaped
    state: CopyState = CopyState.WARM
    proxy: Any = None                      # PortProxy publishing its port, if any
    cause: str = EXITED                    # why it ended: set to KILLED/FAILED by us
    handed_at: float | None = None         # clock time of its spawn
    kill_timer: Any = None                 # the SIGKILL scheduled after a grace
    exited_at: float | None = None         # wall time it was reaped
    on_end: Callable[[], Any] | None = None  # run once it is reaped (e.g. a lazy daemon's kill)
    restarts: int = 0                      # restored after it died (restart = "on-failure")
    crash_loop: bool = False               # died too often to be restarted again

    def move(self, to: CopyState) -> None:
        if to not in TRANSITIONS[self.state]:
            raise CopyStateError(f"copy {self.inst.id}: {self.state.value} -> {to.value}")
        self.state = to

    @property
    def exited(self) -> bool:
        return self.state is CopyState.EXITED

    @property
    def handed_out(self) -> bool:
        """Handed out by a spawn (or adopted live), whatever has happened since."""
        return self.handed_at is not None

    @property
    def watched(self) -> bool:
        """Ours to kill and reap: neither exited nor left running."""
        return self.state not in (CopyState.EXITED, CopyState.LEFT)


class CopyTable:
    """Copies restored and not yet reaped, by id; handed-out copies that exited, oldest first."""

    def __init__(self, capacity: int, exited_history: int) -> None:
        self.capacity = capacity
        self.exited_history = exited_history
        self.running: dict[str, Copy] = {}
        self.history: collections.OrderedDict[str, Copy] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.running)

    def __iter__(self) -> Iterator[Copy]:
        return iter(list(self.running.values()))

    def add(self, c: Copy) -> None:
        self.running[c.inst.id] = c

    def get(self, iid: str) -> Copy | None:
        return self.running.get(iid)

    def retire(self, c: Copy, close: bool = True) -> None:
        """c was reaped: it leaves the running copies; kept in the history if it was handed out
        (its files closed when it falls out), else closed now (close) or by whoever holds it."""
        self.running.pop(c.inst.id, None)
        if not c.handed_out or self.exited_history == 0:
            if not close:
                return
            c.inst.close()
            return
        self.history[c.inst.id] = c
        while len(self.history) > self.exited_history:
            _, old = self.history.popitem(last=False)
            old.inst.close()

    def find(self, iid: str) -> Copy:
        """A handed-out copy (running or recently exited)."""
        c = self.running.get(iid)
        if c is not None and c.handed_out:
            return c
        c = self.history.get(iid)
        if c is None:
            raise InstanceNotFound(iid)
        return c

    def handed_out(self, template: str | None = None) -> list[Copy]:
        return [c for c in self.running.values()
                if c.handed_out and (template is None or c.inst.template == template)]

    def live_count(self) -> int:
        return sum(1 for c in self.running.values() if c.handed_out)

    def watched(self) -> list[Copy]:
        return [c for c in self.running.values() if c.watched]

    def room(self, restoring: int) -> int:
        """Copies the node may still add: its capacity minus every copy it has and the `restoring`
        ones (a restored copy counts twice for a moment, between adopt and its pool taking it)."""
        return self.capacity - len(self.running) - restoring

    def free(self) -> int:
        """What a scheduler may still place here: capacity minus the copies handed out (a warm copy
        is there to serve a spawn)."""
        return max(0, self.capacity - self.live_count())

    def clear(self) -> None:
        """At stop: forget the running copies (their fds released by the caller), close the
        history's."""
        self.running.clear()
        for c in self.history.values():
            c.inst.close()
        self.history.clear()
