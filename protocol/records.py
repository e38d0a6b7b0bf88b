"""Signed records: capacity adverts (node -> everyone) and work receipts (node -> entry).

A record travels as an envelope {kind, body, sig}. `body` is msgpack of the record's fields;
the signature covers a domain tag, the kind and the body bytes, so a receipt can never be
replayed as an advert or vice versa. The signer's key is recovered from the node's peer id
(Ed25519 peer ids embed the public key): a record names its signer and proves it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from protocol.errors import IdentityError, ProtocolError, RecordError
from protocol.framing import decode_body
from protocol.identity import Identity, public_key_from_peer_id, verify_signature

_DOMAIN = b"mesh-record-v1\x00"
MAX_RECORD = 8192
MAX_ADVERT_TTL = 600.0  # a node can't publish an advert that outlives it by more than this
CLOCK_SKEW = 30.0


def _signed_message(kind: str, body: bytes) -> bytes:
    return _DOMAIN + kind.encode() + b"\x00" + body


def _seal(kind: str, fields: dict[str, Any], identity: Identity) -> bytes:
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    sig = identity.sign(_signed_message(kind, body))
    blob: bytes = msgpack.packb({"kind": kind, "body": body, "sig": sig}, use_bin_type=True)
    return blob


def _open(blob: Any, kind: str) -> dict[str, Any]:
    """Check an envelope's shape and signature; return the verified body fields."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_RECORD:
        raise RecordError("record missing or too large")
    try:
        env = decode_body(bytes(blob), MAX_RECORD)
        if env.get("kind") != kind:
            raise RecordError(f"expected a {kind} record, got {env.get('kind')!r}")
        body, sig = env.get("body"), env.get("sig")
        if not isinstance(body, bytes) or not isinstance(sig, bytes):
            raise RecordError("record envelope is malformed")
        fields = decode_body(body, MAX_RECORD)
    except RecordError:
        raise
    except ProtocolError as e:
        raise RecordError(f"record is malformed: {e}") from None
    node = fields.get("node")
    if not isinstance(node, str):
        raise RecordError("record names no signer")
    try:
        pub = public_key_from_peer_id(node)
    except IdentityError as e:
        raise RecordError(str(e)) from None
    if not verify_signature(pub, _signed_message(kind, body), sig):
        raise RecordError("bad signature")
    return fields


def _typed(fields: dict[str, Any], spec: Mapping[str, type]) -> dict[str, Any]:
    out = {}
    for name, typ in spec.items():
        v = fields.get(name)
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            raise RecordError(f"record field {name!r} is missing or has the wrong type")
        out[name] = v
    return out


def _optional_digest(fields: dict[str, Any], name: str) -> str:
    v = fields.get(name, "")
    if not isinstance(v, str) or v and (len(v) != 64 or v.strip("0123456789abcdef")):
        raise RecordError(f"record field {name!r} must be 64 lowercase hex characters or empty")
    return v


@dataclass
class CapacityAdvert:
    node: str  # peer id of the signer
    model_sha256: str
    model_name: str
    quantization: str
    context_size: int
    prefill_tps: float
    decode_tps: float
    total_slots: int
    free_slots: int
    seq: int
    issued_at: float
    expires_at: float
    addrs: list[Any] = field(default_factory=list)  # multiaddrs the node listens on
    # protocol/model_transfer.manifest_root of the model file when the node shares it over
    # /mesh/model/1, else "". Optional on the wire: adverts from nodes that predate it parse.
    manifest_root: str = ""

    KIND = "advert"
    _SPEC = {
        "node": str, "model_sha256": str, "model_name": str, "quantization": str,
        "context_size": int, "prefill_tps": float, "decode_tps": float, "total_slots": int,
        "free_slots": int, "seq": int, "issued_at": float, "expires_at": float, "addrs": list,
    }

    def sign(self, identity: Identity) -> bytes:
        if identity.peer_id != self.node:
            raise RecordError("an advert must be signed by the node it describes")
        return _seal(self.KIND, asdict(self), identity)

    @classmethod
    def verify(cls, blob: Any, *, now: float | None = None, node: str | None = None, model_sha256: str | None = None) -> CapacityAdvert:
        fields = _open(blob, cls.KIND)
        adv = cls(**_typed(fields, cls._SPEC), manifest_root=_optional_digest(fields, "manifest_root"))
        now = time.time() if now is None else now
        if adv.expires_at <= now:
            raise RecordError("advert expired")
        if adv.issued_at > now + CLOCK_SKEW:
            raise RecordError("advert issued in the future")
        if adv.expires_at - adv.issued_at > MAX_ADVERT_TTL:
            raise RecordError("advert lifetime exceeds the allowed maximum")
        if node is not None and adv.node != node:
            raise RecordError("advert is for another node")
        if model_sha256 is not None and adv.model_sha256 != model_sha256:
            raise RecordError("advert is for another model")
        if not all(isinstance(a, str) and len(a) < 256 for a in adv.addrs) or len(adv.addrs) > 16:
            raise RecordError("advert addresses are malformed")
        return adv


