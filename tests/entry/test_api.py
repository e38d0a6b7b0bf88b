"""The entry's OpenAI-compatible API over real HTTP (hypercorn on loopback) against a fake
mesh backend: request and response shapes, streaming, logprobs, n, parameters, anonymity,
client disconnects, and the operator endpoints."""

from __future__ import annotations

import dataclasses

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from entry.api.apikeys import ApiKeyStore
from entry.api.ratelimit import RateLimits
from entry.backend import GenerationSpec
from tests.support.fake_backend import DESCRIPTION, MODEL, WORDS, FakeBackend, parse_sse, running_api

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FULL = "".join(WORDS)


def chat_body(**extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi there"}], **extra}


async def test_chat_non_streaming():
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(CHAT, json=chat_body())
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == FULL
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": len(WORDS), "total_tokens": 2 + len(WORDS)}
    assert body["mesh"] == {"served_by": [{"node": "amber-fox", "kind": DESCRIPTION, "completion_tokens": len(WORDS)}],
                            "failovers": 0}


async def test_chat_streaming_with_usage():
    with trio.fail_after(10):
        async with running_api(FakeBackend(per_event=2, failovers=1)) as api:
            r = await api.client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": True}))
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == FULL
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["delta"] == {}
    assert final["mesh"]["served_by"][0]["kind"] == DESCRIPTION
    assert final["mesh"]["failovers"] == 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": len(WORDS), "total_tokens": 2 + len(WORDS)}


async def test_chat_streaming_without_usage():
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(CHAT, json=chat_body(stream=True))
            events = parse_sse(r.text)
    chunks = events[:-1]
    assert "usage" not in chunks[0]
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completion_non_streaming_and_streaming():
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "Once upon", "max_tokens": 4})
            assert r.status_code == 200
            body = r.json()
            s = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "Once upon", "max_tokens": 4,
                                                         "stream": True, "stream_options": {"include_usage": True}})
            events = parse_sse(s.text)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "".join(WORDS[:4])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "".join(WORDS[:4])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["mesh"]["served_by"][0]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_chat_logprobs_both_ways():
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=2, max_tokens=3))
            s = await api.client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=1, max_tokens=3, stream=True))
            plain = await api.client.post(CHAT, json=chat_body(logprobs=True, max_tokens=2))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == WORDS[:3]
    first = content[0]
    assert first["logprob"] == -0.25
    assert first["bytes"] == list(b"Hello")
    assert first["top_logprobs"] == [{"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")},
                                     {"token": "ALT", "logprob": -1.5, "bytes": list(b"ALT")}]
    streamed = [c for c in parse_sse(s.text)[:-1] if c["choices"][0]["logprobs"]]
    assert [e["token"] for c in streamed for e in c["choices"][0]["logprobs"]["content"]] == WORDS[:3]
    assert all(len(e["top_logprobs"]) == 1 for c in streamed for e in c["choices"][0]["logprobs"]["content"])
    assert all(e["top_logprobs"] == [] for e in plain.json()["choices"][0]["logprobs"]["content"])


async def test_completion_logprobs():
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "logprobs": 2})
            s = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "logprobs": 0,
                                                         "stream": True})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == WORDS[:3]
    assert lp["token_logprobs"] == [-0.25] * 3
    assert lp["top_logprobs"][0] == {"Hello": -0.25, "ALT": -1.5}
    assert lp["text_offset"] == [0, 5, 6]
    chunks = [c for c in parse_sse(s.text)[:-1] if c["choices"] and c["choices"][0]["logprobs"]]
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks] == [0, 5, 6]
    assert all(c["choices"][0]["logprobs"]["top_logprobs"] == [{}] for c in chunks)


