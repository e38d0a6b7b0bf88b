"""Every error the entry's API answers, in OpenAI's shape and with the right status."""

from __future__ import annotations

import pytest
import trio

from entry.api.apikeys import ApiKeyStore
from entry.api.ratelimit import RateLimits
from entry.backend import InvalidGeneration, MeshUnavailable, UnknownModel
from tests.support.fake_backend import MODEL, FakeBackend, running_api

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(**extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **extra}


def error_of(r, status: int, type_: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    return err


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


INVALID_CHAT = [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (chat_body(messages=[]), "messages"),
    (chat_body(messages="hello"), "messages"),
    (chat_body(messages=["hello"]), "messages[0]"),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat_body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]),
     "messages[0].content"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content"),
    (chat_body(messages=[{"role": "user", "content": "x" * 300_000}]), "messages"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(temperature=9), "temperature"),
    (chat_body(top_p=2), "top_p"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens=True), "max_tokens"),
    (chat_body(max_completion_tokens=10**9), "max_completion_tokens"),
    (chat_body(n=0), "n"),
    (chat_body(n=100), "n"),
    (chat_body(stop=["a"] * 20), "stop"),
    (chat_body(stop=[1]), "stop"),
    (chat_body(stop=""), "stop"),
    (chat_body(seed=-1), "seed"),
    (chat_body(seed="x"), "seed"),
    (chat_body(presence_penalty=3), "presence_penalty"),
    (chat_body(top_k=-1), "top_k"),
    (chat_body(logprobs="yes"), "logprobs"),
    (chat_body(top_logprobs=3), "top_logprobs"),
    (chat_body(logprobs=True, top_logprobs=50), "top_logprobs"),
    (chat_body(stream="yes"), "stream"),
    (chat_body(stream=True, stream_options="usage"), "stream_options"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]),
     "tools[0].function.parameters"),
    (chat_body(response_format={"type": "xml"}), "response_format.type"),
    (chat_body(functions=[{"name": "f"}]), "functions"),
    (chat_body(logit_bias={"50256": -100}), "logit_bias"),
]


@pytest.mark.parametrize(("body", "param"), INVALID_CHAT)
async def test_invalid_chat_requests_are_400(body, param):
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=body)
    err = error_of(r, 400, "invalid_request_error")
    assert err["param"] == param
    assert backend.specs == []


INVALID_COMPLETIONS = [
    ({"model": "fake-model"}, "prompt"),
    ({"model": "fake-model", "prompt": [1, 2, 3]}, "prompt"),
    ({"model": "fake-model", "prompt": []}, "prompt"),
    ({"model": "fake-model", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "fake-model", "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": "fake-model", "prompt": "x", "echo": True}, "echo"),
    ({"model": "fake-model", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "fake-model", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "fake-model", "prompt": ["a"] * 5, "n": 2}, "n"),
]


@pytest.mark.parametrize(("body", "param"), INVALID_COMPLETIONS)
async def test_invalid_completion_requests_are_400(body, param):
    with trio.fail_after(10):
        async with running_api() as api:
            r = await api.client.post(COMPLETIONS, json=body)
    assert error_of(r, 400, "invalid_request_error")["param"] == param


async def test_malformed_json_and_non_object_bodies():
    with trio.fail_after(10):
        async with running_api() as api:
            bad = await api.client.post(CHAT, content=b'{"model": "fake-model", "messages": [', headers={"Content-Type": "application/json"})
            arr = await api.client.post(CHAT, json=[chat_body()])
            deep = await api.client.post(CHAT, content=b"[" * 100_000)
            latin = await api.client.post(CHAT, content=b'{"model": "\xff"}')
    for r in (bad, arr, deep, latin):
        error_of(r, 400, "invalid_request_error", "invalid_json")


async def test_oversize_body_is_413():
    with trio.fail_after(10):
        async with running_api(max_body_bytes=10_000) as api:
            declared = await api.client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 20_000}]))

            async def chunks():
                # No Content-Length: the limit must hold while reading.
                for _ in range(40):
                    yield b" " * 1000

            chunked = await api.client.post(CHAT, content=chunks())
            assert (await api.client.post(CHAT, json=chat_body())).status_code == 200
        async with running_api() as api:  # the default limit (1 MB) against a 2 MB body
            huge = await api.client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 2_000_000}]))
    for r in (declared, chunked, huge):
        error_of(r, 413, "invalid_request_error", "request_too_large")
    assert api.backend.specs == []


async def test_unknown_model_is_404():
    with trio.fail_after(10):
        async with running_api() as api:
            chat = await api.client.post(CHAT, json=chat_body(model="gpt-99"))
            comp = await api.client.post(COMPLETIONS, json={"model": "gpt-99", "prompt": "x", "stream": True})
        # The model left the mesh between lookup and generation.
        async with running_api(FakeBackend(fail_before=UnknownModel("no node serves fake-model now"))) as api:
            late = await api.client.post(CHAT, json=chat_body(stream=True))
    for r in (chat, comp, late):
        assert error_of(r, 404, "invalid_request_error", "model_not_found")["param"] == "model"


async def test_no_node_available_is_503_with_retry_after():
    backend = FakeBackend(fail_before=MeshUnavailable("all nodes serving fake-model are busy", retry_after=6.2))
    with trio.fail_after(10):
        async with running_api(backend) as api:
            plain = await api.client.post(CHAT, json=chat_body())
            streamed = await api.client.post(CHAT, json=chat_body(stream=True))
            comp = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x", "n": 3, "temperature": 1})
    for r in (plain, streamed, comp):
        err = error_of(r, 503, "server_error", "mesh_unavailable")
        assert "busy" in err["message"]
        assert r.headers["retry-after"] == "7"
    assert backend.closed == 0  # nothing was open


