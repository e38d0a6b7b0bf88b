"""Adversarial: real cheating node processes (tests/support/cheating_node.py) on real llama.cpp behind
a real libp2p entry that verifies with its own copy of SmolLM2. Every cheat is caught: its
credits are withheld or never booked, its reputation drops, and repeated output cheats get it
demoted (no more user traffic)."""

from __future__ import annotations

import time

import pytest

from engine.model_file import inspect_model
from tests.support.mesh_nodes import collect, completion_spec, routable, wait_for
from tests.support.tiny_model import write_tiny_llama
from tests.support.verify_support import verifying_entry
from tests.support.wrong_model import noised_copy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Here is a short story about a robot who learns to paint:"


def chat_spec(model: str, text: str, max_tokens: int, grammar: str = "", **params):
    from entry.backend import GenerationSpec
    from protocol.messages import ChatMessage, SamplingParams

    return GenerationSpec(model=model, kind="chat", params=SamplingParams(max_tokens=max_tokens, **params),
                          messages=[ChatMessage("user", text)], grammar=grammar)


@pytest.fixture(scope="module")
def noised_smollm2(tmp_path_factory, smollm2_path):
    # 2% of the FFN-down blocks of every layer: plausible text, not SmolLM2's.
    return noised_copy(smollm2_path, tmp_path_factory.mktemp("noised") / "noised.gguf", fraction=0.02, seed=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


async def _two_requests(entry, model_id: str):
    """One greedy completion and one sampled chat request, then wait for their checks."""
    out = [await collect(entry.backend, completion_spec(model_id, PROMPT, 24))]
    out.append(await collect(entry.backend, chat_spec(model_id, "Tell me about the sea.", 24, temperature=0.8, top_p=0.95)))
    assert await entry.verifier.wait_idle(60)
    return out


@pytest.mark.parametrize("cheat,model", [("wrong-model", "noised"), ("wrong-model", "tiny"), ("canned", "real"),
                                         ("truncate-stop", "real")])
async def test_output_cheats_are_caught_withheld_and_demoted(tmp_path, smollm2_path, noised_smollm2, tiny_model, cheat, model):
    path = {"noised": noised_smollm2, "tiny": tiny_model, "real": smollm2_path}[model]
    model_id = smollm2_path.name.removesuffix(".gguf")
    async with verifying_entry(tmp_path, smollm2_path) as entry:
        node = await entry.add_cheater("cheat", cheat, path, "--model-name", model_id, claim=smollm2_path)
        await wait_for(lambda: routable(entry.backend, node), 30, "cheater routable")
        assert entry.backend.models()[0].sha256 == inspect_model(smollm2_path).sha256  # it claims SmolLM2
        await _two_requests(entry, model_id)

        verdicts = [v for v in entry.verifier.verdicts if v.peer_id == node.peer_id]
        assert len(verdicts) == 2 and not any(v.passed for v in verdicts), verdicts
        totals = entry.ledger.node_totals(node.peer_id)
        assert totals["held"].credits == 0 and totals["vested"].credits == 0
        assert totals["withheld"].requests == 2
        st = entry.state(node)
        assert st.reputation < 0.2 and st.model_sha256 in st.demoted and not st.routable(time.monotonic())
        view = [n for n in entry.backend.nodes_view() if n["node"] == st.pseudonym][0]
        assert view["demoted"] and view["verify_failed"] == 2 and view["last_verdict"].startswith("failed")
        print(f"\n{cheat}/{model}: " + ", ".join(f"{v.reason} (max deviation {v.max_deviation})" for v in verdicts))


async def test_truncation_claiming_full_length_is_caught_without_the_model(tmp_path, smollm2_path):
    model_id = smollm2_path.name.removesuffix(".gguf")
    async with verifying_entry(tmp_path, smollm2_path, rate=0.0) as entry:  # structural check only
        entry.verifier.config.new_rate = entry.verifier.config.suspicious_rate = 0.0
        node = await entry.add_cheater("cheat", "truncate", smollm2_path)
        await wait_for(lambda: routable(entry.backend, node), 30, "cheater routable")
        ids, _, done = await collect(entry.backend, completion_spec(model_id, PROMPT, 40))
        assert len(ids) == 3 and done.finish_reason == "length"
        await entry.verifier.wait_idle(30)
        [v] = [v for v in entry.verifier.verdicts if v.peer_id == node.peer_id]
        assert not v.passed and v.reason == "truncated" and not v.rescored
        assert entry.ledger.node_totals(node.peer_id)["withheld"].tokens == 3


@pytest.mark.parametrize("cheat", ["inflate", "forge", "replay"])
async def test_receipt_cheats_book_nothing(tmp_path, smollm2_path, cheat):
    model_id = smollm2_path.name.removesuffix(".gguf")
    async with verifying_entry(tmp_path, smollm2_path, rate=0.0) as entry:
        entry.verifier.config.new_rate = 0.0
        node = await entry.add_cheater("cheat", cheat, smollm2_path)
        await wait_for(lambda: routable(entry.backend, node), 30, "cheater routable")
        for i in range(2):
            await collect(entry.backend, completion_spec(model_id, f"{i}: {PROMPT}", 8))
        c = entry.backend.counters
        rows = entry.ledger.node_requests(node.peer_id)
        if cheat == "replay":
            # Its first receipt was genuine and is booked once; the replayed copy books nothing.
            assert (c.receipts_accepted, c.receipts_rejected) == (1, 1) and len(rows) == 1
        else:
            assert (c.receipts_accepted, c.receipts_rejected) == (0, 2) and rows == []
        assert entry.state(node).reputation < 0.5


async def test_canary_probes_catch_a_cheater_without_any_user_traffic(tmp_path, smollm2_path, noised_smollm2):
    import random

    import trio

    from entry.verify.canary import CanaryConfig, CanaryProber

    async with verifying_entry(tmp_path, smollm2_path, rate=0.0) as entry:
        node = await entry.add_cheater("cheat", "wrong-model", noised_smollm2, claim=smollm2_path)
        await wait_for(lambda: routable(entry.backend, node), 30, "cheater routable")
        prober = CanaryProber(entry.backend, entry.verifier, CanaryConfig(interval=0.3, max_tokens=(24,)), random.Random(3))
        async with trio.open_nursery() as nursery:
            await nursery.start(prober.run)
            st = entry.state(node)
            await wait_for(lambda: st.model_sha256 in st.demoted, 90, "demotion by canaries")
            nursery.cancel_scope.cancel()
        canaries = [v for v in entry.verifier.verdicts if v.canary]
        # A lightly noised model can agree with the real one on a short probe now and then;
        # what matters is that failing probes demote it (above) and are the majority.
        failed = [v for v in canaries if not v.passed]
        assert len(failed) >= 2 and len(failed) > len(canaries) / 2
        assert await entry.verifier.wait_idle(60)
        rows = entry.ledger.node_requests(node.peer_id)
        # A probe that ends after the demotion is withheld as "demoted" whatever its check says
        # (a demoted node is not paid for the probes that test it); every other withheld
        # probe is one that failed its check, and every failed one is withheld.
        withheld = {r["request_id"] for r in rows if r["state"] == "withheld" and r["reason"] != "demoted"}
        failed_ids = {v.request_id for v in entry.verifier.verdicts if v.canary and not v.passed}
        demoted_ids = {r["request_id"] for r in rows if r["reason"] == "demoted"}
        assert failed_ids - demoted_ids == withheld - demoted_ids and failed_ids <= withheld | demoted_ids


@pytest.mark.parametrize("cheat", ["ignore-grammar", "fake-json"])
async def test_grammar_cheats_are_caught(tmp_path, smollm2_path, cheat):
    """JSON-mode requests (response_format json_object) to a node that drops the grammar, or
    that answers with JSON of its own: both fail re-scoring under the request's grammar."""
    from entry.api.structured import JSON_OBJECT_GRAMMAR

    model_id = smollm2_path.name.removesuffix(".gguf")
    async with verifying_entry(tmp_path, smollm2_path) as entry:
        node = await entry.add_cheater("cheat", cheat, smollm2_path, "--model-name", model_id)
        await wait_for(lambda: routable(entry.backend, node), 30, "cheater routable")
        for params in (dict(), dict(temperature=0.8, seed=3)):
            await collect(entry.backend, chat_spec(model_id, "Describe the sea as JSON.", 16, JSON_OBJECT_GRAMMAR, **params))
        assert await entry.verifier.wait_idle(60)
        verdicts = [v for v in entry.verifier.verdicts if v.peer_id == node.peer_id]
        assert len(verdicts) == 2 and not any(v.passed for v in verdicts), verdicts
        if cheat == "ignore-grammar":
            assert {v.reason for v in verdicts} == {"grammar_violation"}
        assert entry.ledger.node_totals(node.peer_id)["withheld"].requests == 2
        print(f"\n{cheat}: " + ", ".join(f"{v.reason} (max deviation {v.max_deviation})" for v in verdicts))
