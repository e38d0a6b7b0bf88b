"""How a node proves it is the one asking an entry for its credit statement.

A statement lists the random request ids a node served and their token counts: nothing
about users, but a node's traffic is its own business. So `GET /v1/mesh/credits/{node}`
carries a header signed by the node's key (the key its peer id embeds):

    X-Mesh-Node-Auth: <unix time>.<hex Ed25519 signature over DOMAIN + node + "\\0" + time>

The entry accepts a time in [now - MAX_AGE, now + MAX_AHEAD] by its own clock (a window of
about a minute, not the ten minutes a symmetric 5-minute skew allowed) and each (node, time)
once: `ReplayGuard` remembers the queries it accepted until they expire, so a captured header
cannot be replayed at all. Ed25519 signatures are deterministic, so a node asking twice within
one second sends the same header; the second ask is refused and waits a second.
"""

from __future__ import annotations

import heapq
import time

from protocol.errors import IdentityError
from protocol.identity import Identity, public_key_from_peer_id, verify_signature

HEADER = "X-Mesh-Node-Auth"
MAX_AGE = 60.0  # how old a query may be (network delay + a clock behind ours)
MAX_AHEAD = 5.0  # how far ahead of our clock a query may be dated
_DOMAIN = b"mesh-credit-query-v1\x00"


def _message(node: str, ts: int) -> bytes:
    return _DOMAIN + node.encode() + b"\x00" + str(ts).encode()


def sign_query(identity: Identity, now: float | None = None) -> str:
    ts = int(time.time() if now is None else now)
    return f"{ts}.{identity.sign(_message(identity.peer_id, ts)).hex()}"


def check_query(node: str, header: str | None, now: float | None = None) -> bool:
    """Is `header` a fresh signature by `node` (a peer id)? Stateless: see ReplayGuard."""
    return _checked_time(node, header, now) is not None


def _checked_time(node: str, header: str | None, now: float | None) -> int | None:
    """The signed time of a valid, fresh header; None otherwise."""
    if not header or "." not in header or len(header) > 200:
        return None
    ts_text, _, sig_hex = header.partition(".")
    if not (ts_text.isascii() and ts_text.isdigit()):
        return None
    try:
        ts = int(ts_text)
        sig = bytes.fromhex(sig_hex)
        pub = public_key_from_peer_id(node)
    except (ValueError, IdentityError):
        return None
    now = time.time() if now is None else now
    if not now - MAX_AGE <= ts <= now + MAX_AHEAD:
        return None
    return ts if verify_signature(pub, _message(node, ts), sig) else None


ACCEPTED, INVALID, REPLAYED, FULL = "accepted", "invalid", "replayed", "full"


class ReplayGuard:
    """Accepts each signed query once. Memory is bounded: an accepted query is forgotten once
    it is too old to be accepted anyway, and when `capacity` queries are still fresh new ones
    are refused (`full`) rather than letting an old one be replayed."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._seen: set[tuple[str, int]] = set()
        self._expiry: list[tuple[float, str, int]] = []

    def accept(self, node: str, header: str | None, now: float | None = None) -> str:
        """ACCEPTED, or why not: INVALID (bad or stale signature), REPLAYED or FULL. Keyed
        by (node, time), not by the header's text: the same signature in other hex case, or
        the time with a leading zero, is the same query."""
        now = time.time() if now is None else now
        ts = _checked_time(node, header, now)
        if ts is None:
            return INVALID
        self._forget(now)
        key = (node, ts)
        if key in self._seen:
            return REPLAYED
        if self.full:
            return FULL
        self._seen.add(key)
        heapq.heappush(self._expiry, (ts + MAX_AGE, node, ts))
        return ACCEPTED

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.capacity

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, node, ts = heapq.heappop(self._expiry)
            self._seen.discard((node, ts))
