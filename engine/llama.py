"""The node's llama.cpp engine: prompt building, deterministic generation, self-benchmark.

Everything here blocks; the daemon calls it from a worker thread. One Engine serves one
generation at a time (a Llama context used from two threads at once segfaults), so a
generation holds the engine lock from its first step until it finishes or is closed.

Determinism (what lets failover and verification work):
- the context is reset before every request, so nothing depends on earlier requests;
- the prompt is evaluated in n_batch chunks, then every other token one at a time: a
  continuation replays the delivered tokens one at a time, i.e. exactly the schedule of the
  uninterrupted run, so greedy output after failover is bit-identical to no failover;
- tokens are picked by engine.sampling from the raw logits row, never by llama.cpp's sampler.
Numbers differ between builds and hardware (and with GPU offload or another n_batch), so
"identical" means: same build, same CPU kind, same n_batch.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import Field, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import numpy as np

from engine.grammar import GrammarError, compile_grammar
from engine.model_file import ModelFileError, ModelInfo, inspect_model
from engine.sampling import SamplingSettings, TokenSampler, logprob_report
from engine.textstream import TextStream
from engine.threads import default_threads

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# Used when a model has no chat template; the stop keeps the model from writing the
# user's next turn itself.
FALLBACK_CHAT_STOP = "\nUser:"

_BENCH_TEXT = (
    "The mesh routes each request to a volunteer node that runs the model locally and streams "
    "the generated tokens back, one frame at a time, while the entry keeps track of credits. "
)


class GenerationSettings(SamplingSettings, Protocol):
    """A request's sampling parameters plus where generation ends (SamplingParams fits). A
    dataclass: run() makes a copy with other stop strings."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def stop(self) -> list[str]: ...
    @property
    def max_tokens(self) -> int: ...


