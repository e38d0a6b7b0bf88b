"""The entry's mesh side against real node processes over real libp2p.

The nodes serve tests/support/endless_model.py's random model: it never ends on its own and
decodes a few hundred tokens/s on one thread, so a long generation lasts seconds and a node
killed (or stopped) at the first token is reliably mid-stream, without timing luck.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import aclosing

import pytest
import trio

from engine.model_file import inspect_model
from entry.backend import MeshUnavailable, TokenEvent, UnknownModel
from entry.mesh.relay import MeshBackendConfig
from tests.support.endless_model import write_endless_llama
from tests.support.mesh_nodes import (
    collect,
    completion_spec,
    direct,
    entry_with_nodes,
    known,
    node_status,
    node_stop,
    routable,
    serving_node,
    wait_for,
)

MODEL_ID = "endless"  # nodes name a model after its file
PROMPT = "Once upon a time"
LONG = 1000  # tokens: over a second of decoding on one thread, ms after the first token a kill lands
CTX = ("--ctx", "4096", "--max-tokens", "4000")


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    path = write_endless_llama(tmp_path_factory.mktemp("endless") / f"{MODEL_ID}.gguf")
    return path, inspect_model(path).sha256


async def test_two_nodes_discovered_listed_and_generation_matches_the_node(tmp_path, endless):
    model, sha = endless
    seen = []
    t0 = time.monotonic()
    async with entry_with_nodes(tmp_path, model, node_args=CTX) as (host, backend, nodes):
        backend.on_receipt = seen.append
        started = time.monotonic() - t0
        became = await wait_for(lambda: all(routable(backend, n) for n in nodes), 20, "both nodes routable")
        print(f"\nnodes ready in {started:.2f}s, routable {became:.2f}s later")

        [m] = backend.models()
        assert (m.id, m.sha256, m.nodes, m.quantization, m.context_size) == (MODEL_ID, sha, 2, "F32", 4096)
        assert m.created > 0
        assert backend.resolve_model(sha) == m and backend.resolve_model(f"{MODEL_ID}@{sha[:12]}") == m
        assert backend.metrics()[f'mesh_nodes{{model="{MODEL_ID}"}}'] == 2

        view = backend.nodes_view()
        assert len(view) == 2 and {v["state"] for v in view} == {"ready"}
        shown = json.dumps(view) + json.dumps(backend.metrics()) + repr(backend.models())
        for n in nodes:  # nothing user-facing names a node's peer id or address
            assert n.peer_id not in shown
            for addr in n.addrs:
                assert addr not in shown and addr.split("/")[4] not in shown

        ids, text, done = await collect(backend, completion_spec(MODEL_ID, PROMPT, 64))
        assert ids == await direct(host, nodes[0], sha, PROMPT, 64)
        assert (done.finish_reason, done.completion_tokens, done.failovers) == ("length", 64, 0)
        assert done.prompt_tokens > 0 and len(done.served_by) == 1
        part = done.served_by[0]
        assert part.completion_tokens == 64 and part.pseudonym in {v["node"] for v in view}
        assert part.description.startswith("endless F32")

        [receipt] = seen
        assert list(backend.receipts) == seen
        server = backend.view.by_pseudonym(part.pseudonym)
        assert (receipt.peer_id, receipt.completion_tokens, receipt.model_sha256) == (server.peer_id, 64, sha)
        assert receipt.receipt.entry == host.peer_id

        # Two at once: each node has one slot, so they must land on different nodes.
        results = []

        async def one() -> None:
            results.append(await collect(backend, completion_spec(MODEL_ID, PROMPT, 400)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        (a, _, da), (b, _, db) = results
        assert a == b and len(a) == 400
        assert {da.served_by[0].pseudonym, db.served_by[0].pseudonym} == {v["node"] for v in view}


async def test_kill_9_of_the_serving_node_mid_stream_continues_on_the_other(tmp_path, endless):
    model, sha = endless
    async with entry_with_nodes(tmp_path, model, node_args=CTX) as (host, backend, nodes):
        await wait_for(lambda: all(routable(backend, n) for n in nodes), 20, "both nodes routable")
        reference, ref_text, ref_done = await collect(backend, completion_spec(MODEL_ID, PROMPT, LONG))
        assert len(reference) == LONG and ref_done.failovers == 0

        killed = {}

        async def kill_on_first_token(ev: TokenEvent, ids: list[int]) -> None:
            if not killed:
                victim = serving_node(backend, nodes)
                killed.update(node=victim, at=time.monotonic(), tokens=len(ids))
                victim.signal(signal.SIGKILL)
            elif "gap" not in killed and len(ids) > killed["tokens"]:
                killed["gap"] = time.monotonic() - killed["at"]

        ids, text, done = await collect(backend, completion_spec(MODEL_ID, PROMPT, LONG), kill_on_first_token)
        assert ids == reference and text == ref_text
        assert done.failovers == 1 and done.completion_tokens == LONG and done.finish_reason == "length"
        first, second = done.served_by
        assert first.pseudonym == backend.view.pseudonym(killed["node"].peer_id)
        assert first.pseudonym != second.pseudonym
        assert first.completion_tokens + second.completion_tokens == LONG and first.completion_tokens >= killed["tokens"]
        # Only the survivor finished, so only it has a receipt for this request, over its share.
        assert backend.receipts[-1].completion_tokens == second.completion_tokens
        assert backend.metrics()["mesh_failovers_total"] == 1

        st = backend.view.node(killed["node"].peer_id)
        assert st is None or not st.routable(time.monotonic())
        print(f"\nfailover gap (kill -> next token): {killed['gap'] * 1000:.0f} ms")


async def test_graceful_stop_leaves_routing_at_once_and_finishes_in_flight(tmp_path, endless):
    model, sha = endless
    async with entry_with_nodes(tmp_path, model, node_args=CTX) as (host, backend, nodes):
        await wait_for(lambda: all(routable(backend, n) for n in nodes), 20, "both nodes routable")
        reference = await direct(host, nodes[1], sha, PROMPT, LONG)
        stopped = {}

        async def stop_on_first_token(ev: TokenEvent, ids: list[int]) -> None:
            if not stopped:
                victim = serving_node(backend, nodes)
                stopped["node"] = victim
                await trio.to_thread.run_sync(node_stop, victim)
                stopped["left_routing_s"] = await wait_for(lambda: not routable(backend, victim), 5, "draining node out of routing")
                # New work goes elsewhere while the drain goes on.
                _, _, other = await collect(backend, completion_spec(MODEL_ID, PROMPT, 8))
                stopped["other"] = other

        ids, _, done = await collect(backend, completion_spec(MODEL_ID, PROMPT, LONG), stop_on_first_token)
        assert ids == reference
        assert done.failovers == 0 and [p.pseudonym for p in done.served_by] == [backend.view.pseudonym(stopped["node"].peer_id)]
        assert stopped["other"].served_by[0].pseudonym != done.served_by[0].pseudonym
        assert await stopped["node"].wait_exit(30) == 0
        await wait_for(lambda: not any(v["state"] in ("ready", "busy") for v in backend.nodes_view()
                                       if v["node"] == done.served_by[0].pseudonym), 10, "stopped node out of the view")
        [m] = backend.models()
        assert m.nodes == 1
        print(f"\ngracefully stopping node left routing {stopped['left_routing_s'] * 1000:.0f} ms after `mesh node stop` returned")


async def test_busy_unknown_cancel_and_no_node(tmp_path, endless):
    model, sha = endless
    cfg = MeshBackendConfig(admission_wait=0.5)
    async with entry_with_nodes(tmp_path, model, ("n1",), node_args=CTX, config=cfg) as (host, backend, [node]):
        with pytest.raises(UnknownModel):
            async with aclosing(backend.generate(completion_spec("no-such-model", PROMPT, 4))) as events:
                async for _ in events:
                    pass
        await wait_for(lambda: routable(backend, node), 20, "node routable")

        # Its only slot is ours: a second request finds every node busy.
        async with aclosing(backend.generate(completion_spec(MODEL_ID, PROMPT, 3000))) as events:
            first = await events.__anext__()
            assert isinstance(first, TokenEvent) and first.ids
            t0 = time.monotonic()
            with pytest.raises(MeshUnavailable) as busy:
                await collect(backend, completion_spec(MODEL_ID, PROMPT, 4))
            assert "busy" in str(busy.value) and time.monotonic() - t0 < 5
        # Closing the iterator early told the node to cancel: its slot frees long before
        # the 3000 tokens would have been done.
        await wait_for(lambda: backend.view.node(node.peer_id).free_slots() == 1, 10, "slot freed in the view")
        status = await trio.to_thread.run_sync(node_status, node)
        assert status["active"] == 0 and status["requests_failed"] == 1
        assert status["tokens_served"] < 3000
        assert "requester went away" not in node.log()  # the cancel frame, not a vanished stream, stopped it
        _, _, done = await collect(backend, completion_spec(MODEL_ID, PROMPT, 4))
        assert done.completion_tokens == 4

        node.signal(signal.SIGKILL)
        left = await wait_for(lambda: not routable(backend, node), 10, "killed node out of routing")
        with pytest.raises(MeshUnavailable):  # the model is known, but nobody serves it now
            await collect(backend, completion_spec(MODEL_ID, PROMPT, 4))
        gone = await wait_for(lambda: not known(backend, node), 15, "killed node's advert expiring")
        assert backend.models() == []
        print(f"\nkilled idle node: out of routing in {left * 1000:.0f} ms, out of the view (advert expiry) {gone:.1f}s later")


async def test_hung_node_is_abandoned_once_it_stops_answering_status(tmp_path, endless):
    """SIGSTOP: the connection stays up but nothing comes back. The view's status stream
    notices within status_timeout (2 s here), long before the 30 s token timeout."""
    model, sha = endless
    cfg = MeshBackendConfig(token_timeout=30.0)
    async with entry_with_nodes(tmp_path, model, node_args=CTX, config=cfg) as (host, backend, nodes):
        await wait_for(lambda: all(routable(backend, n) for n in nodes), 20, "both nodes routable")
        reference = await direct(host, nodes[0], sha, PROMPT, LONG)
        frozen = {}

        async def freeze_on_first_token(ev: TokenEvent, ids: list[int]) -> None:
            if not frozen:
                frozen["node"] = victim = serving_node(backend, nodes)
                frozen.update(at=time.monotonic(), tokens=len(ids))
                victim.signal(signal.SIGSTOP)
            elif "gap" not in frozen and len(ids) > frozen["tokens"]:
                frozen["gap"] = time.monotonic() - frozen["at"]

        try:
            with trio.fail_after(25):
                ids, _, done = await collect(backend, completion_spec(MODEL_ID, PROMPT, LONG), freeze_on_first_token)
            assert ids == reference and done.failovers == 1 and len(done.served_by) == 2
            # Out of routing (its advert may even have expired by now: a stopped node stops
            # refreshing it), and marked down for failing us.
            [st] = [n for n in backend.view.all_nodes() if n.peer_id == frozen["node"].peer_id]
            assert not st.routable(time.monotonic()) and st.total_failures >= 1
            print(f"\nhung node (SIGSTOP): next token {frozen['gap']:.1f}s later, on the other node")
        finally:
            if frozen:
                frozen["node"].signal(signal.SIGCONT)
