"""One loaded model serving every slot of a node: continuous batching and prompt-prefix reuse.

Mode "batched" (the only one built): one llama.cpp context whose unified KV cache holds one
sequence per slot plus the prefix cache; ONE scheduler thread owns that context and does one
`llama_decode` per step for every active sequence. Requests join and leave between steps; a
long prompt is fed in chunks of at most n_batch/2 tokens per step so running streams keep
getting a token every step while it prefills. N separate contexts sharing the model were not
built: on a CPU they split the threads (no gain over batching, measured in issue 11) and on a
GPU each would need its own compute buffers.

KV memory (allocated once, at start): slots x n_ctx cells for the running sequences (each may
use its whole context) + prefix_cache_tokens cells for finished sequences kept for reuse, LRU,
evicted first whenever a running sequence needs room.

Numerics. llama.cpp computes a batch of one token with other kernels than a batch of two or
more (see entry/verify/stats.py), and with several sequences in one cache the summation order
in attention depends on where their cells lie. So greedy output is no longer bit-identical run
to run: a sequence decoding alone in an empty cache gets exactly the old Engine's tokens
(single-token kernels); next to running or cached sequences, near-ties can flip (measured in tests/engine/test_batched.py; the verifier's
tolerance covers both, scripts/bench_verify_batch.py). `pad_single=True` adds a throw-away
token to lone steps so every row is computed the batched way (as the verifier's replay is),
at ~40% more CPU per token alone (measured): off by default.

Per-sequence token choice stays in Python: engine.sampling.TokenSampler.choose(row, history)
with history = prompt + continuation + generated, exactly as Engine.generate does.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.grammar import GrammarError
from engine.llama import (
    _BENCH_TEXT,
    BadRequest,
    Engine,
    EngineRequest,
    GenerationSettings,
    Step,
    StepIterator,
    start_sampler,
)
from engine.sampling import logprob_report
from engine.textstream import TextStream

# llama.cpp's CPU build runs its threads under OpenMP, whose idle workers spin between parallel
# regions. Here the Python between two decodes (sampling, handing Steps to consumer threads)
# runs in other threads than the decode, and spinning workers starve them: measured with 2
# threads on 2 cores, 160 tokens took 74 s instead of 9 s. Passive waiting must be chosen
# before libgomp loads (with llama_cpp, deferred to the first engine); a volunteer's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODE = "batched"
_END = object()
# Cached sequences kept at most, whatever the token budget: each costs a sequence id (llama.cpp
# allows 256 per context) and a prefix comparison per new request.
_MAX_CACHED = 32


@dataclass
class EngineCounters:
    """What the scheduler did, for status and tests."""

    steps: int = 0
    decoded_tokens: int = 0
    prefix_hits: int = 0
    reused_tokens: int = 0
    evictions: int = 0


class BatchedEngine(Engine):
    """An Engine whose generations share one context and advance together.

    Tokenising, chat templates and request validation are Engine's (its own llama.cpp context
    is a 32-token stub, never used for generation); generate/run/replay/measure_speed go through
    the scheduler thread. `slot_handles()` gives the node's admission one worker per slot."""

    mode = MODE
    scoped_cache = True  # run() takes scope=: prefixes are reused only within one scope

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        slots: int = 1,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        prefix_cache_tokens: int = 0,
        pad_single: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        n_threads_batch: int | None = None,
    ) -> None:
        """n_threads serves the steps that only decode (one token per sequence, however many
        sequences), n_threads_batch the steps that read prompt tokens (see _decode)."""
        if slots < 1:
            raise ValueError("at least one slot is needed")
        if prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")
        # The weights are loaded (and offloaded to the GPU) here, once, whatever `slots` is.
        super().__init__(model_path, n_ctx=32, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_batch=32,
                         cache_dir=cache_dir, n_threads_batch=n_threads_batch)
        import llama_cpp._internals as internals

        if self.info.context_length:
            n_ctx = min(n_ctx, self.info.context_length)
        self.n_ctx = n_ctx  # per sequence: what each request may use
        self.slots = slots
        self.n_batch = n_batch
        self.pad_single = pad_single
        self.prefix_cache_tokens = prefix_cache_tokens
        self.max_cached = min(_MAX_CACHED, 4 * slots + 4) if prefix_cache_tokens else 0
        # Sequence ids: `slots` running (more while a replay or benchmark runs), the cached
        # ones, and the scratch sequence for padding.
        n_seq = min(int(self._lc.llama_max_parallel_sequences()), slots + self.max_cached + 2 + 8)
        self._scratch = n_seq - 1
        llm = self._open()
        src = llm.context_params
        params = type(src).from_buffer_copy(src)
        params.n_ctx = slots * n_ctx + prefix_cache_tokens + 64
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = True  # one pool of cells: cached prefixes use what running sequences don't
        try:
            self._bctx: Any = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as e:
            raise RuntimeError(f"llama.cpp cannot create a {slots}-sequence context: {e}") from None
        self._ctx = self._bctx.ctx
        self._mem = self._lc.llama_get_memory(self._ctx)
        self._threads_now = self.n_threads_batch  # the context's n_threads_batch at present
        self._batch = self._lc.llama_batch_init(n_batch + 1, 0, 1)
        self.kv_bytes_per_token = _kv_bytes_per_token(self._lc, llm._model.model)
        self.counters = EngineCounters()
        self.aggregate_tps = 0.0  # decode tok/s of `slots` sequences together, from measure_speed
        self._free: list[int] = list(range(n_seq - 2, -1, -1))
        self._cache: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()  # sid -> (scope, tokens in KV)
        self._cached_tokens = 0
        self._active: list[_Seq] = []
        self._incoming: list[_Seq] = []
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    # --- the node's view -------------------------------------------------------------------

    def slot_handles(self) -> list[BatchSlot]:
        return [BatchSlot(self, i) for i in range(self.slots)]

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    @property
    def cached_sequences(self) -> int:
        return len(self._cache)

    # --- generation ------------------------------------------------------------------------

    def run(self, request: EngineRequest, *, cancel: threading.Event | None = None,  # type: ignore[override]
            scope: str = "") -> BatchedGeneration:
        return super().run(request, cancel=cancel, scope=scope)  # type: ignore[return-value]

    def generate(  # type: ignore[override]
        self,
        prompt_tokens: Sequence[int],
        params: GenerationSettings,
        *,
        continuation: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        cancel: threading.Event | None = None,
        scope: str = "",
        grammar: str = "",
    ) -> BatchedGeneration:
        """As Engine.generate; the generation starts at once (in the scheduler), and its Steps
        wait in the handle until read. `scope`: prefix reuse happens only between requests of
        the same scope (the node passes the requesting peer). `grammar`: as Engine.generate."""
        return BatchedGeneration(self, list(prompt_tokens), params, list(continuation), logprobs, top_logprobs,
                                 cancel, scope, grammar)

    def _submit(self, seq: _Seq) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is closed")
            self._incoming.append(seq)
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the scheduler thread between two steps (it owns the context) and return
        its result."""
        fut: Future[Any] = Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is closed")
            self._jobs.append((fn, fut))
            self._cv.notify()
        return fut.result()

    # --- the scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._jobs or self._active or (self._incoming and self._has_sid())):
                    self._cv.wait(1.0)
                if self._stopping:
                    incoming, self._incoming = self._incoming, []
                    jobs, self._jobs = self._jobs, []
                    break
                jobs, self._jobs = self._jobs, []
                incoming = []
                while self._incoming and self._has_sid(reserve=len(incoming)):
                    incoming.append(self._incoming.pop(0))
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            for seq in incoming:
                try:
                    self._admit(seq)
                except Exception as e:  # this request's problem, not the other sequences'
                    self._fail(seq, e)
            if self._active:
                try:
                    self._step()
                except Exception as e:  # a failed decode fails the sequences in it, not the node
                    for seq in list(self._active):
                        self._fail(seq, e)
        for seq in self._active + incoming:
            self._finish(seq, "cancelled")
        for _fn, fut in jobs:
            fut.set_exception(RuntimeError("engine is closed"))

    def _has_sid(self, reserve: int = 0) -> bool:
        return len(self._free) + len(self._cache) > reserve

    def _admit(self, seq: _Seq) -> None:
        """Engine.generate's start, in the scheduler: early ends, the continuation's text, then
        a sequence id (reusing the longest cached prefix) and the tokens left to evaluate."""
        h = seq.handle
        if len(seq.continuation) >= seq.params.max_tokens:
            return self._finish(seq, "length")
        if seq.cancelled():
            return self._finish(seq, "cancelled")
        for tok in seq.continuation:
            seq.stream.push(self.token_bytes(tok))  # text the user already has
            if seq.stream.stopped or self.is_end(tok):
                return self._finish(seq, "stop")
        h.sampler.skip(len(seq.continuation))
        tokens = seq.history  # prompt + continuation
        seq.sid, reused = self._take_sid(tokens, seq.scope)
        seq.kv = tokens[:reused]
        seq.pending = tokens[reused:]
        h.reused_tokens = reused
        self._active.append(seq)

    def _step(self) -> None:
        """One llama_decode for every active sequence: decoding ones first (one token each),
        then prefill chunks in the room left."""
        budget = self.n_batch
        decoding = [s for s in self._active if s.generating]
        prefilling = [s for s in self._active if not s.generating]
        chunk = self.n_batch // 2 if decoding or len(prefilling) > 1 else self.n_batch
        planned: list[tuple[_Seq, int]] = []
        for seq in decoding + prefilling:
            if seq.cancelled():
                self._finish(seq, "cancelled")
                continue
            n = min(len(seq.pending), chunk, budget)
            if n <= 0:
                continue
            planned.append((seq, n))
            budget -= n
        if not planned:
            return
        entries = [(s.sid, s.pending[:n], len(s.kv), n == len(s.pending)) for s, n in planned if s.sid is not None]
        rows = self._decode(entries)
        self.counters.steps += 1
        for (seq, n), row_idx in zip(planned, rows, strict=True):
            seq.kv.extend(seq.pending[:n])
            del seq.pending[:n]
            self.counters.decoded_tokens += n
            if row_idx is not None:
                seq.generating = True
                try:
                    self._emit(seq, self._row(row_idx))
                except Exception as e:  # e.g. the sampler on a broken row: this sequence only
                    self._fail(seq, e)

    def _emit(self, seq: _Seq, logits: np.ndarray) -> None:
        """Engine.generate's per-token logic for one sequence whose next row is ready."""
        h = seq.handle
        try:
            tok = h.sampler.choose(logits, seq.history)
        except GrammarError as e:  # a grammar no token can continue
            raise BadRequest(str(e)) from None
        if self.is_end(tok):
            return self._finish(seq, "stop")
        lp, top = logprob_report(logits, tok, seq.top_k) if seq.want_lp else (None, None)
        text = seq.stream.push(self.token_bytes(tok))
        seq.history.append(tok)
        seq.produced += 1
        h.completion_tokens += 1
        h.token_steps.append(self.counters.steps)
        h._queue.put(Step(tok, text, lp if seq.logprobs else None, top))
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif seq.produced >= seq.params.max_tokens or len(seq.kv) >= self.n_ctx:
            self._finish(seq, "length")
        elif seq.cancelled():
            self._finish(seq, "cancelled")
        else:
            seq.pending = [tok]

    def _finish(self, seq: _Seq, reason: str) -> None:
        h = seq.handle
        h.finish_reason = reason
        self._retire(seq)  # first: a consumer that saw the end sees the engine's state after it
        h._queue.put(Step(None, seq.stream.flush(), finish_reason=reason))
        h._queue.put(_END)

    def _fail(self, seq: _Seq, error: Exception) -> None:
        seq.kv = []  # its KV state is unknown after a failed decode: not kept for reuse
        self._retire(seq)
        seq.handle._queue.put(error)

    def _retire(self, seq: _Seq) -> None:
        if seq in self._active:
            self._active.remove(seq)
        if seq.sid is None:
            return
        sid, seq.sid = seq.sid, None
        if self.prefix_cache_tokens and 0 < len(seq.kv) <= self.prefix_cache_tokens:
            self._cache[sid] = (seq.scope, seq.kv)
            self._cached_tokens += len(seq.kv)
            self._trim_cache(self.prefix_cache_tokens, self.max_cached)
        else:
            self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
            self._free.append(sid)

    def _trim_cache(self, max_tokens: int, max_entries: int) -> None:
        while self._cache and (self._cached_tokens > max_tokens or len(self._cache) > max_entries):
            self._evict()

    def _evict(self) -> None:
        sid, (_scope, kv) = self._cache.popitem(last=False)
        self._cached_tokens -= len(kv)
        self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
        self._free.append(sid)
        self.counters.evictions += 1

    def _take_sid(self, tokens: list[int], scope: str) -> tuple[int, int]:
        """A sequence id for `tokens` and how many of them its KV already holds: the cached
        sequence sharing the longest prefix is taken over in place (its KV past the prefix
        dropped); else a free id (evicting the least recently used cached one if none is)."""
        best_sid, best = None, 0
        for sid, (sc, kv) in self._cache.items():
            if sc == scope:
                n = _common_prefix(kv, tokens)
                if n > best:
                    best_sid, best = sid, n
        if best_sid is not None:
            _scope, kv = self._cache.pop(best_sid)
            self._cached_tokens -= len(kv)
            keep = min(best, len(tokens) - 1)  # at least one token is evaluated: its row starts generation
            if self._lc.llama_memory_seq_rm(self._mem, best_sid, keep, -1):
                self.counters.prefix_hits += 1
                self.counters.reused_tokens += keep
                return best_sid, keep
            self._lc.llama_memory_seq_rm(self._mem, best_sid, -1, -1)  # a model that can't cut a sequence
            return best_sid, 0
        if not self._free:
            self._evict()
        return self._free.pop(), 0

    def _decode(self, entries: Sequence[tuple[int, list[int], int, bool | list[int]]]) -> list[int | None]:
        """One llama_decode of (sequence id, tokens, first position, want) entries; want: True
        for the last token's row, or a list of token indices whose rows are wanted. Returns,
        per entry, the batch index of its last token's row when want is True (else None).
        When the cache is full, cached prefixes are evicted and the decode retried."""
        b = self._batch
        i = 0
        rows: list[int | None] = []
        for sid, toks, pos, want in entries:
            for j, t in enumerate(toks):
                b.token[i] = t
                b.pos[i] = pos + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = sid
                b.logits[i] = False
                i += 1
            if want is True:
                b.logits[i - 1] = True
            elif want:  # several rows of one entry (replay): indices into its tokens
                for j in want:
                    b.logits[i - len(toks) + j] = True
            rows.append(i - 1 if want is True else None)
        padded = self.pad_single and i == 1
        if padded:  # see the module docstring: keep every row on the 2+-token kernels
            b.token[i] = b.token[0]
            b.pos[i] = 0
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = self._scratch
            b.logits[i] = False
            i += 1
        b.n_tokens = i
        # llama.cpp picks n_threads_batch for any step of more than one token, so several
        # sequences decoding together would run on the prompt-reading count. A decode step
        # carries a token to forward per sequence, the Python work that n_threads leaves
        # room for (engine/threads.py), so it gets n_threads however many sequences it holds.
        threads = self.n_threads_batch if any(len(toks) > 1 for _sid, toks, _pos, _want in entries) else self.n_threads
        if threads != self._threads_now:
            self._lc.llama_set_n_threads(self._ctx, self.n_threads, threads)
            self._threads_now = threads
        try:
            while True:
                rc = self._lc.llama_decode(self._ctx, b)
                if rc == 1 and self._cache:  # no room in the KV cache: cached prefixes go first
                    self._trim_cache(0, 0)
                    continue
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc})")
                return rows
        finally:
            if padded:
                self._lc.llama_memory_seq_rm(self._mem, self._scratch, -1, -1)

    def _row(self, index: int) -> np.ndarray:
        # A view into llama.cpp's buffer: valid only until the next decode.
        return self._row_view(self._lc.llama_get_logits_ith(self._ctx, index))

    def _borrow_sid(self) -> int:
        if not self._free:
            if not self._cache:
                raise RuntimeError("no free sequence")
            self._evict()
        return self._free.pop()

    def _return_sid(self, sid: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
        self._free.append(sid)

    # --- teacher-forced replay and self-benchmark (jobs between steps) ----------------------

    def replay(self, prompt: Sequence[int], output: Sequence[int], consume: Callable[[int, np.ndarray], None]) -> None:
        """As Engine.replay, in a sequence of its own between two scheduler steps (running
        generations pause for it)."""
        seq = list(prompt) + list(output)
        first = len(prompt) - 1
        if first < 0:
            raise ValueError("empty prompt")
        if len(seq) > self.n_ctx:
            raise ValueError(f"{len(seq)} tokens do not fit the verifier's context of {self.n_ctx}")

        def job() -> None:
            sid = self._borrow_sid()
            try:
                for start in range(0, len(seq), self.n_batch):
                    chunk = seq[start:start + self.n_batch]
                    wanted = [j for j in range(len(chunk)) if start + j >= first]
                    self._decode_all(sid, chunk, start, wanted)
                    for j in wanted:
                        consume(start + j - first, self._row(j))
            finally:
                self._return_sid(sid)

        self._call(job)

    def _decode_all(self, sid: int, toks: list[int], pos: int, wanted: list[int]) -> None:
        """Decode tokens of one sequence, keeping the rows of the `wanted` token indices (the
        batch indices too: the sequence is alone in the batch)."""
        self._decode([(sid, toks, pos, wanted or False)])

    def measure_speed(
        self,
        progress: Callable[[float, str], None] | None = None,
        *,
        n_prompt: int = 200,
        n_decode: int = 64,
        max_seconds: float = 5.0,
    ) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s of one sequence), like Engine.measure_speed; also sets
        `aggregate_tps`: decode tok/s of `slots` sequences stepping together (the node's
        capacity). Runs between scheduler steps (at start-up nothing else runs)."""
        report = progress or (lambda f, m: None)
        base = self.tokenize(_BENCH_TEXT)
        n_prompt = max(8, min(n_prompt, self.n_ctx - n_decode - 2))
        prompt = (base * (n_prompt // max(len(base), 1) + 1))[:n_prompt]

        def job() -> tuple[float, float, float]:
            sids = [self._borrow_sid() for _ in range(self.slots)]
            try:
                report(0.0, "warming up")
                self._decode([(sids[0], prompt[:8], 0, True)])
                prefill = 0.0
                for attempt in range(2):
                    report(0.05 + 0.15 * attempt, f"prefill of {len(prompt)} tokens ({attempt + 1}/2)")
                    self._lc.llama_memory_seq_rm(self._mem, sids[0], -1, -1)
                    t0 = time.perf_counter()
                    for s in range(0, len(prompt), self.n_batch):
                        self._decode([(sids[0], prompt[s:s + self.n_batch], s, s + self.n_batch >= len(prompt))])
                    prefill = max(prefill, len(prompt) / max(time.perf_counter() - t0, 1e-9))
                for s in sids[1:]:
                    self._lc.llama_memory_seq_cp(self._mem, sids[0], s, -1, -1)
                results = []
                for k, n in enumerate(sorted({1, self.slots})):
                    report(0.35 + 0.3 * k, f"decoding {n_decode} steps of {n} sequence(s)")
                    results.append(self._bench_decode(sids[:n], len(prompt), n_decode, max_seconds / 2))
                return prefill, results[0], results[-1]
            finally:
                for s in sids:
                    self._return_sid(s)

        prefill, single, aggregate = self._call(job)
        self.aggregate_tps = aggregate
        report(1.0, f"prefill {prefill:.0f} tok/s, decode {single:.0f} tok/s, {self.slots} sequences "
                    f"together {aggregate:.0f} tok/s")
        return prefill, single

    def _bench_decode(self, sids: list[int], pos: int, n_steps: int, max_seconds: float) -> float:
        """Median-step aggregate decode rate of these sequences (robust to a momentarily busy
        machine: llama.cpp's spin-waiting threads stall a step when one is descheduled)."""
        steps: list[float] = []
        toks = [int(np.argmax(self._row(-1)))] * len(sids)
        start = time.perf_counter()
        for i in range(n_steps):
            t0 = time.perf_counter()
            rows = self._decode([(sid, [toks[k]], pos + i, True) for k, sid in enumerate(sids)])
            toks = [int(np.argmax(self._row(r))) for r in rows if r is not None]
            for t in toks:
                self.token_bytes(t)
            steps.append(time.perf_counter() - t0)
            if time.perf_counter() - start > max_seconds or pos + i + 2 >= self.n_ctx:
                break
        for sid in sids:
            self._lc.llama_memory_seq_rm(self._mem, sid, pos, -1)
        return len(sids) / max(float(np.median(steps)), 1e-9)

    def close(self) -> None:
        """Stop the scheduler (running generations end "cancelled") and free the model."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        ctx, self._bctx = self._bctx, None
        if ctx is not None:
            self._lc.llama_batch_free(self._batch)
            ctx.close()
        super().close()


class BatchSlot:
    """One of the node's admission workers: a right to run one generation on the shared
    engine. Reads through to the engine for everything else."""

    def __init__(self, engine: BatchedEngine, index: int):
        self.engine = engine
        self.index = index

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, request: EngineRequest, *, cancel: threading.Event | None = None, scope: str = "") -> BatchedGeneration:
        return self.engine.run(request, cancel=cancel, scope=scope)


class _Seq:
    """Scheduler-side state of one generation."""

    def __init__(self, handle: BatchedGeneration, prompt: list[int], params: GenerationSettings,
                 continuation: list[int], logprobs: bool, top_k: int, cancel: threading.Event | None, scope: str):
        self.handle = handle
        self.params = params
        self.continuation = continuation
        self.history = prompt + continuation  # penalties look at the whole sequence
        self.logprobs = logprobs
        self.top_k = top_k
        self.want_lp = logprobs or top_k > 0
        self.cancel = cancel
        self.scope = scope
        self.stream = TextStream(params.stop)
        self.produced = len(continuation)
        self.sid: int | None = None
        self.kv: list[int] = []  # tokens in the KV cache, positions 0..len-1
        self.pending: list[int] = []  # tokens to evaluate next
        self.generating = False  # past the prompt: one token per step

    def cancelled(self) -> bool:
        return self.handle._closed or (self.cancel is not None and self.cancel.is_set())


class BatchedGeneration(StepIterator):
    """Iterator[Step] with Generation's attributes, fed by the scheduler thread. Iterate it to
    the end or close() it (closing ends the sequence at the next step). `reused_tokens`: how
    many prompt tokens came from the prefix cache (known once the first step arrived)."""

    def __init__(self, engine: BatchedEngine, prompt: list[int], params: GenerationSettings, continuation: list[int],
                 logprobs: bool, top_logprobs: int, cancel: threading.Event | None, scope: str,
                 grammar: str = "") -> None:
        self.prompt_tokens = len(prompt)
        self.sampler = start_sampler(engine, prompt, continuation, params, grammar)
        self.seed = self.sampler.seed
        self.reused_tokens = 0
        self.token_steps: list[int] = []  # the scheduler step that produced each token (tests, benchmarks)
        self.submitted_at_step = engine.counters.steps
        self._engine = engine
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._gen = self._iterate()
        engine._submit(_Seq(self, prompt, params, continuation, logprobs, top_logprobs, cancel, scope))

    def _iterate(self) -> Generator[Step, None, None]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._engine._thread.is_alive():
                    raise RuntimeError("the engine's scheduler stopped") from None
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._wake()
        self._gen.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _kv_bytes_per_token(lc: Any, model: Any) -> int:
    """KV cache bytes one token takes (f16 K and V in every layer): what a prefix-cache token
    costs in memory."""
    try:
        n_layer = lc.llama_model_n_layer(model)
        n_embd = lc.llama_model_n_embd(model)
        n_head = max(1, lc.llama_model_n_head(model))
        n_head_kv = lc.llama_model_n_head_kv(model)
        return int(n_layer * 2 * 2 * n_embd * n_head_kv // n_head)
    except (AttributeError, ctypes.ArgumentError):
        return 0
