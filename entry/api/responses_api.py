"""`POST /v1/responses` (OpenAI's Responses API) as an adapter over the chat-completions path.

A Responses request is translated into a chat-completions body (`ResponsesRequest.to_chat`),
which then goes through exactly what /v1/chat/completions does: the same parsing, limits,
routing (`model: "auto"`), generation, failover and accounting. `ResponsesAdapter` rewrites
that path's answer on its way out: a chat.completion becomes a Response object, a chunk
stream becomes the Responses event stream. Doing it at the edge keeps one code path for
generation, and whatever the chat path learns (tool calls, structured output) reaches the
Responses API by translation alone.

The entry keeps nothing between requests: everything that needs a conversation stored on
the server (`store`, `previous_response_id`, `conversation`, `background`, stored prompts,
item references) is refused with a 400 that says so.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from entry.api.parsing import ApiError, invalid
from entry.api.responses import dumps
from protocol.messages import SamplingParams

_ROLES = {"user": "user", "system": "system", "developer": "developer", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")
# The chat path names its own fields in errors; a Responses client sent these instead.
_PARAM_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "messages": "input"}
_DEFAULTS = SamplingParams()  # what a request that sets no sampling parameter gets (greedy)
_KEEPS_NOTHING = "this mesh keeps no conversations or responses between requests"


def _refused(param: str, why: str) -> ApiError:
    return invalid(f"'{param}' is not supported by this mesh: {why}", param, "unsupported_parameter")


def responses_error(e: ApiError) -> ApiError:
    """An error of the chat path, naming the Responses API's parameter instead of chat's."""
    if e.param is None:
        return e
    head = e.param.split("[", 1)[0].split(".", 1)[0]
    name = _PARAM_NAMES.get(head)
    if name is None:
        return e
    msg = e.message.replace(f"'{head}'", f"'{name}'")
    return ApiError(e.status, msg, type=e.type, param=name, code=e.code, headers=e.headers)


def _text_of(content: Any, param: str, allowed: tuple[str, ...] = _TEXT_PARTS) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of input_text parts", param)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise invalid(f"content part type {kind!r} is not supported: this mesh serves text-only models "
                          f"(parts of type {' or '.join(allowed)})", f"{param}[{i}]", "unsupported_content")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"a {kind} part needs a string 'text'", f"{param}[{i}].text")
        parts.append(text)
    return "\n".join(parts)


def _str_field(item: dict, key: str, param: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or not v:
        raise invalid(f"'{key}' must be a non-empty string", f"{param}.{key}")
    return v


def _messages(body: dict) -> list[dict]:
    out: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("'instructions' must be a string", "instructions")
        out.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        out.append({"role": "user", "content": raw})
        return out
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string or a non-empty list of input items", "input")
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid("each input item must be an object", param)
        kind = item.get("type", "message")
        if kind == "message":
            raw_role = item.get("role")
            role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                raise invalid("a message's role must be one of user, system, developer, assistant", f"{param}.role")
            allowed: tuple[str, ...] = _TEXT_PARTS + ("refusal",) if role == "assistant" else _TEXT_PARTS
            if role == "assistant" and isinstance(item.get("content"), list):
                # A refusal the client echoes back is text the assistant said.
                content = _text_of([{"type": "output_text", "text": p.get("refusal")} if isinstance(p, dict)
                                    and p.get("type") == "refusal" else p for p in item["content"]], f"{param}.content",
                                   allowed)
            else:
                content = _text_of(item.get("content"), f"{param}.content", allowed)
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            arguments = item.get("arguments", "")
            if not isinstance(arguments, str):
                raise invalid("'arguments' must be a JSON string", f"{param}.arguments")
            call = {"id": _str_field(item, "call_id", param), "type": "function",
                    "function": {"name": _str_field(item, "name", param), "arguments": arguments}}
            # Calls that follow each other are one assistant turn, as chat completions has them.
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{param}.output")
            out.append({"role": "tool", "tool_call_id": _str_field(item, "call_id", param), "content": text})
        elif kind == "item_reference":
            raise _refused(f"{param}.type", f"item references need stored items, and {_KEEPS_NOTHING}: send the items")
        elif kind == "reasoning":
            raise _refused(f"{param}.type", "reasoning items: the mesh's models do not reason in a separate channel")
        else:
            raise invalid(f"input item type {kind!r} is not supported: this mesh takes message, function_call and "
                          f"function_call_output items", f"{param}.type", "unsupported_content")
    return out


def _tools(body: dict) -> list[dict] | None:
    raw = body.get("tools")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list", "tools")
    out = []
    for i, t in enumerate(raw):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise _refused(f"tools[{i}]", f"built-in tools ({kind!r}) run on OpenAI's own servers; this mesh serves "
                           "function tools, which your code runs")
        fn = {"name": _str_field(t, "name", f"tools[{i}]")}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(body: dict) -> Any:
    tc = body.get("tool_choice")
    if tc is None or isinstance(tc, str):
        return tc  # auto | none | required; the chat path checks the value
    if isinstance(tc, dict) and tc.get("type") == "function":
        return {"type": "function", "function": {"name": _str_field(tc, "name", "tool_choice")}}
    kind = tc.get("type") if isinstance(tc, dict) else None
    raise _refused("tool_choice", f"{kind!r}: only auto, none, required or a named function tool")


def _response_format(body: dict) -> dict | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("'text' must be an object like {\"format\": {\"type\": \"text\"}}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = {"name": _str_field(fmt, "name", "text.format")}
        for key in ("schema", "strict", "description"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise invalid("'text.format.type' must be text, json_object or json_schema", "text.format")


def _refuse_stored(body: dict) -> None:
    """Parameters that would need the entry to keep conversations, or to run what the mesh has
    not got: a 400 that says why, rather than an answer that silently differs."""
    if body.get("store") is True:
        raise _refused("store", f"{_KEEPS_NOTHING}; send \"store\": false (and the whole conversation as input)")
    if body.get("previous_response_id") is not None:
        raise _refused("previous_response_id", f"{_KEEPS_NOTHING}; send the earlier turns as input items")
    if body.get("conversation") is not None:
        raise _refused("conversation", f"{_KEEPS_NOTHING}; send the earlier turns as input items")
    if body.get("background") is True:
        raise _refused("background", f"{_KEEPS_NOTHING}, so a response cannot be fetched later; use stream instead")
    if body.get("prompt") is not None:
        raise _refused("prompt", "stored prompt templates live on OpenAI's servers; send the text as instructions")
    if body.get("include"):
        raise _refused("include", "no extra output (logprobs, reasoning, tool sources) is attached to responses here")
    if body.get("reasoning") not in (None, {}):
        raise _refused("reasoning", "the mesh's models have no reasoning effort or summaries to set")
    if body.get("max_tool_calls") is not None:
        raise _refused("max_tool_calls", "a limit on tool calls is not enforced here")
    if body.get("truncation") not in (None, "disabled"):
        raise _refused("truncation", "the input is never truncated: an input over the context is refused")


class ResponsesRequest:
    """One Responses request: its body, and the chat-completions body it stands for."""

    def __init__(self) -> None:
        self.body: dict = {}
        self.chat: dict = {}

    def to_chat(self, body: dict) -> dict:
        self.body = body
        _refuse_stored(body)
        chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        for key in ("temperature", "top_p", "parallel_tool_calls", "stream", "mesh"):
            if body.get(key) is not None:
                chat[key] = body[key]
        if body.get("stream") is True:
            chat["stream_options"] = {"include_usage": True}  # response.completed carries usage
        tools = _tools(body)
        if tools is not None:
            chat["tools"] = tools
        tc = _tool_choice(body)
        if tc is not None:
            chat["tool_choice"] = tc
        rf = _response_format(body)
        if rf is not None:
            chat["response_format"] = rf
        self.chat = chat
        return chat

    def skeleton(self, response_id: str, created: int, model: str) -> dict:
        """The Response object before any output, echoing the request as OpenAI does."""
        b = self.body
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "background": False, "completed_at": None, "error": None, "incomplete_details": None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": None, "model": model, "output": [], "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": b.get("temperature", _DEFAULTS.temperature), "text": {"format": fmt},
            "tool_choice": b.get("tool_choice", "auto"), "tools": list(b.get("tools") or []),
            "top_p": b.get("top_p", _DEFAULTS.top_p), "truncation": "disabled", "usage": None, "user": None,
            "metadata": b.get("metadata") if isinstance(b.get("metadata"), dict) else {},
        }


def _usage(u: dict | None) -> dict | None:
    if not u:
        return None
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(item_id: str, call: dict, status: str) -> dict:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": item_id, "call_id": call.get("id") or _new_id("call_"),
            "name": fn.get("name") or "", "arguments": fn.get("arguments") or "", "status": status}


def _finish(obj: dict, finish_reason: str | None) -> None:
    if finish_reason == "length":
        obj["status"] = "incomplete"
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        obj["status"] = "completed"
        obj["completed_at"] = int(time.time())


def response_object(req: ResponsesRequest, completion: dict) -> dict:
    """A chat.completion -> the Response object."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    obj = req.skeleton(_new_id("resp_"), completion.get("created", int(time.time())), completion.get("model", ""))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    output = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(_message_item(_new_id("msg_"), message.get("content") or "", status))
    output += [_call_item(_new_id("fc_"), c, "completed") for c in message.get("tool_calls") or []]
    obj["output"] = output
    obj["usage"] = _usage(completion.get("usage"))
    _finish(obj, choice.get("finish_reason"))
    if "mesh" in completion:
        obj["mesh"] = completion["mesh"]
    return obj


