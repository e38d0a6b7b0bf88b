"""The node's stream handler on real llama.cpp (tiny random model): every answer a requester can get."""

import pytest
import trio

from protocol.framing import FrameReader, FrameWriter
from protocol.messages import (
    ERR_BUSY,
    ERR_CANCELLED,
    ERR_INVALID,
    ERR_LEAVING,
    ERR_TOO_LONG,
    ERR_UNKNOWN_MODEL,
    Leaving,
    parse_message,
    to_wire,
)
from protocol.records import WorkReceipt
from tests.support.node_harness import ENTRY_ID, collect, connect, gated_service, make_service, request, wait_for
from transport.node_client import NodeCall, NodeError, query_status


@pytest.fixture
def service(tiny_gguf):
    return make_service(tiny_gguf)


async def test_status_answers(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        st = await query_status(s)
        assert (st.model_sha256, st.total_slots, st.free_slots, st.draining) == (service.model_sha256, 1, 1, False)
        await s.close()


async def test_completion_streams_tokens_and_signed_receipt(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service, max_tokens=20)
        ids, _, call = await collect(s, req)
        assert len(ids) == call.final.completion_tokens > 0
        r = WorkReceipt.verify(call.final.receipt, node=service.identity.peer_id, entry=ENTRY_ID, request_id=req.request_id,
                               model_sha256=service.model_sha256, tokens=ids, prompt_tokens=call.final.prompt_tokens)
        assert r.completion_tokens == len(ids)
        await s.close()
    assert service.stats.tokens_served == len(ids)


async def test_same_request_same_tokens_and_seeded_sampling(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        a, _, _ = await collect(s, request(service, max_tokens=24))
        b, _, _ = await collect(s, request(service, max_tokens=24))  # same stream, next request
        assert a == b
        c, _, fc = await collect(s, request(service, max_tokens=24, temperature=1.0, seed=7))
        d, _, _ = await collect(s, request(service, max_tokens=24, temperature=1.0, seed=7))
        assert c == d and fc.final.seed == 7
        await s.close()


async def test_continuation_equals_uninterrupted(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        full, _, _ = await collect(s, request(service, prompt="abc", max_tokens=30))
        for cut in (1, 7, 20):
            req = request(service, prompt="abc", max_tokens=30)
            req.continuation = full[:cut]
            rest, _, call = await collect(s, req)
            assert full[:cut] + rest == full
            assert call.final.completion_tokens == len(rest)  # the receipt covers only this node's work
        await s.close()


async def test_unknown_model_and_invalid_request(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service)
        req.model_sha256 = "00" * 32
        with pytest.raises(NodeError) as e:
            await collect(s, req)
        assert e.value.code == ERR_UNKNOWN_MODEL
        # The stream stays usable after a refused request.
        ids, _, _ = await collect(s, request(service, max_tokens=3))
        assert len(ids) == 3
        bad = to_wire(request(service))
        bad["params"]["temperature"] = "hot"
        await FrameWriter(s).write_frame(bad)
        err = parse_message(await FrameReader(s).read_frame())
        assert err.code == ERR_INVALID and "temperature" in err.message
        await s.close()


async def test_malformed_and_oversized_frames_get_an_error_and_close(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        await s.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # msgpack never uses 0xc1
        reader = FrameReader(s)
        err = parse_message(await reader.read_frame())
        assert err.code == ERR_INVALID
        assert await reader.read_frame() is None  # node closed the stream
        s2 = connect(n, service)
        await s2.write(b"\x7f\xff\xff\xff")  # announces a 2 GB frame
        err = parse_message(await FrameReader(s2).read_frame())
        assert err.code == ERR_INVALID
        s3 = connect(n, service)
        assert (await query_status(s3)).free_slots == 1  # the node is fine
        await s3.close()


async def test_prompt_too_long(tiny_gguf):
    service = make_service(tiny_gguf)
    async with trio.open_nursery() as n:
        s = connect(n, service)
        with pytest.raises(NodeError) as e:
            await collect(s, request(service, prompt="word " * 600))
        assert e.value.code == ERR_TOO_LONG
        await s.close()


async def test_busy_when_slots_and_queue_are_full(tiny_gguf):
    service = make_service(tiny_gguf, queue=0)
    async with trio.open_nursery() as n:
        s = connect(n, service)
        async with service.admission.slot():  # another request holds the only slot
            with pytest.raises(NodeError) as e:
                await collect(s, request(service))
            assert e.value.code == ERR_BUSY and e.value.error.retry_after > 0
        ids, _, _ = await collect(s, request(service, max_tokens=4))  # free again: served
        assert len(ids) == 4
        await s.close()


async def test_queue_serves_waiting_requests_in_turn(tiny_gguf):
    service = make_service(tiny_gguf, queue=2)
    async with trio.open_nursery() as n:
        outs = []

        async def one():
            s = connect(n, service)
            outs.append((await collect(s, request(service, max_tokens=50)))[0])
            await s.close()

        for _ in range(3):
            n.start_soon(one)
    assert len(outs) == 3 and outs[0] == outs[1] == outs[2]


async def test_a_peer_flooding_the_node_does_not_starve_another(tiny_gguf):
    """One peer opens more requests than slot + queue; a second peer still gets a queue place
    and the next slot, and the flooding peer's surplus is answered busy."""
    service, eng = gated_service(tiny_gguf, queue=3, pause_after=2)
    runs: list[str] = []  # requesting peer of each generation, in the order they started
    peer_of: dict[str, str] = {}
    engine_run = eng.run

    def recording_run(req, *, cancel=None):
        runs.append(peer_of[req.request_id])
        return engine_run(req, cancel=cancel)

    eng.run = recording_run
    outcomes: dict[str, list] = {"hog": [], "user": []}

    async def one(peer: str) -> None:
        s = connect(n, service, remote=peer)
        req = request(service, max_tokens=6)
        peer_of[req.request_id] = peer
        try:
            ids, _, _ = await collect(s, req)
            outcomes[peer].append(len(ids))
        except NodeError as e:
            outcomes[peer].append(e.code)
        await s.close()

    async def until(predicate) -> None:
        with trio.fail_after(30):
            while not predicate():
                await trio.sleep(0.005)

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one, "hog")
        await wait_for(eng.paused)  # one runs, three wait, the fifth was answered busy
        await until(lambda: service.admission.queued == 3 and outcomes["hog"] == [ERR_BUSY])
        n.start_soon(one, "user")
        await until(lambda: outcomes["user"] or len(outcomes["hog"]) == 2)
        assert outcomes["user"] == [] and service.admission.queued == 3  # the user waits in the queue
        eng.gate.set()
    assert runs[:2] == ["hog", "user"]
    assert outcomes["user"] == [6]
    assert sorted(outcomes["hog"], key=str) == sorted([6, 6, 6, ERR_BUSY, ERR_BUSY], key=str)


async def test_cancel_stops_generation(tiny_gguf):
    service, eng = gated_service(tiny_gguf, pause_after=5)
    async with trio.open_nursery() as n:
        s = connect(n, service)
        call = NodeCall(s, request(service, max_tokens=400))
        await call.send()
        got = 0
        with pytest.raises(NodeError) as e:
            async for chunk in call.chunks():
                got += len(chunk.ids)
                if got >= 5:
                    await call.cancel()
        assert e.value.code == ERR_CANCELLED
        assert got <= 6
        await s.close()
    assert service.admission.active == 0 and service.stats.tokens_served == got


async def test_requester_vanishing_frees_the_slot(tiny_gguf):
    service, eng = gated_service(tiny_gguf, pause_after=2)
    async with trio.open_nursery() as n:
        s = connect(n, service)
        call = NodeCall(s, request(service, max_tokens=400))
        await call.send()
        await wait_for(eng.paused)
        await s.close()  # vanish mid-stream
        with trio.fail_after(20):
            while service.admission.active:
                await trio.sleep(0.01)
    assert service.stats.requests_served == 0


async def test_draining_refuses_new_and_finishes_in_flight(tiny_gguf):
    service, eng = gated_service(tiny_gguf, pause_after=3)
    async with trio.open_nursery() as n:
        s1 = connect(n, service)
        call = NodeCall(s1, request(service, max_tokens=60))
        await call.send()
        await wait_for(eng.paused)
        await service.announce_leaving(10.0)
        s3 = connect(n, service)
        with pytest.raises(NodeError) as e:
            await collect(s3, request(service))
        assert e.value.code == ERR_LEAVING
        await s3.close()
        s2 = connect(n, service)
        st = await query_status(s2)
        assert st.draining and st.free_slots == 0
        await s2.close()
        eng.gate.set()
        total = 0
        async for c in call.chunks():
            total += len(c.ids)
        assert call.final is not None and total == call.final.completion_tokens > 3
        assert call.node_leaving == Leaving(10.0)
        await s1.close()


async def test_drain_deadline_cancels_with_leaving_error(tiny_gguf):
    service, eng = gated_service(tiny_gguf, pause_after=3)
    async with trio.open_nursery() as n:
        s = connect(n, service)
        call = NodeCall(s, request(service, max_tokens=60))
        await call.send()
        await wait_for(eng.paused)
        await service.announce_leaving(0.0)
        service.cancel_all()  # what the daemon does when the grace period is over
        with pytest.raises(NodeError) as e:
            async for _ in call.chunks():
                pass
        assert e.value.code == ERR_LEAVING
        await s.close()


async def test_logprob_alternatives_carry_each_tokens_own_bytes(service, tiny_gguf):
    """The entry has no tokenizer: every alternative and every chosen token comes with the
    bytes the node's tokenizer renders it as."""
    from engine.llama import Engine

    chunks = []
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service, max_tokens=6)
        req.logprobs, req.top_logprobs = True, 3
        call = NodeCall(s, req)
        await call.send()
        async for chunk in call.chunks():
            chunks.append(chunk)
        await s.close()
    tok = Engine(tiny_gguf, n_ctx=64, n_threads=1)
    seen = 0
    for chunk in chunks:
        assert len(chunk.token_bytes) == len(chunk.ids) == len(chunk.top_logprobs)
        for tid, raw, alts in zip(chunk.ids, chunk.token_bytes, chunk.top_logprobs):
            assert raw == tok.token_bytes(tid)
            assert len(alts) == 3
            for aid, _lp, araw in alts:
                assert araw == tok.token_bytes(aid)
                seen += 1
    assert seen == 18
    tok.close()


async def test_an_older_peers_request_gets_a_clean_refusal(service):
    from protocol import PROTOCOL_VERSION

    async with trio.open_nursery() as n:
        s = connect(n, service)
        old = {**to_wire(request(service)), "v": PROTOCOL_VERSION - 1}
        await FrameWriter(s).write_frame(old)
        err = parse_message(await FrameReader(s).read_frame())
        assert err.code == ERR_INVALID and f"protocol version {PROTOCOL_VERSION - 1} is not supported" in err.message
        await s.close()
