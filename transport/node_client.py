"""The requester's side of /mesh/infer/1: the one client every caller of a node uses (the
entry's relay, its status view and canary probes, tests, benchmarks).

`NodeCall` is one generation on one stream: `send()` the request, then `next()` returns the
node's TokenChunks and finally its Final frame. A stream that ends or breaks before Final
(node killed, reset) raises `StreamBroken` — the signal for failover — an Error frame raises
`NodeError` with the node's code, and a frame that breaks the protocol raises ProtocolError.
`open_call` dials a node and sends the request; `timed_generation` is one whole call, timed
(benchmarks and tests measure the mesh with it).

`read_status` reads a status stream up to the node's next StatusReply; `query_status` asks
for one. Both reading paths share `_read_message`, the only place a requester reads frames.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import trio

from protocol import INFER_PROTOCOL_ID
from protocol.errors import ProtocolError
from protocol.framing import FrameReader, FrameWriter
from protocol.messages import (
    Cancel,
    Error,
    Final,
    InferRequest,
    Leaving,
    Message,
    StatusQuery,
    StatusReply,
    TokenChunk,
    parse_message,
    to_wire,
)
from transport.host import DIAL_TIMEOUT_S

OnLeaving = Callable[[Leaving], None]


class NodeError(Exception):
    def __init__(self, error: Error):
        super().__init__(f"{error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        return self.error.code


class StreamBroken(Exception):
    """The stream ended or broke before the frame we waited for. `clean`: the node ended it
    between frames (a close, not a reset or a failure under us)."""

    def __init__(self, message: str, *, clean: bool = False):
        super().__init__(message)
        self.clean = clean


async def _read_message(reader: FrameReader) -> Message:
    # Cancel-safe: a partly read frame stays in the FrameReader's buffer for the next call.
    try:
        frame = await reader.read_frame()
    except ProtocolError:
        raise
    except Exception as e:  # resets and closed streams surface as many types
        raise StreamBroken(f"stream failed: {type(e).__name__}") from e
    if frame is None:
        raise StreamBroken("node closed the stream", clean=True)
    return parse_message(frame)


class NodeCall:
    """One request on one node's stream, from the requester's side.

    `next()` is cancel-safe (a frame cut off by a cancellation is read whole by the next
    call), so a caller may wrap it in its own deadlines and interrupts. A Leaving notice is
    kept in `node_leaving` and handed to `on_leaving`: the node finishes this request within
    its grace but takes no new work. StatusReply frames (a status query on the same stream)
    are skipped. `last_frame_at` is the trio time the node last sent anything at all, so a
    caller can tell a quiet stream from a live one."""

    def __init__(self, stream, request: InferRequest, *, on_leaving: OnLeaving | None = None):
        self.stream = stream
        self.request = request
        self.reader = FrameReader(stream)
        self.writer = FrameWriter(stream)
        self.on_leaving = on_leaving
        self.final: Final | None = None
        self.node_leaving: Leaving | None = None
        self.last_frame_at = trio.current_time()

    async def send(self) -> None:
        await self.writer.write_frame(to_wire(self.request))

    async def next(self) -> TokenChunk | Final:
        """The node's next token chunk or its final frame (also kept in `final`)."""
        rid = self.request.request_id
        while True:
            msg = await _read_message(self.reader)
            self.last_frame_at = trio.current_time()
            if isinstance(msg, (TokenChunk, Final)):
                if msg.request_id != rid:
                    raise ProtocolError(f"{msg.T} frame for another request")
                if isinstance(msg, Final):
                    self.final = msg
                return msg
            if isinstance(msg, Error):
                raise NodeError(msg)
            if isinstance(msg, Leaving):
                self.node_leaving = msg
                if self.on_leaving is not None:
                    self.on_leaving(msg)
            elif not isinstance(msg, StatusReply):
                raise ProtocolError(f"unexpected {msg.T!r} frame during a generation")

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        """The token chunks up to the final frame, which ends the iteration (see `final`)."""
        while not isinstance(msg := await self.next(), Final):
            yield msg

    async def cancel(self) -> None:
        """Tell the node to stop: it frees the slot at once."""
        await self.writer.write_frame(to_wire(Cancel(self.request.request_id)))

    async def stop(self, timeout: float = 2.0) -> None:
        """The requester gave up (its own caller left): cancel, then close. Bounded and
        shielded, as it runs while the caller is being cancelled."""

        async def cancel_and_close() -> None:
            try:
                await self.cancel()
            finally:
                await self.stream.close()

        await _bounded(cancel_and_close, timeout)

    async def close(self, timeout: float = 2.0) -> None:
        await _bounded(self.stream.close, timeout)

    async def abort(self, timeout: float = 2.0) -> None:
        """Reset the stream: a node that failed us gets no clean goodbye."""
        await _bounded(getattr(self.stream, "reset", self.stream.close), timeout)


