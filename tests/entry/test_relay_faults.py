"""Backend failover and settlement against in-process nodes with injected faults.

Real NodeServices on real llama.cpp (the endless random model), reached through a fake host;
a fault sits between entry and node and strikes at an exact token, so every path is
deterministic and fast."""

from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing, asynccontextmanager

import pytest
import trio

from entry.backend import GenerationSpec, InvalidGeneration, MeshUnavailable, TokenEvent, UnknownModel
from entry.mesh.relay import MeshBackend, MeshBackendConfig, build_request, open_mesh_backend
from entry.mesh.view import REPUTATION_NEUTRAL, MeshView, NodeState
from protocol.identity import Identity
from protocol.messages import Final
from protocol.records import CapacityAdvert, WorkReceipt, token_digest
from tests.support.endless_model import write_endless_llama
from tests.support.mesh_fakes import FakeHost, add_node, faulty
from tests.support.mesh_nodes import collect, completion_spec
from tests.support.node_harness import make_service
from transport.host import open_mesh_host

N = 120
PROMPT = "Once upon a time"
CONFIG = MeshBackendConfig(first_token_timeout=10.0, token_timeout=0.5, admission_wait=0.3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_endless_llama(tmp_path_factory.mktemp("endless") / "tiny.gguf")


@asynccontextmanager
async def mesh(config: MeshBackendConfig = CONFIG):
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery)
        view = MeshView(host)
        yield nursery, host, view, MeshBackend(host, view, config=config)
        nursery.cancel_scope.cancel()


async def reference(model, spec: GenerationSpec) -> list[int]:
    async with mesh() as (nursery, host, view, backend):
        add_node(host, view, make_service(model))
        ids, _, done = await collect(backend, spec)
        assert done.failovers == 0
        return ids


@pytest.mark.parametrize("mode", ["die", "silent", "error", "extra"])
async def test_failure_mid_stream_continues_on_another_node(model, mode):
    expected = await reference(model, completion_spec("tiny", PROMPT, N))
    async with mesh() as (nursery, host, view, backend):
        bad = add_node(host, view, make_service(model), None)
        host.handlers[bad.peer_id] = faulty(make_service(model), nursery, mode, after=5)
        good = add_node(host, view, make_service(model))
        bad.reputation, good.reputation = 0.9, 0.5  # the faulty one is picked first

        started = time.monotonic()
        ids, _, done = await collect(backend, completion_spec("tiny", PROMPT, N))
        assert ids == expected
        assert done.failovers == 1 and done.completion_tokens == N and done.finish_reason == "length"
        assert [p.pseudonym for p in done.served_by] == [bad.pseudonym, good.pseudonym]
        first = N if mode == "extra" else 5
        assert [p.completion_tokens for p in done.served_by] == [first, N - first]
        assert host.opened == [bad.peer_id, good.peer_id]
        # Out of routing for a cooldown that began at the failure (checked by its end, not by
        # the clock now: on a loaded machine a short cooldown may be over by this line).
        assert bad.total_failures == 1 and bad.reputation < 0.9 and bad.cooldown_until > started
        [receipt] = backend.receipts
        assert (receipt.peer_id, receipt.completion_tokens) == (good.peer_id, N - first)


@pytest.mark.parametrize("mode", ["busy", "leaving", "internal"])
async def test_refusal_before_any_token_goes_to_another_node(model, mode):
    async with mesh() as (nursery, host, view, backend):
        bad = add_node(host, view, make_service(model))
        host.handlers[bad.peer_id] = faulty(make_service(model), nursery, mode)
        good = add_node(host, view, make_service(model))
        bad.reputation = 0.9
        ids, _, done = await collect(backend, completion_spec("tiny", PROMPT, 16))
        assert len(ids) == 16 and [p.pseudonym for p in done.served_by] == [good.pseudonym]
        if mode == "busy":  # not its fault: held back briefly, not blamed
            assert done.failovers == 0 and bad.failures == 0 and bad.reputation == 0.9
            assert bad.cooldown_until > time.monotonic()
        elif mode == "leaving":
            assert done.failovers == 0 and bad.leaving and not bad.live()
        else:
            assert done.failovers == 1 and bad.failures == 1


async def test_invalid_request_is_not_retried(model):
    async with mesh() as (nursery, host, view, backend):
        a, b = add_node(host, view, make_service(model)), add_node(host, view, make_service(model))
        # The nodes' context is 512 tokens; byte-level tokens make this prompt far longer.
        with pytest.raises(InvalidGeneration) as err:
            await collect(backend, completion_spec("tiny", "x" * 2000, 8))
        assert err.value.code == "context_length_exceeded"
        assert len(host.opened) == 1  # one node said no; the request itself is at fault
        assert a.failures == b.failures == 0
        assert backend.metrics()["mesh_requests_failed_total"] == 1


