"""The synthetic engine (engine/synthetic.py): the Engine interface without a model, for
benchmarks and scale tests. Unit tests, then a NodeService in-process, then a real
`mesh node start --synthetic` process serving through a real entry."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import trio

from engine.llama import BadRequest, RequestTooLong
from engine.synthetic import SyntheticEngine, synthetic_info, synthetic_sha256, token_text
from node.admission import Admission
from node.control import call as control_call
from node.service import NodeService
from protocol.identity import Identity
from protocol.messages import ChatMessage, InferRequest, SamplingParams
from protocol.records import WorkReceipt, token_digest
from tests.support.node_harness import ENTRY_ID, connect
from tests.support.node_procs import spawn_entry, spawn_node, wait_ready_sync
from transport.node_client import NodeCall

FAST = 1e6  # tokens/s: no waiting in unit tests


def req(prompt: str = "hello", *, max_tokens: int = 16, cont=(), stop=(), chat: bool = False, seed=None,
        temperature: float = 0.0, logprobs: bool = False, top: int = 0, rid: str = "req-00000001") -> InferRequest:
    params = SamplingParams(max_tokens=max_tokens, stop=list(stop), seed=seed, temperature=temperature)
    sha = synthetic_sha256("synth")
    if chat:
        return InferRequest(rid, sha, "chat", params, [ChatMessage("user", prompt)], continuation=list(cont),
                            logprobs=logprobs, top_logprobs=top)
    return InferRequest(rid, sha, "completion", params, prompt=prompt, continuation=list(cont), logprobs=logprobs,
                        top_logprobs=top)


def run(engine: SyntheticEngine, request: InferRequest, cancel=None):
    gen = engine.run(request, cancel=cancel)
    with gen:
        steps = list(gen)
    return gen, [s.token for s in steps if s.token is not None], "".join(s.text for s in steps), steps[-1].finish_reason


def test_info_is_made_up_and_never_a_real_models():
    info = synthetic_info("synth")
    assert info.sha256 == synthetic_sha256("synth") and len(info.sha256) == 64
    assert info.sha256 != synthetic_sha256("synth2")
    import hashlib

    assert info.sha256 != hashlib.sha256(b"synth").hexdigest()  # domain-separated from the name's own hash
    assert info.quantization == "SYNTHETIC" and info.architecture == "synthetic" and info.size_bytes == 0
    with pytest.raises(ValueError):
        synthetic_info("")


def test_deterministic_tokens_from_the_prompt():
    eng = SyntheticEngine("synth", rate=FAST)
    g1, a, text_a, reason = run(eng, req("hello"))
    _, b, _, _ = run(eng, req("hello"))
    _, c, _, _ = run(eng, req("goodbye"))
    assert a == b and a != c
    assert len(a) == 16 and reason == "length" and g1.completion_tokens == 16
    assert text_a == "".join(token_text(t) for t in a) == eng.detokenize(a)
    assert all(0 <= t < eng.n_vocab for t in a)
    assert g1.prompt_tokens == eng.tokenize("hello") and g1.seed is None
    # Another engine instance (another node) produces the same stream.
    _, d, _, _ = run(SyntheticEngine("synth", rate=FAST), req("hello"))
    assert d == a


def test_sampling_with_a_seed_is_reproducible_and_reported():
    eng = SyntheticEngine("synth", rate=FAST)
    g, a, _, _ = run(eng, req("x", temperature=0.8, seed=42))
    _, b, _, _ = run(eng, req("x", temperature=0.8, seed=42))
    _, c, _, _ = run(eng, req("x", temperature=0.8, seed=43))
    assert a == b and a != c and g.seed == 42
    g2, _, _, _ = run(eng, req("x", temperature=0.8))
    assert isinstance(g2.seed, int)  # a random seed is still reported


def test_continuation_resumes_the_same_generation():
    eng = SyntheticEngine("synth", rate=FAST)
    _, full, full_text, _ = run(eng, req("resume me", max_tokens=20))
    g, rest, text, reason = run(eng, req("resume me", max_tokens=20, cont=full[:7]))
    assert rest == full[7:] and reason == "length"
    assert g.completion_tokens == 13  # max_tokens counts the continuation
    assert full_text.endswith(text) and text == eng.detokenize(full[7:])
    _, none, _, reason = run(eng, req("resume me", max_tokens=20, cont=full))
    assert none == [] and reason == "length"


def test_stop_strings_and_chat_fallback_stop():
    eng = SyntheticEngine("synth", rate=FAST)
    _, toks, text, _ = run(eng, req("stop test", max_tokens=30))
    stop = token_text(toks[5])  # " t<id>" of the sixth token
    _, got, stopped_text, reason = run(eng, req("stop test", max_tokens=30, stop=[stop]))
    assert reason == "stop"
    assert stop not in stopped_text and text.startswith(stopped_text)
    assert len(got) <= 6
    assert "\nUser:" in eng.request_stops(req("hi", chat=True))
    _, chat_toks, _, _ = run(eng, req("hi", chat=True, max_tokens=5))
    assert len(chat_toks) == 5


def test_rate_is_honoured():
    eng = SyntheticEngine("synth", rate=400.0)
    t0 = time.perf_counter()
    _, toks, _, _ = run(eng, req("timed", max_tokens=41))
    elapsed = time.perf_counter() - t0
    assert len(toks) == 41
    assert 0.09 <= elapsed < 1.5  # 40 intervals of 2.5 ms; generous upper bound for a busy machine


def test_cancel_stops_a_generation():
    eng = SyntheticEngine("synth", rate=50.0)
    cancel = threading.Event()
    gen = eng.run(req("cancel me", max_tokens=1000), cancel=cancel)
    got = []
    t0 = time.perf_counter()
    with gen:
        for step in gen:
            if step.token is not None:
                got.append(step.token)
                if len(got) == 3:
                    cancel.set()
            else:
                assert step.finish_reason == "cancelled"
    assert len(got) == 3 and time.perf_counter() - t0 < 2.0
    assert gen.finish_reason == "cancelled"


def test_bad_requests_are_refused_up_front():
    eng = SyntheticEngine("synth", rate=FAST, n_ctx=64)
    with pytest.raises(RequestTooLong):
        eng.run(req("x" * 400))
    with pytest.raises(BadRequest):
        eng.run(req("x", cont=[eng.n_vocab + 5]))
    with pytest.raises(ValueError):
        SyntheticEngine("synth", rate=0)


def test_logprobs_are_reported_when_asked():
    eng = SyntheticEngine("synth", rate=FAST)
    gen = eng.run(req("lp", max_tokens=3, logprobs=True, top=2))
    with gen:
        steps = [s for s in gen if s.token is not None]
    assert all(s.logprob is not None and s.logprob <= 0 for s in steps)
    assert all(len(s.top) == 2 and s.top[0][0] == s.token for s in steps)


async def test_node_service_serves_the_synthetic_engine_in_process():
    eng = SyntheticEngine("synth", rate=2000.0)
    identity = Identity.generate()
    service = NodeService(identity, Admission([eng, SyntheticEngine("synth", rate=2000.0)], 2),
                          model_sha256=eng.info.sha256, model_name="synth", context_size=2048, max_tokens=512)
    _, expected, expected_text, _ = run(SyntheticEngine("synth", rate=FAST), req("through the service", max_tokens=60))
    async with trio.open_nursery() as nursery:
        stream = connect(nursery, service)
        request = req("through the service", max_tokens=60, rid="req-svc-0001")
        call = NodeCall(stream, request)
        await call.send()
        ids, text, frames = [], "", 0
        with trio.fail_after(10):
            async for chunk in call.chunks():
                ids += chunk.ids
                text += chunk.text
                frames += 1
        await stream.close()
    assert ids == expected and text == expected_text
    assert frames < len(ids)  # fast tokens share frames
    final = call.final
    assert final.finish_reason == "length" and final.completion_tokens == 60
    receipt = WorkReceipt.verify(final.receipt, node=identity.peer_id, entry=ENTRY_ID, request_id="req-svc-0001",
                                 model_sha256=eng.info.sha256, tokens=ids, prompt_tokens=final.prompt_tokens)
    assert receipt.output_digest == token_digest(ids)


@pytest.mark.slow
def test_a_synthetic_node_process_serves_through_an_entry(tmp_path):
    """`mesh node start --synthetic` over real libp2p, discovered by a real entry, streamed as SSE."""
    entry = spawn_entry(tmp_path, "entry", "--open")
    procs = [entry]
    try:
        info = wait_ready_sync(entry, 60)
        node = spawn_node(tmp_path, "node", "--synthetic", "synth-e2e", "--synthetic-rate", "300", "--slots", "2",
                          "--bootstrap", info["p2p_addrs"][0])
        procs.append(node)
        wait_ready_sync(node, 60)
        url = info["url"]
        deadline = time.monotonic() + 30
        model = None
        while time.monotonic() < deadline and model is None:
            data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            model = next((m for m in data if m["id"] == "synth-e2e"), None)
            time.sleep(0.1)
        assert model is not None, "the entry never listed the synthetic model"
        assert model["sha256"] == synthetic_sha256("synth-e2e") and model["quantization"] == "SYNTHETIC"
        _, expected, expected_text, _ = run(SyntheticEngine("synth-e2e", rate=FAST), req("over the mesh", max_tokens=40))
        body = {"model": "synth-e2e", "prompt": "over the mesh", "max_tokens": 40, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        text, usage, events = "", None, 0
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("choices"):
                    text += ev["choices"][0].get("text") or ""
                    events += 1
        elapsed = time.perf_counter() - t0
        assert text == expected_text and usage["completion_tokens"] == 40
        assert elapsed >= 39 / 300 * 0.9  # the node kept its rate
        status = control_call(node.state_dir / "node.sock", {"cmd": "status"})
        assert status["model"]["name"] == "synth-e2e" and status["tokens_served"] >= 40
    finally:
        for p in reversed(procs):
            p.stop()
