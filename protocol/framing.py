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

from protocol.errors import FrameTooLarge, MalformedFrame

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB: a request with a long chat fits, a memory bomb does not
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class ByteStream(Protocol):
    async def read(self, n: int) -> bytes: ...  # b"" at end of stream

    async def write(self, data: bytes) -> None: ...


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension type {code} is not allowed")


def encode_frame(message: dict, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> dict:
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
    """Reads frames from a ByteStream with buffering: one stream read serves many frames."""

    def __init__(self, stream: ByteStream, max_frame: int = DEFAULT_MAX_FRAME, read_size: int = 65536):
        self._read = stream.read
        self._buf = bytearray()
        self.max_frame = max_frame
        self._read_size = read_size

    async def _fill(self, need: int) -> bool:
        while len(self._buf) < need:
            chunk = await self._read(max(self._read_size, need - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def frame_ready(self) -> bool:
        """Whether read_frame() would return (or fail) without reading from the stream: a
        whole frame is buffered. Lets a relay merge frames that arrived together."""
        if len(self._buf) < HEADER_SIZE:
            return False
        (length,) = _HEADER.unpack_from(self._buf)
        return length > self.max_frame or len(self._buf) >= HEADER_SIZE + length

    async def read_frame(self) -> dict | None:
        """Next message, or None at a clean end of stream between frames."""
        if not await self._fill(HEADER_SIZE):
            if self._buf:
                raise MalformedFrame("stream ended inside a frame header")
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            raise FrameTooLarge(f"peer announced a {length}-byte frame; the limit is {self.max_frame}")
        if not await self._fill(HEADER_SIZE + length):
            raise MalformedFrame("stream ended inside a frame")
        body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        return decode_body(body, self.max_frame)


class FrameWriter:
    """Writes frames; several frames queued together go out in one stream write."""

    def __init__(self, stream: ByteStream, max_frame: int = DEFAULT_MAX_FRAME):
        self._write: Callable[[bytes], Awaitable[None]] = stream.write
        self.max_frame = max_frame

    async def write_frame(self, message: dict) -> None:
        await self._write(encode_frame(message, self.max_frame))

    async def write_frames(self, messages: list[dict]) -> None:
        if messages:
            await self._write(b"".join(encode_frame(m, self.max_frame) for m in messages))