async def test_no_node_left_to_continue_raises_mid_stream(model):
    async with mesh() as (nursery, host, view, backend):
        bad = add_node(host, view, make_service(model))
        host.handlers[bad.peer_id] = faulty(make_service(model), nursery, "die", after=5)
        got = []
        with pytest.raises(MeshUnavailable):
            async with aclosing(backend.generate(completion_spec("tiny", PROMPT, N))) as events:
                async for ev in events:
                    got += ev.ids
        assert len(got) == 5


async def test_unreachable_node_is_skipped(model):
    async with mesh() as (nursery, host, view, backend):
        gone = add_node(host, view, make_service(model))
        del host.handlers[gone.peer_id]
        good = add_node(host, view, make_service(model))
        gone.reputation = 0.9
        _, _, done = await collect(backend, completion_spec("tiny", PROMPT, 8))
        assert [p.pseudonym for p in done.served_by] == [good.pseudonym] and done.failovers == 0
        assert not gone.routable(time.monotonic()) and not gone.connected


async def test_bad_receipt_costs_the_node_not_the_user(model):
    async with mesh() as (nursery, host, view, backend):
        # The view believes this node is another peer: its receipts are signed by "someone else".
        impostor = add_node(host, view, make_service(model), peer_id=Identity.generate().peer_id)
        ids, _, done = await collect(backend, completion_spec("tiny", PROMPT, 16))
        assert len(ids) == 16 and done.completion_tokens == 16
        assert list(backend.receipts) == [] and backend.counters.receipts_rejected == 1
        assert impostor.reputation < 0.5 and impostor.failures == 1


async def test_sampling_without_seed_gets_one_and_failover_reproduces_it(model):
    seen: list = []
    spec = completion_spec("tiny", PROMPT, N, temperature=0.9)
    async with mesh() as (nursery, host, view, backend):
        bad = add_node(host, view, make_service(model))
        host.handlers[bad.peer_id] = faulty(make_service(model), nursery, "die", after=7, seen=seen)
        add_node(host, view, make_service(model))
        bad.reputation = 0.9
        ids, _, done = await collect(backend, spec)
        assert done.failovers == 1
    seed = seen[0]["params"]["seed"]
    assert isinstance(seed, int)
    assert ids == await reference(model, completion_spec("tiny", PROMPT, N, temperature=0.9, seed=seed))


async def test_slots_are_never_oversubscribed_and_a_request_waits_for_one(model):
    config = MeshBackendConfig(admission_wait=10.0)
    async with mesh(config) as (nursery, host, view, backend):
        node = add_node(host, view, make_service(model))
        peak = 0

        async def one() -> None:
            nonlocal peak

            async def watch(ev, ids) -> None:
                nonlocal peak
                peak = max(peak, node.in_flight)

            await collect(backend, completion_spec("tiny", PROMPT, 40), watch)

        async with trio.open_nursery() as inner:
            for _ in range(3):
                inner.start_soon(one)
        assert peak == 1 and node.in_flight == 0 and node.served == 3


async def test_closing_the_stream_early_cancels_on_the_node(model):
    async with mesh() as (nursery, host, view, backend):
        service = make_service(model)
        node = add_node(host, view, service)
        async with aclosing(backend.generate(completion_spec("tiny", PROMPT, 400))) as events:
            first = await events.__anext__()
            assert isinstance(first, TokenEvent)
        assert node.in_flight == 0
        with trio.fail_after(10):
            while service.admission.free != 1 or service.stats.requests_failed != 1:
                await trio.sleep(0.01)
        assert service.stats.tokens_served < 400


async def test_empty_mesh_and_errors_pass_through_unwrapped():
    async with open_mesh_host(Identity.generate()) as host:
        with pytest.raises(KeyError):  # not an ExceptionGroup around it
            async with open_mesh_backend(host) as backend:
                assert backend.models() == [] and backend.nodes_view() == []
                assert backend.metrics()["mesh_nodes_known"] == 0
                with pytest.raises(UnknownModel):
                    await collect(backend, completion_spec("anything", PROMPT, 4))
                raise KeyError("the caller's own error")


