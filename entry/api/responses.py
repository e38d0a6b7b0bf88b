"""Backend events -> OpenAI response objects (chat.completion, text_completion, chunks).

Each choice accumulates in a ChoiceState; the builders only read it, so the streaming and
non-streaming paths produce the same text, logprobs and usage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from entry.api.structured import CALL_CLOSE, CALL_OPEN, ToolCall, parse_calls
from entry.backend import DoneEvent, ModelEntry, TokenEvent

_BAD_LOGPROB = -9999.0  # what OpenAI reports for an unrepresentable logprob


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class TokenLogprob:
    text: str
    logprob: float
    top: list[tuple[str, float, bytes]]  # (text, logprob, bytes) per alternative
    raw: bytes = b""  # the token's own bytes: a token may hold part of a character


def _lp(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _BAD_LOGPROB
    return f if math.isfinite(f) else _BAD_LOGPROB


def piece_text(raw: bytes) -> str:
    # As OpenAI does: a token that holds part of a character shows U+FFFD in `token`, and
    # `bytes` keeps what it really is.
    return raw.decode("utf-8", errors="replace")


def token_logprobs(ev: TokenEvent, k: int) -> list[TokenLogprob]:
    """Per-token logprobs of an event. Nodes send each token's bytes and each alternative as
    (id, logprob, bytes); other sources may send (id, logprob, text) or only (id, logprob),
    and then an alternative that is the chosen token borrows its text and any other shows as
    <token ID>, since the entry holds no tokenizer."""
    if ev.logprobs is None:
        return []
    out = []
    texts = ev.token_texts or []
    pieces = ev.token_bytes or []
    for i, tid in enumerate(ev.ids):
        if i < len(pieces):
            raw = pieces[i]
            text = piece_text(raw)
        else:
            text = texts[i] if i < len(texts) else (ev.text if len(ev.ids) == 1 else "")
            raw = text.encode("utf-8")
        top = []
        alts = ev.top_logprobs[i] if ev.top_logprobs and i < len(ev.top_logprobs) else []
        for alt in alts[:k]:
            aid, alp = alt[0], alt[1]
            extra = alt[2] if len(alt) > 2 else None
            if isinstance(extra, (bytes, bytearray)):
                araw = bytes(extra)
                atext = piece_text(araw)
            else:
                atext = extra if isinstance(extra, str) else (text if aid == tid else f"<token {aid}>")
                araw = atext.encode("utf-8")
            top.append((atext, _lp(alp), araw))
        out.append(TokenLogprob(text, _lp(ev.logprobs[i] if i < len(ev.logprobs) else None), top, raw))
    return out


@dataclass
class ChoiceState:
    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0  # ids seen, in case the generation never finishes
    done: DoneEvent | None = None
    text_offset: int = 0  # characters of token text so far (completion logprobs)
    # Streaming with tools: "" until the answer shows whether it is text or calls, then
    # "text" or "calls"; `pending` holds what was not streamed yet.
    mode: str = ""
    pending: str = ""
    pending_lps: list[TokenLogprob] = field(default_factory=list)
    calls_sent: int = 0
    calls_seen: set[tuple[str, str]] = field(default_factory=set)  # (name, arguments): repeats are dropped

    def add(self, ev: TokenEvent, k: int) -> list[TokenLogprob]:
        self.tokens += len(ev.ids)
        self.text.append(ev.text)
        lps = token_logprobs(ev, k)
        self.logprobs.extend(lps)
        return lps

    @property
    def completion_tokens(self) -> int:
        return self.done.completion_tokens if self.done else self.tokens


def usage(states: list[ChoiceState]) -> dict:
    prompt: dict[int, int] = {}
    for s in states:
        if s.done:
            prompt[s.prompt_index] = max(prompt.get(s.prompt_index, 0), s.done.prompt_tokens)
    p = sum(prompt.values())
    c = sum(s.completion_tokens for s in states)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def mesh_extra(dones: list[DoneEvent | None]) -> dict:
    """The non-standard `mesh` field: which kinds of node served the answer."""
    parts, failovers = [], 0
    for d in dones:
        if d is None:
            continue
        failovers += d.failovers
        parts.extend({"node": p.pseudonym, "kind": p.description, "completion_tokens": p.completion_tokens}
                     for p in d.served_by)
    return {"served_by": parts, "failovers": failovers}


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    def item(text: str, lp: float, raw: bytes) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**item(t.text, t.logprob, t.raw), "top_logprobs": [item(*a) for a in t.top]} for t in lps],
            "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], start_offset: int) -> dict:
    offsets, pos = [], start_offset
    for t in lps:
        offsets.append(pos)
        pos += len(t.text)
    return {
        "tokens": [t.text for t in lps],
        "token_logprobs": [t.logprob for t in lps],
        "top_logprobs": [{a[0]: a[1] for a in t.top} for t in lps],
        "text_offset": offsets,
    }


def model_object(e: ModelEntry, fallback_created: int) -> dict:
    return {
        "id": e.id,
        "object": "model",
        "created": e.created or fallback_created,
        "owned_by": "mesh",
        "nodes": e.nodes,
        "sha256": e.sha256,
        "context_length": e.context_size,
        "name": e.name,
        "quantization": e.quantization,
    }


_ARG_PIECE = 48  # characters of arguments per streamed delta


def _split_args(args: str) -> list[str]:
    return [args[i:i + _ARG_PIECE] for i in range(0, len(args), _ARG_PIECE)] or [""]


class ResponseBuilder:
    """Shapes one request's objects; `endpoint` is "chat" or "completion". `tool_names`:
    functions a chat answer may call (GenerationPlan.tool_names), None when tools are off."""

    tool_names: set[str] | None = None

    def __init__(self, endpoint: str, response_id: str, created: int, model: ModelEntry, include_usage: bool):
        self.endpoint = endpoint
        self.id = response_id
        self.created = created
        self.model = model.id
        self.fingerprint = "fp_" + model.sha256[:12] if model.sha256 else None
        self.include_usage = include_usage
        self.route: dict | None = None  # `mesh.route` of a routed (`auto`) request

    def _mesh(self, dones: list[DoneEvent | None]) -> dict:
        extra = mesh_extra(dones)
        if self.route is not None:
            extra["route"] = self.route
        return extra

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _chunk(self, choice: dict) -> dict:
        obj = self._head("chat.completion.chunk" if self.endpoint == "chat" else "text_completion")
        obj["choices"] = [choice]
        if self.include_usage:
            obj["usage"] = None  # as OpenAI does: only the extra last chunk carries usage
        return obj

    def role_chunk(self, index: int) -> dict:
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def token_chunk(self, state: ChoiceState, ev: TokenEvent, lps: list[TokenLogprob],
                    want_logprobs: bool) -> dict | list[dict] | None:
        """The chunk(s) this event adds to the stream (a list: several tool-call deltas)."""
        if self.endpoint == "chat" and self.tool_names is not None and state.mode != "text":
            return self._tool_chunks(state, ev, lps, want_logprobs)
        if not ev.text and not lps:
            return None  # a token that ends mid-character: its text comes with the next one
        if self.endpoint == "chat":
            return self._chunk({"index": state.index, "delta": {"content": ev.text},
                                "logprobs": chat_logprobs(lps) if want_logprobs else None, "finish_reason": None})
        lp = completion_logprobs(lps, state.text_offset) if want_logprobs else None
        state.text_offset += sum(len(t.text) for t in lps)
        return self._chunk({"index": state.index, "text": ev.text, "logprobs": lp, "finish_reason": None})

    def _tool_chunks(self, state: ChoiceState, ev: TokenEvent, lps: list[TokenLogprob], want_logprobs: bool) -> list[dict] | None:
        """Streaming when the answer may be calls. Text streams as soon as it cannot open a
        call block; a call streams once its block is complete (its name must be known before
        the first delta, and only a complete block can be checked), as OpenAI's deltas:
        id, type and name first, then the arguments in pieces."""
        state.pending += ev.text
        state.pending_lps.extend(lps)
        if state.mode == "":
            head = state.pending.lstrip()
            if not head or (CALL_OPEN.startswith(head) and len(head) < len(CALL_OPEN)):
                return None
            state.mode = "calls" if head.startswith(CALL_OPEN) else "text"
            if state.mode == "text":
                text, lps_all = state.pending, state.pending_lps
                state.pending, state.pending_lps = "", []
                return [self._chunk({"index": state.index, "delta": {"content": text},
                                     "logprobs": chat_logprobs(lps_all) if want_logprobs else None, "finish_reason": None})]
        state.pending_lps = []
        out = []
        while CALL_CLOSE in state.pending:
            end = state.pending.index(CALL_CLOSE) + len(CALL_CLOSE)
            block, rest = state.pending[:end], state.pending[end:]
            calls = parse_calls(block, self.tool_names or set())
            if not calls:
                break  # not a call after all: it ends up as text in the final chunk
            state.pending = rest
            if (calls[0].name, calls[0].arguments) not in state.calls_seen:
                state.calls_seen.add((calls[0].name, calls[0].arguments))
                out.extend(self._call_deltas(state, calls[0]))
        return out or None

    def _call_deltas(self, state: ChoiceState, call: ToolCall) -> list[dict]:
        k = state.calls_sent
        state.calls_sent += 1
        first = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas = [first] + [{"index": k, "function": {"arguments": a}} for a in _split_args(call.arguments)]
        head = [{"role": "assistant", "content": None}] if k == 0 else []  # OpenAI's first call delta nulls content
        return [self._chunk({"index": state.index, "delta": {**(head[0] if head and i == 0 else {}), "tool_calls": [d]},
                             "logprobs": None, "finish_reason": None}) for i, d in enumerate(deltas)]

    def _finish_reason(self, state: ChoiceState, calls: bool) -> str:
        return "tool_calls" if calls and state.done.finish_reason == "stop" else state.done.finish_reason

    def final_chunk(self, state: ChoiceState) -> dict:
        if self.endpoint == "chat":
            leftover = state.pending if state.mode != "text" else ""
            state.pending = ""
            # An unfinished or malformed call is shown as the text it is.
            delta: dict = {"content": leftover} if leftover.strip() else {}
            calls = state.calls_sent > 0 and not delta
            choice = {"index": state.index, "delta": delta, "logprobs": None,
                      "finish_reason": self._finish_reason(state, calls)}
        else:
            choice = {"index": state.index, "text": "", "logprobs": None, "finish_reason": state.done.finish_reason}
        obj = self._chunk(choice)
        obj["mesh"] = self._mesh([state.done])
        return obj

    def usage_chunk(self, states: list[ChoiceState]) -> dict:
        obj = self._head("chat.completion.chunk" if self.endpoint == "chat" else "text_completion")
        obj["choices"] = []
        obj["usage"] = usage(states)
        obj["mesh"] = self._mesh([s.done for s in states])
        return obj

    def response(self, states: list[ChoiceState], want_logprobs: bool) -> dict:
        choices = []
        for s in states:
            text = "".join(s.text)
            if self.endpoint == "chat":
                calls = parse_calls(text, self.tool_names) if self.tool_names is not None else None
                message: dict = {"role": "assistant", "content": text, "refusal": None}
                if calls:
                    message = {"role": "assistant", "content": None, "refusal": None,
                               "tool_calls": [c.as_dict() for c in calls]}
                choices.append({"index": s.index, "message": message,
                                "logprobs": chat_logprobs(s.logprobs) if want_logprobs and not calls else None,
                                "finish_reason": self._finish_reason(s, bool(calls))})
            else:
                choices.append({"index": s.index, "text": text,
                                "logprobs": completion_logprobs(s.logprobs, 0) if want_logprobs else None,
                                "finish_reason": s.done.finish_reason})
        obj = self._head("chat.completion" if self.endpoint == "chat" else "text_completion")
        obj["choices"] = choices
        obj["usage"] = usage(states)
        obj["mesh"] = self._mesh([s.done for s in states])
        return obj
