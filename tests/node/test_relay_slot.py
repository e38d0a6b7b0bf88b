"""A node nobody can dial keeps asking for a relay slot until it holds one (node/daemon.py
_reach_loop), on trio's mock clock: no network, no waiting."""

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from node.config import NodeConfig
from node.daemon import REACH_INTERVAL_S, RELAY_RETRY_MAX_S, RELAY_RETRY_MIN_S, NodeDaemon
from transport.reachability import RELAYED, Reachability

SLOT = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWEntry/p2p-circuit"


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class FakeHost:
    private_mesh = False
    listen_addrs: list[str] = []

    async def set_dht_server(self, server: bool) -> None:
        pass


class FakeRelay:
    """Refuses `refusals` reservations (a relay whose hop is not up yet), then grants one."""

    def __init__(self, refusals: int):
        self.refusals = refusals
        self.asked_at: list[float] = []

    async def reserve(self, peer: str) -> str | None:
        self.asked_at.append(trio.current_time())
        if len(self.asked_at) <= self.refusals:
            return None
        return SLOT


def daemon(relay: FakeRelay) -> tuple[NodeDaemon, list[list[str]]]:
    d = NodeDaemon(NodeConfig())
    d.host = FakeHost()
    d.reach = Reachability(d.host)

    async def no_dialback(peers) -> None:  # nobody could dial us back
        pass

    d.reach.probe = no_dialback
    d.relay = relay
    d.links = SimpleNamespace(connected=lambda: [SimpleNamespace(peer_id="12D3KooWEntry")])
    published: list[list[str]] = []

    async def publish(draining: bool = False) -> None:
        published.append(d.reach.advertised())

    d._publish = publish
    return d, published


async def test_refused_relay_slot_is_asked_for_again_with_backoff(autojump_clock):
    relay = FakeRelay(refusals=3)
    d, published = daemon(relay)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d._reach_loop)
        t0 = trio.current_time()
        with trio.fail_after(REACH_INTERVAL_S / 2):  # well before the next full check
            while d.reach.state != RELAYED:
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(relay.asked_at, relay.asked_at[1:])]
    assert relay.asked_at[0] - t0 == pytest.approx(5.0)  # the first check, as before
    assert gaps == pytest.approx([RELAY_RETRY_MIN_S, 2 * RELAY_RETRY_MIN_S, 4 * RELAY_RETRY_MIN_S])
    assert published[-1] == [SLOT]  # the new slot went into the advert at once


async def test_retries_back_off_to_the_cap_stop_once_a_slot_is_held_and_the_full_check_renews_it(autojump_clock):
    relay = FakeRelay(refusals=12)
    d, _ = daemon(relay)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(d._reach_loop)
        with trio.fail_after(REACH_INTERVAL_S):
            while d.reach.state != RELAYED:
                await trio.sleep(0.5)
        assert len(relay.asked_at) == 13
        full_check = t0 + 5.0 + REACH_INTERVAL_S
        await trio.sleep_until(full_check - 1.0)
        assert len(relay.asked_at) == 13  # holding a slot: nothing asked until the next full check
        await trio.sleep_until(full_check + 1.0)
        assert len(relay.asked_at) == 14 and relay.asked_at[-1] == pytest.approx(full_check)  # renewed there
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(relay.asked_at[:13], relay.asked_at[1:13])]
    assert gaps[:6] == pytest.approx([2.0, 4.0, 8.0, 16.0, 32.0, RELAY_RETRY_MAX_S])
    assert max(gaps) == pytest.approx(RELAY_RETRY_MAX_S)
