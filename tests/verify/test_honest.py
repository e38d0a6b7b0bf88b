"""Honest nodes are never flagged: two real SmolLM2 node processes with different thread
counts (1 and 2), greedy and sampled requests with assorted parameters, stop strings, a
failover split across both nodes; every request re-scored by the entry's own llama.cpp
(1 thread, one batched prefill: a different schedule than the nodes' one token at a time)."""

from __future__ import annotations

import random
import signal
import time

import pytest

from entry.mesh.view import PROBATION_PASSES, REINSTATE_AFTER
from entry.verify.canary import CanaryProber
from entry.verify.stats import HARD, SOFT
from tests.support.mesh_nodes import collect, completion_spec, routable, serving_node, wait_for
from tests.support.verify_support import verifying_entry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = ["The history of the printing press", "A recipe for tomato soup:", "Three reasons to learn to swim:",
           "Once upon a time in a small village,", "The main parts of a computer are", "Dear diary, today I",
           "Q: Why do cats purr?\nA:", "The best way to learn a language is"]
PARAMS = [dict(), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=0.8, top_k=40, repeat_penalty=1.1),
          dict(temperature=0.6, min_p=0.05, presence_penalty=0.5), dict(stop=["."]), dict(temperature=0.9, top_p=0.95, stop=["\n"])]


def _only(entry, node) -> None:
    """Route the next request to `node`: the other node sits out a blameless hold."""
    now = time.monotonic()
    for n in entry.nodes:
        st = entry.state(n)
        st.cooldown_until = 0.0 if n is node else now + 60.0


async def test_honest_nodes_with_1_and_2_threads_are_never_flagged(tmp_path, smollm2_path):
    model_id = smollm2_path.name.removesuffix(".gguf")
    rng = random.Random(7)
    async with verifying_entry(tmp_path, smollm2_path) as entry:
        n1 = await entry.add_node("t1", smollm2_path, threads=1)
        n2 = await entry.add_node("t2", smollm2_path, threads=2)
        await wait_for(lambda: routable(entry.backend, n1) and routable(entry.backend, n2), 30, "both routable")
        for i in range(20):
            _only(entry, (n1, n2)[i % 2])
            # A loaded machine can make a status answer late: wait for the node rather than fail.
            await wait_for(lambda: routable(entry.backend, (n1, n2)[i % 2]), 30, "target routable")
            spec = completion_spec(model_id, rng.choice(PROMPTS), rng.choice((16, 24, 32)), **rng.choice(PARAMS))
            await collect(entry.backend, spec)
            # One llama.cpp at work at a time: a 2-thread node next to the verifier would
            # oversubscribe two cores.
            assert await entry.verifier.wait_idle(60)
        # Canary probes (chat requests with their own shape) on both nodes too.
        prober = CanaryProber(entry.backend, entry.verifier, rng=rng)
        prober.config.max_tokens = (24,)
        for node in (n1, n2) * 2:
            _only(entry, node)
            assert await prober.probe(entry.state(node)) is not None
            assert await entry.verifier.wait_idle(60)

        verdicts = list(entry.verifier.verdicts)
        assert len(verdicts) == 24
        bad = [v for v in verdicts if not v.passed]
        assert not bad, bad
        per_node = {n.peer_id: sum(v.peer_id == n.peer_id for v in verdicts) for n in (n1, n2)}
        assert min(per_node.values()) == 12
        assert entry.ledger.node_totals(n1.peer_id)["withheld"].requests == 0
        worst = max(v.max_deviation for v in verdicts)
        print(f"\n24 honest verifications, worst per-token deviation {worst:.3f} (soft limit {SOFT}, hard {HARD})")
        for n in (n1, n2):
            st = entry.state(n)
            assert st.reputation > 0.5 and not st.demoted and st.verified == 12


async def test_failover_split_credits_and_verifies_each_node_for_its_own_tokens(tmp_path, smollm2_path):
    model_id = smollm2_path.name.removesuffix(".gguf")
    async with verifying_entry(tmp_path, smollm2_path) as entry:
        nodes = [await entry.add_node("a", smollm2_path), await entry.add_node("b", smollm2_path)]
        await wait_for(lambda: all(routable(entry.backend, n) for n in nodes), 30, "both routable")
        killed = {}

        async def kill_after_8(ev, ids):
            if not killed and len(ids) >= 8:
                victim = serving_node(entry.backend, nodes)
                killed.update(node=victim, at=len(ids))
                victim.signal(signal.SIGKILL)

        ids, _, done = await collect(entry.backend, completion_spec(model_id, "1, 2, 3, 4, 5,", 40, temperature=0.7, seed=3),
                                     kill_after_8)
        assert done.failovers == 1 and len(ids) == 40
        assert await entry.verifier.wait_idle(60)
        victim = killed["node"]
        survivor = next(n for n in nodes if n is not victim)
        a, b = entry.ledger.node_requests(victim.peer_id), entry.ledger.node_requests(survivor.peer_id)
        assert len(a) == len(b) == 1 and a[0]["request_id"] == b[0]["request_id"]
        assert a[0]["source"] == "relayed" and b[0]["source"] == "receipt"
        assert a[0]["tokens"] + b[0]["tokens"] == 40 and a[0]["tokens"] >= 8
        assert a[0]["verify"] == b[0]["verify"] == "passed"
        assert {v.peer_id for v in entry.verifier.verdicts if v.passed} == {victim.peer_id, survivor.peer_id}


async def test_a_demoted_honest_node_comes_back_through_probes_then_probation(tmp_path, smollm2_path):
    async with verifying_entry(tmp_path, smollm2_path) as entry:
        node = await entry.add_node("n", smollm2_path)
        await wait_for(lambda: routable(entry.backend, node), 30, "routable")
        st = entry.state(node)
        for _ in range(2):  # as if two checks had failed
            entry.backend.view.record_verdict(node.peer_id, st.model_sha256, False, "test")
        st.cooldown_until = 0.0
        assert st.model_sha256 in st.demoted and not st.routable(time.monotonic())
        prober = CanaryProber(entry.backend, entry.verifier, rng=random.Random(1))
        prober.config.max_tokens = (16,)
        assert prober.pick() is st  # demoted nodes are still probed
        for _ in range(REINSTATE_AFTER):
            st.cooldown_until = 0.0
            await prober.probe(st)
            assert await entry.verifier.wait_idle(60)
        # Probes put it on probation: user traffic again, every request checked...
        assert st.model_sha256 not in st.demoted and st.model_sha256 in st.probation
        assert st.routable(time.monotonic())
        model_id = smollm2_path.name.removesuffix(".gguf")
        for i in range(PROBATION_PASSES):
            await wait_for(lambda: routable(entry.backend, node), 30, "routable")
            await collect(entry.backend, completion_spec(model_id, f"{i}. The sea is", 12))
            assert await entry.verifier.wait_idle(60)
        # ...and passed checks of user requests end it.
        assert st.model_sha256 not in st.probation and st.routable(time.monotonic())
