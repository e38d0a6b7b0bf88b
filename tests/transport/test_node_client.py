"""The requester's side of a node call (transport/node_client.py) against a scripted node on an
in-memory stream: every frame is written by the test, so each path is exact."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from protocol import PROTOCOL_VERSION
from protocol.errors import InvalidMessage, MalformedFrame, ProtocolError
from protocol.framing import FrameReader, FrameWriter, encode_frame
from protocol.messages import (
    Cancel,
    Error,
    Final,
    InferRequest,
    Leaving,
    SamplingParams,
    StatusQuery,
    StatusReply,
    TokenChunk,
    parse_message,
    to_wire,
)
from transport.host import StreamClosed
from transport.node_client import NodeCall, NodeError, StreamBroken, open_call, query_status, read_status, timed_generation

RID = "req-client-0001"
SHA = "ab" * 32
REQUEST = InferRequest(RID, SHA, "completion", SamplingParams(max_tokens=8), prompt="hi")
STATUS = StatusReply(SHA, "m", 1, 1, 0, 4, 100.0, 50.0, 0, False)


class Pipe:
    """One end of a trio memory stream pair as the read/write/close/reset byte stream."""

    def __init__(self, stream):
        self.s = stream
        self.resets = 0

    async def read(self, n: int) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def close(self) -> None:
        await self.s.aclose()

    async def reset(self) -> None:
        self.resets += 1
        await self.s.aclose()


def pair() -> tuple[Pipe, Pipe]:
    a, b = trio.testing.memory_stream_pair()
    return Pipe(a), Pipe(b)


async def send(peer: Pipe, *messages) -> None:
    await FrameWriter(peer).write_frames([to_wire(m) for m in messages])


async def test_next_yields_tokens_and_final_skips_status_and_reports_leaving():
    ours, node = pair()
    notices = []
    call = NodeCall(ours, REQUEST, on_leaving=notices.append)
    with trio.fail_after(5):
        await call.send()
        assert parse_message(await FrameReader(node).read_frame()) == REQUEST
        before = call.last_frame_at
        await send(node, STATUS, TokenChunk(RID, [1, 2], "ab"), Leaving(3.0), STATUS, TokenChunk(RID, [3], "c"),
                   Final(RID, "length", 2, 3, b"receipt"))
        got = [await call.next() for _ in range(3)]
    assert got == [TokenChunk(RID, [1, 2], "ab"), TokenChunk(RID, [3], "c"), Final(RID, "length", 2, 3, b"receipt")]
    assert call.final == got[-1]
    assert notices == [Leaving(3.0)] and call.node_leaving == Leaving(3.0)
    assert call.last_frame_at >= before


async def test_chunks_end_at_the_final_frame():
    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    with trio.fail_after(5):
        await send(node, TokenChunk(RID, [1], "a"), TokenChunk(RID, [2], "b"), Final(RID, "stop", 2, 2, b"r"))
        ids = [t for chunk in [c async for c in call.chunks()] for t in chunk.ids]
    assert ids == [1, 2] and call.final.finish_reason == "stop"


async def test_next_is_cancel_safe_mid_frame():
    """A read cut off halfway through a frame loses nothing: the relay relies on this when the
    view interrupts a read and it reads on."""
    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    frame = encode_frame(to_wire(TokenChunk(RID, [7, 8, 9], "xyz")))
    with trio.fail_after(5):
        await node.write(frame[:5])
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call.next)
                await trio.testing.wait_all_tasks_blocked()  # the reader holds half a frame
                scope.cancel()
        await node.write(frame[5:])
        assert await call.next() == TokenChunk(RID, [7, 8, 9], "xyz")


@pytest.mark.parametrize("frames, error, match", [
    ([TokenChunk("req-someone-else", [1], "a")], ProtocolError, "tok frame for another request"),
    ([Final("req-someone-else", "stop", 1, 1, b"r")], ProtocolError, "fin frame for another request"),
    ([StatusQuery()], ProtocolError, "unexpected 'status\\?' frame"),
    ([Error("busy", "full", RID, retry_after=2.0)], NodeError, "busy: full"),
])
async def test_next_refuses_what_a_generation_cannot_contain(frames, error, match):
    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    with trio.fail_after(5):
        await send(node, *frames)
        with pytest.raises(error, match=match) as e:
            await call.next()
    if error is NodeError:
        assert e.value.code == "busy" and e.value.error.retry_after == 2.0


async def test_stream_ends_and_breaks():
    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    with trio.fail_after(5):
        await send(node, TokenChunk(RID, [1], "a"))
        await node.close()
        await call.next()
        with pytest.raises(StreamBroken) as closed:
            await call.next()
    assert closed.value.clean

    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    with trio.fail_after(5):
        await node.write(encode_frame(to_wire(TokenChunk(RID, [1], "a")))[:6])
        await node.close()
        with pytest.raises(MalformedFrame):  # cut inside a frame: not a clean end
            await call.next()

    class Broken(Pipe):
        async def read(self, n: int) -> bytes:
            raise StreamClosed("stream reset by peer")

    call = NodeCall(Broken(None), REQUEST)
    with pytest.raises(StreamBroken) as reset:
        await call.next()
    assert not reset.value.clean and isinstance(reset.value.__cause__, StreamClosed)


async def test_stop_cancels_then_closes():
    ours, node = pair()
    call = NodeCall(ours, REQUEST)
    with trio.fail_after(5):
        await call.stop(timeout=2.0)
        reader = FrameReader(node)
        assert parse_message(await reader.read_frame()) == Cancel(RID)
        assert await reader.read_frame() is None


async def test_read_status_reports_leaving_and_returns_the_reply():
    ours, node = pair()
    notices = []
    with trio.fail_after(5):
        await send(node, Leaving(1.0), TokenChunk(RID, [1], "a"), STATUS)
        assert await read_status(FrameReader(ours), on_leaving=notices.append) == STATUS
        assert notices == [Leaving(1.0)]

        await send(node, Error("internal", "oops"))
        with pytest.raises(NodeError):
            await read_status(FrameReader(ours))
        await node.write(encode_frame({"t": "status", "v": PROTOCOL_VERSION}))
        with pytest.raises(InvalidMessage):
            await read_status(FrameReader(ours))
        await node.close()
        with pytest.raises(StreamBroken):
            await read_status(FrameReader(ours))


async def test_query_status_asks_then_reads():
    ours, node = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def answer() -> None:
                assert parse_message(await FrameReader(node).read_frame()) == StatusQuery()
                await send(node, Leaving(1.0), STATUS)
            nursery.start_soon(answer)
            assert await query_status(ours) == STATUS


class OneStreamHost:
    def __init__(self, stream):
        self.stream = stream
        self.dialled = []

    async def open_stream(self, peer_id, protocol, addrs=None, *, timeout=5.0):
        self.dialled.append((peer_id, protocol, addrs, timeout))
        return self.stream


async def test_open_call_dials_and_sends_the_request():
    ours, node = pair()
    host = OneStreamHost(ours)
    with trio.fail_after(5):
        call = await open_call(host, "peer-a", ["/ip4/127.0.0.1/tcp/1"], REQUEST, timeout=3.0)
        assert parse_message(await FrameReader(node).read_frame()) == REQUEST
    assert host.dialled == [("peer-a", "/mesh/infer/1", ["/ip4/127.0.0.1/tcp/1"], 3.0)] and call.request == REQUEST


async def test_open_call_resets_a_stream_it_could_not_send_on():
    class Unwritable(Pipe):
        async def write(self, data: bytes) -> None:
            raise StreamClosed("write failed")

    stream = Unwritable(trio.testing.memory_stream_pair()[0])
    with trio.fail_after(5), pytest.raises(StreamClosed):
        await open_call(OneStreamHost(stream), "peer-a", None, REQUEST)
    assert stream.resets == 1


async def test_timed_generation_counts_tokens_and_times_the_first():
    ours, node = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            async def scripted_node() -> None:
                assert parse_message(await FrameReader(node).read_frame()) == REQUEST
                await send(node, TokenChunk(RID, [1, 2], "ab"), TokenChunk(RID, [3], "c"), Final(RID, "length", 2, 3, b"r"))

            n.start_soon(scripted_node)
            ttft, after, tokens = await timed_generation(OneStreamHost(ours), "peer-a", None, REQUEST)
    assert tokens == 3 and ttft >= 0 and after >= 0


async def test_timed_generation_without_a_token_is_an_error():
    ours, node = pair()
    with trio.fail_after(5), pytest.raises(RuntimeError, match="no final frame or no token"):
        await send(node, Final(RID, "stop", 2, 0, b"r"))  # buffered: read after the request went out
        await timed_generation(OneStreamHost(ours), "peer-a", None, REQUEST)
