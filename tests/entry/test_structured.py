"""response_format and tools on /v1/chat/completions against a fake mesh: what reaches the
node (grammar, rendered prompt), the 400s for bad schemas and tools, and the tool_calls
response shapes, streamed and not, also through the official openai client."""

from __future__ import annotations

import functools
import json

import openai
import pytest
import trio

import tests.support.fake_backend as fb
from entry.api import structured as st
from tests.support.fake_backend import FakeBackend, parse_sse, running_api

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": False}


def body(**extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Weather in Paris?"}], **extra}


async def post(backend: FakeBackend, payload: dict):
    with trio.fail_after(10):
        async with running_api(backend) as api:
            return await api.client.post(CHAT, json=payload)


async def test_json_object_and_schema_send_a_grammar():
    backend = FakeBackend()
    r = await post(backend, body(response_format={"type": "json_object"}))
    assert r.status_code == 200 and backend.specs[-1].grammar == st.JSON_OBJECT_GRAMMAR
    r = await post(backend, body(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                                          "strict": True}}))
    assert r.status_code == 200
    assert '"\\"name\\""' in backend.specs[-1].grammar and backend.specs[-1].grammar.startswith("char ::=")
    r = await post(backend, body(response_format={"type": "text"}))
    assert r.status_code == 200 and backend.specs[-1].grammar == ""