async def _bounded(fn: Callable[[], Awaitable[None]], timeout: float) -> None:
    # Runs while the caller's task may be cancelled: shielded, but never for long. A stream
    # that fails while being closed is closed enough.
    with trio.move_on_after(timeout) as cs:
        cs.shield = True
        try:
            await fn()
        except Exception:
            pass


async def open_call(host, peer_id: str, addrs: Iterable[str] | None, request: InferRequest, *,
                    timeout: float = DIAL_TIMEOUT_S, on_leaving: OnLeaving | None = None) -> NodeCall:
    """Dial a node (`host` is a transport.host.MeshHost; `addrs` where to reach it, None for
    what the host knows), open /mesh/infer/1 and send the request. Raises DialError when no stream could be opened, StreamClosed when the request
    could not be sent (the stream is reset then)."""
    stream = await host.open_stream(peer_id, INFER_PROTOCOL_ID, addrs, timeout=timeout)
    call = NodeCall(stream, request, on_leaving=on_leaving)
    try:
        await call.send()
    except BaseException:
        await call.abort()
        raise
    return call


async def timed_generation(host, peer_id: str, addrs: Iterable[str] | None, request: InferRequest, *,
                           timeout: float = DIAL_TIMEOUT_S) -> tuple[float, float, int]:
    """One generation on a new stream, read to its Final frame: (seconds from the dial to the
    first token, seconds after it, tokens). Raises RuntimeError when no token or no Final came."""
    t0 = time.perf_counter()
    call = await open_call(host, peer_id, addrs, request, timeout=timeout)
    first, n = None, 0
    async for chunk in call.chunks():
        if first is None and chunk.ids:
            first = time.perf_counter()
        n += len(chunk.ids)
    end = time.perf_counter()
    await call.close()
    if call.final is None or first is None:
        raise RuntimeError(f"{request.request_id}: no final frame or no token")
    return first - t0, end - first, n


async def read_status(reader: FrameReader, on_leaving: OnLeaving | None = None) -> StatusReply:
    """Read a status stream up to the node's next StatusReply. A Leaving notice on the way
    goes to `on_leaving` (the reply says `draining` too); other frames are skipped. Raises
    StreamBroken, NodeError or ProtocolError like NodeCall.next."""
    while True:
        msg = await _read_message(reader)
        if isinstance(msg, StatusReply):
            return msg
        if isinstance(msg, Error):
            raise NodeError(msg)
        if isinstance(msg, Leaving) and on_leaving is not None:
            on_leaving(msg)


async def query_status(stream, reader: FrameReader | None = None) -> StatusReply:
    """Ask a node for its live load over an open stream. Pass the stream's own FrameReader
    when asking more than once: a fresh reader would drop bytes the last one buffered."""
    await FrameWriter(stream).write_frame(to_wire(StatusQuery()))
    return await read_status(reader or FrameReader(stream))