async def test_hung_node_is_abandoned_when_its_status_stream_is_lost(model):
    """The view noticed the node stopped answering status: our silent stream is given up at
    once instead of after the token timeout."""
    config = MeshBackendConfig(first_token_timeout=30.0, token_timeout=30.0)
    async with mesh(config) as (nursery, host, view, backend):
        bad = add_node(host, view, make_service(model))
        host.handlers[bad.peer_id] = faulty(make_service(model), nursery, "silent", after=5)
        add_node(host, view, make_service(model))
        bad.reputation = 0.9
        delivered: list[int] = []

        async def status_watcher_gives_up() -> None:
            while len(delivered) < 5:
                await trio.sleep(0.01)
            await trio.sleep(1.2)  # silent for longer than HUNG_AFTER_S
            view.interrupt(bad)

        async def track(ev, ids) -> None:
            delivered[:] = ids

        nursery.start_soon(status_watcher_gives_up)
        with trio.fail_after(10):  # far below the 30 s token timeout
            ids, _, done = await collect(backend, completion_spec("tiny", PROMPT, N), track)
        assert done.failovers == 1 and len(ids) == N and done.served_by[0].completion_tokens == 5


async def test_lost_status_stream_does_not_abandon_a_node_that_still_streams(model):
    async with mesh() as (nursery, host, view, backend):
        node = add_node(host, view, make_service(model))
        hits = 0

        async def flap() -> None:
            nonlocal hits
            for _ in range(50):
                await trio.sleep(0.003)
                hits += len(node.interrupts)  # reads in progress that this interrupts
                view.interrupt(node)

        nursery.start_soon(flap)
        ids, _, done = await collect(backend, completion_spec("tiny", "Hello", 400))
        assert len(ids) == 400 and done.failovers == 0 and hits > 0


async def test_accept_receipt_is_the_one_check_for_generations_and_probes():
    """MeshBackend.accept_receipt (the relay's settlement and the canary's both) accepts a
    matching receipt once and counts it; a replay or a mismatch is refused at the node's
    cost. What a served generation earns beyond the receipt (served count, the on_receipt
    hook, the receipts list) stays with the relay, so a probe does not touch it."""
    async with mesh() as (nursery, host, view, backend):
        ident = Identity.generate()
        now = time.time()
        adv = CapacityAdvert(node=ident.peer_id, model_sha256="ab" * 32, model_name="m", quantization="F32",
                             context_size=512, prefill_tps=0.0, decode_tps=0.0, total_slots=1, free_slots=1, seq=1,
                             issued_at=now, expires_at=now + 3600)
        node = view.track(NodeState(ident.peer_id, view.pseudonym(ident.peer_id), adv))
        hooked = []
        backend.on_receipt = hooked.append
        request = build_request(completion_spec("m", PROMPT, 8), adv.model_sha256)
        ids = [5, 6, 7]
        blob = WorkReceipt(request.request_id, adv.model_sha256, 4, len(ids), token_digest(ids), ident.peer_id,
                           host.peer_id, now).sign(ident)
        final = Final(request.request_id, "stop", 4, len(ids), blob)

        accepted = backend.accept_receipt(node, request, ids, final, canary=True)
        assert (accepted.peer_id, accepted.pseudonym, accepted.completion_tokens, accepted.blob) == (
            ident.peer_id, node.pseudonym, 3, blob)
        assert backend.counters.receipts_accepted == 1 and node.reputation == REPUTATION_NEUTRAL
        assert hooked == [] and list(backend.receipts) == [] and node.served == 0

        assert backend.accept_receipt(node, request, ids, final) is None  # the same receipt again
        assert backend.accept_receipt(node, dataclasses.replace(request, request_id="req-other-0001"), ids, final) is None
        assert backend.counters.receipts_rejected == 2 and node.failures == 2 and node.reputation < REPUTATION_NEUTRAL


async def test_select_model_tells_unknown_from_unavailable_and_generate_does_not_ask_again(model):
    async with mesh() as (nursery, host, view, backend):
        node = add_node(host, view, make_service(model))
        entry = backend.select_model("tiny")
        assert entry.sha256 == node.model_sha256
        with pytest.raises(UnknownModel):
            backend.select_model("no-such-model")

        def no_second_choice(name):
            raise AssertionError("generate chose the model again")

        backend.select_model = no_second_choice
        async with aclosing(backend.generate(completion_spec("tiny", PROMPT, 4), entry)) as events:
            done = [ev async for ev in events][-1]
        assert done.completion_tokens == 4
        del backend.select_model

        node.connected = False  # its status stream is gone: known, but nobody serves it now
        with pytest.raises(MeshUnavailable):
            backend.select_model("tiny")
