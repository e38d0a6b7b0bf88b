"""POST /v1/responses: the Responses API over the chat path, checked with the official
`openai` client (run from a thread: it is synchronous, the server runs in this trio loop)."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from entry.backend import MeshUnavailable
from tests.support.fake_backend import DESCRIPTION, WORDS, FakeBackend, parse_sse, running_api

FULL = "".join(WORDS)
RESPONSES = "/v1/responses"


def client(api, timeout: float = 10) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def test_text_input_answers_a_response_object():
    with trio.fail_after(20):
        async with running_api() as api:
            r = await in_thread(client(api).responses.create, model="fake-model", input="Hi there", temperature=0.5,
                                top_p=0.9)
            spec = api.backend.specs[0]
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == FULL
    assert r.model == "fake-model"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (2, len(WORDS), 2 + len(WORDS))
    assert r.temperature == 0.5 and r.top_p == 0.9 and r.incomplete_details is None
    assert r.model_extra["mesh"]["served_by"][0]["kind"] == DESCRIPTION
    assert [(m.role, m.content) for m in spec.messages] == [("user", "Hi there")]
    assert (spec.params.temperature, spec.params.top_p) == (0.5, 0.9)


async def test_instructions_come_first_and_message_items_are_translated():
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                        {"type": "input_text", "text": "again"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "And now?"},
    ]
    with trio.fail_after(20):
        async with running_api() as api:
            r = await in_thread(client(api).responses.create, model="fake-model", input=items, instructions="Be kind.")
            spec = api.backend.specs[0]
    assert r.instructions == "Be kind."
    assert (r.temperature, r.top_p) == (0.0, 1.0)  # what ran: the mesh's default is greedy
    assert [(m.role, m.content) for m in spec.messages] == [
        ("system", "Be kind."), ("system", "Answer briefly."), ("user", "Hi\nagain"), ("assistant", "Hello!"),
        ("user", "And now?")]


async def test_max_output_tokens_makes_an_incomplete_response():
    with trio.fail_after(20):
        async with running_api() as api:
            r = await in_thread(client(api).responses.create, model="fake-model", input="Hi", max_output_tokens=3)
            spec = api.backend.specs[0]
    assert spec.params.max_tokens == 3
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "".join(WORDS[:3]) and r.usage.output_tokens == 3 and r.max_output_tokens == 3


async def test_streaming_events_in_order_with_the_official_client():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            events = await in_thread(lambda: list(c.responses.create(model="fake-model", input="Hi", stream=True)))

            def helper():
                with c.responses.stream(model="fake-model", input="Hi", instructions="Be kind.") as s:
                    deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
                    return deltas, s.get_final_response()

            deltas, final = await in_thread(helper)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(WORDS)] == ["response.output_text.delta"] * len(WORDS)
    assert kinds[4 + len(WORDS):] == ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == FULL
    done = events[-1].response
    assert done.status == "completed" and done.output_text == FULL
    assert done.usage.output_tokens == len(WORDS) and done.usage.total_tokens == len(WORDS) + 1
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {done.output[0].id}
    assert {e.response.id for e in events if hasattr(e, "response")} == {done.id}
    assert "".join(deltas) == FULL and final.output_text == FULL and final.instructions == "Be kind."


async def test_streamed_max_output_tokens_ends_with_response_incomplete():
    with trio.fail_after(20):
        async with running_api() as api:
            r = await api.client.post(RESPONSES, json={"model": "fake-model", "input": "Hi", "max_output_tokens": 2,
                                                       "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("event: ") for e in events)
    last = events[-1]
    assert last.startswith("event: response.incomplete\n")
    assert '"reason":"max_output_tokens"' in last


async def test_a_failure_before_the_first_token_is_a_real_status():
    backend = FakeBackend(fail_before=MeshUnavailable("no node can serve this now", retry_after=7))
    with trio.fail_after(20):
        async with running_api(backend) as api:
            r = await api.client.post(RESPONSES, json={"model": "fake-model", "input": "Hi", "stream": True})
            unknown = await api.client.post(RESPONSES, json={"model": "nope", "input": "Hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "mesh_unavailable"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


async def test_a_failure_mid_stream_ends_with_response_failed():
    backend = FakeBackend(fail_after=2)
    with trio.fail_after(20):
        async with running_api(backend) as api:
            c = client(api)
            events = await in_thread(lambda: list(c.responses.create(model="fake-model", input="Hi", stream=True)))
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert kinds.count("response.output_text.delta") == 2
    assert events[-1].response.status == "failed" and "failed" in events[-1].response.error.message


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"store": True}, "store", "keeps no conversations"),
    ({"previous_response_id": "resp_abc"}, "previous_response_id", "keeps no conversations"),
    ({"conversation": "conv_abc"}, "conversation", "keeps no conversations"),
    ({"background": True}, "background", "stream instead"),
    ({"include": ["message.output_text.logprobs"]}, "include", "no extra output"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "no reasoning effort"),
    ({"prompt": {"id": "pmpt_abc"}}, "prompt", "stored prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "built-in tools"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]", "built-in tools"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "only auto, none, required"),
    ({"max_tool_calls": 2}, "max_tool_calls", "not enforced"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "keeps no conversations"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
     "input[0].content[0]", "text-only"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role", "role must be"),
    ({"input": []}, "input", "non-empty list"),
    ({"input": 5}, "input", "must be a string"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "text, json_object or json_schema"),
    ({"max_output_tokens": 0}, "max_output_tokens", "'max_output_tokens' must be an integer"),
    ({"temperature": 9}, "temperature", "temperature"),
])
async def test_refused_and_invalid_requests_get_openai_shaped_400s(body, param, says):
    with trio.fail_after(20):
        async with running_api() as api:
            r = await api.client.post(RESPONSES, json={"model": "fake-model", "input": "Hi", **body})
            assert api.backend.specs == []
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and says in err["message"], err


async def test_the_official_client_raises_bad_request_for_refused_params():
    with trio.fail_after(20):
        async with running_api() as api:
            c = client(api)
            with pytest.raises(openai.BadRequestError) as e:
                await in_thread(c.responses.create, model="fake-model", input="Hi", previous_response_id="resp_1")
    assert e.value.param == "previous_response_id"


async def test_store_false_and_ignored_fields_are_accepted():
    with trio.fail_after(20):
        async with running_api() as api:
            r = await in_thread(client(api).responses.create, model="fake-model", input="Hi", store=False, user="u-1",
                                metadata={"k": "v"}, truncation="disabled", service_tier="auto",
                                text={"format": {"type": "text"}}, safety_identifier="s", prompt_cache_key="p")
    assert r.status == "completed" and r.output_text == FULL and r.metadata == {"k": "v"}


async def test_auto_model_is_routed():
    from entry.targets import AutoRouting

    # The first routed request imports the routing package: seconds on a loaded machine.
    with trio.fail_after(90):
        async with running_api(auto=AutoRouting()) as api:
            c = client(api, timeout=60)
            r = await in_thread(c.responses.with_raw_response.create, model="auto", input="What is 2+2?")
            s = await in_thread(lambda: list(c.responses.create(model="auto", input="What is 2+2?", stream=True)))
    body = r.parse()
    assert body.model == "fake-model" and body.model_extra["mesh"]["route"]["model"] == "fake-model"
    assert r.headers["x-mesh-model"] == "fake-model"
    assert s[-1].type == "response.completed" and s[-1].response.model == "fake-model"
    assert s[-1].response.output_text == FULL


async def test_embeddings_are_refused_clearly():
    with trio.fail_after(20):
        async with running_api() as api:
            with pytest.raises(openai.NotFoundError) as e:
                await in_thread(client(api).embeddings.create, model="fake-model", input="Hi")
    assert "embeddings are not served by this mesh" in e.value.message


def test_sse_events_name_their_type():
    """The adapter writes `event:` lines, which parse_sse (chat's plain data: stream) must not
    be used for: this guards the helper against silently accepting a Responses stream."""
    with pytest.raises(AssertionError):
        parse_sse('event: response.created\ndata: {"type": "response.created"}\n\n')


# --- tool loops: these need tools in the chat path (issue 12, items 1-2, another branch) -----------
# Until that work is merged the chat path refuses tools with a 400, and these are expected to
# fail; run them after the merge (they are marked so).

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}, "strict": True}]


def test_tools_translate_to_chat_completions_tools():
    from entry.api.responses_api import ResponsesRequest

    chat = ResponsesRequest().to_chat({
        "model": "m", "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        "input": [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                  {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                  {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "25C"}]}],
    })
    assert chat["tools"] == [{"type": "function", "function": {k: TOOLS[0][k] for k in
                                                               ("name", "description", "parameters", "strict")}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                             "strict": True}}
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
    ]


def test_chat_tool_calls_become_function_call_items():
    from entry.api.responses_api import ResponsesRequest, _StreamTranslator, response_object

    req = ResponsesRequest()
    req.to_chat({"model": "m", "input": "x", "tools": TOOLS})
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    obj = response_object(req, {"created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
         "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    [item] = obj["output"]
    assert item["type"] == "function_call" and item["call_id"] == "call_9" and item["name"] == "get_weather"
    assert item["arguments"] == '{"city":"Oslo"}' and item["status"] == "completed" and item["id"].startswith("fc_")
    assert obj["status"] == "completed" and obj["tools"] == TOOLS

    t = _StreamTranslator(req)
    head = {"created": 1, "model": "m"}
    raw = b"".join(t.chunk({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                   + t.chunk({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                       {"index": 0, "id": "call_9", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}]}}]})
                   + t.chunk({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                       {"index": 0, "function": {"arguments": '{"city":'}}]}}]})
                   + t.chunk({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                       {"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]})
                   + t.chunk({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                   + t.end())
    kinds = [e.split("\n", 1)[0].removeprefix("event: ") for e in raw.decode().split("\n\n") if e]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert '"arguments":"{\\"city\\":\\"Oslo\\"}"' in raw.decode().split("\n\n")[-2]


def _chat_path_has_tools() -> bool:
    from entry.api.parsing import ApiError, parse_chat

    try:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, mix_seed=lambda s: s)
    except ApiError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _chat_path_has_tools(), reason="AFTER THE TOOLS MERGE: needs tools in the chat path "
                    "(issue 12 items 1-2, another branch); runs by itself once the chat path accepts tools")
async def test_after_tools_merge_two_turn_tool_loop_on_smollm2(smollm2_path):
    from tests.support.real_api import real_api

    async with real_api(smollm2_path) as api:
        await _tool_loop(api)


async def _tool_loop(smollm2_api):
    c = smollm2_api.openai()

    def loop(stream: bool):
        kw = dict(model=smollm2_api.model, tools=TOOLS, tool_choice="required", max_output_tokens=60, temperature=0)
        first_input = [{"role": "user", "content": "What is the weather in Paris?"}]
        if stream:
            with c.responses.stream(input=first_input, **kw) as s:
                first = s.get_final_response()
        else:
            first = c.responses.create(input=first_input, **kw)
        calls = [o for o in first.output if o.type == "function_call"]
        follow = first_input + [{"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                                 "arguments": calls[0].arguments},
                                {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, sunny"}]
        second = c.responses.create(model=smollm2_api.model, input=follow, tools=TOOLS, tool_choice="none",
                                    max_output_tokens=30, temperature=0)
        return calls, second

    for stream in (False, True):
        calls, second = await in_thread(loop, stream)
        assert calls and calls[0].name == "get_weather" and "city" in __import__("json").loads(calls[0].arguments)
        assert second.status in ("completed", "incomplete") and second.output_text