async def test_n2_sampling_uses_distinct_seeds():
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=chat_body(n=2, temperature=0.8, seed=5, max_tokens=3))
            s = await api.client.post(CHAT, json=chat_body(n=2, temperature=0.8, max_tokens=3, stream=True,
                                                           stream_options={"include_usage": True}))
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    seeded = [spec.params.seed for spec in backend.specs[:2]]
    # Each choice its own seed, mixed with the entry's secret (tests/entry/test_api_hardening.py).
    assert len(set(seeded)) == 2 and not set(seeded) & {5, 6}
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["prompt_tokens"] == 2  # the prompt is counted once
    unseeded = [spec.params.seed for spec in backend.specs[2:]]
    assert None not in unseeded and unseeded[0] != unseeded[1]
    chunks = parse_sse(s.text)[:-1]
    finals = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finals == {0, 1}
    assert {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")} == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_n2_greedy_is_identical():
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": ["a", "b c"], "n": 2, "max_tokens": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert len({c["text"] for c in body["choices"]}) == 1
    assert sorted(s.prompt for s in backend.specs) == ["a", "a", "b c", "b c"]  # generations run concurrently
    assert all(s.params.seed is None for s in backend.specs)
    assert body["usage"]["prompt_tokens"] == 1 + 2


async def test_parameters_map_to_sampling_params():
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=chat_body(
                temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1, presence_penalty=0.5,
                frequency_penalty=-0.5, seed=42, max_tokens=100, max_completion_tokens=7, stop=" fake"))
            r2 = await api.client.post(COMPLETIONS, json={"model": MODEL.sha256, "prompt": "p", "stop": [" am", "zz"]})
    assert r.status_code == 200 and r2.status_code == 200
    p = backend.specs[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repeat_penalty) == (0.5, 0.9, 40, 0.05, 1.1)
    assert (p.presence_penalty, p.frequency_penalty, p.max_tokens, p.stop) == (0.5, -0.5, 7, [" fake"])
    assert p.seed is not None and p.seed != 42 and 0 <= p.seed < 2**63  # mixed, not the user's number
    # The fake backend stops at a stop string: the text ends right before it.
    assert backend.specs[1].params.stop == [" am", "zz"]
    assert r2.json()["choices"][0]["text"] == "Hello, I"
    assert r2.json()["model"] == "fake-model"  # asked by sha256, answered with the id
    assert backend.specs[1].params.max_tokens == 256  # the protocol's default


async def test_text_content_parts_are_joined():
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json={"model": "fake-model", "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": None},
            ]})
    assert r.status_code == 200
    msgs = backend.specs[0].messages
    assert [(m.role, m.content) for m in msgs] == [("system", "Be brief."), ("user", "one\ntwo"), ("assistant", "")]


async def test_spec_carries_nothing_about_the_user(tmp_path):
    """Anonymity: the backend (and so the node) sees messages and sampling parameters only."""
    backend = FakeBackend()
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("alice-laptop", rpm=100)
    secrets_sent = [key, "alice@example.com", "user-7781", "203.0.113.9", "Mozilla/5.0 Alice", "session=abc123", "Alice"]
    with trio.fail_after(10):
        async with running_api(backend, open_mode=False, keys=store) as api:
            r = await api.client.post(
                CHAT,
                json={"model": "fake-model", "user": "user-7781", "metadata": {"email": "alice@example.com"},
                      "messages": [{"role": "user", "content": "hello", "name": "Alice"}], "seed": 3},
                headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": "203.0.113.9",
                         "User-Agent": "Mozilla/5.0 Alice", "Cookie": "session=abc123"},
            )
    assert r.status_code == 200
    [spec] = backend.specs
    assert isinstance(spec, GenerationSpec)
    assert {f.name for f in dataclasses.fields(spec)} == {"model", "kind", "params", "messages", "prompt", "logprobs",
                                                         "top_logprobs", "grammar", "queue_key"}
    # The queue's turn-taking key: opaque, not the key or its id (and never sent to nodes).
    assert len(spec.queue_key) == 24 and ":" not in spec.queue_key and spec.queue_key not in key
    assert spec.model == "fake-model" and spec.kind == "chat" and spec.prompt == ""
    assert [(m.role, m.content) for m in spec.messages] == [("user", "hello")]
    assert vars(spec.messages[0]) == {"role": "user", "content": "hello"}
    assert spec.params.seed is not None and spec.params.seed != 3  # a user's seed links their requests
    dump = repr(dataclasses.asdict(spec))
    for s in secrets_sent:
        assert s not in dump
    store.close()


async def _read_until_tokens(response: httpx.Response, n: int) -> None:
    seen = 0
    async for line in response.aiter_lines():
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            seen += 1
            if seen >= n:
                return


async def test_client_disconnect_mid_stream_closes_backend_iterator():
    backend = FakeBackend(hang_after=2)
    with trio.fail_after(10):
        async with running_api(backend) as api:
            async with api.client.stream("POST", CHAT, json=chat_body(stream=True)) as r:
                assert r.status_code == 200
                await _read_until_tokens(r, 2)
                await backend.hanging.wait()
            # Leaving the block closes the connection mid-stream.
            await backend.closed_event.wait()
            assert backend.closed == 1 and backend.finished == 0
            # The entry is still fine afterwards.
            backend.hang_after = None
            assert (await api.client.post(CHAT, json=chat_body())).status_code == 200
            metrics = (await api.client.get("/metrics")).text
    assert "mesh_entry_client_disconnects_total 1" in metrics