class ChatTurn(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...


class EngineRequest(Protocol):
    """What an engine reads of a request: protocol.messages.InferRequest fits (engine/
    imports nothing of ours, so it names the shape, not the class)."""

    @property
    def kind(self) -> str: ...
    @property
    def messages(self) -> Sequence[ChatTurn]: ...
    @property
    def prompt(self) -> str: ...
    @property
    def continuation(self) -> list[int]: ...
    @property
    def params(self) -> GenerationSettings: ...
    @property
    def logprobs(self) -> bool: ...
    @property
    def top_logprobs(self) -> int: ...
    @property
    def grammar(self) -> str: ...


class BadRequest(ValueError):
    """A request this engine cannot run as given (maps to the protocol's invalid_request)."""


class RequestTooLong(BadRequest):
    """Prompt (+ continuation) does not fit the context (maps to context_length_exceeded)."""


@dataclass(slots=True)
class Step:
    """One generated token, or (token None) the end of the generation.

    text: the stop-string-processed text this step releases (may be "", and may lag the
    token when a character or a possible stop string is incomplete).
    logprob/top: under the model's raw distribution, when asked for.
    finish_reason: set on the final step only: "stop" (end-of-generation token or stop
    string), "length" (max_tokens or context full) or "cancelled".
    """

    token: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        cache_dir: str | os.PathLike[str] | None = None,
        n_threads_batch: int | None = None,
    ) -> None:
        """n_threads: llama.cpp threads for steps of one token per sequence; n_threads_batch:
        for steps reading several tokens of a sequence (prompts). Defaults: n_threads_batch is
        n_threads when that is given, else both come from engine.threads.default_threads()."""
        import llama_cpp  # deferred: ~0.15 s of import that `mesh --help` need not pay

        self._lc = llama_cpp
        self.info: ModelInfo = inspect_model(model_path, cache_dir)
        if self.info.context_length:
            n_ctx = min(n_ctx, self.info.context_length)
        if n_threads is None:
            n_threads, default_batch = default_threads()
            n_threads_batch = n_threads_batch or default_batch
        n_threads_batch = n_threads_batch or n_threads
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.gpu_offload: bool = bool(llama_cpp.llama_supports_gpu_offload())
        t0 = time.perf_counter()
        try:
            self._llm: Llama | None = llama_cpp.Llama(
                model_path=str(self.info.path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
                n_gpu_layers=n_gpu_layers,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelFileError(f"llama.cpp cannot load {self.info.path}: {msg}") from None
        self.load_seconds = time.perf_counter() - t0
        assert self._llm is not None  # the ctor either returned one or raised
        self.n_ctx: int = self._llm.n_ctx()
        self.n_vocab: int = self._llm.n_vocab()
        self.n_params: int = int(llama_cpp.llama_model_n_params(self._llm.model))  # prices a token (credit weight)
        self._row_type = ctypes.c_float * self.n_vocab
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.bos_id: int = self._llm.token_bos()
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self.bos_id >= 0
        self._lock = threading.Lock()  # not RLock: successive steps may run on different threads
        self._pieces: dict[int, bytes] = {}
        self.template_error: str | None = None  # why the model's chat template is unusable
        self._formatter = self._make_formatter()

    # --- tokens <-> text ---------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        # Tokenising reads only the vocabulary, so it needs no lock (llama.cpp's server
        # does the same from its HTTP threads).
        ids = self._open().tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if add_bos and self._add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token renders as (b"" for control tokens such as EOS)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._piece(token)
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def _piece(self, token: int) -> bytes:
        # llama-cpp-python's detokenize uses a fixed 32-byte buffer and silently mangles
        # longer pieces; ask for the size when it does not fit.
        size = 64
        while True:
            buf = (ctypes.c_char * size)()
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    # --- prompts -------------------------------------------------------------------------

    def _open(self) -> Llama:
        if self._llm is None:
            raise RuntimeError("engine is closed")
        return self._llm

    def _make_formatter(self) -> Jinja2ChatFormatter | None:
        template = self.info.chat_template
        if template is None:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self._open()

        def text_of(tok: int) -> str:
            return llm._model.token_get_text(tok) if tok >= 0 else ""

        try:
            return Jinja2ChatFormatter(
                template=template,
                eos_token=text_of(llm.token_eos()),
                bos_token=text_of(self.bos_id),
                add_generation_prompt=True,
            )
        except Exception as e:  # a template jinja cannot compile: serve with the fallback
            self.template_error = f"{type(e).__name__}: {e}"
            return None

    @property
    def has_chat_template(self) -> bool:
        return self._formatter is not None

    def render_chat(self, messages: Sequence[ChatTurn | dict[str, str]]) -> str:
        """Chat messages (dicts or objects with role/content) -> prompt text.

        Without a usable template in the model, a plain format is used:
        "System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nAssistant:" and generation also
        stops at FALLBACK_CHAT_STOP.
        """
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        if self._formatter is None:
            turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs)
            return turns + "Assistant:"
        try:
            # The role/content dicts are the messages it takes; its TypedDict union cannot be
            # inferred from dict[str, str].
            return self._formatter(messages=msgs).prompt  # type: ignore[arg-type]
        except Exception as e:  # jinja errors and the template's own raise_exception()
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BadRequest(f"the model's chat template rejected the messages: {line}") from None

    def prompt_tokens(self, request: EngineRequest) -> list[int]:
        """InferRequest -> prompt token ids (continuation not included).

        chat: the model's chat template with the generation prompt, special tokens parsed;
        completion: the prompt as is (special tokens parsed, like llama.cpp's completion).
        BOS is prepended when the model asks for it and the text does not already start
        with it. Raises RequestTooLong if prompt + continuation leave no room to generate;
        a max_tokens beyond the context is not an error: generation ends with "length"
        when the context is full.
        """
        if request.kind == "chat":
            ids = self.tokenize(self.render_chat(request.messages), add_bos=True)
        elif request.kind == "completion":
            ids = self.tokenize(request.prompt, add_bos=True)
        else:
            raise BadRequest(f"unknown request kind {request.kind!r}")
        self._check_fits(len(ids), len(request.continuation))
        return ids

    def request_stops(self, request: EngineRequest) -> list[str]:
        """The stop strings a request runs with: its own plus the fallback chat stop."""
        stops = list(request.params.stop)
        if request.kind == "chat" and self._formatter is None:
            stops.append(FALLBACK_CHAT_STOP)
        return stops

    def _check_fits(self, n_prompt: int, n_cont: int) -> None:
        if n_prompt == 0:
            raise BadRequest("empty prompt (this model adds no BOS token)")
        if n_prompt + n_cont >= self.n_ctx:
            what = f"{n_prompt} prompt tokens" + (f" + {n_cont} continuation tokens" if n_cont else "")
            raise RequestTooLong(f"{what} do not fit this node's context of {self.n_ctx} tokens")

    # --- generation ----------------------------------------------------------------------

    def run(self, request: EngineRequest, *, cancel: threading.Event | None = None, **options: Any) -> Generation:
        """prompt_tokens + generate for an InferRequest; `options` go to generate as they are
        (a subclass's own, e.g. the batched engine's scope)."""
        return self.generate(
            self.prompt_tokens(request),
            replace(request.params, stop=self.request_stops(request)),
            continuation=request.continuation,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            cancel=cancel,
            grammar=request.grammar,
            **options,
        )

    def generate(
        self,
        prompt_tokens: Sequence[int],
        params: GenerationSettings,
        *,
        continuation: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        cancel: threading.Event | None = None,
        grammar: str = "",
    ) -> Generation:
        """An iterator of Steps; the last Step has token None and the finish_reason.

        max_tokens counts continuation tokens: a continuation resumes the same generation,
        so the combined output is as long as the uninterrupted one would have been.
        Validation errors (BadRequest, RequestTooLong) are raised here, not while iterating.
        grammar: GBNF text every generated token must follow (engine.grammar), or "".
        """
        return Generation(self, list(prompt_tokens), params, list(continuation), logprobs, top_logprobs, cancel,
                          grammar)

    def _logits(self) -> np.ndarray:
        # A view into llama.cpp's buffer: valid only until the next decode.
        return self._row_view(self._lc.llama_get_logits_ith(self._open().ctx, -1))

    def _row_view(self, ptr: Any) -> np.ndarray:
        """A logits row llama.cpp returned, as a numpy view (no copy). np.ctypeslib.as_array
        builds a ctypes array type per call: ~75 us a token against ~12 us here (measured)."""
        row = self._row_type.from_address(ctypes.addressof(ptr.contents))
        view: np.ndarray = np.frombuffer(memoryview(row), dtype=np.float32)
        return view

    # --- self-benchmark ----------------------------------------------------------------

    def measure_speed(
        self,
        progress: Callable[[float, str], None] | None = None,
        *,
        n_prompt: int = 200,
        n_decode: int = 64,
        max_seconds: float = 5.0,
    ) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s) on this machine: the better of two
        n_prompt-token prefills, then greedy decoding one token at a time as generate()
        does (its own per-token Python costs 0.01-0.3 ms, noise next to a decode step).

        Robust to a momentarily busy machine, since a node advertises these numbers for a
        long time: llama.cpp's threads spin-wait for each other, so one descheduled thread
        can stall a step for seconds; hence best-of-two prefill and the median decode step.
        Decoding stops early after max_seconds so a slow machine still starts promptly."""
        report = progress or (lambda f, m: None)
        base = self.tokenize(_BENCH_TEXT)
        n_prompt = max(8, min(n_prompt, self.n_ctx - n_decode - 2))
        prompt = (base * (n_prompt // max(len(base), 1) + 1))[:n_prompt]
        with self._lock:
            llm = self._open()
            report(0.0, "warming up")
            llm.reset()
            llm.eval(prompt[:8])
            prefill = 0.0
            for attempt in range(2):
                report(0.05 + 0.2 * attempt, f"prefill of {len(prompt)} tokens ({attempt + 1}/2)")
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                prefill = max(prefill, len(prompt) / max(time.perf_counter() - t0, 1e-9))
            report(0.45, f"prefill {prefill:.0f} tok/s; decoding {n_decode} tokens")
            steps: list[float] = []
            start = time.perf_counter()
            for i in range(n_decode):
                t0 = time.perf_counter()
                tok = int(np.argmax(self._logits()))
                self.token_bytes(tok)
                llm.eval([tok])
                steps.append(time.perf_counter() - t0)
                if time.perf_counter() - start > max_seconds:
                    break
                if i % 16 == 15:
                    report(0.45 + 0.55 * (i + 1) / n_decode, f"decoded {i + 1} tokens")
            decode = 1.0 / max(float(np.median(steps)), 1e-9)
            llm.reset()
        report(1.0, f"prefill {prefill:.0f} tok/s, decode {decode:.0f} tok/s")
        return prefill, decode

    # --- teacher-forced replay (the verifier's re-scoring) -------------------------------

    def replay(self, prompt: Sequence[int], output: Sequence[int], consume: Callable[[int, np.ndarray], None]) -> None:
        """Call consume(i, row) for i = 0..len(output): row i is the distribution the model
        predicts for output[i] (i = len(output): for the token after the last one), from one
        prefill of prompt + output.

        llama.cpp computes logits only for the batch positions flagged for output, so only the
        rows needed (the last prompt position onwards) pay for the output layer, and nothing in
        the llama-cpp-python wrapper copies them (its `logits_all` mode copies every row into a
        Python-side matrix and needs a context built for it). Rows are views of llama.cpp's
        buffer valid only during the call: a long output's rows would not fit in memory
        together. Holds the engine's lock throughout."""
        seq = list(prompt) + list(output)
        first = len(prompt) - 1  # the last prompt position predicts output[0]
        if first < 0:
            raise ValueError("empty prompt")
        if len(seq) > self.n_ctx:
            raise ValueError(f"{len(seq)} tokens do not fit the verifier's context of {self.n_ctx}")
        with self._lock:
            llm = self._llm
            if llm is None:
                raise RuntimeError("engine is closed")
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # reset() alone leaves the KV cache in place
            batch = llm._batch
            try:
                for start in range(0, len(seq), llm.n_batch):
                    chunk = seq[start:start + llm.n_batch]
                    batch.set_batch(batch=chunk, n_past=start, logits_all=False)
                    wanted = [j for j in range(len(chunk)) if start + j >= first]
                    for j in range(len(chunk)):
                        batch.batch.logits[j] = start + j >= first
                    llm._ctx.decode(batch)
                    llm.n_tokens = start + len(chunk)
                    for j in wanted:
                        ptr = self._lc.llama_get_logits_ith(llm.ctx, j)
                        consume(start + j - first, self._row_view(ptr))
            finally:
                llm.reset()  # the next user of this engine starts from a clean context

    def close(self) -> None:
        """Free the model. Waits for the running generation: close or finish it first."""
        with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                llm.close()


