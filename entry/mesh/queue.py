"""The admission queue: a request whose model's nodes are all busy waits here for a slot.

Users with a batch script expect every request to complete, later, not a 503 after a few
seconds. So a request that finds no free slot (router.pick) waits in its model's queue, and is
handed a slot the moment one frees. Bounds keep that honest:
- `max_waiting` requests in all queues together: past it a request is refused at once (503,
  reason "full"); an entry must not hold unbounded connections for a mesh that cannot keep up.
  A full queue still takes a request from a key holding fewer places than the key holding the
  most: that key's newest waiter is refused instead, so one key cannot lock the others out;
- `wait` seconds per request: past it the request is refused (503, reason "expired") rather
  than held until the client's own timeout, which it could not tell from a hung entry.

Fairness is across queue keys (the API passes one per API key, opaque to everyone else and
never sent to nodes): round robin between keys, first in first out within one, so a key that
submits a thousand requests delays another key's one request by at most one slot's turn.
Retries of a generation that already holds a user's stream (failover after a node vanished, a
node that said busy) go first: they were admitted once and must not wait behind newcomers.

Slots free when our own requests finish (MeshView.release) and when a node's status shows
someone else's finished; both call MeshView.notify, and the queue dispatches on every notify
(synchronously, in the notifying task: no task switch between a slot freeing and its next
request taking it). A node's cooldown running out is not an event, so each waiter also
re-checks every BACKSTOP_S.

A waiter whose task is cancelled (its client went away) leaves the queue in its `finally`; a
slot handed to it in the same instant is given back, so the next waiter gets it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from entry.backend import MeshUnavailable
from entry.mesh.view import MeshView, NodeState

log = logging.getLogger("mesh.entry.queue")

BACKSTOP_S = 0.5  # a waiter's re-check when no event came (e.g. a node's cooldown ran out)
FULL = "full"
EXPIRED = "expired"
GONE = "gone"  # every node that could serve it left while it waited
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(eq=False)
class _Waiter:
    key: str
    exclude: set[str]
    since: float
    priority: bool
    ready: trio.Event = field(default_factory=trio.Event)
    node: NodeState | None = None
    error: MeshUnavailable | None = None


class _ModelQueue:
    """One model's waiters: retries first (FIFO), then round robin across keys, FIFO within."""

    def __init__(self) -> None:
        self.first: deque[_Waiter] = deque()
        self.by_key: dict[str, deque[_Waiter]] = {}
        self.turn: deque[str] = deque()  # keys with waiters, the next to be served first

    def __len__(self) -> int:
        return len(self.first) + sum(len(q) for q in self.by_key.values())

    def add(self, w: _Waiter) -> None:
        if w.priority:
            self.first.append(w)
            return
        q = self.by_key.get(w.key)
        if q is None:
            q = self.by_key[w.key] = deque()
            self.turn.append(w.key)
        q.append(w)

    def remove(self, w: _Waiter) -> bool:
        if w.priority:
            try:
                self.first.remove(w)
                return True
            except ValueError:
                return False
        q = self.by_key.get(w.key)
        if q is None or w not in q:
            return False
        q.remove(w)
        if not q:
            del self.by_key[w.key]
            self.turn.remove(w.key)
        return True

    def served(self, w: _Waiter) -> None:
        """w got a slot (and was removed): its key's turn is over, the next key goes first."""
        if not w.priority and w.key in self.by_key:
            self.turn.remove(w.key)
            self.turn.append(w.key)

    def order(self) -> Iterator[_Waiter]:
        """Waiters in the order they are to be served. Lazy: dispatch stops at the first that
        a node can take, so serving one waiter costs a step or two, not the queue's length."""
        yield from list(self.first)
        queues = [self.by_key[k] for k in self.turn]
        depth = max((len(q) for q in queues), default=0)
        for i in range(depth):
            for q in queues:
                if i < len(q):
                    yield q[i]

    def waiters(self) -> list[_Waiter]:
        return [*self.first, *(w for q in self.by_key.values() for w in q)]