async def test_client_disconnect_while_waiting_non_streaming():
    backend = FakeBackend(hang_after=1)
    with trio.fail_after(10):
        async with running_api(backend) as api:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: api.client.post(CHAT, json=chat_body(n=2, temperature=1.0)))
                await backend.hanging.wait()
                nursery.cancel_scope.cancel()  # the client gives up: its connection closes
            while backend.closed < 2:
                await backend.closed_event.wait()
                backend.closed_event = trio.Event()
    assert backend.finished == 0


async def test_error_mid_stream_is_an_sse_event_then_done():
    with trio.fail_after(10):
        async with running_api(FakeBackend(fail_after=3)) as api:
            r = await api.client.post(CHAT, json=chat_body(stream=True))
            j = await api.client.post(CHAT, json=chat_body())
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["type"] == "server_error" and err["code"] == "mesh_unavailable" and err["message"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-2]) == "".join(WORDS[:3])
    # Not streaming, nothing was sent yet: a real status.
    assert j.status_code == 503 and j.headers["retry-after"] == "3"


async def test_models_list_and_retrieve():
    extra = dataclasses.replace(MODEL, id="other/model-7b", sha256="cd" * 32, nodes=1, created=0)
    with trio.fail_after(10):
        async with running_api(FakeBackend(models_list=[MODEL, extra])) as api:
            r = await api.client.get("/v1/models")
            one = await api.client.get("/v1/models/other/model-7b")
            missing = await api.client.get("/v1/models/nope")
    body = r.json()
    assert body["object"] == "list"
    first = body["data"][0]
    assert first == {"id": "fake-model", "object": "model", "created": 1_700_000_000, "owned_by": "mesh", "nodes": 2,
                     "sha256": MODEL.sha256, "context_length": 2048, "name": "FakeModel", "quantization": "Q4_1"}
    assert body["data"][1]["created"] > 0
    assert one.json()["id"] == "other/model-7b" and one.json()["nodes"] == 1
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_health_and_mesh_nodes():
    with trio.fail_after(10):
        async with running_api() as api:
            h = await api.client.get("/health")
            n = await api.client.get("/v1/mesh/nodes")
    assert h.json() == {"status": "ok", "nodes": 2, "models": 1}
    assert n.json()["object"] == "list"
    assert [x["node"] for x in n.json()["data"]] == ["amber-fox", "blue-owl"]


async def test_metrics_exposition_parses():
    with trio.fail_after(10):
        async with running_api() as api:
            await api.client.post(CHAT, json=chat_body(stream=True))
            await api.client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
            await api.client.post("/v1/responses", json={"model": "fake-model", "input": "hi"})
            r = await api.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("mesh_entry_requests_total", (("endpoint", CHAT), ("status", "200")))] == 1
    assert samples[("mesh_entry_requests_total", (("endpoint", CHAT), ("status", "404")))] == 1
    assert samples[("mesh_entry_completion_tokens_total", (("model", "fake-model"),))] == 2 * len(WORDS)
    assert families["mesh_entry_time_to_first_token_seconds"].type == "histogram"
    assert samples[("mesh_entry_time_to_first_token_seconds_count", (("endpoint", CHAT),))] == 1
    # A Responses request runs as a chat plan but is counted under its own path.
    assert samples[("mesh_entry_time_to_first_token_seconds_count", (("endpoint", "/v1/responses"),))] == 1
    assert families["mesh_entry_request_duration_seconds"].type == "histogram"
    assert samples[("mesh_entry_model_nodes", (("model", "fake-model"),))] == 2
    assert samples[("mesh_nodes", (("model", "fake-model"),))] == 2  # the backend's own gauges
    assert samples[("mesh_known_peers", ())] == 2
    assert "bad key" not in r.text


async def test_webchat_is_served():
    with trio.fail_after(10):
        async with running_api() as api:
            page = await api.client.get("/")
            js = await api.client.get("/webchat/app.js")
            css = await api.client.get("/webchat/style.css")
            missing = await api.client.get("/webchat/secret.py")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="webchat/app.js"' in page.text and 'href="webchat/style.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert js.headers["content-type"] == "text/javascript; charset=utf-8" and "v1/chat/completions" in js.text
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert missing.status_code == 404


async def test_keyed_mode_accepts_a_valid_key(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("bob")
    with trio.fail_after(10):
        async with running_api(open_mode=False, keys=store, limits=RateLimits(rpm=100)) as api:
            r = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})
            models = await api.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            health = await api.client.get("/health")  # open: shows no user data
    assert r.status_code == 200 and models.status_code == 200 and health.status_code == 200
    store.close()
