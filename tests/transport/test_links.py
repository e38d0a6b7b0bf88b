"""EntryLinks (transport/links.py) against a scripted host, in trio's virtual time: the
keepalive declares a silent link dead after dead_after, closes it, re-dials with capped
backoff, and re-joins (on_rejoined) when it was the last link."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from protocol.identity import Identity
from transport import links as links_mod
from transport.host import DialError
from transport.links import BACKOFF_MAX_S, EntryLinks

ENTRY = Identity.generate().peer_id
ADDR = f"/ip4/198.51.100.1/tcp/4001/p2p/{ENTRY}"


class ScriptedHost:
    """What EntryLinks uses of MeshHost; `up` says whether the entry answers."""

    def __init__(self):
        self.peer_id = Identity.generate().peer_id
        self.private_mesh = False
        self.up = True
        self.conn = True
        self.dials: list[float] = []
        self.disconnects = 0

    def is_connected(self, peer_id: str) -> bool:
        return self.conn

    async def ping(self, peer_id: str, *, timeout: float) -> float:
        if self.up:
            return 0.001
        await trio.sleep(timeout)
        raise DialError("no answer")

    async def disconnect(self, peer_id: str) -> None:
        self.disconnects += 1
        self.conn = False

    async def join_lookup(self, *, timeout: float = 5.0) -> None:
        return None

    async def bootstrap(self, addrs, *, timeout: float = 5.0, lookup: bool = True) -> int:
        self.dials.append(trio.current_time())
        if not self.up:
            await trio.sleep(timeout)
            return 0
        self.conn = True
        return 1

    async def find_providers(self, *args, **kwargs):
        return []


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_dead_link_closed_redialled_with_capped_backoff_and_rejoined(autojump_clock, monkeypatch):
    monkeypatch.setattr(links_mod, "find_entries", lambda host, **kw: host.find_providers())
    host = ScriptedHost()
    rejoined: list[float] = []

    async def on_rejoined() -> None:
        rejoined.append(trio.current_time())

    links = EntryLinks(host, [ADDR], on_rejoined=on_rejoined, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        await trio.sleep(60)
        assert host.disconnects == 0 and links.summary()["connected"] == 1  # healthy: pings answered
        host.up = False
        t_down = trio.current_time()
        while host.disconnects == 0:
            await trio.sleep(0.5)
        # Declared dead no sooner than dead_after of silence, and soon after it.
        silent = trio.current_time() - links.links[ENTRY].last_ok
        assert links_mod.DEAD_AFTER_S <= silent <= links_mod.DEAD_AFTER_S + links_mod.RETRY_INTERVAL_S + links_mod.PING_TIMEOUT_S + 1
        assert trio.current_time() - t_down <= links_mod.DEAD_AFTER_S + links_mod.PING_TIMEOUT_S + 1
        assert links.summary()["connected"] == 0
        await trio.sleep(120)  # the outage lasts: dials keep failing, spaced by the capped backoff
        gaps = [b - a for a, b in zip(host.dials, host.dials[1:])]
        assert gaps and max(gaps) <= BACKOFF_MAX_S * 1.2 + 5.0 + 1.0  # backoff + the dial's own timeout + a tick
        host.up = True
        t_up = trio.current_time()
        while not rejoined:
            await trio.sleep(0.5)
        assert rejoined[0] - t_up <= BACKOFF_MAX_S * 1.2 + 5.0 + 1.0
        assert links.summary() == {"entries": 1, "connected": 1, "rejoins": 1}
        nursery.cancel_scope.cancel()
