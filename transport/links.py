"""A node's standing connections to entries: how a volunteer behind a home NAT stays reachable.

A home router lets packets in only on connections the home opened, so entries reach a NAT'd
node over the connection the node opened to them. This keeps such connections up:
- to the bootstrap peers and to entries found in the DHT (dht_keys.entry_key), at most
  `max_links` of them; beyond that a random subset, one swapped for another every
  `rotate_every` seconds so every entry sees the node now and then;
- a libp2p ping on each every `ping_interval`; after a failed one, every `retry_interval`;
  no answer for `dead_after` seconds and the connection is closed as dead (a router that
  forgot its NAT state, or an outage, drops packets without telling either side: TCP alone
  would notice only after ~15 minutes of retransmissions);
- a connection that is lost is re-dialled with exponential backoff (capped, so a node is
  back soon after its link is), and when no link is left the node re-joins the DHT through
  whatever answers first (`on_rejoined` then lets it re-publish its advert at once).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio
from multiaddr import Multiaddr

from transport.discovery import find_entries
from transport.host import DialError, MeshHost

log = logging.getLogger("mesh.links")

PING_INTERVAL_S = 10.0
RETRY_INTERVAL_S = 2.5
PING_TIMEOUT_S = 5.0
DEAD_AFTER_S = 15.0  # 15 s without an answer: with 10 s pings, closed 5-20 s after the link died
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 5.0  # the dial itself times out after 5 s: a returning link is found in <= ~10 s
FIND_INTERVAL_S = 30.0
MAX_LINKS = 8
ROTATE_EVERY_S = 300.0
TICK_S = 0.5


@dataclass
class Link:
    peer_id: str
    addrs: list[str]
    bootstrap: bool = False
    connected: bool = False
    last_ok: float = 0.0  # monotonic time of the last answered ping (or the dial)
    next_ping: float = 0.0
    next_dial: float = 0.0
    backoff: float = BACKOFF_MIN_S
    busy: bool = False  # a dial or ping is in flight
    rtt: float | None = None
    failures: int = field(default=0)


def _split(addr: str) -> tuple[str, str]:
    ma = Multiaddr(addr)
    peer = ma.value_for_protocol("p2p")
    if not peer:
        raise ValueError(f"{addr!r} has no /p2p/<peer id>")
    return peer, addr


class EntryLinks:
    def __init__(
        self,
        host: MeshHost,
        bootstrap: Iterable[str],
        *,
        max_links: int = MAX_LINKS,
        ping_interval: float = PING_INTERVAL_S,
        retry_interval: float = RETRY_INTERVAL_S,
        ping_timeout: float = PING_TIMEOUT_S,
        dead_after: float = DEAD_AFTER_S,
        find_interval: float = FIND_INTERVAL_S,
        rotate_every: float = ROTATE_EVERY_S,
        on_rejoined: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.host = host
        self.max_links = max_links
        self.ping_interval = ping_interval
        self.retry_interval = retry_interval
        self.ping_timeout = ping_timeout
        self.dead_after = dead_after
        self.find_interval = find_interval
        self.rotate_every = rotate_every
        self.on_rejoined = on_rejoined
        self._clock = clock
        self.links: dict[str, Link] = {}
        self._spare: dict[str, list[str]] = {}  # entries found beyond max_links
        self.rejoins = 0
        for a in bootstrap:
            try:
                peer, full = _split(a)
            except Exception:
                continue
            if peer != host.peer_id:
                link = self.links.setdefault(peer, Link(peer, [], bootstrap=True))
                link.addrs.append(full)
                link.connected = host.is_connected(peer)
                link.last_ok = clock()

    def connected(self) -> list[Link]:
        return [lk for lk in self.links.values() if lk.connected]

    def summary(self) -> dict:
        """For `mesh node status`."""
        return {"entries": len(self.links), "connected": len(self.connected()), "rejoins": self.rejoins}

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._find_loop)
            task_status.started()
            last_rotate = self._clock()
            while True:
                now = self._clock()
                for link in list(self.links.values()):
                    if link.busy:
                        continue
                    if link.connected and not self.host.is_connected(link.peer_id):
                        self._lost(link, now, "connection closed")
                    if link.connected and now >= link.next_ping:
                        link.busy = True
                        nursery.start_soon(self._ping, link)
                    elif not link.connected and now >= link.next_dial:
                        link.busy = True
                        nursery.start_soon(self._dial, link)
                if now - last_rotate >= self.rotate_every:
                    last_rotate = now
                    self._rotate()
                await trio.sleep(TICK_S)

    def _lost(self, link: Link, now: float, why: str) -> None:
        link.connected = False
        link.next_dial = now  # at once: the first re-dial usually works (a new NAT mapping)
        link.backoff = BACKOFF_MIN_S
        log.info("entry link lost", extra={"peer": link.peer_id[-8:], "reason": why})

    async def _ping(self, link: Link) -> None:
        try:
            link.rtt = await self.host.ping(link.peer_id, timeout=self.ping_timeout)
            now = self._clock()
            link.last_ok, link.next_ping, link.failures = now, now + self.ping_interval, 0
        except DialError as e:
            now = self._clock()
            link.failures += 1
            link.next_ping = now + self.retry_interval
            if now - link.last_ok >= self.dead_after:
                log.info("entry link dead: closing it", extra={"peer": link.peer_id[-8:], "silent_s": round(now - link.last_ok, 1),
                                                                 "error": str(e)})
                await self.host.disconnect(link.peer_id)
                self._lost(link, now, "no ping answer")
        finally:
            link.busy = False

    async def _dial(self, link: Link) -> None:
        was_alone = not self.connected()
        try:
            # The DHT join lookup waits until we are back: a returning node's advert goes out first.
            joined = await self.host.bootstrap(link.addrs, lookup=False) if link.addrs else 0
            now = self._clock()
            if not joined:
                raise DialError("no answer")
            link.connected, link.last_ok, link.next_ping = True, now, now + self.ping_interval
            link.backoff, link.failures = BACKOFF_MIN_S, 0
            log.info("entry link up", extra={"peer": link.peer_id[-8:]})
            if was_alone:
                self.rejoins += 1
                if self.on_rejoined is not None:
                    await self.on_rejoined()
                await self.host.join_lookup()
        except Exception as e:
            now = self._clock()
            link.failures += 1
            link.next_dial = now + link.backoff * random.uniform(0.8, 1.2)
            link.backoff = min(BACKOFF_MAX_S, link.backoff * 2)
            log.debug("entry dial failed: %s", e)
        finally:
            link.busy = False

    # -- finding entries ----------------------------------------------------------------------

    async def _find_loop(self) -> None:
        while True:
            if self.connected():
                try:
                    found = await find_entries(self.host, timeout=10.0)
                except Exception:
                    log.debug("entry lookup failed", exc_info=True)
                    found = []
                for p in found:
                    self.add_entry(p.peer_id, [f"{a}/p2p/{p.peer_id}" for a in p.addrs if "/p2p/" not in a])
            await trio.sleep(self.find_interval)

    def add_entry(self, peer_id: str, addrs: list[str]) -> None:
        if peer_id == self.host.peer_id:
            return
        if not self.host.private_mesh:
            from transport.addrs import is_private

            addrs = [a for a in addrs if not is_private(a)]
        link = self.links.get(peer_id)
        if link is not None:
            if addrs and not link.bootstrap:
                link.addrs = addrs
            return
        if not addrs and not self.host.is_connected(peer_id):
            return
        if len(self.links) >= self.max_links:
            self._spare[peer_id] = addrs
            return
        now = self._clock()
        self.links[peer_id] = Link(peer_id, addrs, connected=self.host.is_connected(peer_id), last_ok=now,
                                   next_ping=now + self.ping_interval)

    def _rotate(self) -> None:
        """Swap one non-bootstrap link for a spare entry, so that with more entries than
        max_links each still sees this node directly now and then."""
        if not self._spare:
            return
        swappable = [lk for lk in self.links.values() if not lk.bootstrap]
        if not swappable:
            return
        out = random.choice(swappable)
        del self.links[out.peer_id]
        self._spare[out.peer_id] = out.addrs
        peer = random.choice(list(self._spare))
        addrs = self._spare.pop(peer)
        self.add_entry(peer, addrs)