def start_sampler(engine: Engine, prompt: list[int], continuation: list[int], params: GenerationSettings,
                  grammar: str) -> TokenSampler:
    """A generation's checks before it starts, and its sampler (BadRequest on bad input):
    room in the context, token ids in the vocabulary, a grammar that compiles and accepts
    the continuation (one the grammar rejects would fail mid-stream)."""
    engine._check_fits(len(prompt), len(continuation))
    bad = [t for t in prompt + continuation if not 0 <= t < engine.n_vocab]
    if bad:
        raise BadRequest(f"token id {bad[0]} is outside this model's vocabulary of {engine.n_vocab}")
    try:
        constraint = compile_grammar(engine, grammar) if grammar else None
        sampler = TokenSampler(params, constraint=constraint, prompt_len=len(prompt))
        sampler.sync(prompt + continuation)
    except GrammarError as e:
        raise BadRequest(str(e)) from None
    return sampler


class StepIterator:
    """The iterator and context-manager shell of a generation: subclasses set `_gen` (a
    generator of Steps) and the attributes below, and fill them in as it runs."""

    prompt_tokens: int
    seed: int | None
    finish_reason: str | None = None
    completion_tokens: int = 0
    _gen: Generator[Step, None, None]

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Generation(StepIterator):
    """Iterator[Step] for one request. Holds the engine lock from the first next() until it
    finishes, is closed, or is garbage-collected; iterate it to the end or close() it.
    `seed` is known before iterating (report it so a verifier can replay the draws);
    `finish_reason` and `completion_tokens` (tokens this call produced, continuation
    excluded) are set once it ends."""

    def __init__(self, engine: Engine, prompt: list[int], params: GenerationSettings, continuation: list[int],
                 logprobs: bool, top_logprobs: int, cancel: threading.Event | None, grammar: str = "") -> None:
        self.prompt_tokens = len(prompt)
        self.sampler = start_sampler(engine, prompt, continuation, params, grammar)
        self.seed = self.sampler.seed
        self._gen = self._run(engine, prompt, params, continuation, logprobs, top_logprobs, cancel)

    def _run(self, eng: Engine, prompt: list[int], params: GenerationSettings, continuation: list[int],
             logprobs: bool, top_k: int, cancel: threading.Event | None) -> Generator[Step, None, None]:
        cancelled = cancel.is_set if cancel is not None else (lambda: False)
        stream = TextStream(params.stop)
        sampler = self.sampler
        history = prompt + continuation  # penalties look at the whole sequence
        want_lp = logprobs or top_k > 0
        with eng._lock:
            llm = eng._llm
            if llm is None:
                raise RuntimeError("engine is closed")
            reason = None
            if len(continuation) >= params.max_tokens:
                reason = "length"
            elif cancelled():
                reason = "cancelled"
            else:
                llm.reset()
                # Chunked exactly as llm.eval would chunk it (same numbers), so that a
                # cancel is noticed between chunks of a long prompt.
                for i in range(0, len(prompt), llm.n_batch):
                    if cancelled():
                        reason = "cancelled"
                        break
                    llm.eval(prompt[i : i + llm.n_batch])
                for tok in continuation if reason is None else ():
                    stream.push(eng.token_bytes(tok))  # text the user already has
                    if stream.stopped or eng.is_end(tok):
                        reason = "stop"
                        break
                    if cancelled():
                        reason = "cancelled"
                        break
                    llm.eval([tok])
                if reason is None:
                    sampler.skip(len(continuation))
            produced = len(continuation)
            while reason is None:
                logits = eng._logits()
                try:
                    tok = sampler.choose(logits, history)
                except GrammarError as e:  # a grammar no token can continue
                    raise BadRequest(str(e)) from None
                if eng.is_end(tok):
                    reason = "stop"
                    break
                lp, top = logprob_report(logits, tok, top_k) if want_lp else (None, None)
                text = stream.push(eng.token_bytes(tok))
                history.append(tok)
                produced += 1
                self.completion_tokens += 1
                yield Step(tok, text, lp if logprobs else None, top)
                if stream.stopped:
                    reason = "stop"
                elif produced >= params.max_tokens or llm.n_tokens >= eng.n_ctx:
                    reason = "length"
                elif cancelled():
                    reason = "cancelled"
                else:
                    llm.eval([tok])
            self.finish_reason = reason
        # The lock is free before the consumer sees the end, so it can start the next
        # request right away.
        yield Step(None, stream.flush(), finish_reason=reason)
