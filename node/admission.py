"""Admission control: at most `slots` generations at once, a bounded wait queue, then "busy".

Each slot owns one llama.cpp context (an Engine), so concurrent generations never share a
Llama object (that segfaults). Waiters are served first come, first served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Busy(Exception):
    """All slots taken and the queue is full."""


class Draining(Exception):
    """The node is leaving and takes no new work."""


class Admission(Generic[T]):
    def __init__(self, workers: list[T], queue_limit: int):
        if not workers:
            raise ValueError("at least one slot is needed")
        self._idle: list[T] = list(workers)
        self.total = len(workers)
        self.queue_limit = queue_limit
        self._waiters: list[trio.Event] = []  # FIFO of parked requests
        self.draining = False

    @property
    def free(self) -> int:
        return 0 if self.draining else len(self._idle)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def active(self) -> int:
        return self.total - len(self._idle)

    def start_draining(self) -> None:
        self.draining = True
        # Queued requests have produced nothing yet: refuse them now rather than make them wait
        # out the grace period only to be cancelled.
        for ev in self._waiters:
            ev.set()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[T]:
        if self.draining:
            raise Draining()
        if not self._idle or self._waiters:
            if len(self._waiters) >= self.queue_limit:
                raise Busy()
            ev = trio.Event()
            self._waiters.append(ev)
            try:
                while not self._idle or self._waiters[0] is not ev:
                    await ev.wait()
                    if self.draining:
                        raise Draining()
                    ev = self._rearm(ev)
            finally:
                if ev in self._waiters:
                    self._waiters.remove(ev)
                self._wake_next()
        worker = self._idle.pop()
        try:
            yield worker
        finally:
            self._idle.append(worker)
            self._wake_next()

    def _rearm(self, ev: trio.Event) -> trio.Event:
        # trio Events can't be cleared: swap in a fresh one at the same queue position.
        fresh = trio.Event()
        self._waiters[self._waiters.index(ev)] = fresh
        return fresh

    def _wake_next(self) -> None:
        if self._waiters and self._idle:
            self._waiters[0].set()

    async def wait_idle(self) -> None:
        """Return when no generation is running (used by drain)."""
        while self.active:
            await trio.sleep(0.05)
