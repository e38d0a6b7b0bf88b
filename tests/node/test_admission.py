"""Admission on its own: slots, queue, busy, draining, and fairness between requesting peers.

Workers are plain strings; requests are trio tasks that hold their slot until the test lets
them go, so every state is reached by waiting for all tasks to block, never by sleeping.
"""

import pytest
import trio
import trio.testing

from node.admission import OVER_SHARE, QUEUE_FULL, Admission, Busy, Draining


class Requests:
    """Requests from named peers: each takes a slot, records the grant and holds the slot
    until finish(name) is called."""

    def __init__(self, admission: Admission, nursery: trio.Nursery):
        self.admission = admission
        self.nursery = nursery
        self.granted: list[str] = []  # request names in the order they got a slot
        self.refused: dict[str, Exception] = {}
        self._done: dict[str, trio.Event] = {}

    async def start(self, peer: str, name: str) -> None:
        self._done[name] = trio.Event()
        self.nursery.start_soon(self._run, peer, name)
        await trio.testing.wait_all_tasks_blocked()

    async def _run(self, peer: str, name: str) -> None:
        try:
            async with self.admission.slot(peer):
                self.granted.append(name)
                await self._done[name].wait()
        except (Busy, Draining) as e:
            self.refused[name] = e

    async def finish(self, name: str) -> None:
        self._done[name].set()
        await trio.testing.wait_all_tasks_blocked()


async def test_a_lone_peer_may_use_every_slot_and_the_whole_queue():
    adm = Admission(["w1", "w2"], queue_limit=3)
    async with trio.open_nursery() as n:
        r = Requests(adm, n)
        for i in range(6):
            await r.start("entry", f"r{i}")
        assert r.granted == ["r0", "r1"] and adm.queued == 3
        assert isinstance(r.refused["r5"], Busy) and str(r.refused["r5"]) == QUEUE_FULL
        for i in range(5):
            await r.finish(f"r{i}")
        assert r.granted == ["r0", "r1", "r2", "r3", "r4"]  # first come, first served
    assert adm.active == 0 and adm.free == 2 and adm.queued == 0


async def test_a_newcomer_gets_a_queue_place_from_a_peer_holding_more_than_its_share():
    adm = Admission(["w"], queue_limit=4)
    async with trio.open_nursery() as n:
        r = Requests(adm, n)
        for i in range(5):
            await r.start("hog", f"h{i}")  # h0 runs, h1-h4 fill the queue
        await r.start("user", "u0")
        assert "u0" not in r.refused
        assert isinstance(r.refused["h4"], Busy) and str(r.refused["h4"]) == OVER_SHARE  # its newest gave way
        assert adm.queued == 4 and adm.queued_for("hog") == 3 and adm.queued_for("user") == 1
        # The freed slot goes to the peer served longest ago, not to the hog's older requests.
        await r.finish("h0")
        assert r.granted == ["h0", "u0"]
        await r.start("hog", "h5")  # the hog refills the queue
        await r.start("user", "u1")
        await r.start("user", "u2")  # hog 3 queued vs user's 1 running + 1 queued: not over share
        assert isinstance(r.refused["u2"], Busy) and str(r.refused["u2"]) == QUEUE_FULL
        await r.finish("u0")
        await r.finish("h1")
        await r.finish("u1")
        assert r.granted == ["h0", "u0", "h1", "u1", "h2"]  # round robin while both wait
        for name in ("h2", "h3", "h5"):
            await r.finish(name)
    assert adm.active == 0 and adm.queued == 0


async def test_a_freed_slot_goes_to_the_waiting_peer_running_the_fewest():
    adm = Admission(["w1", "w2", "w3"], queue_limit=8)
    async with trio.open_nursery() as n:
        r = Requests(adm, n)
        for i in range(3):
            await r.start("a", f"a{i}")  # a takes every free slot: nobody else wants one
        await r.start("a", "a3")
        await r.start("b", "b0")
        await r.start("b", "b1")
        await r.finish("a0")
        assert r.granted[-1] == "b0"  # a3 arrived first, but a still runs two and b none
        await r.finish("a1")
        assert r.granted[-1] == "a3"  # one each running: round robin, a was served longer ago
        await r.finish("a2")
        assert r.granted[-1] == "b1"
        for name in ("a3", "b0", "b1"):
            await r.finish(name)


async def test_cancelled_waiter_leaves_the_queue_and_slot_passes_on():
    adm = Admission(["w"], queue_limit=2)
    async with trio.open_nursery() as n:
        r = Requests(adm, n)
        await r.start("a", "a0")
        waiting = trio.CancelScope()

        async def impatient():
            with waiting:
                async with adm.slot("b"):
                    pytest.fail("a cancelled waiter must not get a slot")

        n.start_soon(impatient)
        await trio.testing.wait_all_tasks_blocked()
        assert adm.queued == 1
        waiting.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert adm.queued == 0
        await r.start("c", "c0")
        await r.finish("a0")
        assert r.granted == ["a0", "c0"]
        await r.finish("c0")
    assert adm.free == 1


async def test_draining_refuses_queued_and_new_requests():
    adm = Admission(["w"], queue_limit=2)
    async with trio.open_nursery() as n:
        r = Requests(adm, n)
        await r.start("a", "a0")
        await r.start("b", "b0")
        adm.start_draining()
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(r.refused["b0"], Draining) and adm.queued == 0 and adm.free == 0
        await r.start("c", "c0")
        assert isinstance(r.refused["c0"], Draining)
        await r.finish("a0")
    assert adm.active == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Admission([], 1)
    with pytest.raises(ValueError):
        Admission(["w"], -1)