class AdmissionQueue:
    """See the module doc. `pick(sha256, exclude)` is the router's choice of a node with a
    free slot (None: none now); `may_serve_later(sha256, exclude)` whether waiting can help;
    `model_id(sha256)` names a model in metrics; `metrics` is an entry/api/metrics.py
    registry (None: the queue keeps no histograms, only its own counts)."""

    def __init__(self, view: MeshView, *, pick: Callable[[str, set[str]], NodeState | None],
                 may_serve_later: Callable[[str, set[str]], bool], wait: float = 300.0, max_waiting: int = 256,
                 retry_after: float = 2.0, model_id: Callable[[str], str] | None = None, metrics=None):
        if not wait > 0:
            raise ValueError("the queue wait must be > 0 seconds")
        if max_waiting < 0:
            raise ValueError("the queue size must be >= 0")
        self.view = view
        self.pick = pick
        self.may_serve_later = may_serve_later
        self.wait = wait
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.model_id = model_id or (lambda sha: sha[:12])
        self._queues: dict[str, _ModelQueue] = {}
        self._dispatching = False
        self.rejected: dict[str, int] = {FULL: 0, EXPIRED: 0, GONE: 0}
        self.served_after_wait = 0
        self._wait_hist = self._rejected = None
        if metrics is not None:
            self._wait_hist = metrics.histogram("mesh_queue_wait_seconds", "Time requests waited in the entry's queue "
                                                "for a free slot (only those that waited)", ("model",), WAIT_BUCKETS)
            self._rejected = metrics.counter("mesh_queue_rejected_total", "Requests refused by the queue (reason: "
                                             "full = --queue-max reached, expired = waited --queue-wait, gone = "
                                             "the model's nodes left)", ("model", "reason"))
        view.listeners.append(self.dispatch)

    # -- reading -------------------------------------------------------------------------

    def lengths(self) -> dict[str, int]:
        """Waiting requests per model sha256 (models with none are left out)."""
        return {sha: len(q) for sha, q in self._queues.items() if len(q)}

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def oldest_wait(self, sha256: str) -> float:
        q = self._queues.get(sha256)
        now = trio.current_time()
        return max((now - w.since for w in q.waiters()), default=0.0) if q else 0.0

    # -- waiting -------------------------------------------------------------------------

    async def acquire(self, sha256: str, key: str, exclude: set[str], *, priority: bool = False) -> NodeState:
        """A node with a slot reserved for us (view.acquire done): at once when one is free and
        nobody waits ahead, else after waiting. Raises MeshUnavailable (503) when no node can
        serve the model at all, when the queue is full, or when the wait runs out."""
        q = self._queues.get(sha256)
        if not q or priority:
            node = self.pick(sha256, exclude)
            if node is not None:
                self.view.acquire(node)
                return node
        if not self.may_serve_later(sha256, exclude):
            raise MeshUnavailable("no node can serve this model now", retry_after=self.retry_after)
        if not priority and self.waiting() >= self.max_waiting:
            victim = self._evictable(key)
            if victim is None:
                self._reject(sha256, FULL)
                raise self._full()
            self._evict(victim)
        if q is None:
            q = self._queues[sha256] = _ModelQueue()
        w = _Waiter(key, set(exclude), trio.current_time(), priority)
        q.add(w)
        taken = False
        try:
            self.dispatch()  # a slot may be free that the waiters ahead cannot use (their excludes)
            with trio.move_on_at(w.since + self.wait):
                while not w.ready.is_set():
                    with trio.move_on_after(BACKSTOP_S):
                        await w.ready.wait()
                    if not w.ready.is_set():
                        self.dispatch()
            if w.node is not None:
                taken = True
                self.served_after_wait += 1
                if self._wait_hist is not None:
                    self._wait_hist.observe(trio.current_time() - w.since, model=self.model_id(sha256))
                return w.node
            if w.error is not None:
                raise w.error
            self._reject(sha256, EXPIRED)
            raise MeshUnavailable(f"all nodes for this model are busy: waited {self.wait:g} s in the entry's queue",
                                  retry_after=self.retry_after, code="queue_timeout")
        finally:
            q.remove(w)
            if not len(q) and self._queues.get(sha256) is q:
                del self._queues[sha256]
            if w.node is not None and not taken:
                # Cancelled (client gone) in the instant a slot was handed to it: pass it on.
                self.view.release(w.node)

    def _full(self) -> MeshUnavailable:
        return MeshUnavailable(f"all nodes for this model are busy and the entry's queue is full "
                               f"({self.max_waiting} requests waiting)", retry_after=self.retry_after, code="queue_full")

    def _evictable(self, key: str) -> tuple[str, _ModelQueue, _Waiter] | None:
        """When the queue is full: the newest waiter of the key holding the most places, if it
        holds more than `key` would with this request. So one key flooding the queue cannot
        lock the others out: the flood loses its newest places to their requests instead."""
        held: dict[str, int] = {}
        newest: dict[str, tuple[str, _ModelQueue, _Waiter]] = {}
        for sha, q in self._queues.items():
            for k, waiters in q.by_key.items():
                held[k] = held.get(k, 0) + len(waiters)
                w = waiters[-1]
                if k not in newest or w.since >= newest[k][2].since:
                    newest[k] = (sha, q, w)
        if not held:
            return None
        top = max(held, key=lambda k: held[k])
        return newest[top] if held[top] > held.get(key, 0) + 1 else None

    def _evict(self, victim: tuple[str, _ModelQueue, _Waiter]) -> None:
        sha, q, w = victim
        q.remove(w)
        self._reject(sha, FULL)
        w.error = self._full()
        w.ready.set()

    def _reject(self, sha256: str, reason: str) -> None:
        self.rejected[reason] += 1
        if self._rejected is not None:
            self._rejected.inc(model=self.model_id(sha256), reason=reason)

    # -- dispatching ---------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand free slots to waiters, in queue order. Called on every view change; cheap
        when nobody waits or no slot is free."""
        if self._dispatching or not self._queues:
            return
        self._dispatching = True
        try:
            for sha, q in list(self._queues.items()):
                self._dispatch_model(sha, q)
        finally:
            self._dispatching = False

    def _dispatch_model(self, sha256: str, q: _ModelQueue) -> None:
        while len(q):
            if self.pick(sha256, set()) is None:  # no free slot for anyone: only check who can still hope
                self._fail_hopeless(sha256, q)
                return
            for w in q.order():
                node = self.pick(sha256, w.exclude)
                if node is not None:
                    self.view.acquire(node)
                    w.node = node
                    q.remove(w)
                    q.served(w)
                    w.ready.set()
                    break
            else:
                return  # the free slots are on nodes every waiter has tried already

    def _fail_hopeless(self, sha256: str, q: _ModelQueue) -> None:
        anyone = self.may_serve_later(sha256, set())
        for w in q.waiters():
            if (not anyone or (w.exclude and not self.may_serve_later(sha256, w.exclude))) and not w.ready.is_set():
                self._reject(sha256, GONE)
                w.error = MeshUnavailable("no node can serve this model now", retry_after=self.retry_after)
                q.remove(w)
                w.ready.set()

