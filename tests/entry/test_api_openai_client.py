"""The official `openai` client works unchanged against the entry (run from a thread: it is
synchronous, the server runs in this test's trio loop)."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from entry.api.apikeys import ApiKeyStore
from entry.api.ratelimit import RateLimits
from entry.backend import MeshUnavailable
from tests.support.fake_backend import DESCRIPTION, WORDS, FakeBackend, running_api

FULL = "".join(WORDS)
MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]


def client(api, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key=key, timeout=10, **kw)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def test_openai_chat_streaming_and_not():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            done = await in_thread(c.chat.completions.create, model="fake-model", messages=MESSAGES, seed=1)

            def stream():
                return list(c.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True}, logprobs=True,
                                                      top_logprobs=2))

            chunks = await in_thread(stream)
    assert done.choices[0].message.content == FULL
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == len(WORDS)
    assert done.model_extra["mesh"]["served_by"][0]["kind"] == DESCRIPTION
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == FULL
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.total_tokens == len(WORDS) + 3
    tokens = [lp.token for ch in chunks if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert tokens == WORDS


async def test_openai_completions_streaming_and_not():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            done = await in_thread(c.completions.create, model="fake-model", prompt="Once", max_tokens=5, logprobs=1)
            chunks = await in_thread(lambda: list(c.completions.create(model="fake-model", prompt="Once", max_tokens=5,
                                                                       stream=True, n=2, temperature=0)))
    assert done.choices[0].text == "".join(WORDS[:5])
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].logprobs.tokens == WORDS[:5]
    by_index: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {0: "".join(WORDS[:5]), 1: "".join(WORDS[:5])}


async def test_openai_models():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            models = await in_thread(lambda: list(c.models.list()))
            one = await in_thread(c.models.retrieve, "fake-model")
    assert [m.id for m in models] == ["fake-model", "auto"]
    assert one.owned_by == "mesh" and one.model_extra["nodes"] == 2


async def test_openai_errors_map_to_client_exceptions(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("henry", rpm=1)
    with trio.fail_after(20):
        async with running_api(open_mode=False, keys=store, limits=RateLimits()) as api:
            bad = client(api, "mesh-wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await in_thread(bad.chat.completions.create, model="fake-model", messages=MESSAGES)
            good = client(api, key, max_retries=0)
            with pytest.raises(openai.NotFoundError) as nf:
                await in_thread(good.chat.completions.create, model="nope", messages=MESSAGES)
            assert nf.value.code == "model_not_found"
            with pytest.raises(openai.BadRequestError):
                await in_thread(good.chat.completions.create, model="fake-model", messages=[])
            await in_thread(good.chat.completions.create, model="fake-model", messages=MESSAGES)
            with pytest.raises(openai.RateLimitError):
                await in_thread(good.chat.completions.create, model="fake-model", messages=MESSAGES)
        async with running_api(FakeBackend(fail_before=MeshUnavailable("no node", retry_after=1))) as api:
            with pytest.raises(openai.InternalServerError) as e:
                await in_thread(client(api, max_retries=0).chat.completions.create, model="fake-model", messages=MESSAGES)
            assert e.value.status_code == 503
        async with running_api(FakeBackend(fail_after=2)) as api:
            def broken_stream():
                for _ in client(api, max_retries=0).chat.completions.create(model="fake-model", messages=MESSAGES,
                                                                              stream=True):
                    pass

            with pytest.raises(openai.APIError):
                await in_thread(broken_stream)
    store.close()
