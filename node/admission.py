"""Admission control: at most `slots` generations at once, a bounded wait queue, then "busy",
shared fairly between the peers that send requests.

The workers are slots: with a real model, handles onto the node's one batched engine
(engine/batched.py), each the right to run one sequence in its shared context; with the
synthetic engine, one engine each. Admission decides who runs, the engine's scheduler how.

Fairness is per requesting peer (in the mesh, an entry), not per request: one entry carries
the traffic of many users, so a peer alone may take every free slot and the whole queue. Once
several peers want the node:
- a freed slot goes to the waiting peer with the fewest running generations, ties to the peer
  served longest ago (round robin); each peer's own requests are served first come, first
  served;
- when the queue is full, a newcomer still gets a place if another peer holds more than its
  share (running + queued exceeds the newcomer's by two or more): that peer's newest queued
  request is answered busy instead. A peer opening many streams therefore delays others by at
  most about one generation, however many it opens.
Running generations are never pre-empted; --max-tokens bounds how long each runs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

T = TypeVar("T")

QUEUE_FULL = "all slots are busy and the queue is full"
OVER_SHARE = "this requester holds more than its share of the node: its newest queued request gives way"
# Peers whose last grant is remembered for round robin; the ones served longest ago are
# forgotten first, which ranks them as never served: the order round robin gives them anyway.
_REMEMBERED_PEERS = 4096


class Busy(Exception):
    """All slots taken and the queue is full (or this request gave way to a fairer share)."""

    def __init__(self, message: str = QUEUE_FULL):
        super().__init__(message)


class Draining(Exception):
    """The node is leaving and takes no new work."""


class _Waiter(Generic[T]):
    __slots__ = ("peer", "seq", "event", "worker", "refusal")

    def __init__(self, peer: str, seq: int):
        self.peer = peer
        self.seq = seq  # arrival order, across peers
        self.event = trio.Event()
        self.worker: T | None = None  # handed over directly, so no newcomer can take it first
        self.refusal: Exception | None = None


class Admission(Generic[T]):
    def __init__(self, workers: list[T], queue_limit: int):
        if not workers:
            raise ValueError("at least one slot is needed")
        if queue_limit < 0:
            raise ValueError("the queue limit must be >= 0")
        self._idle: list[T] = list(workers)  # non-empty only while nobody waits
        self.total = len(workers)
        self.queue_limit = queue_limit
        self._queues: dict[str, deque[_Waiter[T]]] = {}  # per peer, FIFO; no empty deques
        self._queued = 0
        self._running: Counter[str] = Counter()
        self._served_at: OrderedDict[str, int] = OrderedDict()  # peer -> number of its last grant
        self._grants = 0
        self._arrivals = 0
        self.draining = False

    @property
    def free(self) -> int:
        return 0 if self.draining else len(self._idle)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def active(self) -> int:
        return self.total - len(self._idle)

    def running(self, peer: str) -> int:
        return self._running[peer]

    def queued_for(self, peer: str) -> int:
        return len(self._queues.get(peer, ()))

    def start_draining(self) -> None:
        self.draining = True
        # Queued requests have produced nothing yet: refuse them now rather than make them wait
        # out the grace period only to be cancelled.
        for queue in self._queues.values():
            for w in queue:
                w.refusal = Draining()
                w.event.set()
        self._queues.clear()
        self._queued = 0

    @asynccontextmanager
    async def slot(self, peer: str = "") -> AsyncIterator[T]:
        """Hold one slot for `peer` (the requester's peer id) while the block runs; raises Busy
        or Draining without holding one."""
        worker = await self._acquire(peer)
        try:
            yield worker
        finally:
            self._release(peer, worker)

    async def _acquire(self, peer: str) -> T:
        if self.draining:
            raise Draining()
        if self._idle:
            return self._grant(peer, self._idle.pop())
        if self._queued >= self.queue_limit and not self._make_room_for(peer):
            raise Busy()
        self._arrivals += 1
        w: _Waiter[T] = _Waiter(peer, self._arrivals)
        self._queues.setdefault(peer, deque()).append(w)
        self._queued += 1
        try:
            await w.event.wait()
        except BaseException:  # cancelled while waiting
            if w.worker is not None:  # granted in the same instant: pass the slot on
                self._release(peer, w.worker)
            else:
                self._forget(w)
            raise
        if w.refusal is not None:
            raise w.refusal
        assert w.worker is not None
        return w.worker

    def _grant(self, peer: str, worker: T) -> T:
        self._running[peer] += 1
        self._grants += 1
        self._served_at[peer] = self._grants
        self._served_at.move_to_end(peer)
        while len(self._served_at) > _REMEMBERED_PEERS:
            self._served_at.popitem(last=False)
        return worker

    def _release(self, peer: str, worker: T) -> None:
        self._running[peer] -= 1
        if self._running[peer] <= 0:
            del self._running[peer]
        nxt = self._next_waiter()
        if nxt is None:
            self._idle.append(worker)
            return
        self._forget(nxt)
        nxt.worker = self._grant(nxt.peer, worker)
        nxt.event.set()

    def _next_waiter(self) -> _Waiter[T] | None:
        if not self._queues:
            return None
        peer = min(self._queues, key=lambda p: (self._running[p], self._served_at.get(p, -1), self._queues[p][0].seq))
        return self._queues[peer][0]

    def _make_room_for(self, peer: str) -> bool:
        """Queue full: take the newest queued request of the peer holding the most, if it holds
        more than its share next to `peer`. Returns whether a place was freed."""
        def holding(p: str) -> int:
            return self._running[p] + len(self._queues.get(p, ()))

        others = [p for p in self._queues if p != peer]
        if not others:
            return False
        hog = max(others, key=lambda p: (holding(p), self._served_at.get(p, -1)))
        if holding(hog) <= holding(peer) + 1:
            return False
        victim = self._queues[hog][-1]
        self._forget(victim)
        victim.refusal = Busy(OVER_SHARE)
        victim.event.set()
        return True

    def _forget(self, w: _Waiter[T]) -> None:
        queue = self._queues.get(w.peer)
        if queue is None or w not in queue:
            return
        queue.remove(w)
        self._queued -= 1
        if not queue:
            del self._queues[w.peer]

    async def wait_idle(self) -> None:
        """Return when no generation is running (used by drain)."""
        while self.active:
            await trio.sleep(0.05)
