"""Message types of /mesh/infer/1, with strict validation.

Every frame is a map with "t" (type) and "v" (protocol version). `parse_message` turns a
decoded frame into one of the dataclasses below or raises InvalidMessage; `to_wire` is the
reverse. Validation bounds every field so a hostile peer cannot make the other side allocate
or compute without limit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any, TypeVar

from protocol import PROTOCOL_VERSION
from protocol.errors import InvalidMessage, UnsupportedVersion

MAX_MESSAGES = 256
MAX_TEXT = 256 * 1024  # characters in one prompt or message
MAX_STOP = 8
MAX_STOP_LEN = 64
MAX_CONTINUATION = 32768
MAX_TOKENS_LIMIT = 32768
MAX_TOP_LOGPROBS = 20
# GBNF text in a request (engine.grammar.MAX_GRAMMAR_CHARS must not be smaller).
MAX_GRAMMAR = 64 * 1024
ROLES = ("system", "user", "assistant", "tool")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Error codes a node may answer with; entries route on them.
ERR_BUSY = "busy"
ERR_LEAVING = "leaving"
ERR_UNKNOWN_MODEL = "unknown_model"
ERR_INVALID = "invalid_request"
ERR_TOO_LONG = "context_length_exceeded"
ERR_INTERNAL = "internal"
ERR_CANCELLED = "cancelled"


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise InvalidMessage(what)


# A field's default when absent: the result is the field's type or the default's (often None);
# no default (`...`) means the field is required.
D = TypeVar("D")


def _default(default: D | EllipsisType, key: str) -> D:
    if isinstance(default, EllipsisType):
        raise InvalidMessage(f"missing field {key!r}")
    return default


def _int(d: dict[str, Any], key: str, lo: int, hi: int, default: D | EllipsisType = ...) -> int | D:
    if key not in d or d[key] is None:
        return _default(default, key)
    v: int = d[key]
    _check(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, f"{key!r} must be an integer in [{lo}, {hi}]")
    return v


def _float(d: dict[str, Any], key: str, lo: float, hi: float, default: D | EllipsisType = ...) -> float | D:
    if key not in d or d[key] is None:
        return _default(default, key)
    v: float = d[key]
    _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{key!r} must be a number")
    v = float(v)
    _check(math.isfinite(v) and lo <= v <= hi, f"{key!r} must be in [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], key: str, max_len: int, default: D | EllipsisType = ...) -> str | D:
    if key not in d or d[key] is None:
        return _default(default, key)
    v: str = d[key]
    _check(isinstance(v, str) and len(v) <= max_len, f"{key!r} must be a string of at most {max_len} characters")
    return v


def _bool(d: dict[str, Any], key: str, default: bool = False) -> bool:
    v: bool = d.get(key, default)
    _check(isinstance(v, bool), f"{key!r} must be a boolean")
    return v


def _int_list(d: dict[str, Any], key: str, max_len: int) -> list[int]:
    v: list[int] = d.get(key) or []
    _check(isinstance(v, list) and len(v) <= max_len, f"{key!r} must be a list of at most {max_len} items")
    _check(all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31 for x in v), f"{key!r} must hold token ids")
    return v


@dataclass
class SamplingParams:
    """temperature 0 means greedy. Defaults follow llama.cpp's."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 256

    @classmethod
    def from_wire(cls, d: Any) -> SamplingParams:
        _check(isinstance(d, dict), "'params' must be a map")
        stop = d.get("stop") or []
        _check(isinstance(stop, list) and len(stop) <= MAX_STOP, f"'stop' must be a list of at most {MAX_STOP} strings")
        _check(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop), f"each stop string must have 1-{MAX_STOP_LEN} characters")
        return cls(
            temperature=_float(d, "temperature", 0.0, 5.0, 0.0),
            top_p=_float(d, "top_p", 0.0, 1.0, 1.0),
            top_k=_int(d, "top_k", 0, 1_000_000, 0),
            min_p=_float(d, "min_p", 0.0, 1.0, 0.0),
            repeat_penalty=_float(d, "repeat_penalty", 0.0, 10.0, 1.0),
            repeat_last_n=_int(d, "repeat_last_n", 0, 4096, 64),
            presence_penalty=_float(d, "presence_penalty", -2.0, 2.0, 0.0),
            frequency_penalty=_float(d, "frequency_penalty", -2.0, 2.0, 0.0),
            seed=_int(d, "seed", 0, 2**63 - 1, None),
            stop=list(stop),
            max_tokens=_int(d, "max_tokens", 1, MAX_TOKENS_LIMIT, 256),
        )

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class InferRequest:
    """A generation: chat (messages) or completion (prompt), optionally continuing tokens
    another node already produced (failover).

    grammar (protocol 2): GBNF text (llama.cpp's grammar format, root rule `root`) that the
    generated tokens must follow, or "" for none. The entry builds it from a JSON schema,
    `response_format` or forced tool calls, so nodes need no schema logic, and the verifier
    replays under the same text. The node applies it as a mask on each logits row before
    sampling (engine/sampling.py), and refuses text that is too long or does not parse with
    invalid_request."""

    request_id: str
    model_sha256: str
    kind: str  # "chat" | "completion"
    params: SamplingParams
    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    continuation: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str = ""
    T = "req"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> InferRequest:
        rid = _str(d, "id", 64)
        _check(bool(_REQUEST_ID.match(rid)), "'id' must be 8-64 characters of [A-Za-z0-9_-]")
        model = _str(d, "model", 64)
        _check(bool(_SHA256.match(model)), "'model' must be a lowercase hex sha256")
        kind = _str(d, "kind", 16)
        _check(kind in ("chat", "completion"), "'kind' must be 'chat' or 'completion'")
        messages: list[ChatMessage] = []
        prompt = ""
        if kind == "chat":
            raw = d.get("messages")
            if not (isinstance(raw, list) and 0 < len(raw) <= MAX_MESSAGES):
                raise InvalidMessage(f"'messages' must be a list of 1-{MAX_MESSAGES} messages")
            total = 0
            for m in raw:
                _check(isinstance(m, dict), "each message must be a map")
                role = _str(m, "role", 16)
                _check(role in ROLES, f"message role must be one of {', '.join(ROLES)}")
                content = _str(m, "content", MAX_TEXT)
                total += len(content)
                messages.append(ChatMessage(role, content))
            _check(total <= MAX_TEXT, f"chat text exceeds {MAX_TEXT} characters")
        else:
            prompt = _str(d, "prompt", MAX_TEXT)
        return cls(
            request_id=rid,
            model_sha256=model,
            kind=kind,
            params=SamplingParams.from_wire(d.get("params", {})),
            messages=messages,
            prompt=prompt,
            continuation=_int_list(d, "cont", MAX_CONTINUATION),
            logprobs=_bool(d, "logprobs"),
            top_logprobs=_int(d, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0),
            grammar=_str(d, "grammar", MAX_GRAMMAR, ""),
        )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.request_id,
            "model": self.model_sha256,
            "kind": self.kind,
            "params": self.params.to_wire(),
            "cont": list(self.continuation),
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
        }
        if self.grammar:
            d["grammar"] = self.grammar
        if self.kind == "chat":
            d["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        else:
            d["prompt"] = self.prompt
        return d


MAX_TOKEN_BYTES = 1024  # one token's piece; real vocabularies stay far below, and a node's frame (32 tokens, 20
# alternatives each) stays under the 1 MiB frame limit even at this size


def _token_piece(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) <= MAX_TOKEN_BYTES


@dataclass
class TokenChunk:
    """Tokens in generation order. `text` is the UTF-8 text these tokens complete (a token may
    end mid-character, so text can lag ids by a token). logprobs[i] belongs to ids[i].

    The entry holds no tokenizer, so when logprobs are asked for the node sends each token's
    own bytes: `token_bytes[i]` for ids[i], and every top_logprobs alternative as
    [id, logprob, bytes]. OpenAI's API reports both as text and bytes."""

    request_id: str
    ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[Any]]] | None = None  # per token: [[id, logprob, bytes], ...]
    token_bytes: list[bytes] | None = None  # per token, with logprobs
    T = "tok"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> TokenChunk:
        ids = _int_list(d, "ids", 4096)
        lp = d.get("lp")
        if lp is not None:
            _check(isinstance(lp, list) and len(lp) == len(ids), "'lp' must have one logprob per token")
            _check(all(isinstance(x, (int, float)) and not isinstance(x, bool) and (x <= 0 or math.isnan(x)) for x in lp), "logprobs must be <= 0")
        top = d.get("top")
        if top is not None:
            _check(isinstance(top, list) and len(top) == len(ids), "'top' must have one entry per token")
            for entry in top:
                _check(isinstance(entry, list) and len(entry) <= MAX_TOP_LOGPROBS, "bad 'top' entry")
                for alt in entry:
                    _check(isinstance(alt, list) and len(alt) == 3 and isinstance(alt[0], int) and not isinstance(alt[0], bool)
                           and isinstance(alt[1], (int, float)) and not isinstance(alt[1], bool) and _token_piece(alt[2]),
                           "a 'top' alternative must be [id, logprob, bytes]")
        tb = d.get("tb")
        if tb is not None:
            _check(isinstance(tb, list) and len(tb) == len(ids) and all(_token_piece(b) for b in tb),
                   f"'tb' must hold one token's bytes (at most {MAX_TOKEN_BYTES}) per token")
        return cls(_str(d, "id", 64), ids, _str(d, "text", MAX_TEXT, ""), lp, top, tb)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.request_id, "ids": self.ids, "text": self.text}
        if self.logprobs is not None:
            d["lp"] = self.logprobs
        if self.top_logprobs is not None:
            d["top"] = self.top_logprobs
        if self.token_bytes is not None:
            d["tb"] = self.token_bytes
        return d


