"""The serving side of /mesh/model/1: a node hands out the model file it serves.

Inference keeps priority: the file is read in worker threads, a chunk leaves in PIECE_SIZE
frames paced by a token bucket (`--share-rate`), and at most MAX_UPLOADS chunks are in flight
at once, so an upload costs the trio loop (which relays tokens) only short slices. While the
node is generating, uploads slow to BUSY_FRACTION of the rate: on a machine whose cores are
all in use, moving and encrypting bytes at full rate took cores from llama.cpp (decode fell to
~40% of idle in scripts/bench_share.py), and a downloader can wait where a chat reader can't. What a
downloader can learn or cost is in SECURITY.md ("Model downloads").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from protocol.errors import InvalidMessage, ProtocolError, UnsupportedVersion
from protocol.framing import FrameReader, FrameWriter
from protocol.model_transfer import (
    ERR_BUSY,
    ERR_INVALID,
    ERR_UNKNOWN_MODEL,
    MAX_MANIFEST_FRAME,
    MAX_REQUEST_FRAME,
    PIECE_SIZE,
    ChunkRequest,
    Manifest,
    Piece,
    TransferError,
    error_to_wire,
    manifest_to_wire,
    parse_request,
    piece_to_wire,
)

log = logging.getLogger("mesh.node.share")

MAX_UPLOADS = 4  # chunks read and sent at once, all downloaders together (4 x 4 MiB of memory)
UPLOAD_SLOT_WAIT_S = 20.0  # a request waits this long for a slot, then is answered busy
IDLE_TIMEOUT_S = 60.0  # a stream with no request for this long is closed
BUSY_FRACTION = 0.1  # of --share-rate, while generations run


class TokenBucket:
    """`rate` bytes per second on average, bursts of at most `burst` bytes; shared by every
    upload so the limit holds for the node, not per downloader."""

    def __init__(self, rate: float, burst: int):
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs rate > 0 and burst > 0")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = trio.current_time()
        self._lock = trio.Lock()

    async def take(self, n: int, fraction: float = 1.0) -> None:
        """Wait until `n` bytes may go out at `fraction` of the rate."""
        async with self._lock:  # first come, first served: uploads share the rate fairly
            now = trio.current_time()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n / fraction
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)


@dataclass
class ShareStats:
    bytes_sent: int = 0
    chunks_sent: int = 0
    manifests_sent: int = 0
    refused: int = 0


class ModelShare:
    def __init__(self, path: Path, manifest: Manifest, *, rate_mb: float, max_uploads: int = MAX_UPLOADS,
                 idle_timeout: float = IDLE_TIMEOUT_S, busy: Callable[[], bool] = lambda: False):
        self.path = path
        self._busy = busy  # whether generations are running now
        self.manifest = manifest
        self.stats = ShareStats()
        self._bucket = TokenBucket(rate_mb * 1e6, PIECE_SIZE)
        self._slots = trio.CapacityLimiter(max_uploads)
        self._idle = idle_timeout
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def _read(self, index: int) -> bytes:
        off, length = self.manifest.span(index)
        data = os.pread(self._fd, length, off)
        if len(data) != length:
            raise OSError(f"model file {self.path} is shorter than when it was hashed")
        return data

    async def handle_stream(self, stream, remote: str) -> None:
        reader = FrameReader(stream, max_frame=MAX_REQUEST_FRAME)
        writer = FrameWriter(stream, max_frame=MAX_MANIFEST_FRAME)
        try:
            while True:
                with trio.move_on_after(self._idle):
                    frame = await reader.read_frame()
                    if frame is None:
                        return
                    try:
                        req = parse_request(frame)
                    except (InvalidMessage, UnsupportedVersion) as e:
                        # Said plainly, then the stream ends: an old or new peer learns why.
                        await writer.write_frame(error_to_wire(TransferError(e.code if isinstance(e, UnsupportedVersion) else ERR_INVALID, str(e))))
                        return
                    if req.sha256 != self.manifest.sha256:
                        await writer.write_frame(error_to_wire(TransferError(ERR_UNKNOWN_MODEL, "this node does not share that model")))
                        continue
                    if isinstance(req, ChunkRequest):
                        if req.index >= self.manifest.chunks:
                            await writer.write_frame(error_to_wire(TransferError(ERR_INVALID, "no such chunk")))
                            continue
                        await self._send_chunk(writer, req.index, remote)
                    else:
                        await writer.write_frame(manifest_to_wire(self.manifest))
                        self.stats.manifests_sent += 1
                    continue
                log.debug("model share stream idle: closing", extra={"peer": remote})
                return
        except ProtocolError:
            raise
        finally:
            reader.release()

    async def _send_chunk(self, writer: FrameWriter, index: int, remote: str) -> None:
        with trio.move_on_after(UPLOAD_SLOT_WAIT_S) as wait:
            await self._slots.acquire()
        if wait.cancelled_caught:
            self.stats.refused += 1
            await writer.write_frame(error_to_wire(TransferError(ERR_BUSY, "all upload slots are busy")))
            return
        try:
            data = await trio.to_thread.run_sync(self._read, index)
            for off in range(0, len(data), PIECE_SIZE):
                piece = data[off : off + PIECE_SIZE]
                await self._bucket.take(len(piece), BUSY_FRACTION if self._busy() else 1.0)
                await writer.write_frame(piece_to_wire(Piece(index, off, piece)))
                self.stats.bytes_sent += len(piece)
            self.stats.chunks_sent += 1
            log.debug("chunk uploaded", extra={"peer": remote, "chunk": index})
        finally:
            self._slots.release()
