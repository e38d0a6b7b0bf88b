"""Failover with the real SmolLM2: kill -9 of the serving node mid-stream, twice, and the
output still equals an uninterrupted greedy run token for token. Prints the failover gap
(kill -> next token delivered) and how fast a new node becomes routable."""

from __future__ import annotations

import signal
import time

import pytest

from engine.model_file import inspect_model
from tests.support.mesh_nodes import FAST, collect, completion_spec, direct, entry_with_nodes, routable, serving_node, wait_for
from tests.support.node_procs import start_node

PROMPT = "1, 2, 3, 4, 5, 6,"  # counting never reaches end-of-text: a long generation
N = 200


def _killer(backend, nodes, after_tokens: int, record: dict):
    async def on_token(ev, ids):
        if "at" not in record and len(ids) >= after_tokens:
            victim = serving_node(backend, nodes)
            record.update(node=victim, at=time.monotonic(), tokens=len(ids))
            victim.signal(signal.SIGKILL)
        elif "at" in record and "gap" not in record and len(ids) > record["tokens"]:
            record["gap"] = time.monotonic() - record["at"]
    return on_token


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_smollm2_kill_9_mid_stream_equals_uninterrupted_greedy(tmp_path, smollm2_path):
    sha = inspect_model(smollm2_path).sha256
    model_id = smollm2_path.name.removesuffix(".gguf")
    async with entry_with_nodes(tmp_path, smollm2_path) as (host, backend, nodes):
        await wait_for(lambda: all(routable(backend, n) for n in nodes), 30, "both nodes routable")
        reference, ref_text, ref_done = await collect(backend, completion_spec(model_id, PROMPT, N))
        assert len(reference) == N and ref_done.failovers == 0
        assert reference == await direct(host, nodes[0], sha, PROMPT, N)

        early: dict = {}
        ids, text, done = await collect(backend, completion_spec(model_id, PROMPT, N), _killer(backend, nodes, 1, early))
        assert ids == reference and text == ref_text
        assert done.failovers == 1 and len(done.served_by) == 2 and done.completion_tokens == N

        # A replacement node (still two llama.cpp processes at most).
        t0 = time.monotonic()
        fresh = await start_node(tmp_path, "n3", "--bootstrap", host.listen_addrs[0], *FAST)
        nodes.append(fresh)
        ready = time.monotonic() - t0
        to_routable = await wait_for(lambda: routable(backend, fresh), 30, "replacement routable")
        survivors = [n for n in nodes if n.proc.poll() is None]
        assert len(survivors) == 2

        late: dict = {}
        ids, text, done = await collect(backend, completion_spec(model_id, PROMPT, N), _killer(backend, survivors, 100, late))
        assert ids == reference and text == ref_text
        assert done.failovers == 1 and [p.completion_tokens for p in done.served_by][0] >= 100

        print(f"\nSmolLM2 failover gap (kill -> next token): {early['gap'] * 1000:.0f} ms after {early['tokens']} token(s), "
              f"{late['gap'] * 1000:.0f} ms after {late['tokens']} tokens (the new node replays them one by one)"
              f"\nnew node: process ready in {ready:.2f}s, routable {to_routable:.2f}s later"
              f"\nspeed seen by the entry: {', '.join(p.description for p in done.served_by)}")