FINISH_REASONS = ("stop", "length")


@dataclass
class Final:
    """Ends a generation. `receipt` is a signed WorkReceipt (protocol.records) over exactly
    the tokens this node produced for this request (continuation excluded)."""

    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    receipt: bytes
    seed: int | None = None
    T = "fin"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Final:
        fr = _str(d, "finish", 16)
        _check(fr in FINISH_REASONS, f"'finish' must be one of {FINISH_REASONS}")
        receipt = d.get("receipt")
        if not (isinstance(receipt, bytes) and len(receipt) <= 4096):
            raise InvalidMessage("'receipt' must be bytes")
        return cls(
            _str(d, "id", 64),
            fr,
            _int(d, "prompt_tokens", 0, 1 << 30),
            _int(d, "completion_tokens", 0, 1 << 30),
            receipt,
            _int(d, "seed", 0, 2**63 - 1, None),
        )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.request_id,
            "finish": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "receipt": self.receipt,
        }
        if self.seed is not None:
            d["seed"] = self.seed
        return d


@dataclass
class Error:
    code: str
    message: str
    request_id: str | None = None
    retry_after: float | None = None
    T = "err"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Error:
        return cls(
            _str(d, "code", 64),
            _str(d, "message", 4096),
            _str(d, "id", 64, None),
            _float(d, "retry_after", 0.0, 86400.0, None),
        )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.request_id is not None:
            d["id"] = self.request_id
        if self.retry_after is not None:
            d["retry_after"] = self.retry_after
        return d


