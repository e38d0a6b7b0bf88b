"""DHT keys and the advert-namespace validator (pure: no network)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, RecordError
from protocol.identity import Identity
from protocol.records import CapacityAdvert
from transport.dht_keys import (
    ADVERT_NAMESPACE,
    AdvertValidator,
    advert_key,
    directory_key,
    model_key,
    peer_id_from_advert_key,
)

SHA = "ab" * 32
T0 = 1_700_000_000.0


def advert(identity: Identity, *, seq: int = 1, issued: float = T0, ttl: float = 15.0, model: str = SHA) -> bytes:
    return CapacityAdvert(
        node=identity.peer_id, model_sha256=model, model_name="m", quantization="Q4_0",
        context_size=2048, prefill_tps=1.0, decode_tps=1.0, total_slots=1, free_slots=1,
        seq=seq, issued_at=issued, expires_at=issued + ttl, addrs=["/ip4/127.0.0.1/tcp/1"],
    ).sign(identity)


def test_model_key_is_a_domain_separated_sha256_multihash():
    key = model_key(SHA)
    raw = bytes.fromhex(key)
    assert raw[:2] == b"\x12\x20" and len(raw) == 34  # what py-libp2p decodes to key bytes
    assert raw[2:] != bytes.fromhex(SHA)  # not the bare file digest
    assert key == model_key(SHA.upper())
    assert model_key("cd" * 32) != key
    assert raw[2:] == hashlib.sha256(b"mesh-model-v1\x00" + SHA.encode()).digest()


def test_directory_key_is_a_fixed_multihash_apart_from_every_model_key():
    key = directory_key()
    raw = bytes.fromhex(key)
    assert raw[:2] == b"\x12\x20" and len(raw) == 34
    assert key == directory_key()  # every node and entry must agree on it
    assert raw[2:] == hashlib.sha256(b"mesh-directory-v1\x00").digest()
    assert key not in {model_key(SHA), model_key("00" * 32), model_key(hashlib.sha256(b"").hexdigest())}


@pytest.mark.parametrize("bad", ["", "ab", "zz" * 32, "ab" * 33, None])
def test_model_key_refuses_malformed_digests(bad):
    with pytest.raises(ValueError):
        model_key(bad)


def test_advert_key_round_trip():
    ident = Identity.generate()
    key = advert_key(ident.peer_id)
    assert key == f"/{ADVERT_NAMESPACE}/{ident.peer_id}"
    assert peer_id_from_advert_key(key) == ident.peer_id
    assert len(key.encode()) <= 128  # py-libp2p refuses longer GET_VALUE keys
    for bad in ["", "a/b", "x" * 101]:
        with pytest.raises(ValueError):
            advert_key(bad)
    with pytest.raises(RecordError):
        peer_id_from_advert_key("/other/" + ident.peer_id)


def test_validator_accepts_only_the_named_nodes_unexpired_advert():
    a, b = Identity.generate(), Identity.generate()
    v = AdvertValidator(clock=lambda: T0 + 1)
    v.validate(advert_key(a.peer_id), advert(a))
    with pytest.raises(RecordError):  # b's advert parked under a's key
        v.validate(advert_key(a.peer_id), advert(b))
    with pytest.raises(RecordError):  # expired
        AdvertValidator(clock=lambda: T0 + 16).validate(advert_key(a.peer_id), advert(a))
    blob = bytearray(advert(a))
    blob[-5] ^= 1
    with pytest.raises(ProtocolError):  # tampered
        v.validate(advert_key(a.peer_id), bytes(blob))
    with pytest.raises(ProtocolError):
        v.validate(advert_key(a.peer_id), b"not an advert")


def test_select_prefers_valid_then_highest_seq_and_never_raises():
    a, b = Identity.generate(), Identity.generate()
    key = advert_key(a.peer_id)
    v = AdvertValidator(clock=lambda: T0 + 10)
    old, new = advert(a, seq=1), advert(a, seq=2)
    assert v.select(key, [old, new]) == 1
    assert v.select(key, [new, old]) == 0
    assert v.select(key, [old, old]) == 0  # tie: keep what is stored
    expired_high = advert(a, seq=99, issued=T0 - 100)
    assert v.select(key, [expired_high, old]) == 1  # a restarted node's lower seq still wins
    assert v.select(key, [b"junk", advert(b, seq=5), old]) == 2
    assert v.select(key, [b"junk", b"more junk"]) == 0
    with pytest.raises(ValueError):
        v.select(key, [])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_validator_refuses_arbitrary_bytes_cleanly(blob):
    ident_key = advert_key("12D3KooWQiker5AdjLshjGtECS8qEBvp3k53WTewVvEd1fLbGEhQ")
    v = AdvertValidator(clock=lambda: T0)
    with pytest.raises((ProtocolError, ValueError)):
        v.validate(ident_key, blob)
    assert v.select(ident_key, [blob, blob]) == 0
