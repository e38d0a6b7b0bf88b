"""DHT keys for discovery, and the validator that guards the advert namespace.

Three kinds of DHT entries:
- provider records under `model_key(sha256)`: "this peer serves model M" (unsigned, kept
  48 h by whoever stores them, so they say nothing about liveness);
- provider records under `directory_key()`: "this peer serves some model", so an entry can
  list every model without knowing its digest first (same caveats as above);
- a signed CapacityAdvert under `advert_key(peer_id)`: liveness and capacity, short expiry;
- provider records under `entry_key()`: "this peer is an entry" (public by definition), so a
  node can keep connections to entries it was never told of (transport/links.py).

Every storer and every reader runs `AdvertValidator`, so a forged, mismatched or expired
advert is refused when stored and dropped when fetched.
"""

from __future__ import annotations

import hashlib
import time

from libp2p.records.validator import Validator

from protocol.errors import ProtocolError, RecordError
from protocol.records import CapacityAdvert

ADVERT_NAMESPACE = "mesh-advert"
_ADVERT_PREFIX = f"/{ADVERT_NAMESPACE}/"
_MODEL_KEY_DOMAIN = b"mesh-model-v1\x00"
_DIRECTORY_KEY_DOMAIN = b"mesh-directory-v1\x00"
_ENTRY_KEY_DOMAIN = b"mesh-entries-v1\x00"
_SHA256_MULTIHASH_PREFIX = "1220"  # multihash: code 0x12 (sha2-256), length 0x20


def _check_sha256_hex(sha256_hex: str) -> str:
    if not isinstance(sha256_hex, str) or len(sha256_hex) != 64:
        raise ValueError("model sha256 must be 64 hex characters")
    try:
        bytes.fromhex(sha256_hex)
    except ValueError:
        raise ValueError("model sha256 must be 64 hex characters") from None
    return sha256_hex.lower()


def model_key(sha256_hex: str) -> str:
    """The key nodes provide() for a model, as a hex multihash string.

    Hashed with a domain tag rather than using the file digest directly: the DHT speaks
    /ipfs/kad/1.0.0 whatever prefix we ask for, and the bare digest of a GGUF would collide
    with the IPFS key of the same bytes. The hex-multihash form is what py-libp2p's
    provide()/find_providers() decode to raw key bytes (not a UTF-8 string)."""
    sha = _check_sha256_hex(sha256_hex)
    digest = hashlib.sha256(_MODEL_KEY_DOMAIN + sha.encode()).hexdigest()
    return _SHA256_MULTIHASH_PREFIX + digest


def directory_key() -> str:
    """The key every serving node provide()s, whatever its model: the entry's way to find
    all nodes (and so all models) with one provider lookup. Its own domain tag keeps it
    apart from every model key; same hex-multihash form as model_key()."""
    return _SHA256_MULTIHASH_PREFIX + hashlib.sha256(_DIRECTORY_KEY_DOMAIN).hexdigest()


def entry_key() -> str:
    """The key every entry provide()s: how nodes find entries beyond their bootstrap peers.
    Same hex-multihash form as model_key()."""
    return _SHA256_MULTIHASH_PREFIX + hashlib.sha256(_ENTRY_KEY_DOMAIN).hexdigest()


def advert_key(peer_id: str) -> str:
    """Where a node's signed CapacityAdvert is stored (put_value/get_value)."""
    if not isinstance(peer_id, str) or not peer_id or "/" in peer_id or len(peer_id) > 100:
        raise ValueError("malformed peer id")
    return _ADVERT_PREFIX + peer_id


def peer_id_from_advert_key(key: str) -> str:
    if not key.startswith(_ADVERT_PREFIX):
        raise RecordError("key is not in the advert namespace")
    peer_id = key[len(_ADVERT_PREFIX):]
    if not peer_id or "/" in peer_id:
        raise RecordError("advert key names no peer")
    return peer_id


def verify_advert_for_key(key: str, value: bytes, *, now: float | None = None) -> CapacityAdvert:
    """A key may hold only an unexpired advert signed by the peer the key names: otherwise
    anyone could overwrite another node's advert or park a stale one."""
    node = peer_id_from_advert_key(key)
    return CapacityAdvert.verify(value, now=now, node=node)


class AdvertValidator(Validator):
    """py-libp2p Validator for the advert namespace.

    `validate` raises on anything untrustworthy (py-libp2p treats any exception as
    "reject": storers refuse the PUT, readers drop the record). `select` must never raise:
    storers call it to compare an incoming record against one that may since have expired.
    """

    def __init__(self, clock=time.time):
        self._clock = clock  # injectable so tests can move time without sleeping

    def validate(self, key: str, value: bytes) -> None:
        verify_advert_for_key(key, value, now=self._clock())

    def _rank(self, key: str, value: bytes) -> tuple:
        try:
            adv = verify_advert_for_key(key, value, now=self._clock())
        except (ProtocolError, ValueError, TypeError):
            return (0, 0, 0.0)
        return (1, adv.seq, adv.issued_at)

    def select(self, key: str, values: list[bytes]) -> int:
        # Valid beats invalid/expired, then the highest sequence number, then the newest.
        # On a tie the first (already stored) value wins, so re-storing the same advert is
        # a no-op.
        if not values:
            raise ValueError("no values to select from")
        ranks = [self._rank(key, v) for v in values]
        best = 0
        for i, r in enumerate(ranks):
            if r > ranks[best]:
                best = i
        return best
