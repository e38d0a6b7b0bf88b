"""The requester's side of /mesh/infer/1 over any byte stream: used by the entry, tests, benchmarks.

`InferCall` sends one request and yields the node's TokenChunks until the Final frame. A
stream that ends before Final (node killed, reset) raises `StreamBroken` — the signal for
failover — and an Error frame raises `NodeError` with the node's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from protocol.errors import ProtocolError
from protocol.framing import FrameReader, FrameWriter
from protocol.messages import (
    Cancel,
    Error,
    Final,
    InferRequest,
    Leaving,
    StatusQuery,
    StatusReply,
    TokenChunk,
    parse_message,
    to_wire,
)


class NodeError(Exception):
    def __init__(self, error: Error):
        super().__init__(f"{error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        return self.error.code


class StreamBroken(Exception):
    """The stream ended or broke before the node's final frame."""


class InferCall:
    def __init__(self, stream, request: InferRequest):
        self.stream = stream
        self.request = request
        self.reader = FrameReader(stream)
        self.writer = FrameWriter(stream)
        self.final: Final | None = None
        self.node_leaving: Leaving | None = None

    async def send(self) -> None:
        await self.writer.write_frame(to_wire(self.request))

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        rid = self.request.request_id
        while True:
            try:
                frame = await self.reader.read_frame()
            except ProtocolError:
                raise
            except Exception as e:  # resets and closed streams surface as many types
                raise StreamBroken(f"stream failed: {type(e).__name__}") from e
            if frame is None:
                raise StreamBroken("node closed the stream before the final frame")
            msg = parse_message(frame)
            if isinstance(msg, TokenChunk):
                if msg.request_id != rid:
                    raise ProtocolError("token chunk for another request")
                yield msg
            elif isinstance(msg, Final):
                if msg.request_id != rid:
                    raise ProtocolError("final frame for another request")
                self.final = msg
                return
            elif isinstance(msg, Error):
                raise NodeError(msg)
            elif isinstance(msg, Leaving):
                self.node_leaving = msg  # the node finishes this request within its grace
            elif isinstance(msg, StatusReply):
                continue
            else:
                raise ProtocolError(f"unexpected {msg.T!r} frame during a generation")

    async def cancel(self) -> None:
        await self.writer.write_frame(to_wire(Cancel(self.request.request_id)))


async def query_status(stream, reader: FrameReader | None = None) -> StatusReply:
    """Ask a node for its live load over an open stream. Pass the stream's own FrameReader
    when asking more than once: a fresh reader would drop bytes the last one buffered. A
    Leaving notice that arrives first is skipped: the reply says `draining` too."""
    await FrameWriter(stream).write_frame(to_wire(StatusQuery()))
    reader = reader or FrameReader(stream)
    while True:
        frame = await reader.read_frame()
        if frame is None:
            raise StreamBroken("node closed the stream")
        msg = parse_message(frame)
        if isinstance(msg, StatusReply):
            return msg
        if isinstance(msg, Error):
            raise NodeError(msg)
