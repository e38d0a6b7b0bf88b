"""The entry's admission queue (entry/mesh/queue.py) on its own: the view's node states, the
router's choice, no network. Slots free when the test releases them; tasks are synchronised
with trio.testing.wait_all_tasks_blocked (every task is waiting), never with the clock."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from entry.backend import GenerationSpec, MeshUnavailable
from entry.mesh import router
from entry.mesh.queue import AdmissionQueue
from entry.mesh.relay import build_request
from entry.mesh.view import MeshView, NodeState
from protocol.messages import SamplingParams, to_wire
from tests.entry.test_router import OTHER, SHA, node, proven


def setup(*nodes: NodeState, **kw) -> tuple[MeshView, AdmissionQueue]:
    view = MeshView(object())
    for n in nodes:
        view.track(n)
    queue = AdmissionQueue(view, pick=lambda sha, ex: router.pick(view.nodes(), sha, time.monotonic(), exclude=ex),
                           may_serve_later=lambda sha, ex: router.may_serve_later(view.nodes(), sha, ex), **kw)
    return view, queue


class Recorder:
    """Waiters that, once they get a slot, note their name and finish at once (release), like
    the relay: a checkpoint (where it would open the node's stream) and a release in `finally`."""

    def __init__(self, view: MeshView, queue: AdmissionQueue):
        self.view, self.queue = view, queue
        self.order: list[str] = []
        self.errors: dict[str, MeshUnavailable] = {}

    async def one(self, name: str, key: str, sha: str = SHA, *, priority: bool = False, exclude=()) -> None:
        try:
            n = await self.queue.acquire(sha, key, set(exclude), priority=priority)
        except MeshUnavailable as e:
            self.errors[name] = e
            return
        try:
            await trio.lowlevel.checkpoint()
            self.order.append(name)
        finally:
            self.view.release(n)

    async def submit(self, nursery, name: str, key: str, **kw) -> None:
        """Start one and wait until it is parked (in the queue, or done)."""
        nursery.start_soon(lambda: self.one(name, key, **kw))
        await trio.testing.wait_all_tasks_blocked()


async def test_a_slot_freeing_goes_to_the_waiters_round_robin_across_keys_fifo_within_one():
    n = proven(node("a", slots=1))
    view, queue = setup(n)
    held = await queue.acquire(SHA, "x", set())  # the only slot is busy
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            await rec.submit(nursery, f"A{i}", "key-a")
        await rec.submit(nursery, "B0", "key-b")
        assert queue.waiting() == 11 and queue.lengths() == {SHA: 11} and rec.order == []
        view.release(held)
    # Key b's one request is served second, not eleventh; key a's in the order they came.
    assert rec.order == ["A0", "B0"] + [f"A{i}" for i in range(1, 10)]
    assert queue.waiting() == 0 and n.in_flight == 0 and queue.served_after_wait == 11


async def test_more_waiters_than_slots_all_get_one_and_slots_are_never_oversubscribed():
    a, b = proven(node("a", slots=2)), proven(node("b", slots=1))
    view, queue = setup(a, b)
    peak = 0
    done = 0

    async def one(i: int) -> None:
        nonlocal peak, done
        n = await queue.acquire(SHA, f"key-{i % 3}", set())
        peak = max(peak, a.in_flight + b.in_flight)
        assert a.in_flight <= 2 and b.in_flight <= 1
        await trio.sleep(0)  # others run while it holds the slot
        view.release(n)
        done += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
    assert done == 40 and peak == 3 and queue.waiting() == 0


async def test_a_retry_goes_before_everyone_waiting():
    n = proven(node("a", slots=1))
    view, queue = setup(n)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        await rec.submit(nursery, "A0", "key-a")
        await rec.submit(nursery, "B0", "key-b")
        await rec.submit(nursery, "retry", "key-c", priority=True)
        view.release(held)
    assert rec.order == ["retry", "A0", "B0"]


async def test_a_waiter_is_not_given_a_node_it_already_tried_and_does_not_block_the_others():
    a, b = proven(node("a", slots=1)), proven(node("b", slots=1))
    view, queue = setup(a, b)
    on_a, on_b = await queue.acquire(SHA, "x", set()), await queue.acquire(SHA, "x", set())
    assert {on_a.peer_id, on_b.peer_id} == {"a", "b"}
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        await rec.submit(nursery, "retry-not-a", "key-c", priority=True, exclude={"a"})
        await rec.submit(nursery, "A0", "key-a")
        view.release(a)  # a frees: the retry has tried a, so A0 takes it
        await trio.testing.wait_all_tasks_blocked()
        assert rec.order == ["A0"]
        view.release(b)
    assert rec.order == ["A0", "retry-not-a"]


async def test_a_full_queue_refuses_at_once_but_never_a_retry():
    n = proven(node("a", slots=1))
    view, queue = setup(n, max_waiting=2, retry_after=3.0)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        await rec.submit(nursery, "A0", "key-a")
        await rec.submit(nursery, "B0", "key-b")
        await rec.submit(nursery, "A1", "key-a")  # refused: two are waiting, one per key
        await rec.submit(nursery, "C0", "key-c")  # likewise: nobody holds more than a fair share
        for name in ("A1", "C0"):
            e = rec.errors[name]
            assert e.code == "queue_full" and e.retry_after == 3.0 and "queue is full" in str(e)
        await rec.submit(nursery, "retry", "key-b", priority=True)  # it holds a user's stream already
        assert queue.waiting() == 3 and queue.rejected["full"] == 2
        view.release(held)
    assert rec.order == ["retry", "A0", "B0"]


async def test_a_key_flooding_a_full_queue_loses_its_newest_place_to_another_key():
    n = proven(node("a", slots=1))
    view, queue = setup(n, max_waiting=3)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            await rec.submit(nursery, f"A{i}", "key-a")
        await rec.submit(nursery, "B0", "key-b")
        assert rec.errors["A2"].code == "queue_full" and queue.waiting() == 3
        await rec.submit(nursery, "A3", "key-a")  # its own key is at its share: refused
        assert "A3" in rec.errors and queue.rejected["full"] == 2
        view.release(held)
    assert rec.order == ["A0", "B0", "A1"]


async def test_a_wait_past_the_bound_is_refused():
    n = proven(node("a", slots=1))
    view, queue = setup(n, wait=0.3)
    held = await queue.acquire(SHA, "x", set())
    t0 = trio.current_time()
    with pytest.raises(MeshUnavailable) as err:
        await queue.acquire(SHA, "key-a", set())
    assert trio.current_time() - t0 >= 0.3
    assert err.value.code == "queue_timeout" and "busy" in str(err.value)
    assert queue.waiting() == 0 and queue.rejected["expired"] == 1
    view.release(held)
    assert n.in_flight == 0


async def test_a_cancelled_waiter_leaves_at_once_and_takes_no_slot():
    n = proven(node("a", slots=1))
    view, queue = setup(n)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def leaving() -> None:
            with scope:
                await rec.one("gone", "key-a")

        nursery.start_soon(leaving)
        await rec.submit(nursery, "B0", "key-b")
        assert queue.waiting() == 2
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert queue.waiting() == 1 and queue.lengths() == {SHA: 1}
        view.release(held)
    assert rec.order == ["B0"] and n.in_flight == 0


async def test_a_waiter_cancelled_in_the_instant_it_was_handed_a_slot_passes_the_slot_on():
    n = proven(node("a", slots=1))
    view, queue = setup(n)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def leaving() -> None:
            with scope:
                await rec.one("gone", "key-a")

        nursery.start_soon(leaving)
        await trio.testing.wait_all_tasks_blocked()
        await rec.submit(nursery, "B0", "key-b")
        view.release(held)  # hands the slot to "gone" (first in line) ...
        assert n.in_flight == 1
        scope.cancel()  # ... which is cancelled before it ran: B0 must get the slot
    assert rec.order == ["B0"] and n.in_flight == 0 and queue.waiting() == 0


async def test_models_queue_separately():
    a, b = proven(node("a", slots=1)), proven(node("b", sha=OTHER, slots=1))
    view, queue = setup(a, b)
    held = await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        await rec.submit(nursery, "A0", "key-a")
        await rec.submit(nursery, "other", "key-a", sha=OTHER)  # its model has a free slot
        assert rec.order == ["other"] and queue.lengths() == {SHA: 1}
        view.release(held)
    assert rec.order == ["other", "A0"]


async def test_waiters_are_refused_when_every_node_of_their_model_leaves():
    n = proven(node("a", slots=1))
    view, queue = setup(n)
    await queue.acquire(SHA, "x", set())
    rec = Recorder(view, queue)
    async with trio.open_nursery() as nursery:
        await rec.submit(nursery, "A0", "key-a")
        n.present = False  # its advert expired
        view.notify()
    assert "no node can serve" in str(rec.errors["A0"]) and queue.rejected["gone"] == 1
    with pytest.raises(MeshUnavailable):  # and nobody waits for a model nobody serves
        await queue.acquire(SHA, "key-a", set())


def test_the_queue_key_never_reaches_a_node():
    spec = GenerationSpec(model="smol", kind="completion", params=SamplingParams(max_tokens=4), prompt="hi",
                          queue_key="key:secret-key-id")
    wire = repr(to_wire(build_request(spec, SHA)))
    assert "secret-key-id" not in wire and "queue" not in wire


def test_queue_bounds_come_from_flags_or_the_config_file(tmp_path):
    import argparse

    from entry import cli
    from entry.config import load_entry_config

    (tmp_path / "entry.toml").write_text("[entry]\nqueue_wait = 45.5\nqueue_max = 10\n")
    cfg = load_entry_config(str(tmp_path / "entry.toml"), {})
    assert (cfg.queue_wait, cfg.queue_max) == (45.5, 10)
    assert load_entry_config(None, {}).queue_wait == 300.0 and load_entry_config(None, {}).queue_max == 256
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["entry", "start", "--queue-wait", "5", "--queue-max", "0"])
    cfg = load_entry_config(str(tmp_path / "entry.toml"), {k: getattr(args, k) for k in cli._START_KEYS})
    assert (cfg.queue_wait, cfg.queue_max) == (5.0, 0)
    for bad in ({"queue_wait": 0}, {"queue_max": -1}):
        with pytest.raises(ValueError, match="--queue-"):
            load_entry_config(None, bad)


async def test_a_zero_size_queue_refuses_at_once_when_every_slot_is_busy():
    n = proven(node("a", slots=1))
    view, queue = setup(n, max_waiting=0)
    held = await queue.acquire(SHA, "x", set())
    with trio.fail_after(1), pytest.raises(MeshUnavailable) as err:
        await queue.acquire(SHA, "key-a", set())
    assert err.value.code == "queue_full"
    view.release(held)
    assert (await queue.acquire(SHA, "key-a", set())) is n  # a free slot needs no queue
