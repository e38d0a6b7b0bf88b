"""The "ignored" and "refused" rows of README's OpenAI compatibility table for chat and
completions, with the official `openai` client (fake backend: these are the entry's own
decisions). The "supported" rows run on a real node in test_openai_compat.py."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from tests.support.fake_backend import WORDS, running_api

MESSAGES = [{"role": "user", "content": "Hi"}]


def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key="unused", timeout=10, max_retries=0)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


CHAT_IGNORED = dict(user="u-1", metadata={"k": "v"}, store=True, safety_identifier="s", prompt_cache_key="p",
                    prompt_cache_retention="24h", service_tier="auto", modalities=["text"], reasoning_effort="low",
                    verbosity="low", prediction={"type": "content", "content": "Hello"}, web_search_options={},
                    stream_options={"include_usage": True, "include_obfuscation": False})


async def test_chat_ignored_parameters_change_nothing():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            r = await in_thread(c.chat.completions.create, model="fake-model", messages=MESSAGES, **{
                k: v for k, v in CHAT_IGNORED.items() if k != "stream_options"})
            chunks = await in_thread(lambda: list(c.chat.completions.create(model="fake-model", messages=MESSAGES,
                                                                            stream=True, **CHAT_IGNORED)))
            spec = api.backend.specs[0]
    assert r.choices[0].message.content == "".join(WORDS)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "".join(WORDS)
    assert [(m.role, m.content) for m in spec.messages] == [("user", "Hi")]


async def test_sampling_extensions_reach_the_node():
    with trio.fail_after(20):
        async with running_api() as api:
            await in_thread(client(api).chat.completions.create, model="fake-model", messages=MESSAGES,
                            extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2, "repeat_last_n": 32})
            p = api.backend.specs[0].params
    assert (p.top_k, p.min_p, p.repeat_penalty, p.repeat_last_n) == (5, 0.1, 1.2, 32)


@pytest.mark.parametrize(("kw", "param"), [
    (dict(logit_bias={"50256": -100}), "logit_bias"),
    (dict(functions=[{"name": "f", "parameters": {}}]), "functions"),
    (dict(function_call={"name": "f"}), "function_call"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]),
     "messages[0].content"),
])
async def test_chat_refused_parameters(kw, param):
    with trio.fail_after(20):
        async with running_api() as api:
            with pytest.raises(openai.BadRequestError) as e:
                await in_thread(client(api).chat.completions.create, **{"model": "fake-model", "messages": MESSAGES, **kw})
    assert e.value.param == param


@pytest.mark.parametrize(("kw", "param"), [
    (dict(echo=True), "echo"),
    (dict(suffix="end"), "suffix"),
    (dict(logit_bias={"50256": -100}), "logit_bias"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(best_of=3), "best_of"),
])
async def test_completions_refused_parameters(kw, param):
    with trio.fail_after(20):
        async with running_api() as api:
            with pytest.raises(openai.BadRequestError) as e:
                await in_thread(client(api).completions.create, **{"model": "fake-model", "prompt": "Hi", **kw})
    assert e.value.param == param
