"""What requesters' unfinished frames may cost a node: a frame limit from its context, one byte
budget shared by all streams, and a deadline for finishing a frame once begun.

The node runs the tiny model behind in-memory streams; bytes are counted in the node's budget
object, not in process memory.
"""

import struct

import pytest
import trio

from node.config import NodeConfig
from node.service import buffer_budget, request_frame_limit
from protocol.framing import FrameReader, encode_frame
from protocol.messages import ERR_BUSY, ERR_INVALID, ERR_TOO_LONG, StatusQuery, parse_message, to_wire
from tests.support.node_harness import collect, connect, make_service, request
from transport.node_client import query_status


@pytest.fixture
def service(tiny_gguf):
    return make_service(tiny_gguf)  # a 512-token context


async def until(predicate, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.005)


async def reply_of(stream) -> dict | None:
    """The node's next frame on a stream, or None when it ended the stream."""
    return await FrameReader(stream).read_frame()


def test_buffer_setting_is_checked():
    NodeConfig(buffer_mb=1).validate()
    with pytest.raises(ValueError, match="--buffer-mb"):
        NodeConfig(buffer_mb=0).validate()
    budget = buffer_budget(64 << 20)
    assert (budget.limit, budget.reserve) == (64 << 20, 8 << 20)


def test_request_frame_limit_follows_the_context():
    assert request_frame_limit(512) == 64 * 1024 + 512 * 72
    assert request_frame_limit(2048) == 64 * 1024 + 2048 * 72  # 206 KiB at the default context
    assert request_frame_limit(1 << 20) == 1 << 20  # never above the protocol's limit


async def test_stalled_partial_frames_stay_within_the_budget_and_requests_still_work(service):
    service.buffers = budget = buffer_budget(2 * 1024 * 1024)
    service.frame_stall_s = 120.0  # nobody times out during this test
    limit = service.request_frame_limit
    partial = struct.pack(">I", limit) + b"\x00" * (limit - 1000)  # a request frame, 1000 bytes short
    streams, outcomes = [], []
    async with trio.open_nursery() as n:

        async def stall() -> None:
            s = connect(n, service, remote=f"attacker-{len(streams)}")
            streams.append(s)
            await s.write(partial)
            frame = await reply_of(s)  # only a refused stream gets an answer
            outcomes.append(parse_message(frame).code if frame else None)

        for _ in range(40):
            n.start_soon(stall)
        # Settled: each stream is either refused or holds all it sent.
        await until(lambda: len(outcomes) + budget.used // len(partial) == 40 and budget.used % len(partial) == 0)
        assert budget.used <= budget.limit - budget.reserve
        assert outcomes == [ERR_BUSY] * (40 - budget.used // len(partial))
        assert budget.peak <= budget.limit

        # A requester with an ordinary request is still served meanwhile.
        s = connect(n, service, remote="user")
        ids, _, call = await collect(s, request(service, max_tokens=4))
        assert len(ids) == 4 and call.final is not None
        await s.close()

        for s in streams:  # the stalled streams end: their bytes go back
            await s.close()
        await until(lambda: budget.used == 0 and len(outcomes) == 40)
    assert budget.peak <= budget.limit


async def test_a_frame_begun_must_finish_in_time_but_a_stream_may_idle(service):
    service.frame_stall_s = 0.3
    async with trio.open_nursery() as n:
        idle = connect(n, service)
        stalled = connect(n, service)
        await stalled.write(struct.pack(">I", 5000) + b"\x00" * 3000)
        with trio.fail_after(10):
            err = parse_message(await reply_of(stalled))
        assert err.code == ERR_INVALID and "incomplete" in err.message
        await until(lambda: service.buffers.used == 0)
        # The idle stream outlived the deadline several times over and still works.
        await trio.sleep(1.0)
        st = await query_status(idle)
        assert st.total_slots == 1
        # So does a stream whose frames arrive in pieces, each frame within the deadline.
        slow = connect(n, service)
        data = encode_frame(to_wire(StatusQuery())) * 3
        for i in range(0, len(data), 5):
            await slow.write(data[i:i + 5])
            await trio.sleep(0.01)
        reader = FrameReader(slow)
        for _ in range(3):
            assert parse_message(await reader.read_frame()).total_slots == 1
        for s in (idle, slow):
            await s.close()


async def test_request_larger_than_the_context_can_take_is_refused_unread(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        await s.write(struct.pack(">I", service.request_frame_limit + 1))  # the body never comes
        with trio.fail_after(10):
            err = parse_message(await reply_of(s))
        assert err.code == ERR_TOO_LONG and "512-token context" in err.message
        assert service.buffers.used == 0
        ok = connect(n, service)
        ids, _, _ = await collect(ok, request(service, prompt="word " * 100, max_tokens=3))
        assert len(ids) == 3
        await ok.close()
