"""OpenAI request bodies -> validated generation plans.

Only the fields generation needs are copied into a GenerationSpec, one by one: nothing from
the request (the `user` field, message `name`s, metadata) or from the connection can reach a
node by accident.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from entry.api import structured as st
from entry.backend import GenerationSpec
from protocol.messages import (
    MAX_MESSAGES,
    MAX_STOP,
    MAX_STOP_LEN,
    MAX_TEXT,
    MAX_TOKENS_LIMIT,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    SamplingParams,
)

MAX_CHOICES = 8  # n (times prompts, for /v1/completions): each choice is a full generation
# Temperatures below this are greedy, as in vLLM (_SAMPLING_EPS): dividing logits by a
# near-zero temperature only adds overflow and ties, never a different intent.
GREEDY_BELOW = 1e-5
_SEED_SPACE = 2**63
_CHARS_PER_TOKEN = 4
_TEMPLATE_TOKENS = 4  # role markers and separators a chat template adds per message
# "developer" is what newer OpenAI clients send instead of "system".
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationPlan:
    """What one API request asks for: one spec per choice, in choice-index order."""

    endpoint: str  # "chat" | "completion"
    model: str
    stream: bool
    include_usage: bool
    specs: list[GenerationSpec]
    prompt_of: list[int]  # prompt index of each choice (usage counts each prompt once)
    logprobs: bool
    top_logprobs: int
    # Names of the functions a chat answer may call: the answer is read for tool calls
    # (message.tool_calls, finish_reason "tool_calls"); None when tools are off.
    tool_names: set[str] | None = None

    def prompt_estimates(self) -> list[int]:
        """A token estimate for each prompt (usage counts each prompt once). The entry has no
        tokenizer (it does not hold most models): ~4 characters per token, the usual English
        average, plus a few template tokens per chat message. Text that tokenizes worse is
        charged at its real count when the request ends."""
        out: dict[int, int] = {}
        for spec, pi in zip(self.specs, self.prompt_of):
            if pi not in out:
                if spec.kind == "chat":
                    chars, extra = sum(len(m.content) for m in spec.messages), _TEMPLATE_TOKENS * len(spec.messages)
                else:
                    chars, extra = len(spec.prompt), 0
                out[pi] = extra + -(-chars // _CHARS_PER_TOKEN)
        return [out[i] for i in sorted(out)]

    def max_tokens(self) -> int:
        """The most tokens this request can use: its prompts' estimates + max_tokens per
        choice (SamplingParams' default when the request sets none)."""
        return sum(self.prompt_estimates()) + sum(spec.params.max_tokens for spec in self.specs)


# --- field readers: each names the offending parameter in its error ---------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or not lo <= v <= hi:
        raise invalid(f"'{key}' must be an integer between {lo} and {hi}", key)
    return v


def _opt_num(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
        raise invalid(f"'{key}' must be a number between {lo:g} and {hi:g}", key)
    return float(v)


def _opt_bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(f"'{key}' must be true or false", key)
    return v


def _unsupported(body: dict, key: str, what: str, allowed=lambda v: v in (None, False, [], {}, "")) -> None:
    if not allowed(body.get(key)):
        raise invalid(f"'{key}' is not supported by this mesh: {what}", key, "unsupported_parameter")


def _model(body: dict) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m.strip() or len(m) > 256:
        raise invalid("'model' must be a model id from /v1/models", "model")
    return m.strip()


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise invalid(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    for s in stops:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LEN:
            raise invalid(f"each 'stop' string must have 1-{MAX_STOP_LEN} characters", "stop")
    return list(stops)


def _sampling(body: dict) -> SamplingParams:
    max_tokens = _opt_int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    # max_completion_tokens is the newer name; it wins when a client sends both.
    alias = _opt_int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if alias is not None:
        max_tokens = alias
    values = {
        "temperature": _opt_num(body, "temperature", 0.0, 5.0),
        "top_p": _opt_num(body, "top_p", 0.0, 1.0),
        "top_k": _opt_int(body, "top_k", 0, 1_000_000),
        "min_p": _opt_num(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _opt_num(body, "repeat_penalty", 0.0, 10.0),
        "repeat_last_n": _opt_int(body, "repeat_last_n", 0, 4096),
        "presence_penalty": _opt_num(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _opt_num(body, "frequency_penalty", -2.0, 2.0),
        "seed": _opt_int(body, "seed", 0, _SEED_SPACE - 1),
        "max_tokens": max_tokens,
    }
    if values["temperature"] is not None and values["temperature"] < GREEDY_BELOW:
        values["temperature"] = 0.0
    params = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    params.stop = _stop(body)
    return params


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = bool(_opt_bool(body, "stream"))
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    return stream, stream and bool(_opt_bool(opts, "include_usage"))


def _common_unsupported(body: dict) -> None:
    _unsupported(body, "logit_bias", "token ids differ between models")
    _unsupported(body, "functions", "the deprecated function calling (use 'tools')")
    _unsupported(body, "function_call", "the deprecated function calling (use 'tool_choice')", lambda v: v in (None, "none"))


def _completion_unsupported(body: dict) -> None:
    _unsupported(body, "tools", "tool calling on /v1/completions (use /v1/chat/completions)")
    _unsupported(body, "tool_choice", "tool calling on /v1/completions (use /v1/chat/completions)",
                 lambda v: v in (None, "none", "auto"))
    _unsupported(body, "response_format", "structured output on /v1/completions (use /v1/chat/completions)",
                 lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"))


def _response_format(body: dict) -> str:
    """The grammar `response_format` asks for ("" for plain text)."""
    rf = body.get("response_format")
    if rf is None:
        return ""
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return ""
    if kind == "json_object":
        return st.JSON_OBJECT_GRAMMAR
    if kind != "json_schema":
        raise invalid(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                      "response_format.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise invalid("response_format json_schema needs a 'json_schema' object with 'name' and 'schema'",
                      "response_format.json_schema")
    name = js.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise invalid("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                      "response_format.json_schema.name")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict")
    schema = js.get("schema", {})
    try:
        return st.schema_grammar(schema, strict=bool(strict))
    except st.SchemaProblem as e:
        raise invalid(str(e), "response_format.json_schema.schema", "invalid_json_schema") from None


def _tools(body: dict) -> list[st.Tool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > st.MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {st.MAX_TOOLS} tools", "tools")
    out: list[st.Tool] = []
    for i, t in enumerate(raw):
        param = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise invalid("each tool must be {\"type\": \"function\", \"function\": {...}}", param)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise invalid("a function name must be 1-64 characters of a-z, A-Z, 0-9, _ and -", f"{param}.function.name")
        if any(o.name == name for o in out):
            raise invalid(f"two tools are named {name!r}", f"{param}.function.name")
        desc = f.get("description") or ""
        if not isinstance(desc, str):
            raise invalid("a function description must be a string", f"{param}.function.description")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise invalid("a function's 'parameters' must be a JSON schema of type object",
                          f"{param}.function.parameters")
        try:
            st.schema_grammar(params, strict=f.get("strict") is True)
        except st.SchemaProblem as e:
            raise invalid(str(e), f"{param}.function.parameters", "invalid_json_schema") from None
        out.append(st.Tool(name, desc, params))
    return out


def _tool_choice(body: dict, tools: list[st.Tool]) -> str:
    """"none", "auto", "required", or the name of the one function that must be called."""
    v = body.get("tool_choice")
    if v is None:
        return "auto" if tools else "none"
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise invalid("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}", "tool_choice")
        if v != "none" and not tools:
            raise invalid(f"tool_choice {v!r} needs 'tools'", "tool_choice")
        return v
    if isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict):
        name = v["function"].get("name")
        if not any(t.name == name for t in tools):
            raise invalid(f"tool_choice names the function {name!r}, which is not in 'tools'", "tool_choice")
        return "function:" + name
    raise invalid("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                  "tool_choice")


def _choice_seeds(params: SamplingParams, n: int, mix_seed: Callable[[int], int]) -> list[int | None]:
    if params.seed is not None:
        # Consecutive seeds: reproducible, and each choice differs when sampling. Mixed before
        # they leave the entry: a node must not see the user's own number (entry/api/seeds.py).
        return [mix_seed((params.seed + i) % _SEED_SPACE) for i in range(n)]
    if n > 1 and not params.greedy:
        # Fresh per request, so it links nothing across requests.
        return [secrets.randbits(63) for _ in range(n)]
    return [None] * n


def _n(body: dict, prompts: int = 1) -> int:
    n = _opt_int(body, "n", 1, MAX_CHOICES) or 1
    if n * prompts > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices per request (n times prompts)", "n")
    return n


# --- chat ----------------------------------------------------------------------------------------


def _content(m: dict, i: int, role: str) -> str:
    c = m.get("content")
    param = f"messages[{i}].content"
    if c is None and role == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if not isinstance(part, dict):
                raise invalid("content parts must be objects like {\"type\": \"text\", \"text\": \"...\"}", param)
            kind = part.get("type")
            if kind != "text":
                raise invalid(f"content part type {kind!r} is not supported: this mesh serves text-only models", param,
                              "unsupported_content")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid("a text content part needs a string 'text'", param)
            parts.append(text)
        return "\n".join(parts)
    raise invalid("message content must be a string or a list of text parts", param)


def _messages(body: dict) -> list[ChatMessage]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty list", "messages")
    if len(raw) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} messages", "messages")
    out: list[ChatMessage] = []
    total = 0
    call_names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise invalid("each message must be an object with 'role' and 'content'", f"messages[{i}]")
        role = _ROLE_ALIASES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise invalid(f"messages[{i}].role must be one of system, developer, user, assistant, tool",
                          f"messages[{i}].role")
        if m.get("function_call"):
            raise invalid("'function_call' in messages is the deprecated format: use 'tool_calls'",
                          f"messages[{i}].function_call", "unsupported_parameter")
        content = _content(m, i, role)
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join(([content] if content else []) + _rendered_calls(m["tool_calls"], i, call_names))
        elif role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                raise invalid("a tool message needs the 'tool_call_id' it answers", f"messages[{i}].tool_call_id")
            # Rendered as the user's turn: chat templates without a tool role (Gemma's) refuse
            # any role but user and assistant, and every template has those.
            block = "<tool_response>\n" + json.dumps({"name": call_names.get(cid, ""), "content": content},
                                                       ensure_ascii=False) + "\n</tool_response>"
            total += len(block)
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1].content += "\n" + block  # consecutive results: one turn
            else:
                out.append(ChatMessage("user", block))
            continue
        total += len(content)
        # Only role and text go on: a message's `name` can identify a person.
        out.append(ChatMessage(role, content))
    if total > MAX_TEXT:
        raise invalid(f"the messages hold more than {MAX_TEXT} characters", "messages", "context_length_exceeded")
    return out


def _rendered_calls(calls: Any, i: int, call_names: dict[str, str]) -> list[str]:
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise invalid("'tool_calls' must be a list", param)
    out = []
    for c in calls:
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments", ""), str)):
            raise invalid("each tool call needs function.name and function.arguments (a JSON string)", param)
        if isinstance(c.get("id"), str):
            call_names[c["id"]] = f["name"]
        out.append(st.render_call(f["name"], f.get("arguments", "")))
    return out


def _with_tools_prompt(messages: list[ChatMessage], tools: list[st.Tool], choice: str) -> list[ChatMessage]:
    block = st.tools_prompt(tools, choice.removeprefix("function:"))
    if messages and messages[0].role == "system":
        return [ChatMessage("system", messages[0].content + "\n\n" + block)] + messages[1:]
    return [ChatMessage("system", block)] + messages


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    """A copy for one choice of the request, with that choice's seed."""
    return SamplingParams(**{**params.to_wire(), "seed": seed, "stop": list(params.stop)})


def parse_chat(body: dict, *, mix_seed: Callable[[int], int]) -> GenerationPlan:
    """mix_seed: the user's seed -> the seed a node gets (SeedMixer.for_subject)."""
    model = _model(body)
    messages = _messages(body)
    params = _sampling(body)
    stream, include_usage = _stream_flags(body)
    _common_unsupported(body)
    grammar = _response_format(body)
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    parallel = _opt_bool(body, "parallel_tool_calls")
    tool_names = None
    if choice != "none":
        if grammar:
            raise invalid("'response_format' and tool calls cannot be combined: set tool_choice to none",
                          "response_format")
        offered = [t for t in tools if choice == "auto" or choice == "required" or choice == "function:" + t.name]
        try:
            grammar = st.tools_grammar(offered, parallel=parallel is not False, optional=choice == "auto")
        except st.SchemaProblem as e:
            raise invalid(str(e), "tools") from None
        messages = _with_tools_prompt(messages, offered, choice)
        tool_names = {t.name for t in offered}
    logprobs = bool(_opt_bool(body, "logprobs"))
    top = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    n = _n(body)
    specs = []
    for seed in _choice_seeds(params, n, mix_seed):
        specs.append(GenerationSpec(model=model, kind="chat", params=_with_seed(params, seed), messages=list(messages),
                                    logprobs=logprobs, top_logprobs=top or 0, grammar=grammar))
    return GenerationPlan("chat", model, stream, include_usage, specs, [0] * n, logprobs, top or 0, tool_names)


# --- completions ---------------------------------------------------------------------------------


def _prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    prompts = [p] if isinstance(p, str) else p
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise invalid("'prompt' must be a string or a list of strings (token ids are not supported)", "prompt")
    if sum(len(x) for x in prompts) > MAX_TEXT:
        raise invalid(f"the prompt holds more than {MAX_TEXT} characters", "prompt", "context_length_exceeded")
    return prompts


def parse_completion(body: dict, *, mix_seed: Callable[[int], int]) -> GenerationPlan:
    model = _model(body)
    prompts = _prompts(body)
    params = _sampling(body)
    stream, include_usage = _stream_flags(body)
    _common_unsupported(body)
    _completion_unsupported(body)
    _unsupported(body, "echo", "echoing the prompt")
    _unsupported(body, "suffix", "insertion")
    lp = body.get("logprobs")
    if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS):
        raise invalid(f"'logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
    n = _n(body, len(prompts))
    best_of = body.get("best_of")
    if best_of is not None and best_of not in (1, n):
        raise invalid("'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    specs, prompt_of = [], []
    seeds = _choice_seeds(params, n, mix_seed)
    for pi, prompt in enumerate(prompts):
        for seed in seeds:
            specs.append(GenerationSpec(model=model, kind="completion", params=_with_seed(params, seed), prompt=prompt,
                                        logprobs=lp is not None, top_logprobs=lp or 0))
            prompt_of.append(pi)
    return GenerationPlan("completion", model, stream, include_usage, specs, prompt_of, lp is not None, lp or 0)
