"""How a node proves it is the one asking an entry for its credit statement.

A statement lists the random request ids a node served and their token counts: nothing
about users, but a node's traffic is its own business. So `GET /v1/mesh/credits/{node}`
carries a header signed by the node's key (the key its peer id embeds):

    X-Mesh-Node-Auth: <unix time>.<hex Ed25519 signature over DOMAIN + node + "\\0" + time>

The entry accepts it within MAX_SKEW seconds of its own clock. A captured header can be
replayed only for that long and only to read the same statement.
"""

from __future__ import annotations

import time

from protocol.errors import IdentityError
from protocol.identity import Identity, public_key_from_peer_id, verify_signature

HEADER = "X-Mesh-Node-Auth"
MAX_SKEW = 300.0
_DOMAIN = b"mesh-credit-query-v1\x00"


def _message(node: str, ts: int) -> bytes:
    return _DOMAIN + node.encode() + b"\x00" + str(ts).encode()


def sign_query(identity: Identity, now: float | None = None) -> str:
    ts = int(time.time() if now is None else now)
    return f"{ts}.{identity.sign(_message(identity.peer_id, ts)).hex()}"


def check_query(node: str, header: str | None, now: float | None = None) -> bool:
    """Is `header` a fresh signature by `node` (a peer id)?"""
    if not header or "." not in header or len(header) > 200:
        return False
    ts_text, _, sig_hex = header.partition(".")
    try:
        ts = int(ts_text)
        sig = bytes.fromhex(sig_hex)
        pub = public_key_from_peer_id(node)
    except (ValueError, IdentityError):
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > MAX_SKEW:
        return False
    return verify_signature(pub, _message(node, ts), sig)
