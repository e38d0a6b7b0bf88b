"""Signed records: valid ones verify; tampered, expired, replayed, mismatched and wrong-key ones are refused."""

import time

import msgpack
import pytest

from protocol.errors import IdentityError, RecordError
from protocol.identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from protocol.records import AdvertBook, CapacityAdvert, ReceiptBook, WorkReceipt, token_digest

SHA = "cd" * 32


@pytest.fixture
def node():
    return Identity.generate()


def advert(ident, seq=1, now=None, ttl=20.0, **over):
    now = time.time() if now is None else now
    fields = dict(node=ident.peer_id, model_sha256=SHA, model_name="SmolLM2", quantization="Q4_1", context_size=2048,
                  prefill_tps=800.0, decode_tps=100.0, total_slots=1, free_slots=1, seq=seq, issued_at=now,
                  expires_at=now + ttl, addrs=["/ip4/127.0.0.1/tcp/4001"])
    fields.update(over)
    return CapacityAdvert(**fields)


def receipt(ident, tokens=(1, 2, 3), entry="entry-peer", rid="req-000001"):
    return WorkReceipt(rid, SHA, 7, len(tokens), token_digest(list(tokens)), ident.peer_id, entry, time.time()).sign(ident)


def test_advert_round_trip(node):
    a = advert(node)
    assert CapacityAdvert.verify(a.sign(node), node=node.peer_id, model_sha256=SHA) == a


def test_advert_tampered_body_refused(node):
    blob = advert(node).sign(node)
    env = msgpack.unpackb(blob)
    fields = msgpack.unpackb(env["body"])
    fields["decode_tps"] = 1e6  # a node bragging after signing
    env["body"] = msgpack.packb(fields)
    with pytest.raises(RecordError, match="signature"):
        CapacityAdvert.verify(msgpack.packb(env))


def test_advert_flipped_bit_refused(node):
    blob = bytearray(advert(node).sign(node))
    for i in range(len(blob)):
        mutated = bytearray(blob)
        mutated[i] ^= 0x01
        with pytest.raises(RecordError):
            CapacityAdvert.verify(bytes(mutated))


def test_advert_wrong_key_refused(node):
    other = Identity.generate()
    with pytest.raises(RecordError):
        advert(node).sign(other)
    # Forge: claim node's id but sign with another key.
    env = msgpack.unpackb(advert(node).sign(node))
    env["sig"] = other.sign(b"mesh-record-v1\x00advert\x00" + env["body"])
    with pytest.raises(RecordError, match="signature"):
        CapacityAdvert.verify(msgpack.packb(env))


def test_advert_expired_future_and_overlong_refused(node):
    now = time.time()
    with pytest.raises(RecordError, match="expired"):
        CapacityAdvert.verify(advert(node, now=now - 100).sign(node), now=now)
    with pytest.raises(RecordError, match="future"):
        CapacityAdvert.verify(advert(node, now=now + 3600).sign(node), now=now)
    with pytest.raises(RecordError, match="lifetime"):
        CapacityAdvert.verify(advert(node, ttl=86400).sign(node), now=now)


def test_advert_mismatch_refused(node):
    blob = advert(node).sign(node)
    with pytest.raises(RecordError, match="another node"):
        CapacityAdvert.verify(blob, node=Identity.generate().peer_id)
    with pytest.raises(RecordError, match="another model"):
        CapacityAdvert.verify(blob, model_sha256="ee" * 32)


def test_advert_replay_refused(node):
    book = AdvertBook()
    old = advert(node, seq=1).sign(node)
    book.accept(old)
    book.accept(old)  # fetching the same record twice is fine
    book.accept(advert(node, seq=2, free_slots=0).sign(node))
    with pytest.raises(RecordError, match="replayed"):
        book.accept(old)
    assert book.current(node.peer_id).seq == 2


def test_receipt_receipt_not_accepted_as_advert(node):
    with pytest.raises(RecordError):
        CapacityAdvert.verify(receipt(node))


def test_receipt_verifies_against_relayed_tokens(node):
    blob = receipt(node, tokens=(4, 5, 6))
    kw = dict(node=node.peer_id, entry="entry-peer", request_id="req-000001", model_sha256=SHA)
    assert WorkReceipt.verify(blob, tokens=[4, 5, 6], **kw).completion_tokens == 3
    with pytest.raises(RecordError, match="disagree"):
        WorkReceipt.verify(blob, tokens=[4, 5], **kw)  # inflated count
    with pytest.raises(RecordError, match="disagree"):
        WorkReceipt.verify(blob, tokens=[4, 5, 7], **kw)  # other output
    with pytest.raises(RecordError, match="another entry"):
        WorkReceipt.verify(blob, tokens=[4, 5, 6], **{**kw, "entry": "someone-else"})
    with pytest.raises(RecordError, match="another request"):
        WorkReceipt.verify(blob, tokens=[4, 5, 6], **{**kw, "request_id": "req-000002"})
    with pytest.raises(RecordError, match="another node"):
        WorkReceipt.verify(blob, tokens=[4, 5, 6], **{**kw, "node": Identity.generate().peer_id})


def test_receipt_replay_refused(node):
    book = ReceiptBook()
    kw = dict(node=node.peer_id, entry="entry-peer", request_id="req-000001", model_sha256=SHA, tokens=[1, 2, 3])
    book.accept(WorkReceipt.verify(receipt(node), **kw))
    with pytest.raises(RecordError, match="replayed"):
        book.accept(WorkReceipt.verify(receipt(node), **kw))


def test_garbage_records_refused():
    for blob in (b"", b"\x00" * 10, msgpack.packb({"kind": "advert"}), msgpack.packb([1]), b"x" * 10000, None, 5):
        with pytest.raises(RecordError):
            CapacityAdvert.verify(blob)


def test_identity_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "sub" / "node.key"
    ident = Identity.load_or_create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Identity.load_or_create(path).peer_id == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id
    assert verify_signature(ident.public_key, b"m", ident.sign(b"m"))
    assert not verify_signature(ident.public_key, b"other", ident.sign(b"m"))
    assert not verify_signature(b"short", b"m", ident.sign(b"m"))


def test_identity_file_errors(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)
    path.write_text("garbage")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a mesh identity"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "missing.key")