BAD = [
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "response_format.json_schema.schema", "invalid JSON schema"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5,
                                                                                           "maxLength": 2}}}),
     "response_format.json_schema.schema", "unsatisfiable"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}),
     "response_format.json_schema.schema", "unsatisfiable"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["a"], "additionalProperties": False}}}), "response_format.json_schema.schema", "unsatisfiable"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "integer", "minimum": 3}}}), "response_format.json_schema.schema", "strict"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}),
     "response_format.json_schema.schema", "unsupported"),
    (body(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}), "response_format.json_schema.name", "name"),
    (body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]),
     "tools[0].function.parameters", "invalid JSON schema"),
    (body(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), "tools[0].function.parameters", "object"),
    (body(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name", "name"),
    (body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "not in 'tools'"),
    (body(tool_choice="required"), "tool_choice", "needs 'tools'"),
    (body(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "must be"),
    (body(tools=[WEATHER], response_format={"type": "json_object"}), "response_format", "cannot be combined"),
    ({"model": "fake-model", "messages": [{"role": "tool", "content": "22C"}]}, "messages[0].tool_call_id", "tool_call_id"),
    ({"model": "fake-model", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": 3}}]}]},
     "messages[0].tool_calls", "function.name"),
]


@pytest.mark.parametrize(("payload", "param", "words"), BAD)
async def test_bad_schemas_and_tools_are_400(payload, param, words):
    backend = FakeBackend()
    r = await post(backend, payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
    assert backend.specs == []


async def test_tools_are_rendered_into_the_prompt_and_forced_by_a_grammar():
    backend = FakeBackend()
    r = await post(backend, body(tools=[WEATHER, ADD], tool_choice="required", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]))
    assert r.status_code == 200
    spec = backend.specs[-1]
    system = spec.messages[0]
    assert system.role == "system" and system.content.startswith("Be brief.") and "get_weather" in system.content
    assert st.CALL_OPEN in system.content and spec.grammar.startswith("root ::= tool-calls\n")
    r = await post(backend, body(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
                                 parallel_tool_calls=False))
    spec = backend.specs[-1]
    assert '"\\"add\\""' in spec.grammar and "get_weather" not in spec.grammar and ")*" not in spec.grammar.splitlines()[1]
    r = await post(backend, body(tools=[WEATHER]))  # auto by default: text or calls
    assert backend.specs[-1].grammar.startswith("root ::= tool-calls | plain-text")
    r = await post(backend, body(tools=[WEATHER], tool_choice="none"))
    assert backend.specs[-1].grammar == "" and "get_weather" not in backend.specs[-1].messages[0].content


async def test_later_turns_with_tool_calls_and_tool_results_are_accepted():
    backend = FakeBackend()
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"}]}]
    r = await post(backend, {"model": "fake-model", "messages": msgs, "tools": [WEATHER]})
    assert r.status_code == 200
    m = backend.specs[-1].messages
    assert [x.role for x in m] == ["system", "user", "assistant", "user"]
    assert m[2].content == st.render_call("get_weather", '{"city": "Paris"}') + "\n" + st.render_call("get_weather", '{"city": "Rome"}')
    assert m[3].content.count("<tool_response>") == 2 and '"name": "get_weather", "content": "25C"' in m[3].content


CALLS = [st.CALL_OPEN + "\n", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}', "\n" + st.CALL_CLOSE,
         "\n" + st.CALL_OPEN + "\n", '{"name": "add", "arguments": {"a": 1, "b": 2}}', "\n" + st.CALL_CLOSE]


@pytest.fixture
def scripted(monkeypatch):
    def use(texts):
        monkeypatch.setattr(fb, "WORDS", list(texts))
        monkeypatch.setattr(fb, "script", lambda spec: list(texts))
    return use


async def test_tool_calls_response_non_streamed(scripted):
    scripted(CALLS)
    r = await post(FakeBackend(), body(tools=[WEATHER, ADD]))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] is None and msg["role"] == "assistant"
    calls = msg["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"a": 1, "b": 2}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls) and calls[0]["id"] != calls[1]["id"]


async def test_plain_text_under_auto_is_an_ordinary_answer(scripted):
    scripted(["It is ", "sunny."])
    for stream in (False, True):
        backend = FakeBackend()
        r = await post(backend, body(tools=[WEATHER], stream=stream))
        if stream:
            events = parse_sse(r.text)[:-1]
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "It is sunny."
            assert events[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            assert r.json()["choices"][0]["message"]["content"] == "It is sunny."
            assert r.json()["choices"][0]["finish_reason"] == "stop"


async def test_tool_calls_streamed_as_openai_deltas(scripted):
    scripted(CALLS)
    r = await post(FakeBackend(), body(tools=[WEATHER, ADD], stream=True))
    events = parse_sse(r.text)[:-1]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    tc = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    firsts = [d for d in tc if "id" in d]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in firsts] == [(0, "get_weather", ""), (1, "add", "")]
    args = {0: "", 1: ""}
    for d in tc:
        args[d["index"]] += d["function"]["arguments"]
    assert json.loads(args[0]) == {"city": "Paris"} and json.loads(args[1]) == {"a": 1, "b": 2}
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_unfinished_call_ends_as_text_with_length(scripted):
    scripted(CALLS[:3])
    backend = FakeBackend()
    r = await post(backend, body(tools=[WEATHER], tool_choice="required", max_tokens=2))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith(st.CALL_OPEN)
    r = await post(backend, body(tools=[WEATHER], tool_choice="required", max_tokens=2, stream=True))
    events = parse_sse(r.text)[:-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]).startswith(st.CALL_OPEN)


async def test_openai_client_reads_tool_calls_streamed_and_not(scripted):
    scripted(CALLS[:5])
    with trio.fail_after(20):
        async with running_api(FakeBackend()) as api:
            c = openai.OpenAI(base_url=api.base_url + "/v1", api_key="x", timeout=10)
            run = functools.partial(trio.to_thread.run_sync)
            done = await run(functools.partial(c.chat.completions.create, model="fake-model", tools=[WEATHER],
                                               messages=[{"role": "user", "content": "Paris?"}]))
            chunks = await run(lambda: list(c.chat.completions.create(model="fake-model", tools=[WEATHER], stream=True,
                                                                      messages=[{"role": "user", "content": "Paris?"}])))
    call = done.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments), done.choices[0].finish_reason) == (
        "get_weather", {"city": "Paris"}, "tool_calls")
    streamed = [tc for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls]
    assert streamed[0].function.name == "get_weather" and streamed[0].id.startswith("call_")
    assert json.loads("".join(tc.function.arguments or "" for tc in streamed)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_calls_are_capped_at_one_per_tool_and_repeats_dropped():
    one, two = st.Tool("get_weather", "", WEATHER["function"]["parameters"]), st.Tool("add", "", ADD["function"]["parameters"])
    assert "{0," not in st.tools_grammar([one], parallel=True, optional=False)
    assert "{0,1}" in st.tools_grammar([one, two], parallel=True, optional=False)
    assert "{0," not in st.tools_grammar([one, two], parallel=False, optional=False)
    block = st.render_call("get_weather", '{"city": "Paris"}')
    calls = st.parse_calls(block + "\n" + block, {"get_weather"})
    assert [c.name for c in calls] == ["get_weather"]
    assert st.parse_calls(block + " trailing words", {"get_weather"}) is None
    assert st.parse_calls(st.render_call("other", "{}"), {"get_weather"}) is None
