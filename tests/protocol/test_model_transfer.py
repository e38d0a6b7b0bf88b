"""/mesh/model/1 frames and the advert's manifest commitment (pure: no network)."""

import hashlib
import time

import msgpack
import pytest

from protocol.errors import InvalidMessage, RecordError, UnsupportedVersion
from protocol.identity import Identity
from protocol.model_transfer import (
    CHUNK_SIZE,
    ChunkRequest,
    Manifest,
    ManifestRequest,
    chunk_span,
    manifest_root,
    manifest_to_wire,
    parse_reply,
    parse_request,
    request_to_wire,
)
from protocol.records import CapacityAdvert, _seal

SHA = "cd" * 32


def advert_fields(ident, **over):
    now = time.time()
    f = dict(node=ident.peer_id, model_sha256=SHA, model_name="m", quantization="Q4_1", context_size=2048,
             prefill_tps=1.0, decode_tps=1.0, total_slots=1, free_slots=1, seq=1, issued_at=now,
             expires_at=now + 20, addrs=[])
    f.update(over)
    return f


def test_advert_carries_the_manifest_root():
    ident = Identity.generate()
    a = CapacityAdvert(**advert_fields(ident), manifest_root="ab" * 32)
    assert CapacityAdvert.verify(a.sign(ident)).manifest_root == "ab" * 32


def test_an_advert_from_a_node_without_model_sharing_still_parses():
    ident = Identity.generate()
    blob = _seal("advert", advert_fields(ident), ident)  # signed without the field, as old nodes do
    assert CapacityAdvert.verify(blob).manifest_root == ""


def test_a_malformed_manifest_root_is_refused():
    ident = Identity.generate()
    blob = _seal("advert", {**advert_fields(ident), "manifest_root": "xyz"}, ident)
    with pytest.raises(RecordError, match="manifest_root"):
        CapacityAdvert.verify(blob)


def test_root_binds_size_chunk_size_and_every_hash():
    hashes = hashlib.sha256(b"a").digest() + hashlib.sha256(b"b").digest()
    root = manifest_root(CHUNK_SIZE + 1, CHUNK_SIZE, hashes)
    assert root != manifest_root(CHUNK_SIZE + 2, CHUNK_SIZE, hashes)
    assert root != manifest_root(CHUNK_SIZE + 1, CHUNK_SIZE * 2, hashes)
    assert root != manifest_root(CHUNK_SIZE + 1, CHUNK_SIZE, hashes[32:] + hashes[:32])
    assert chunk_span(1, CHUNK_SIZE + 1) == (CHUNK_SIZE, 1)


def test_requests_round_trip_and_bad_ones_are_refused():
    for req in (ManifestRequest(SHA), ChunkRequest(SHA, 7)):
        assert parse_request(msgpack.unpackb(msgpack.packb(request_to_wire(req)))) == req
    with pytest.raises(UnsupportedVersion):
        parse_request({"t": "manifest?", "v": 2, "sha256": SHA})
    with pytest.raises(InvalidMessage):
        parse_request({"t": "chunk?", "v": 1, "sha256": SHA, "index": -1})
    with pytest.raises(InvalidMessage):
        parse_request({"t": "manifest?", "v": 1, "sha256": "CD" * 32})


def test_a_manifest_with_the_wrong_number_of_hashes_is_refused():
    m = Manifest(SHA, CHUNK_SIZE * 2, CHUNK_SIZE, b"\0" * 64)
    assert parse_reply(manifest_to_wire(m)) == m
    with pytest.raises(InvalidMessage, match="number of chunk hashes"):
        parse_reply({**manifest_to_wire(m), "hashes": b"\0" * 32})
