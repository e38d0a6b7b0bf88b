"""Structured output and a full two-turn tool loop with the official openai client against a real
entry and a real node process serving the bundled SmolLM2 (grammar applied on the node)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.entry.test_e2e import NODE_ARGS, create_key, wait_nodes
from tests.support.node_procs import spawn_entry, spawn_node, wait_ready_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_path):
    tmp = tmp_path_factory.mktemp("tools-e2e")
    db = tmp / "keys.db"
    key = create_key(db, "tester")
    procs = [spawn_entry(tmp, "entry", "--keys-db", str(db), "--token-timeout", "30")]
    try:
        info = wait_ready_sync(procs[0], 60)
        procs.append(spawn_node(tmp, "node1", "--bootstrap", info["p2p_addrs"][0], *NODE_ARGS))
        wait_ready_sync(procs[1], 120)
        model = wait_nodes(info["url"], 1, key)[0]["id"]
        c = openai.OpenAI(base_url=info["url"] + "/v1", api_key=key, max_retries=0, timeout=300)
        c.model_id = model
        yield c
    finally:
        for p in procs:
            p.stop()


def _stream_message(chunks) -> tuple[str | None, list[dict], str]:
    """Accumulate a streamed chat answer as the openai docs show: content, tool calls by index."""
    content, calls, finish = None, {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        if d.content:
            content = (content or "") + d.content
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            c["id"] = tc.id or c["id"]
            if tc.function and tc.function.name:
                c["function"]["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                c["function"]["arguments"] += tc.function.arguments
        finish = ch.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_tool_loop(client, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=client.model_id, tools=[WEATHER], max_tokens=60, temperature=0)
    if stream:
        content, calls, finish = _stream_message(client.chat.completions.create(
            messages=messages, tool_choice="required", stream=True, **kw))
    else:
        r = client.chat.completions.create(messages=messages, tool_choice="required", **kw)
        msg = r.choices[0].message
        content, finish = msg.content, r.choices[0].finish_reason
        calls = [c.model_dump() for c in msg.tool_calls]
    assert finish == "tool_calls" and content is None and len(calls) >= 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])

    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    if stream:
        content, calls2, finish = _stream_message(client.chat.completions.create(
            messages=messages, tool_choice="none", stream=True, **kw))
    else:
        r = client.chat.completions.create(messages=messages, tool_choice="none", **kw)
        content, calls2, finish = r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason
    assert content and not calls2 and finish in ("stop", "length")


def test_named_tool_choice_and_auto(client):
    r = client.chat.completions.create(model=client.model_id, tools=[WEATHER], max_tokens=60, temperature=0.7, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       messages=[{"role": "user", "content": "Is it cold in Oslo?"}])
    [call] = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = client.chat.completions.create(model=client.model_id, tools=[WEATHER], max_tokens=40, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
    choice = r.choices[0]
    # auto: the model may answer or call; either way the answer is well-formed.
    assert (choice.finish_reason == "tool_calls" and choice.message.tool_calls) or choice.message.content


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, stream):
    kw = dict(model=client.model_id, max_tokens=60, temperature=0.8, seed=2,
              messages=[{"role": "user", "content": "Invent a person."}],
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw) if ch.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_parses_and_short_max_tokens_gives_length(client):
    r = client.chat.completions.create(model=client.model_id, max_tokens=60, temperature=0,
                                       messages=[{"role": "user", "content": 'Reply with a JSON object with key "ok".'}],
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=client.model_id, max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "Invent a person."}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_bad_schema_is_a_400_from_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=client.model_id, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "p", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
