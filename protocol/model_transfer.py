"""/mesh/model/1: a node hands the GGUF it serves to a node that wants to serve it too.

Integrity. The only fact a downloader trusts is the model's sha256 (its identity in adverts,
routing and credits), and that can only be checked once the whole file is there. To check
each chunk as it arrives, the file is cut into CHUNK_SIZE chunks and their sha256 digests,
in order, form the *manifest*; `manifest_root` hashes the manifest (with the file size and
chunk size) into one digest that serving nodes put in their signed advert. A downloader picks
the root most independent advertisers commit to, fetches the manifest from any peer, checks
it hashes to that root, then checks every chunk against it before writing it. The whole
file's sha256 is still checked at the end: it is what decides, so advertisers who all lie
about the root cost a failed download, never a wrong model.

Frames (msgpack maps, protocol/framing.py), requester -> server:
  {"t": "manifest?", "v": 1, "sha256": hex}
  {"t": "chunk?", "v": 1, "sha256": hex, "index": i}
server -> requester:
  {"t": "manifest", "v": 1, "sha256", "size", "chunk_size", "hashes": bytes(32 * n)}
  {"t": "piece", "v": 1, "index": i, "offset": o, "data": bytes}  (a chunk in PIECE_SIZE pieces, in order)
  {"t": "error", "v": 1, "code", "message"}
A stream carries any number of requests, one at a time. Pure code: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Any

from protocol.errors import InvalidMessage, UnsupportedVersion

MODEL_PROTOCOL_ID = "/mesh/model/1"
TRANSFER_VERSION = 1
CHUNK_SIZE = 4 << 20  # the unit of verification, resumption and parallelism
PIECE_SIZE = 256 << 10  # a chunk leaves in frames this big: small writes keep the loop responsive
# A manifest lists 32 bytes per chunk: 2 MiB of frame covers a 256 GiB file.
MAX_MANIFEST_FRAME = (2 << 20) + 4096
MAX_PIECE_FRAME = PIECE_SIZE + 4096
MAX_REQUEST_FRAME = 4096
MAX_CHUNKS = (MAX_MANIFEST_FRAME - 4096) // 32
_DOMAIN = b"mesh-manifest-v1\x00"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ERR_UNKNOWN_MODEL = "unknown_model"
ERR_BUSY = "busy"
ERR_INVALID = "invalid_request"


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return max(0, -(-size // chunk_size))


def chunk_span(index: int, size: int, chunk_size: int = CHUNK_SIZE) -> tuple[int, int]:
    """(offset, length) of chunk `index`; the last chunk is shorter."""
    off = index * chunk_size
    return off, max(0, min(chunk_size, size - off))


def manifest_root(size: int, chunk_size: int, hashes: bytes) -> str:
    """The digest an advert commits to. Size and chunk size are inside it, so a peer can't
    keep the root and lie about where chunks start or how long the file is."""
    return hashlib.sha256(_DOMAIN + struct.pack(">QQ", size, chunk_size) + hashes).hexdigest()


@dataclass(frozen=True)
class Manifest:
    sha256: str  # the whole file's digest (the model's identity)
    size: int
    chunk_size: int
    hashes: bytes  # sha256 of each chunk, concatenated in order

    @property
    def root(self) -> str:
        return manifest_root(self.size, self.chunk_size, self.hashes)

    @property
    def chunks(self) -> int:
        return len(self.hashes) // 32

    def chunk_hash(self, index: int) -> bytes:
        return self.hashes[index * 32 : index * 32 + 32]

    def span(self, index: int) -> tuple[int, int]:
        return chunk_span(index, self.size, self.chunk_size)

    def check_chunk(self, index: int, data: bytes) -> bool:
        return len(data) == self.span(index)[1] and hashlib.sha256(data).digest() == self.chunk_hash(index)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise InvalidMessage(what)


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    _check(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, f"{key!r} must be an integer in [{lo}, {hi}]")
    assert isinstance(v, int)
    return v


def _sha(d: dict[str, Any]) -> str:
    v = d.get("sha256")
    _check(isinstance(v, str) and bool(_SHA256.match(v)), "'sha256' must be 64 lowercase hex characters")
    assert isinstance(v, str)
    return v


def _version(d: dict[str, Any]) -> None:
    if d.get("v") != TRANSFER_VERSION:
        raise UnsupportedVersion(f"model transfer version {d.get('v')!r} is not supported (this peer speaks {TRANSFER_VERSION})")


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestRequest:
    sha256: str


@dataclass(frozen=True)
class ChunkRequest:
    sha256: str
    index: int


def request_to_wire(req: ManifestRequest | ChunkRequest) -> dict[str, Any]:
    if isinstance(req, ManifestRequest):
        return {"t": "manifest?", "v": TRANSFER_VERSION, "sha256": req.sha256}
    return {"t": "chunk?", "v": TRANSFER_VERSION, "sha256": req.sha256, "index": req.index}


def parse_request(d: dict[str, Any]) -> ManifestRequest | ChunkRequest:
    _version(d)
    t = d.get("t")
    if t == "manifest?":
        return ManifestRequest(_sha(d))
    if t == "chunk?":
        return ChunkRequest(_sha(d), _int(d, "index", 0, MAX_CHUNKS - 1))
    raise InvalidMessage(f"unknown model transfer request {t!r}")


# --- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    index: int
    offset: int  # within the chunk
    data: bytes


@dataclass(frozen=True)
class TransferError:
    code: str
    message: str


def manifest_to_wire(m: Manifest) -> dict[str, Any]:
    return {"t": "manifest", "v": TRANSFER_VERSION, "sha256": m.sha256, "size": m.size,
            "chunk_size": m.chunk_size, "hashes": m.hashes}


def piece_to_wire(p: Piece) -> dict[str, Any]:
    return {"t": "piece", "v": TRANSFER_VERSION, "index": p.index, "offset": p.offset, "data": p.data}


def error_to_wire(e: TransferError) -> dict[str, Any]:
    return {"t": "error", "v": TRANSFER_VERSION, "code": e.code, "message": e.message[:500]}


def parse_reply(d: dict[str, Any]) -> Manifest | Piece | TransferError:
    _version(d)
    t = d.get("t")
    if t == "manifest":
        size = _int(d, "size", 1, MAX_CHUNKS * CHUNK_SIZE)
        chunk_size = _int(d, "chunk_size", 64 << 10, 64 << 20)
        hashes = d.get("hashes")
        _check(isinstance(hashes, bytes), "'hashes' must be bytes")
        assert isinstance(hashes, bytes)
        _check(len(hashes) == 32 * chunk_count(size, chunk_size), "manifest lists the wrong number of chunk hashes")
        return Manifest(_sha(d), size, chunk_size, hashes)
    if t == "piece":
        data = d.get("data")
        _check(isinstance(data, bytes) and 0 < len(data) <= PIECE_SIZE, f"'data' must be 1-{PIECE_SIZE} bytes")
        assert isinstance(data, bytes)
        return Piece(_int(d, "index", 0, MAX_CHUNKS - 1), _int(d, "offset", 0, 64 << 20), data)
    if t == "error":
        code, msg = d.get("code"), d.get("message")
        _check(isinstance(code, str) and len(code) <= 64, "'code' must be a short string")
        _check(isinstance(msg, str) and len(msg) <= 1000, "'message' must be a string")
        assert isinstance(code, str) and isinstance(msg, str)
        return TransferError(code, msg)
    raise InvalidMessage(f"unknown model transfer reply {t!r}")