class _StreamTranslator:
    """Chat-completion chunks -> Responses events, in order, with sequence numbers."""

    def __init__(self, req: ResponsesRequest):
        self.req = req
        self.seq = 0
        self.obj: dict = {}  # the Response object, from the first chunk on
        self.items: list[dict] = []  # output items so far, by output_index
        self.text_item: dict | None = None  # the message item being streamed
        self.calls: dict[int, dict] = {}  # chat tool_call index -> its function_call item
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.mesh: dict | None = None
        self.over = False

    def _event(self, kind: str, **fields) -> bytes:
        fields = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {dumps(fields)}\n\n".encode()

    def _start(self, chunk: dict) -> list[bytes]:
        if self.obj:
            return []
        self.obj = self.req.skeleton(_new_id("resp_"), chunk.get("created", int(time.time())), chunk.get("model", ""))
        return [self._event("response.created", response=self.obj), self._event("response.in_progress", response=self.obj)]

    def _open_text(self) -> list[bytes]:
        if self.text_item is not None:
            return []
        self.text_item = _message_item(_new_id("msg_"), "", "in_progress")
        self.text_item["content"] = []
        self.items.append(self.text_item)
        index = len(self.items) - 1
        return [self._event("response.output_item.added", output_index=index, item=self.text_item),
                self._event("response.content_part.added", item_id=self.text_item["id"], output_index=index,
                            content_index=0, part=_text_part(""))]

    def _text(self, delta: str) -> list[bytes]:
        out = self._open_text()
        item = self.text_item
        assert item is not None
        if not item["content"]:
            item["content"].append(_text_part(""))
        item["content"][0]["text"] += delta
        out.append(self._event("response.output_text.delta", item_id=item["id"], output_index=self.items.index(item),
                               content_index=0, delta=delta, logprobs=[]))
        return out

    def _call_delta(self, tc: dict) -> list[bytes]:
        out = []
        index = tc.get("index", 0)
        item = self.calls.get(index)
        fn = tc.get("function") or {}
        if item is None:
            item = _call_item(_new_id("fc_"), {"id": tc.get("id"), "function": {"name": fn.get("name")}}, "in_progress")
            self.calls[index] = item
            self.items.append(item)
            out.append(self._event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item)))
        elif fn.get("name"):
            item["name"] += fn["name"]
        args = fn.get("arguments") or ""
        if args:
            item["arguments"] += args
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self.items.index(item), delta=args))
        return out

    def chunk(self, chunk: dict) -> list[bytes]:
        if self.over:
            return []
        if "error" in chunk and "choices" not in chunk:
            return self.failed(chunk["error"])
        out = self._start(chunk)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("mesh") is not None:
            self.mesh = chunk["mesh"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for tc in delta.get("tool_calls") or []:
                out += self._call_delta(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def end(self) -> list[bytes]:
        """The chat stream is over: close every item, then the response."""
        if self.over:
            return []
        self.over = True
        out = self._start({})
        if not self.items:
            out += self._open_text()  # an empty answer is still one (empty) message
        status = "incomplete" if self.finish_reason == "length" else "completed"
        for index, item in enumerate(self.items):
            if item["type"] == "message":
                if not item["content"]:
                    item["content"].append(_text_part(""))
                part = item["content"][0]
                out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                       content_index=0, text=part["text"], logprobs=[]))
                out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                       content_index=0, part=part))
                item["status"] = status
            else:
                out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                       name=item["name"], arguments=item["arguments"]))
                item["status"] = "completed"
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        obj = self.obj
        obj["output"] = self.items
        obj["usage"] = _usage(self.usage)
        _finish(obj, self.finish_reason)
        if self.mesh is not None:
            obj["mesh"] = self.mesh
        out.append(self._event("response.incomplete" if obj["status"] == "incomplete" else "response.completed",
                               response=obj))
        return out

    def failed(self, error: dict) -> list[bytes]:
        """The generation failed mid-stream (headers are gone): an error event, then the response
        as failed, as OpenAI's stream reports it."""
        self.over = True
        out = self._start({})
        message = error.get("message") or "the generation failed"
        out.append(self._event("error", code=error.get("code"), message=message, param=error.get("param")))
        obj = self.obj
        obj["status"] = "failed"
        obj["output"] = self.items
        obj["error"] = {"code": "server_error", "message": message}
        out.append(self._event("response.failed", response=obj))
        return out


