"""A synthetic engine: no model, tokens at a set rate. For benchmarks and scale tests only.

It has the interface NodeService uses from engine.llama.Engine (`run(request, cancel=...)` ->
Generation of Steps, `info`, `measure_speed`, `close`), so a node serving it goes through the
real node stack: admission, the /mesh/infer/1 handler, frames, receipts, libp2p. What it
leaves out is the model: the cost of a token is whatever `rate` says, so the mesh's own costs
(relay, routing, discovery) can be measured at speeds no CPU model reaches here.

Its output is a pure function of the request, like the real engine's:
- token i of a generation is hash(model, prompt text, seed when sampling, i) mod the vocabulary,
  so a continuation (failover) yields exactly the tokens the uninterrupted run would have;
- token t renders as " t<id>" (ASCII), so stop strings work through the same TextStream;
- max_tokens counts continuation tokens; no end-of-generation token is ever drawn, so a
  generation ends with "length" unless a stop string or a cancel ends it first.
Timing: the first token after `prefill_tps`-paced prompt processing (instant by default),
then token i is due at start + i / rate (a fixed schedule: a late consumer gets the tokens that
are due at once rather than a slower stream). The generation thread wakes at most every `tick`
seconds (20 ms, the node's frame interval) and releases every token due by then, so a rate
above 1/tick costs the node 50 wake-ups per second per stream rather than one per token; at
rates up to 1/tick each token comes on its own schedule. The sha256 is derived from the name with a prefix no GGUF file
starts with, so it never names a real model.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path

from engine.llama import (
    FALLBACK_CHAT_STOP,
    BadRequest,
    ChatTurn,
    EngineRequest,
    GenerationSettings,
    RequestTooLong,
    Step,
    StepIterator,
)
from engine.model_file import ModelInfo
from engine.textstream import TextStream

SYNTHETIC_VOCAB = 32000
SYNTHETIC_QUANT = "SYNTHETIC"
_DIGEST_PREFIX = b"mesh-synthetic-model/v1\x00"


def synthetic_sha256(name: str) -> str:
    """The made-up digest a synthetic model is known by (never a real GGUF file's: a GGUF
    file starts with b"GGUF", the hashed bytes here with a different prefix)."""
    return hashlib.sha256(_DIGEST_PREFIX + name.encode("utf-8")).hexdigest()


def synthetic_info(name: str, context_length: int = 2048) -> ModelInfo:
    if not name or len(name) > 128:
        raise ValueError("a synthetic model needs a name of 1-128 characters")
    return ModelInfo(
        path=Path(f"synthetic:{name}"),
        sha256=synthetic_sha256(name),
        size_bytes=0,
        name=name,
        architecture="synthetic",
        quantization=SYNTHETIC_QUANT,
        context_length=context_length,
        chat_template=None,
        bos_token_id=None,
        eos_token_id=None,
        vocab_size=SYNTHETIC_VOCAB,
    )


def token_text(token: int) -> str:
    return f" t{token}"


class SyntheticEngine:
    """Stands in for engine.llama.Engine. One instance per slot, like the real engine (a
    generation holds its instance's lock), though it would be safe to share."""

    def __init__(self, name: str, *, rate: float = 500.0, n_ctx: int = 2048, prefill_tps: float = 0.0,
                 tick: float = 0.02):
        if rate <= 0:
            raise ValueError("the synthetic token rate must be > 0")
        self.info = synthetic_info(name, n_ctx)
        self.rate = float(rate)
        self.tick = max(0.0, float(tick))
        self.prefill_tps = float(prefill_tps)  # 0 = the prompt costs nothing
        self.n_ctx = n_ctx
        self.n_vocab = SYNTHETIC_VOCAB
        self.n_threads = 0
        self.gpu_offload = False
        self.load_seconds = 0.0
        self.template_error = None
        self._lock = threading.Lock()
        self._closed = False

    # --- prompts -----------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return False

    def render_chat(self, messages: Sequence[ChatTurn | dict[str, str]]) -> str:
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs) + "Assistant:"

    def prompt_text(self, request: EngineRequest) -> str:
        if request.kind == "chat":
            return self.render_chat(request.messages)
        if request.kind == "completion":
            return request.prompt
        raise BadRequest(f"unknown request kind {request.kind!r}")

    def tokenize(self, text: str) -> int:
        """Prompt length in tokens: one per 4 bytes of UTF-8, at least one (a rough BPE)."""
        return max(1, (len(text.encode("utf-8")) + 3) // 4)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(token_text(t) for t in tokens)

    def request_stops(self, request: EngineRequest) -> list[str]:
        stops = list(request.params.stop)
        if request.kind == "chat":
            stops.append(FALLBACK_CHAT_STOP)
        return stops

    # --- generation ----------------------------------------------------------------------------

    def run(self, request: EngineRequest, *, cancel: threading.Event | None = None) -> SyntheticGeneration:
        text = self.prompt_text(request)
        n_prompt = self.tokenize(text)
        n_cont = len(request.continuation)
        if n_prompt + n_cont >= self.n_ctx:
            what = f"{n_prompt} prompt tokens" + (f" + {n_cont} continuation tokens" if n_cont else "")
            raise RequestTooLong(f"{what} do not fit this node's context of {self.n_ctx} tokens")
        bad = [t for t in request.continuation if not 0 <= t < self.n_vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside this model's vocabulary of {self.n_vocab}")
        params = replace(request.params, stop=self.request_stops(request))
        seed = params.seed if params.temperature > 0 else None
        if params.temperature > 0 and seed is None:
            import secrets

            seed = secrets.randbits(63)
        key = hashlib.sha256(b"\x00".join([self.info.sha256.encode(), text.encode("utf-8"),
                                           str(seed).encode()])).digest()[:16]
        return SyntheticGeneration(self, key, n_prompt, params, list(request.continuation), request.logprobs,
                                   request.top_logprobs, seed, cancel)

    def token_at(self, key: bytes, position: int) -> int:
        digest = hashlib.blake2b(struct.pack(">Q", position), key=key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.n_vocab

    def measure_speed(self, progress: Callable[[float, str], None] | None = None, **_ignored: object) -> tuple[float, float]:
        if progress is not None:
            progress(1.0, f"synthetic engine: decode {self.rate:.0f} tok/s")
        return (self.prefill_tps or 1e6), self.rate

    def close(self) -> None:
        with self._lock:
            self._closed = True


class SyntheticGeneration(StepIterator):
    """Iterator[Step] with Generation's attributes: prompt_tokens, seed, finish_reason,
    completion_tokens. A context manager; close() ends it early."""

    def __init__(self, engine: SyntheticEngine, key: bytes, n_prompt: int, params: GenerationSettings, continuation: list[int],
                 logprobs: bool, top_logprobs: int, seed: int | None, cancel: threading.Event | None):
        self.prompt_tokens = n_prompt
        self.seed = seed
        self._gen = self._run(engine, key, n_prompt, params, continuation, logprobs, top_logprobs, cancel)

    def _run(self, eng: SyntheticEngine, key: bytes, n_prompt: int, params: GenerationSettings, continuation: list[int],
             logprobs: bool, top_k: int, cancel: threading.Event | None) -> Generator[Step, None, None]:
        cancelled = cancel.is_set if cancel is not None else (lambda: False)

        def wait(seconds: float) -> bool:
            """Sleep; True if cancelled meanwhile. Short waits use time.sleep (much cheaper
            than Event.wait with a timeout); long ones wake for a cancel at once."""
            if cancel is None:
                time.sleep(seconds)
                return False
            if seconds > 0.05:
                return cancel.wait(seconds)
            time.sleep(seconds)
            return cancel.is_set()
        stream = TextStream(params.stop)
        reason = None
        with eng._lock:
            if eng._closed:
                raise RuntimeError("engine is closed")
            start = time.perf_counter()
            if len(continuation) >= params.max_tokens:
                reason = "length"
            elif eng.prefill_tps > 0:
                # Prompt and continuation are "evaluated" at the prefill rate.
                if wait((n_prompt + len(continuation)) / eng.prefill_tps):
                    reason = "cancelled"
                start = time.perf_counter()
            if reason is None:
                for tok in continuation:
                    stream.push(token_text(tok).encode())
                    if stream.stopped:
                        reason = "stop"
                        break
            produced = len(continuation)
            interval = 1.0 / eng.rate
            i = 0
            woke = start
            while reason is None:
                if cancelled():
                    reason = "cancelled"
                    break
                due = start + i * interval
                now = time.perf_counter()
                if due > now:
                    if wait(max(due, woke + eng.tick) - now):
                        reason = "cancelled"
                        break
                    woke = time.perf_counter()
                tok = eng.token_at(key, produced)
                text = stream.push(token_text(tok).encode())
                produced += 1
                i += 1
                self.completion_tokens += 1
                lp = -0.5 if (logprobs or top_k) else None
                top = [(tok, -0.5)] + [((tok + j) % eng.n_vocab, -1.0 - j) for j in range(1, top_k)] if top_k else None
                yield Step(tok, text, lp if logprobs else None, top)
                if stream.stopped:
                    reason = "stop"
                elif produced >= params.max_tokens or n_prompt + produced >= eng.n_ctx:
                    reason = "length"
            self.finish_reason = reason
        yield Step(None, stream.flush(), finish_reason=reason)
