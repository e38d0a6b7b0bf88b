"""Length-prefixed msgpack frames over a byte stream.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack holding one map.
The decoder never reads past the announced length, refuses lengths above the limit before
reading the body, and refuses every msgpack type a message cannot contain (ext types,
timestamps, non-string map keys), so a hostile peer can neither crash nor balloon a reader.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack

from protocol.errors import FrameTooLarge, MalformedFrame, ProtocolError

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB: a request with a long chat fits, a memory bomb does not
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# A reader holding at most this much may draw on a budget's reserve: status queries, cancels
# and ordinary requests still get through while large partial frames have used up the rest.
SMALL_HOLDING = 16 * 1024


class OversizedFrame(FrameTooLarge):
    """A peer announced a frame above the reader's limit (refused before reading its body)."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"peer announced a {length}-byte frame; the limit is {limit}")
        self.length = length
        self.limit = limit


class BufferFull(ProtocolError):
    """Buffering the bytes a peer sent would exceed the budget shared by all streams."""

    code = "buffer_full"


class FrameStalled(ProtocolError):
    """A frame was begun and not finished in time (raised by the reader's stream)."""

    code = "frame_stalled"


class BufferBudget:
    """Bytes that all FrameReaders sharing it may hold for their frames at once.

    A reader buffers a frame until it is complete, so without a shared bound every stream that
    stops mid-frame pins up to a frame's worth of memory, and a peer opening many streams pins
    as much as it likes. Readers charge bytes as they arrive (so holding budget costs a peer
    the bytes it sends, not just a header announcing them) and give them back when the frame
    is consumed or the reader released. `reserve` bytes are kept for readers holding at most
    SMALL_HOLDING, so small frames still get through while large ones hold the rest.
    """

    def __init__(self, limit: int, reserve: int = 0):
        if limit < 1 or not 0 <= reserve < limit:
            raise ValueError("a buffer budget needs limit >= 1 and 0 <= reserve < limit")
        self.limit = limit
        self.reserve = reserve
        self.used = 0
        self.peak = 0  # highest `used` so far, for status and tests
        self.refusals = 0

    def take(self, n: int, small: bool = False) -> bool:
        cap = self.limit if small else self.limit - self.reserve
        if self.used + n > cap:
            self.refusals += 1
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n


class ByteStream(Protocol):
    async def read(self, n: int) -> bytes: ...  # b"" at end of stream

    async def write(self, data: bytes) -> None: ...


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension type {code} is not allowed")


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            # Containers can't hold more items than the body has bytes; these caps stop
            # preallocation from a lying header inside the body.
            max_str_len=max_frame,
            max_bin_len=max_frame,
            max_array_len=max_frame,
            max_map_len=max_frame,
            max_ext_len=0,
        )
    except MalformedFrame:
        raise
    except msgpack.ExtraData:
        raise MalformedFrame("trailing bytes after the message in a frame") from None
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as e:
        raise MalformedFrame(f"undecodable msgpack: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame("a frame must hold a map")
    return obj


class FrameReader:
    """Reads frames from a ByteStream with buffering: one stream read serves many frames.

    With a budget the reader reads exactly the frame it is on (no read-ahead), charges every
    byte to the budget as it arrives (BufferFull when it can't) and gives it back once the
    frame is consumed, so it holds at most one frame (max_frame plus its 4-byte header);
    release() gives its share back when the stream is done.
    """

    def __init__(self, stream: ByteStream, max_frame: int = DEFAULT_MAX_FRAME, read_size: int = 65536,
                 budget: BufferBudget | None = None):
        self._read = stream.read
        self._buf = bytearray()
        self.max_frame = max_frame
        self._read_size = read_size
        self._budget = budget
        self._held = 0  # bytes charged to the budget: len(self._buf) while a budget is set
        self.frames_read = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (non-zero: a frame has begun)."""
        return len(self._buf)

    async def _fill(self, need: int) -> bool:
        while len(self._buf) < need:
            missing = need - len(self._buf)
            chunk = await self._read(missing if self._budget is not None else max(self._read_size, missing))
            if not chunk:
                return False
            if self._budget is not None:
                holding = len(self._buf) + len(chunk)
                if not self._budget.take(len(chunk), small=holding <= SMALL_HOLDING):
                    raise BufferFull(f"no buffer space for {holding} bytes of a frame "
                                     f"({self._budget.used} of {self._budget.limit} bytes in use)")
                self._held = holding
            self._buf += chunk
        return True

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        if self._budget is not None:
            self._budget.give(n)
            self._held -= n

    def release(self) -> None:
        """Drop whatever is buffered and return its budget; the reader is done."""
        self._buf = bytearray()
        if self._budget is not None and self._held:
            self._budget.give(self._held)
            self._held = 0

    def frame_ready(self) -> bool:
        """Whether read_frame() would return (or fail) without reading from the stream: a
        whole frame is buffered. Lets a relay merge frames that arrived together."""
        if len(self._buf) < HEADER_SIZE:
            return False
        length: int
        (length,) = _HEADER.unpack_from(self._buf)
        return length > self.max_frame or len(self._buf) >= HEADER_SIZE + length

    async def read_frame(self) -> dict[str, Any] | None:
        """Next message, or None at a clean end of stream between frames."""
        if not await self._fill(HEADER_SIZE):
            if self._buf:
                raise MalformedFrame("stream ended inside a frame header")
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            raise OversizedFrame(length, self.max_frame)
        if not await self._fill(HEADER_SIZE + length):
            raise MalformedFrame("stream ended inside a frame")
        body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        self._consume(HEADER_SIZE + length)
        self.frames_read += 1
        return decode_body(body, self.max_frame)


class FrameWriter:
    """Writes frames; several frames queued together go out in one stream write."""

    def __init__(self, stream: ByteStream, max_frame: int = DEFAULT_MAX_FRAME):
        self._write: Callable[[bytes], Awaitable[None]] = stream.write
        self.max_frame = max_frame

    async def write_frame(self, message: dict[str, Any]) -> None:
        await self._write(encode_frame(message, self.max_frame))

    async def write_frames(self, messages: list[dict[str, Any]]) -> None:
        if messages:
            await self._write(b"".join(encode_frame(m, self.max_frame) for m in messages))
