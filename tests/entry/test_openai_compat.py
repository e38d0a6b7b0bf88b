"""Every "supported" row of README's compatibility table, checked with the official `openai`
client against a real entry and a real node (bundled SmolLM2 on llama.cpp), streamed and not
where both exist. Rows for response_format and tools are backed by tests/entry/test_structured.py
and tests/entry/test_tools_e2e.py.

One mesh per test function (a model load each), many requests per mesh: the machine is small."""

from __future__ import annotations

import pytest
import trio

from tests.support.real_api import in_thread, real_api

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


def _text(chunks) -> str:
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def _pieces(tokenizer) -> set[bytes]:
    return {tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)}


def _check_alternatives(entries, pieces: set[bytes], greedy: bool) -> int:
    """Each alternative is a real token of the node's vocabulary, shown as OpenAI shows it."""
    checked = 0
    for e in entries:
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
        assert bytes(e.bytes) in pieces
        assert len(e.top_logprobs) == 3
        lps = [a.logprob for a in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        for a in e.top_logprobs:
            assert not a.token.startswith("<token "), a.token
            assert a.token == bytes(a.bytes).decode("utf-8", errors="replace")
            assert bytes(a.bytes) in pieces, a
            checked += 1
        if greedy:
            assert bytes(e.top_logprobs[0].bytes) == bytes(e.bytes) and e.top_logprobs[0].logprob == e.logprob
    return checked


async def test_chat_completions_parameters_on_smollm2(smollm2_path):
    async with real_api(smollm2_path) as api:
        c = api.openai()
        m = api.model
        pieces = await trio.to_thread.run_sync(_pieces, api.tokenizer)

        def run():
            out = {}
            # messages (system, developer, user, assistant; text parts), model, max_tokens, temperature 0
            out["plain"] = c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0)
            out["stream"] = list(c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0,
                                                           stream=True, stream_options={"include_usage": True}))
            out["parts"] = c.chat.completions.create(model=m, max_completion_tokens=12, temperature=0, messages=[
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "text", "text": "Name three"}, {"type": "text", "text": "colors."}]},
                {"role": "assistant", "content": "Red, green and blue."},
                {"role": "user", "content": "Two more?"}])
            # seed + temperature/top_p: reproducible sampling; n: several choices
            kw = dict(model=m, messages=MESSAGES, max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
                      presence_penalty=0.5, frequency_penalty=0.5)
            out["seeded"] = [c.chat.completions.create(**kw).choices[0].message.content for _ in range(2)]
            out["seeded_stream"] = _text(list(c.chat.completions.create(**kw, stream=True)))
            out["n"] = c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=3, n=2)
            out["n_stream"] = list(c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=6, temperature=1.0,
                                                             seed=3, n=2, stream=True))
            # stop
            out["stop"] = c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=30, temperature=0, stop=[","])
            out["stop_stream"] = _text(list(c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=30,
                                                                      temperature=0, stop=[","], stream=True)))
            # logprobs + top_logprobs
            out["lp"] = c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                                  top_logprobs=3)
            out["lp_stream"] = list(c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=8, temperature=0,
                                                              logprobs=True, top_logprobs=3, stream=True))
            # llama.cpp's samplers through extra_body: top_k 1 is greedy at any temperature
            ext = dict(model=m, messages=MESSAGES, max_tokens=12, temperature=0.9,
                       extra_body={"top_k": 1, "min_p": 0.05, "repeat_penalty": 1.0, "repeat_last_n": 64})
            out["top_k"] = c.chat.completions.create(**ext).choices[0].message.content
            out["top_k_stream"] = _text(list(c.chat.completions.create(**ext, stream=True)))
            # accepted and ignored
            out["ignored"] = c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=4, temperature=0,
                                                       user="u-1", metadata={"k": "v"}, store=False,
                                                       safety_identifier="s", prompt_cache_key="p",
                                                       service_tier="auto", parallel_tool_calls=True)
            return out

        out = await in_thread(run)

    plain, stream = out["plain"], out["stream"]
    assert plain.choices[0].message.content and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12 and plain.usage.prompt_tokens > 0
    assert _text(stream) == plain.choices[0].message.content  # greedy: the same both ways
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[-1].usage.completion_tokens == 12 and stream[-1].choices == []
    assert out["parts"].choices[0].message.content
    assert out["seeded"][0] == out["seeded"][1] == out["seeded_stream"]
    assert sorted(ch.index for ch in out["n"].choices) == [0, 1]
    assert out["n"].choices[0].message.content != out["n"].choices[1].message.content
    streamed_n = {i: "".join(ch.choices[0].delta.content or "" for ch in out["n_stream"]
                             if ch.choices and ch.choices[0].index == i) for i in (0, 1)}
    assert streamed_n == {ch.index: ch.message.content for ch in out["n"].choices}
    assert "," not in out["stop"].choices[0].message.content and out["stop"].choices[0].finish_reason == "stop"
    assert out["stop_stream"] == out["stop"].choices[0].message.content
    content = out["lp"].choices[0].logprobs.content
    assert len(content) == 8
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == out["lp"].choices[0].message.content
    assert _check_alternatives(content, pieces, greedy=True) == 24
    streamed = [e for ch in out["lp_stream"] if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.bytes, e.logprob) for e in streamed] == [(e.token, e.bytes, e.logprob) for e in content]
    assert [[(a.token, a.bytes) for a in e.top_logprobs] for e in streamed] == \
        [[(a.token, a.bytes) for a in e.top_logprobs] for e in content]
    assert out["top_k"] == out["top_k_stream"] == plain.choices[0].message.content
    assert out["ignored"].choices[0].message.content