async def test_node_refusal_is_400_with_its_code():
    backend = FakeBackend(fail_before=InvalidGeneration("prompt is longer than the context", "context_length_exceeded"))
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=chat_body())
    error_of(r, 400, "invalid_request_error", "context_length_exceeded")


async def test_backend_bug_is_500_without_details():
    with trio.fail_after(10):
        async with running_api(FakeBackend(fail_before=RuntimeError("secret internals"))) as api:
            r = await api.client.post(CHAT, json=chat_body())
            after = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x"})
    err = error_of(r, 500, "server_error", "internal_error")
    assert "secret" not in err["message"]
    assert after.status_code == 500  # and the server keeps answering


async def test_unknown_route_404_and_wrong_method_405():
    with trio.fail_after(10):
        async with running_api() as api:
            missing = await api.client.get("/v1/engines")
            wrong = await api.client.get(CHAT)
            wrong2 = await api.client.delete("/v1/models")
    error_of(missing, 404, "invalid_request_error", "unknown_url")
    error_of(wrong, 405, "invalid_request_error", "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    error_of(wrong2, 405)


async def test_api_keys_401(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    info, key = store.create("carol")
    _, other = store.create("dave")
    store.revoke(info.id)
    with trio.fail_after(10):
        async with running_api(open_mode=False, keys=store) as api:
            none = await api.client.post(CHAT, json=chat_body())
            wrong = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer mesh-not-a-key"})
            basic = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": f"Basic {other}"})
            revoked = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})
            models = await api.client.get("/v1/models")
            nodes = await api.client.get("/v1/mesh/nodes")
            ok = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": f"bearer {other}"})
    for r in (none, wrong, basic, revoked, models, nodes):
        error_of(r, 401, "invalid_request_error", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200
    assert api.backend.specs and len(api.backend.specs) == 1
    store.close()


async def test_key_request_limit_429_with_retry_after(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, limited = store.create("eve", rpm=2)
    _, free = store.create("frank")
    clock = FrozenClock()
    with trio.fail_after(10):
        async with running_api(open_mode=False, keys=store, limits=RateLimits(clock=clock)) as api:
            auth = {"Authorization": f"Bearer {limited}"}
            assert (await api.client.post(CHAT, json=chat_body(), headers=auth)).status_code == 200
            assert (await api.client.post(CHAT, json=chat_body(), headers=auth)).status_code == 200
            third = await api.client.post(CHAT, json=chat_body(stream=True), headers=auth)
            other = await api.client.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {free}"})
            clock.now += 30  # half a minute refills one request of two per minute
            later = await api.client.post(CHAT, json=chat_body(), headers=auth)
    err = error_of(third, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "2 requests per minute" in err["message"]
    assert third.headers["retry-after"] == "30"
    assert other.status_code == 200  # limits are per key
    assert later.status_code == 200
    store.close()


async def test_key_token_limit_429(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("grace", tpm=30)
    clock = FrozenClock()
    with trio.fail_after(10):
        async with running_api(open_mode=False, keys=store, limits=RateLimits(clock=clock)) as api:
            auth = {"Authorization": f"Bearer {key}"}
            # Reserves 1 + 4 (prompt estimate: 2 characters, one chat message) + 20, uses 1 + 13.
            first = await api.client.post(CHAT, json=chat_body(max_tokens=20), headers=auth)
            second = await api.client.post(CHAT, json=chat_body(max_tokens=20), headers=auth)
            # Without max_tokens the default cap (256) is reserved: more than the whole limit.
            too_big = await api.client.post(CHAT, json=chat_body(), headers=auth)
    assert first.status_code == 200
    err = error_of(second, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "30 tokens per minute" in err["message"]
    assert second.headers["retry-after"] == "18"  # 25 needed, 16 left: 9 tokens at 30/min
    err = error_of(too_big, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "lower max_tokens" in err["message"] and err["param"] == "max_tokens"
    assert "retry-after" not in too_big.headers  # waiting would not help
    store.close()


async def test_open_mode_shares_one_bucket():
    with trio.fail_after(10):
        async with running_api(limits=RateLimits(rpm=1, clock=FrozenClock())) as api:
            first = await api.client.post(CHAT, json=chat_body())
            second = await api.client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x"},
                                           headers={"X-Forwarded-For": "198.51.100.1"})
    assert first.status_code == 200
    error_of(second, 429, "rate_limit_error")
    assert second.headers["retry-after"] == "60"


async def test_the_model_is_chosen_once_and_generations_run_on_it():
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=chat_body(n=3, temperature=1))
    assert r.status_code == 200
    assert backend.selections == 1 and backend.given_models == [MODEL] * 3


async def test_a_known_model_with_no_node_now_is_503_before_any_generation():
    """Its nodes just left (or are still connecting): unavailable, not unknown."""
    backend = FakeBackend(unserved={"gone-model"})
    with trio.fail_after(10):
        async with running_api(backend) as api:
            r = await api.client.post(CHAT, json=chat_body(model="gone-model", stream=True))
    err = error_of(r, 503, "server_error", "mesh_unavailable")
    assert "gone-model" in err["message"] and r.headers["retry-after"] == "4"
    assert backend.specs == []