class ResponsesAdapter:
    """Wraps the chat path's ASGI response and rewrites what it sends: 200 JSON and SSE bodies
    become Responses objects and events; errors (already in OpenAI's shape) pass unchanged."""

    def __init__(self, inner, req: ResponsesRequest):
        self.inner = inner
        self.req = req

    async def __call__(self, scope, receive, send) -> None:
        state: dict[str, Any] = {"mode": None, "buf": bytearray(), "headers": None}
        translator = _StreamTranslator(self.req)

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"")
                if message["status"] != 200:
                    state["mode"] = "pass"
                elif ctype.startswith(b"text/event-stream"):
                    state["mode"] = "sse"
                else:
                    state["mode"] = "json"
                    state["headers"] = [(k, v) for k, v in message.get("headers") or [] if k != b"content-length"]
                    return  # sent with the rewritten body, whose length differs
                await send(message)
                return
            if message["type"] != "http.response.body" or state["mode"] == "pass":
                await send(message)
                return
            state["buf"] += message.get("body", b"")
            more = message.get("more_body", False)
            if state["mode"] == "json":
                if more:
                    return
                data = dumps(response_object(self.req, json.loads(bytes(state["buf"])))).encode("utf-8")
                await send({"type": "http.response.start", "status": 200,
                            "headers": state["headers"] + [(b"content-length", str(len(data)).encode())]})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            out: list[bytes] = []
            buf = state["buf"]
            while (end := buf.find(b"\n\n")) >= 0:
                event, state["buf"] = bytes(buf[:end]), buf[end + 2:]
                buf = state["buf"]
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    out += translator.end()
                else:
                    out += translator.chunk(json.loads(data))
            if not more:
                out += translator.end()  # a chat stream always ends with [DONE]; this only guards
            if out or not more:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

        await self.inner(scope, receive, rewrite)