@dataclass
class Cancel:
    request_id: str
    T = "cancel"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Cancel:
        return cls(_str(d, "id", 64))

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.request_id}


@dataclass
class Leaving:
    """The node stops taking work; in-flight work gets `grace_seconds` to finish."""

    grace_seconds: float
    T = "leaving"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Leaving:
        return cls(_float(d, "grace", 0.0, 86400.0))

    def to_wire(self) -> dict[str, Any]:
        return {"grace": self.grace_seconds}


@dataclass
class StatusQuery:
    T = "status?"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StatusQuery:
        return cls()

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass
class StatusReply:
    model_sha256: str
    model_name: str
    total_slots: int
    free_slots: int
    queued: int
    queue_limit: int
    prefill_tps: float
    decode_tps: float
    tokens_served: int
    draining: bool
    context_size: int = 0
    # How the node runs its slots ("batched": sequences of one llama.cpp context) and its decode
    # tok/s with every slot busy. Optional: a peer that does not know them ignores them.
    engine_mode: str = ""
    aggregate_tps: float = 0.0
    T = "status"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StatusReply:
        return cls(
            _str(d, "model", 64),
            _str(d, "name", 256),
            _int(d, "slots", 0, 4096),
            _int(d, "free", 0, 4096),
            _int(d, "queued", 0, 1 << 20),
            _int(d, "queue_limit", 0, 1 << 20),
            _float(d, "prefill_tps", 0.0, 1e9),
            _float(d, "decode_tps", 0.0, 1e9),
            _int(d, "served", 0, 1 << 62),
            _bool(d, "draining"),
            _int(d, "ctx", 0, 1 << 24, 0),
            _str(d, "mode", 32, ""),
            _float(d, "agg_tps", 0.0, 1e9, 0.0),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model_sha256,
            "name": self.model_name,
            "slots": self.total_slots,
            "free": self.free_slots,
            "queued": self.queued,
            "queue_limit": self.queue_limit,
            "prefill_tps": self.prefill_tps,
            "decode_tps": self.decode_tps,
            "served": self.tokens_served,
            "draining": self.draining,
            "ctx": self.context_size,
            "mode": self.engine_mode,
            "agg_tps": self.aggregate_tps,
        }


MESSAGE_TYPES = {cls.T: cls for cls in (InferRequest, TokenChunk, Final, Error, Cancel, Leaving, StatusQuery, StatusReply)}
Message = InferRequest | TokenChunk | Final | Error | Cancel | Leaving | StatusQuery | StatusReply


def parse_message(frame: dict[str, Any]) -> Message:
    """A decoded frame -> a validated message. Raises InvalidMessage / UnsupportedVersion."""
    v = frame.get("v")
    if v != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {v!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    t = frame.get("t")
    cls = MESSAGE_TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise InvalidMessage(f"unknown message type {t!r}")
    try:
        return cls.from_wire(frame)
    except InvalidMessage:
        raise
    except Exception as e:  # a validator must never crash the reader on odd input
        raise InvalidMessage(f"invalid {t} message: {type(e).__name__}") from None


def to_wire(message: Message) -> dict[str, Any]:
    d = message.to_wire()
    d["t"] = message.T
    d["v"] = PROTOCOL_VERSION
    return d
