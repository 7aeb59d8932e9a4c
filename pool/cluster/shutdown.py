"""How `pool serve` and `pool agent` are asked to stop: SIGTERM or SIGINT once drains, twice forces.

The handlers run on the event loop (loop.add_signal_handler) and only set events and ask the node
to signal its copies; the phases that wait on those events (drain, stop) do the work.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownSignals:
    """stop: set by the first signal (drain); force: by the second (skip the graceful parts), when
    on_force is called too (e.g. to kill live copies at once)."""

    def __init__(self, on_force: Callable[[], None] = lambda: None) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self._on_force = on_force
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._loop.add_signal_handler(sig, self.received, sig)

    def remove(self) -> None:
        if self._loop is not None:
            for sig in SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def received(self, sig: int = signal.SIGTERM) -> None:
        if not self.stop.is_set():
            log.info("%s: draining (again to force)", signal.Signals(sig).name)
            self.stop.set()
        elif not self.force.is_set():
            log.info("%s again: forcing the shutdown", signal.Signals(sig).name)
            self.force.set()
            self._on_force()
