"""ProviderTarget against a real third-party OpenAI-compatible server: llama-cpp-python's
`llama_cpp.server` on 127.0.0.1 serving the bundled SmolLM2 (tests/support/provider_server.py)."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

from entry.backend import DoneEvent, GenerationSpec, TokenEvent
from entry.providers import ProviderClient, ProviderDoneEvent, ProviderError
from entry.routing_config import parse_providers
from protocol.messages import ChatMessage, SamplingParams
from tests.support import provider_server as support
from tests.support.provider_server import API_KEY, MODEL_ALIAS

provider_server = support.provider_server  # the module-scoped fixture

pytestmark = pytest.mark.slow
LIMIT = 120  # seconds per test: one core shared with other work decodes SmolLM2 at ~20+ tok/s


def client(server, key: str | None = API_KEY) -> ProviderClient:
    [cfg] = parse_providers([{"name": "llamacpp", "base_url": server.base_url, "api_key_env": "LLAMACPP_KEY",
                              "timeout": 60, "input_per_mtok": 0.1, "output_per_mtok": 0.2, "models": [MODEL_ALIAS]}])
    return ProviderClient(cfg, key)


async def collect(target, spec) -> tuple[list[TokenEvent], DoneEvent]:
    toks, done = [], None
    async with aclosing(target.generate(spec)) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                toks.append(ev)
            else:
                done = ev
    assert isinstance(done, DoneEvent)
    return toks, done


def chat(content: str, **params) -> GenerationSpec:
    return GenerationSpec(model=f"llamacpp/{MODEL_ALIAS}", kind="chat", params=SamplingParams(**params),
                          messages=[ChatMessage("user", content)])


def completion(prompt: str, **params) -> GenerationSpec:
    return GenerationSpec(model=f"llamacpp/{MODEL_ALIAS}", kind="completion", params=SamplingParams(**params), prompt=prompt)


async def test_streamed_chat(provider_server):
    with trio.fail_after(LIMIT):
        async with client(provider_server) as c:
            toks, done = await collect(c.targets[0], chat("What is the capital of France?", max_tokens=24))
    text = "".join(t.text for t in toks)
    print(f"\nanswer: {text!r}; {done}")
    assert len(toks) > 1 and all(isinstance(t, TokenEvent) and t.ids == [] and t.text for t in toks)
    assert text.strip()
    assert isinstance(done, ProviderDoneEvent) and done.finish_reason in ("stop", "length")
    # llama_cpp.server sends no usage in streams, whatever stream_options say: estimated.
    assert done.prompt_tokens > 0 and done.completion_tokens >= len(toks) and done.usage_estimated
    assert done.served_by[0].pseudonym == "llamacpp"


async def test_non_streamed_answer_is_the_collected_stream_and_greedy_is_repeatable(provider_server):
    """The API answers a non-streamed request with the events collected; greedy decoding at
    the provider gives the same text each time."""
    with trio.fail_after(LIMIT):
        async with client(provider_server) as c:
            a, _ = await collect(c.targets[0], chat("Name a colour.", max_tokens=12, temperature=0.0))
            b, done = await collect(c.targets[0], chat("Name a colour.", max_tokens=12, temperature=0.0))
    assert "".join(t.text for t in a) == "".join(t.text for t in b) != ""
    assert done.completion_tokens > 0


async def test_max_tokens_is_respected(provider_server):
    with trio.fail_after(LIMIT):
        async with client(provider_server) as c:
            toks, done = await collect(c.targets[0], completion("Once upon a time", max_tokens=3))
    assert 1 <= len(toks) <= 3 and done.finish_reason == "length"


async def test_stop_is_respected(provider_server):
    with trio.fail_after(LIMIT):
        async with client(provider_server) as c:
            toks, done = await collect(c.targets[0], completion("1, 2, 3, 4, 5,", max_tokens=30, stop=[" 8"]))
    text = "".join(t.text for t in toks)
    print(f"\ncompletion: {text!r}")
    assert text.startswith(" 6, 7,") and "8" not in text and done.finish_reason == "stop"


async def test_wrong_key_is_a_clear_non_retryable_error(provider_server):
    with trio.fail_after(LIMIT):
        async with client(provider_server, key="not-the-key") as c:
            with pytest.raises(ProviderError) as ei:
                await collect(c.targets[0], chat("Hi", max_tokens=4))
    assert ei.value.status == 401 and not ei.value.retryable
    assert str(ei.value) == "provider 'llamacpp': answered HTTP 401: Invalid API key"
