"""The node's side of /mesh/infer/1: one handler per incoming stream.

A stream carries any number of status queries and at most one generation at a time. The
generation runs in a worker thread (llama.cpp blocks); tokens cross to the trio loop through a
memory channel and leave in frames that carry every token ready at that moment, so fast
decoding costs few stream writes while the first token still leaves at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from engine.grammar import GrammarError, check_grammar_text
from node.admission import Admission, Busy, Draining
from protocol.errors import ProtocolError
from protocol.framing import (
    DEFAULT_MAX_FRAME,
    BufferBudget,
    BufferFull,
    FrameReader,
    FrameStalled,
    FrameWriter,
    OversizedFrame,
)
from protocol.identity import Identity
from protocol.messages import (
    ERR_BUSY,
    ERR_CANCELLED,
    ERR_INTERNAL,
    ERR_INVALID,
    ERR_LEAVING,
    ERR_TOO_LONG,
    ERR_UNKNOWN_MODEL,
    Cancel,
    Error,
    Final,
    InferRequest,
    Leaving,
    StatusQuery,
    StatusReply,
    TokenChunk,
    parse_message,
    to_wire,
)
from protocol.records import WorkReceipt, token_digest

log = logging.getLogger("mesh.node.service")

MAX_TOKENS_PER_FRAME = 32
# Once a generation streams, a frame leaves at most this often: tokens that come faster
# share frames. A reader sees a 20 ms cadence as continuous (it is below the 50 ms pause a
# reader notices), while a fast engine's frames, and with them the per-frame costs of node,
# entry and client, drop several-fold. The first token, the last frame and a full frame
# (MAX_TOKENS_PER_FRAME) always leave at once.
FRAME_INTERVAL_S = 0.02

# What a requester's frames may hold in this node's memory. Requesters send `req`, `cancel`
# and `status?`; only a request is ever large, and a request that doesn't fit the context is
# refused anyway. Any real tokenizer turns text into at least one token per few dozen bytes
# (its longest tokens are runs of spaces or punctuation), so 64 bytes per context token, plus
# 8 per continuation token id and 64 KiB for the envelope and message framing, admits every
# request that could fit: 208 KiB at the default 2048-token context, the protocol's 1 MiB
# limit from about 13,650 tokens up. A larger request is answered context_length_exceeded before
# its body is read.
REQUEST_FRAME_BASE = 64 * 1024
REQUEST_BYTES_PER_TOKEN = 64 + 8
# All streams together may hold this much in unfinished frames; beyond it a stream is answered
# busy and closed. An eighth is kept for streams holding little (protocol.framing.SMALL_HOLDING),
# so status queries, cancels and ordinary requests still get in while big partial frames hold
# the rest.
DEFAULT_BUFFER_BUDGET = 64 * 1024 * 1024
# A frame, once begun, must be complete within this long: a peer stopping mid-frame would
# otherwise hold its share of the budget for as long as it liked. 15 s asks 14 kB/s of a
# requester sending the largest request at the default context, 70 kB/s for a 1 MiB one.
FRAME_STALL_S = 15.0
# Bound on writing an error to a requester before the stream ends: one that stopped reading
# must not keep the handler, and the buffers it holds, alive.
ERROR_SEND_S = 2.0
BUFFER_WARNING_INTERVAL_S = 10.0


def request_frame_limit(context_size: int) -> int:
    """The largest request frame a node with this context accepts (see REQUEST_BYTES_PER_TOKEN)."""
    return min(DEFAULT_MAX_FRAME, REQUEST_FRAME_BASE + context_size * REQUEST_BYTES_PER_TOKEN)


def buffer_budget(total_bytes: int = DEFAULT_BUFFER_BUDGET) -> BufferBudget:
    return BufferBudget(total_bytes, reserve=total_bytes // 8)


class ByteStream(Protocol):
    async def read(self, n: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


@dataclass
class NodeStats:
    started_at: float = field(default_factory=time.time)
    requests_served: int = 0
    requests_failed: int = 0
    tokens_served: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0  # one generation alone
    aggregate_tps: float = 0.0  # every slot decoding at once, as measured at start
    engine_mode: str = ""  # "batched": slots are sequences of one context; "separate": one engine each


class Session:
    """One open stream; writes are serialized so a Leaving notice never splits a frame."""

    def __init__(self, stream: ByteStream, remote: str):
        self.stream = stream
        self.remote = remote
        self.writer = FrameWriter(stream)
        self.lock = trio.Lock()
        self.closed = False
        self.abort = False  # end with a reset: the peer stalled, nothing it sends matters now
        self.generated = False  # carried a generation: its peer closes it once it read the end

    async def send(self, *messages) -> None:
        async with self.lock:
            await self.writer.write_frames([to_wire(m) for m in messages])


class NodeService:
    def __init__(self, identity: Identity, admission: Admission, *, model_sha256: str, model_name: str,
                 context_size: int, max_tokens: int, stats: NodeStats | None = None,
                 on_receipt: Callable[[bytes], None] | None = None, buffers: BufferBudget | None = None,
                 frame_stall_s: float = FRAME_STALL_S):
        self.identity = identity
        self.admission = admission
        self.model_sha256 = model_sha256
        self.model_name = model_name
        self.context_size = context_size
        self.max_tokens = max_tokens
        self.stats = stats or NodeStats()
        # Called with every receipt this node signs, so the volunteer keeps their own record
        # to check the entry's credit statements against.
        self.on_receipt = on_receipt
        self.sessions: set[Session] = set()
        # Shared by every requester stream's FrameReader: the node's memory for frames in flight.
        self.buffers = buffers if buffers is not None else buffer_budget()
        self.request_frame_limit = request_frame_limit(context_size)
        self.frame_stall_s = frame_stall_s
        self._buffers_warned_at = float("-inf")
        self.grace_seconds = 0.0
        self.frame_interval = FRAME_INTERVAL_S
        self._live_cancels: set[threading.Event] = set()  # one per running generation
        self._threads: trio.CapacityLimiter | None = None

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> StatusReply:
        a = self.admission
        return StatusReply(self.model_sha256, self.model_name, a.total, a.free, a.queued, a.queue_limit,
                           self.stats.prefill_tps, self.stats.decode_tps, self.stats.tokens_served,
                           a.draining, self.context_size, self.stats.engine_mode, self.stats.aggregate_tps)

    # ---- leaving -----------------------------------------------------------------------------
    async def announce_leaving(self, grace_seconds: float) -> None:
        """Refuse new work at once and tell every connected entry, so they route elsewhere
        before their next request rather than after a failed one."""
        self.grace_seconds = grace_seconds
        self.admission.start_draining()
        for s in list(self.sessions):
            with trio.move_on_after(1.0):
                try:
                    await s.send(Leaving(grace_seconds))
                except Exception:
                    pass

    async def wait_generation_streams_closed(self, poll: float = 0.05) -> None:
        """Until every stream that carried a generation has ended. A requester closes its
        stream once it has read the final frame; until then the frames may still sit in the
        muxer's send window (a requester that reads slowly has not granted more), and closing
        the host would lose them. Callers bound this with a timeout."""
        while any(s.generated for s in self.sessions):
            await trio.sleep(poll)

    # ---- stream handling ---------------------------------------------------------------------
    async def handle_stream(self, stream: ByteStream, remote: str) -> None:
        session = Session(stream, remote)
        self.sessions.add(session)
        try:
            await self._serve(session)
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError, ConnectionError):
            pass
        except Exception as e:  # a peer's stream must never take the node down
            if not _is_stream_failure(e):
                log.exception("stream handler failed", extra={"peer": _short(remote)})
        finally:
            self.sessions.discard(session)
            reset = getattr(stream, "reset", None) if session.abort else None
            with trio.move_on_after(1.0) as cs:
                cs.shield = True
                try:
                    await (reset() if reset is not None else stream.close())
                except Exception:
                    pass

    async def _serve(self, session: Session) -> None:
        guarded = _StallGuard(session.stream, self.frame_stall_s)
        reader = FrameReader(guarded, max_frame=self.request_frame_limit, budget=self.buffers)
        guarded.reader = reader
        try:
            await self._serve_frames(session, reader)
        finally:
            reader.release()  # the stream is done: its buffered bytes go back to the budget

    async def _serve_frames(self, session: Session, reader: FrameReader) -> None:
        while True:
            try:
                frame = await reader.read_frame()
            except ProtocolError as e:
                await self._refuse_frame(session, e)
                return
            if frame is None:
                return
            try:
                msg = parse_message(frame)
            except ProtocolError as e:
                await session.send(Error(ERR_INVALID, str(e), _request_id_of(frame)))
                return  # after a protocol violation the stream's state can't be trusted
            if isinstance(msg, StatusQuery):
                await session.send(self.status())
            elif isinstance(msg, InferRequest):
                session.generated = True
                if not await self._run_request(session, reader, msg):
                    return
            elif isinstance(msg, Cancel):
                continue  # cancel for a request that already ended: harmless
            else:
                await session.send(Error(ERR_INVALID, f"a node does not accept {msg.T!r} messages"))
                return

    async def _refuse_frame(self, session: Session, e: ProtocolError) -> None:
        """The last word on a stream whose next frame can't be read: the error a requester can
        act on, sent within ERROR_SEND_S."""
        if isinstance(e, OversizedFrame) and e.length <= DEFAULT_MAX_FRAME:
            # Valid for the protocol, too large for this node: what a too-long prompt gets.
            err = Error(ERR_TOO_LONG, f"a request of {e.length} bytes is more than this node's "
                        f"{self.context_size}-token context can take (at most {e.limit} bytes)")
        elif isinstance(e, BufferFull):
            now = time.monotonic()
            if now - self._buffers_warned_at >= BUFFER_WARNING_INTERVAL_S:  # a flood must not flood the log
                self._buffers_warned_at = now
                log.warning("receive buffers full: refusing streams", extra={
                    "peer": _short(session.remote), "buffered": self.buffers.used, "refused_so_far": self.buffers.refusals})
            err = Error(ERR_BUSY, "the node's receive buffers are full", retry_after=1.0)
        else:
            session.abort = isinstance(e, FrameStalled)
            err = Error(ERR_INVALID, str(e))
        with trio.move_on_after(ERROR_SEND_S):
            await session.send(err)

    async def _run_request(self, session: Session, reader: FrameReader, req: InferRequest) -> bool:
        """Serve one generation. Returns whether the stream may carry more messages."""
        rid = req.request_id
        if req.model_sha256 != self.model_sha256:
            await session.send(Error(ERR_UNKNOWN_MODEL, f"this node serves model {self.model_sha256[:12]}…, not {req.model_sha256[:12]}…", rid))
            return True
        if req.params.max_tokens > self.max_tokens:
            req.params.max_tokens = self.max_tokens  # the node's limit, stated in its advert
        if req.grammar:
            try:
                # Before a slot is taken: hostile grammar text must not hold one. Whether it
                # parses is llama.cpp's call, made by the engine (a BadRequest, same code).
                check_grammar_text(req.grammar)
            except GrammarError as e:
                await session.send(Error(ERR_INVALID, f"unusable grammar: {e}", rid))
                return True
        try:
            async with self.admission.slot(session.remote) as engine:
                return await self._generate(session, reader, req, engine)
        except Busy as e:
            await session.send(Error(ERR_BUSY, str(e), rid, retry_after=1.0))
            return True
        except Draining:
            await session.send(Error(ERR_LEAVING, "this node is leaving the mesh", rid))
            return True

    async def _generate(self, session: Session, reader: FrameReader, req: InferRequest, engine) -> bool:
        """Run one admitted generation: the engine in a worker thread, its steps relayed in
        batched frames, the requester watched for a cancel or a disappearance. Returns whether
        the stream may carry more messages."""
        run = _RunState(req.request_id)
        worker = _EngineThread(engine, req, run.cancel, scope=session.remote)
        batcher = _FrameBatcher(session, req, run, self.stats, self.frame_interval, _piece_reader(engine))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_peer, session, reader, run, self.status)
            nursery.start_soon(worker.run, self._worker_limiter())
            # Registered so the drain deadline can stop this generation.
            self._live_cancels.add(run.cancel)
            try:
                await batcher.relay(worker.steps, worker.finished)
            finally:
                self._live_cancels.discard(run.cancel)
            nursery.cancel_scope.cancel()  # stop the peer watcher once the worker is done
        return await self._conclude(session, req, run, worker, batcher.ids)

    def _worker_limiter(self) -> trio.CapacityLimiter:
        # One worker thread per slot: trio's default limiter (40 threads) would make the 41st
        # concurrent generation of a many-slot node wait for a thread with its slot held.
        if self._threads is None:
            self._threads = trio.CapacityLimiter(max(1, self.admission.total))
        return self._threads

    async def _conclude(self, session: Session, req: InferRequest, run: _RunState, worker: _EngineThread,
                        ids: list[int]) -> bool:
        """The generation's last word to the requester: an error, a cancel notice, or the Final
        frame with a signed receipt. Returns whether the stream may carry more messages."""
        rid = req.request_id
        if worker.error is not None:
            self.stats.requests_failed += 1
            code, msg = _error_for(worker.error)
            log.info("request failed", extra={"request": rid, "code": code})
            if not run.peer_gone:
                await session.send(Error(code, msg, rid))
            return not run.peer_gone
        if run.cancel.is_set():
            self.stats.requests_failed += 1
            if run.peer_gone:
                log.info("requester went away; generation stopped", extra={"request": rid, "tokens": len(ids)})
                return False
            code = ERR_LEAVING if self.admission.draining else ERR_CANCELLED
            await session.send(Error(code, "generation cancelled" if code == ERR_CANCELLED else "node left before finishing", rid))
            return True
        receipt = self._sign_receipt(session, rid, worker.prompt_tokens, ids)
        await session.send(Final(rid, worker.finish or "stop", worker.prompt_tokens, len(ids), receipt, worker.seed))
        self.stats.requests_served += 1
        log.info("request served", extra={"request": rid, "tokens": len(ids), "finish": worker.finish})
        return True

    def _sign_receipt(self, session: Session, rid: str, prompt_tokens: int, ids: list[int]) -> bytes:
        """The receipt is the node's claim to credit: it binds exactly the tokens the requester
        was sent (their digest) to this node, that requester and the request. The volunteer's
        own copy (on_receipt) lets them check the entry's credit statements; failing to keep
        it must not cost the requester their Final frame."""
        receipt = WorkReceipt(rid, self.model_sha256, prompt_tokens, len(ids), token_digest(ids),
                              self.identity.peer_id, session.remote, time.time()).sign(self.identity)
        if self.on_receipt is not None:
            try:
                self.on_receipt(receipt)
            except Exception:
                log.exception("keeping a receipt failed")
        return receipt

    def cancel_all(self) -> None:
        """Stop every running generation (the drain grace period is over)."""
        for ev in list(self._live_cancels):
            ev.set()


class _RunState:
    """What the parts of one running generation share: the cancel flag the worker thread
    polls (a threading.Event, since the thread can't see trio state), whether the requester is
    gone (then nothing more is written to it), and the request id cancels must name."""

    def __init__(self, rid: str):
        self.rid = rid
        self.cancel = threading.Event()
        self.peer_gone = False

    def lose_peer(self) -> None:
        self.peer_gone = True
        self.cancel.set()


async def _watch_peer(session: Session, reader: FrameReader, run: _RunState, status: Callable[[], StatusReply]) -> None:
    """Reads the stream while a generation runs, because the requester may cancel or vanish
    (EOF, reset, garbage) and either way llama.cpp should stop at once rather than decode
    tokens no one reads. Status queries are still answered so an entry's load polling keeps
    working on a busy stream."""
    try:
        while True:
            frame = await reader.read_frame()
            if frame is None:
                run.peer_gone = True
                break
            try:
                msg = parse_message(frame)
            except ProtocolError:
                run.peer_gone = True
                break
            if isinstance(msg, Cancel) and msg.request_id == run.rid:
                break
            if isinstance(msg, StatusQuery):
                await session.send(status())
    except Exception as e:
        session.abort = isinstance(e, FrameStalled)
        run.peer_gone = True
    run.cancel.set()


class _StallGuard:
    """A requester's stream as its FrameReader reads it: once a frame has begun, the rest must
    arrive within `stall_s` or the read raises FrameStalled. Between frames a stream may idle
    as long as it likes (entries keep status streams open); inside one it holds buffer budget,
    which a peer stopping mid-frame must not keep."""

    def __init__(self, stream: ByteStream, stall_s: float):
        self._stream = stream
        self._stall_s = stall_s
        self.reader: FrameReader | None = None
        self._deadline: float | None = None
        self._frame = -1  # frames_read when the deadline was set: a new frame, a new deadline

    async def read(self, n: int) -> bytes:
        reader = self.reader
        if reader is None or not reader.buffered:
            self._deadline = None
            return await self._stream.read(n)
        if self._deadline is None or reader.frames_read != self._frame:
            self._deadline = trio.current_time() + self._stall_s
            self._frame = reader.frames_read
        with trio.move_on_at(self._deadline):
            return await self._stream.read(n)
        raise FrameStalled(f"a frame begun {self._stall_s:g} s ago is still incomplete ({reader.buffered} bytes)")


class _EngineThread:
    """Runs the engine's step iterator in a worker thread, because llama.cpp calls block and
    the trio loop must keep serving other streams meanwhile. Steps reach the loop through
    _Handover, so the thread never waits for the loop; the outcome (prompt size, seed, finish
    reason or the exception) is read once run() returned."""

    def __init__(self, engine, req: InferRequest, cancel: threading.Event, scope: str = ""):
        self._engine = engine
        # A batched engine reuses cached prompt prefixes only within one scope: the requesting
        # peer, so one entry's traffic never reveals (by timing) what another entry sent.
        self._scope = {"scope": scope} if getattr(engine, "scoped_cache", False) else {}
        self._req = req
        self._cancel = cancel
        send, self.steps = trio.open_memory_channel(float("inf"))
        self._handover = _Handover(trio.lowlevel.current_trio_token(), send)
        self.finished = self._handover.finished  # set once the last step is in `steps`
        self.prompt_tokens = 0
        self.seed: int | None = None
        self.finish: str | None = None
        self.error: Exception | None = None

    async def run(self, limiter: trio.CapacityLimiter) -> None:
        await trio.to_thread.run_sync(self._work, limiter=limiter)

    def _work(self) -> None:  # in the worker thread
        try:
            gen = self._engine.run(self._req, cancel=self._cancel, **self._scope)
            self.prompt_tokens = gen.prompt_tokens
            self.seed = gen.seed
            with gen:
                for step in gen:
                    if step.finish_reason is not None:
                        self.finish = step.finish_reason
                    if step.token is not None or step.text:
                        self._handover.put(step)
        except Exception as e:
            self.error = e
        finally:
            self._handover.close()


class _FrameBatcher:
    """Sends a generation's steps as TokenChunk frames, at most one per frame interval once
    streaming, because per-frame costs (node, entry, client) dominate on fast engines while a
    20 ms cadence still reads as continuous. The first frame, a full frame and the end leave
    at once. Records the token ids actually sent: the receipt covers exactly those."""

    def __init__(self, session: Session, req: InferRequest, run: _RunState, stats: NodeStats, frame_interval: float,
                 piece: Callable[[int], bytes]):
        self._session = session
        self._req = req
        self._piece = piece
        self._run = run
        self._stats = stats
        self._interval = frame_interval
        self.ids: list[int] = []

    async def relay(self, steps: trio.MemoryReceiveChannel, finished: trio.Event) -> None:
        last_sent: float | None = None
        last_full = False
        async for step in steps:
            if last_sent is not None and not last_full and self._interval > 0:
                delay = last_sent + self._interval - trio.current_time()
                if delay > 0:
                    # Tokens gather in the channel meanwhile; the generation's end goes out
                    # at once.
                    with trio.move_on_after(delay):
                        await finished.wait()
            batch = [step]
            while len(batch) < MAX_TOKENS_PER_FRAME:
                try:
                    batch.append(steps.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if self._run.cancel.is_set():
                continue  # drain the channel so the worker never blocks
            last_full = len(batch) >= MAX_TOKENS_PER_FRAME
            try:
                await self._session.send(_chunk(self._run.rid, batch, self._req, self._piece))
            except Exception:
                self._run.lose_peer()
                continue
            last_sent = trio.current_time()
            sent = [s.token for s in batch if s.token is not None]
            self.ids.extend(sent)
            self._stats.tokens_served += len(sent)


class _Handover:
    """Worker thread -> trio loop, without blocking the thread: put() queues a step and, unless
    a callback is already queued, schedules one (run_sync_soon) that moves every queued step
    into the channel. close() closes the channel after the last step.

    A busy loop must not slow the engine down, and a blocking from_thread round trip per token
    cost more than the token itself on fast engines; at most one callback is queued at a time
    and it takes every step waiting by then (order kept)."""

    def __init__(self, trio_token, channel: trio.MemorySendChannel):
        self._token = trio_token
        self._channel = channel
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False
        self._closing = False
        self.finished = trio.Event()  # set (in the loop) once the last step is in the channel

    def put(self, item) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._token.run_sync_soon(self._drain)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._scheduled:
                return
            self._scheduled = True
        self._token.run_sync_soon(self._drain)

    def _drain(self) -> None:  # in the trio loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            closing = self._closing
        for item in items:
            try:
                self._channel.send_nowait(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        if closing:
            self._channel.close()
            self.finished.set()


def _piece_reader(engine) -> Callable[[int], bytes]:
    """A token id -> the bytes it renders as, for logprobs: the entry has no tokenizer."""
    piece = getattr(engine, "token_bytes", None)
    if piece is not None:
        return piece
    detokenize = getattr(engine, "detokenize", None)
    if detokenize is not None:
        # Engines without byte-level pieces (the synthetic one) render whole characters.
        return lambda t: detokenize([t]).encode("utf-8")
    return lambda t: b""  # a wrapper that exposes neither: no text rather than a failed stream


def _chunk(rid: str, batch: list, req: InferRequest, piece: Callable[[int], bytes]) -> TokenChunk:
    # The generation's last step may carry only held-back text (token None).
    toks = [s for s in batch if s.token is not None]
    # Pieces are cached by the engine after their first lookup, so this costs dict reads
    # in the loop, and only for requests that asked for logprobs.
    return TokenChunk(
        rid,
        [s.token for s in toks],
        "".join(s.text for s in batch),
        [s.logprob for s in toks] if req.logprobs else None,
        [[[t, lp, piece(t)] for t, lp in (s.top or [])] for s in toks] if req.logprobs and req.top_logprobs else None,
        [piece(s.token) for s in toks] if req.logprobs else None,
    )


def _error_for(e: Exception) -> tuple[str, str]:
    """Maps an engine failure to the protocol's error code: the requester's fault (too long,
    invalid) is named so it isn't retried elsewhere; anything else is the node's, logged here
    with its traceback and reported without internals."""
    from engine.llama import BadRequest, RequestTooLong

    if isinstance(e, RequestTooLong):
        return ERR_TOO_LONG, str(e)
    if isinstance(e, BadRequest):
        return ERR_INVALID, str(e)
    log.error("generation failed: %s", e, exc_info=e)
    return ERR_INTERNAL, "the node failed while generating"


def _request_id_of(frame: dict) -> str | None:
    rid = frame.get("id")
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


def _is_stream_failure(e: Exception) -> bool:
    name = type(e).__name__
    return any(k in name for k in ("Stream", "Reset", "Closed", "EOF", "Broken"))


def _short(peer: str) -> str:
    return peer[-8:] if peer else "?"
