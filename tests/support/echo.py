"""An echo protocol for transport tests: each frame comes back as {"echo": frame}."""

from __future__ import annotations

from protocol.framing import FrameReader, FrameWriter

ECHO = "/mesh/test-echo/1"


async def echo(stream, remote: str) -> None:
    reader, writer = FrameReader(stream), FrameWriter(stream)
    while (frame := await reader.read_frame()) is not None:
        await writer.write_frame({"echo": frame})