class AdvertBook:
    """Latest advert per node; refuses replays (a sequence number not above the last one seen)."""

    def __init__(self) -> None:
        self._latest: dict[str, CapacityAdvert] = {}

    def accept(self, blob: Any, *, now: float | None = None) -> CapacityAdvert:
        adv = CapacityAdvert.verify(blob, now=now)
        last = self._latest.get(adv.node)
        if last is not None and adv.seq <= last.seq:
            if adv == last:
                return last  # the same record fetched again is not a replay
            raise RecordError(f"advert sequence {adv.seq} is not newer than {last.seq}: replayed")
        self._latest[adv.node] = adv
        return adv

    def current(self, node: str, *, now: float | None = None) -> CapacityAdvert | None:
        adv = self._latest.get(node)
        now = time.time() if now is None else now
        return adv if adv is not None and adv.expires_at > now else None

    def forget(self, node: str) -> None:
        self._latest.pop(node, None)


def token_digest(token_ids: list[int]) -> bytes:
    """What a receipt commits to: the exact token ids, in order."""
    return hashlib.sha256(b"mesh-tokens-v1\x00" + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


@dataclass
class WorkReceipt:
    request_id: str
    model_sha256: str
    prompt_tokens: int
    completion_tokens: int
    output_digest: bytes
    node: str
    entry: str
    issued_at: float

    KIND = "receipt"
    _SPEC = {
        "request_id": str, "model_sha256": str, "prompt_tokens": int, "completion_tokens": int,
        "output_digest": bytes, "node": str, "entry": str, "issued_at": float,
    }

    def sign(self, identity: Identity) -> bytes:
        if identity.peer_id != self.node:
            raise RecordError("a receipt must be signed by the node that did the work")
        return _seal(self.KIND, asdict(self), identity)

    @classmethod
    def verify(
        cls,
        blob: Any,
        *,
        node: str,
        entry: str,
        request_id: str,
        model_sha256: str,
        tokens: list[int],
        prompt_tokens: int | None = None,
    ) -> WorkReceipt:
        """Accept only a receipt that matches what the entry itself relayed."""
        r = cls(**_typed(_open(blob, cls.KIND), cls._SPEC))
        if r.node != node:
            raise RecordError("receipt signed by another node than the one that streamed")
        if r.entry != entry:
            raise RecordError("receipt is for another entry")
        if r.request_id != request_id:
            raise RecordError("receipt is for another request")
        if r.model_sha256 != model_sha256:
            raise RecordError("receipt is for another model")
        if r.completion_tokens != len(tokens) or r.output_digest != token_digest(tokens):
            raise RecordError("receipt's tokens disagree with what was relayed")
        if prompt_tokens is not None and r.prompt_tokens != prompt_tokens:
            raise RecordError("receipt's prompt token count disagrees")
        return r


class ReceiptBook:
    """Receipts already accepted, so a node cannot cash the same one twice. The entry's
    ledger persists this; the in-memory book serves tests and short-lived tools."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def accept(self, receipt: WorkReceipt) -> None:
        key = (receipt.node, receipt.request_id)
        if key in self._seen:
            raise RecordError("receipt already accepted: replayed")
        self._seen.add(key)