async def test_completions_parameters_on_smollm2(smollm2_path):
    async with real_api(smollm2_path) as api:
        c = api.openai()
        m = api.model
        pieces = await trio.to_thread.run_sync(_pieces, api.tokenizer)

        def run():
            out = {}
            out["plain"] = c.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
            out["stream"] = list(c.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
            out["prompts"] = c.completions.create(model=m, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0)
            kw = dict(model=m, prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.9, seed=11, presence_penalty=0.3,
                      frequency_penalty=0.3)
            out["seeded"] = [c.completions.create(**kw).choices[0].text for _ in range(2)]
            out["seeded_stream"] = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True)
                                           if ch.choices)
            out["n"] = c.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, n=2,
                                            best_of=2)
            out["stop"] = c.completions.create(model=m, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
            out["lp"] = c.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
            out["lp_stream"] = list(c.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0,
                                                         logprobs=3, stream=True))
            out["ignored"] = c.completions.create(model=m, prompt=PROMPT, max_tokens=3, temperature=0, user="u-1")
            return out

        out = await in_thread(run)

    text = out["plain"].choices[0].text
    assert text and out["plain"].choices[0].finish_reason == "length" and out["plain"].usage.completion_tokens == 8
    assert "".join(ch.choices[0].text for ch in out["stream"] if ch.choices) == text
    assert out["stream"][-1].usage.completion_tokens == 8
    assert [ch.index for ch in out["prompts"].choices] == [0, 1]
    assert out["seeded"][0] == out["seeded"][1] == out["seeded_stream"]
    assert len(out["n"].choices) == 2
    assert " 7" not in out["stop"].choices[0].text and out["stop"].choices[0].finish_reason == "stop"
    lp = out["lp"].choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == out["lp"].choices[0].text
    for i, alts in enumerate(lp.top_logprobs):
        assert len(alts) == 3, alts
        assert not any(t.startswith("<token ") for t in alts)
        assert all(t.encode("utf-8") in pieces for t in alts if "\ufffd" not in t)
        assert max(alts, key=alts.get) == lp.tokens[i]  # greedy: the best alternative is the chosen token
    streamed = [ch.choices[0].logprobs for ch in out["lp_stream"] if ch.choices and ch.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [a for s in streamed for a in s.top_logprobs] == lp.top_logprobs
    assert out["ignored"].choices[0].text


async def test_responses_parameters_on_smollm2(smollm2_path):
    async with real_api(smollm2_path) as api:
        c = api.openai()
        m = api.model

        def run():
            out = {}
            out["plain"] = c.responses.create(model=m, input="Name three colors.", instructions="Answer briefly.",
                                              max_output_tokens=12, temperature=0)
            out["events"] = list(c.responses.create(model=m, input="Name three colors.", instructions="Answer briefly.",
                                                    max_output_tokens=12, temperature=0, stream=True))
            with c.responses.stream(model=m, input=[{"role": "user", "content": [
                    {"type": "input_text", "text": "Say hello."}]}], max_output_tokens=40, temperature=0) as s:
                out["deltas"] = "".join(e.delta for e in s if e.type == "response.output_text.delta")
                out["final"] = s.get_final_response()
            out["sampled"] = c.responses.create(model=m, input="Tell me a word.", max_output_tokens=5, temperature=0.8,
                                                top_p=0.5, store=False, user="u-1", metadata={"k": "v"})
            return out

        out = await in_thread(run)

    plain = out["plain"]
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    assert plain.output_text and plain.usage.output_tokens == 12 and plain.usage.input_tokens > 0
    events = out["events"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 12
    final = out["final"]
    assert final.status == "completed" and final.output_text == out["deltas"] and final.output_text
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    assert out["sampled"].output_text is not None and out["sampled"].top_p == 0.5
