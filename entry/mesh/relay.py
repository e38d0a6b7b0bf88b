"""The Backend (entry/backend.py) on top of the mesh: route, stream, fail over, settle receipts.

One generation = one random request id, sent to one node at a time. If the node dies, goes
silent or gives up before its final frame, the same request goes to another node with the
token ids already delivered as its continuation; nodes replay those exactly (greedy and
seeded sampling alike), so the consumer sees one uninterrupted stream without duplicates.
What a node receives is only what generation needs: messages or prompt, sampling params,
logprob options and the random request id.

Consumers must close the event iterator when they stop early (`async with
contextlib.aclosing(backend.generate(spec)) as events:`): closing it cancels the work on the
node; an iterator merely dropped is closed later by the garbage collector.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import trio

from entry.backend import (
    DoneEvent,
    GenerationSpec,
    InvalidGeneration,
    MeshUnavailable,
    ModelEntry,
    ServedPart,
    TokenEvent,
    UnknownModel,
)
from entry.mesh import router
from entry.mesh.queue import AdmissionQueue
from entry.mesh.view import PENALTY_BAD_RECEIPT, PENALTY_DISCONNECT, PENALTY_FAILED, MeshView, NodeState
from protocol.errors import ProtocolError, RecordError
from protocol.messages import ERR_BUSY, ERR_INVALID, ERR_LEAVING, ERR_TOO_LONG, Final, InferRequest, TokenChunk
from protocol.records import ReceiptBook, WorkReceipt
from transport.host import DialError, MeshHost, StreamClosed
from transport.node_client import NodeCall, NodeError, StreamBroken, open_call

log = logging.getLogger("mesh.entry.backend")

# Floors for scaling the first-token timeout: a node slower than this at prefill, or at
# replaying a continuation (one token at a time, like decoding), is not worth waiting for.
PREFILL_FLOOR_TPS = 50.0
REPLAY_FLOOR_TPS = 20.0
CHARS_PER_TOKEN = 3.0  # a generous guess: more tokens -> more patience
# A node whose status stream was lost is abandoned at once if our generation stream has
# also been quiet this long (hung or cut off); if tokens still flow, it is kept.
HUNG_AFTER_S = 1.0


@dataclass
class MeshBackendConfig:
    first_token_timeout: float = 60.0  # base wait for a node's first token (see first_token_deadline)
    # The same for a node without a history with us (router.proven): an unknown identity that
    # takes a request and answers nothing costs the user this, not the full wait.
    unproven_first_token_timeout: float = 10.0
    token_timeout: float = 10.0  # longest silence between tokens (and before the final frame)
    # How long a request may wait in the entry's queue for a free slot before 503 (--queue-wait),
    # and how many may wait at once, all models together (--queue-max): entry/mesh/queue.py.
    # 300: a burst of 200 against 2 CPU nodes takes over a minute to drain (BENCHMARKS.md, burst).
    admission_wait: float = 300.0
    queue_max: int = 256
    dial_timeout: float = 5.0
    cancel_timeout: float = 2.0  # bound on telling a node to stop when the consumer left
    max_attempts: int = 8  # nodes tried for one generation, refusals included
    retry_after: float = 2.0  # suggested to clients when no node can serve


@dataclass
class AcceptedReceipt:
    """A node's verified receipt for the tokens it delivered: what credits build on.
    `peer_id` is for the ledger only, never shown to users."""

    peer_id: str
    pseudonym: str
    request_id: str
    model_sha256: str
    prompt_tokens: int
    completion_tokens: int
    receipt: WorkReceipt
    blob: bytes


@dataclass
class PartRecord:
    """One node's share of a finished generation, for the verifier and the credits ledger.
    `receipt` is set for the node that finished it, when its receipt was accepted; earlier
    nodes of a failover chain have none (they failed before their final frame) but the entry
    relayed their tokens itself.

    The parts of a generation, by stage: while it runs the relay keeps a _RunningPart per
    node (its NodeState, tokens and timing), which becomes this record and, for the user, a
    ServedPart (entry/backend.py: pseudonym and description only). The ledger books each
    record as a PartCredit (entry/credits/ledger.py: peer id, tokens it is paid for, receipt)."""

    peer_id: str  # for the ledger and the verifier only, never shown to users
    pseudonym: str
    ids: list[int]
    receipt: AcceptedReceipt | None = None
    finished: bool = False  # this node sent the final frame
    context_size: int = 0  # from its advert


@dataclass
class GenerationRecord:
    """Everything the credits ledger and the verifier need about one finished generation:
    the request as first sent (its params carry the seed a sampling node had to use) and
    every node's part, in order. Kept in memory only (it holds the prompt)."""

    request: InferRequest
    parts: list[PartRecord]
    finish_reason: str
    prompt_tokens: int
    canary: bool = False

    @property
    def ids(self) -> list[int]:
        return [t for p in self.parts for t in p.ids]


class _Silent(Exception):
    """The node produced nothing within the allowed time."""


_NODE_FAILURES = (DialError, StreamClosed, StreamBroken, ProtocolError, _Silent, NodeError)


def build_request(spec: GenerationSpec, model_sha256: str) -> InferRequest:
    """What the node gets: only what generation needs, under a fresh random request id.
    Sampling without a seed gets one here, so a continuation on another node draws the same
    numbers the first node would have."""
    params = dataclasses.replace(spec.params, stop=list(spec.params.stop))
    if params.seed is None and params.temperature > 0:
        params.seed = secrets.randbelow(2**63)
    return InferRequest(
        request_id=secrets.token_urlsafe(18),
        model_sha256=model_sha256,
        kind=spec.kind,
        params=params,
        messages=[dataclasses.replace(m) for m in spec.messages] if spec.kind == "chat" else [],
        prompt=spec.prompt if spec.kind == "completion" else "",
        logprobs=spec.logprobs,
        top_logprobs=spec.top_logprobs,
        grammar=spec.grammar,
    )


def first_token_deadline(config: MeshBackendConfig, request: InferRequest) -> float:
    """Seconds to wait for a node's first token: the base, plus prefill of a long prompt, plus
    the replay of a long continuation (nodes replay it one token at a time)."""
    chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    return (config.first_token_timeout + chars / CHARS_PER_TOKEN / PREFILL_FLOOR_TPS
            + len(request.continuation) / REPLAY_FLOOR_TPS)


def node_first_token_deadline(config: MeshBackendConfig, request: InferRequest, node: NodeState) -> float:
    """first_token_deadline, with the short base for a node that has not proven itself."""
    if not router.proven(node):
        config = dataclasses.replace(config, first_token_timeout=min(config.first_token_timeout,
                                                                     config.unproven_first_token_timeout))
    return first_token_deadline(config, request)


def describe_node(node: NodeState, tps: float | None = None) -> str:
    """How a node is described to users: model, quantization, speed; nothing identifying."""
    name = router.display_name(node.advert.model_name, node.model_sha256)
    speed = tps or node.decode_tps()
    return f"{name} {node.advert.quantization}" + (f", {speed:.0f} tok/s" if speed else "")


@dataclass
class _RunningPart:
    """One node's share of a generation while it runs (see PartRecord)."""

    node: NodeState
    ids: list[int] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None

    def add(self, ids: list[int]) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.ids += ids

    def tps(self) -> float | None:
        # Needs a few tokens over a measurable time; the first one waited for prefill.
        if len(self.ids) < 8 or self.first_at is None or self.last_at - self.first_at < 0.05:
            return None
        return (len(self.ids) - 1) / (self.last_at - self.first_at)

    def record(self, receipt: AcceptedReceipt | None, finished: bool) -> PartRecord:
        node = self.node
        return PartRecord(node.peer_id, node.pseudonym, list(self.ids), receipt, finished, node.advert.context_size)

    def served(self) -> ServedPart:
        return ServedPart(self.node.pseudonym, describe_node(self.node, self.tps()), len(self.ids))


class _Attempt:
    """One request on one node: a NodeCall plus the relay's patience with it."""

    def __init__(self, host: MeshHost, view: MeshView, node: NodeState, request: InferRequest, config: MeshBackendConfig):
        self.host, self.view, self.node, self.request, self.config = host, view, node, request, config
        self.call: NodeCall | None = None

    async def open(self) -> None:
        # No advert addresses: see MeshView's module doc (only what libp2p saw is dialled).
        # A Leaving notice mid-generation: it finishes this one within its grace.
        self.call = await open_call(self.host, self.node.peer_id, None, self.request,
                                    timeout=self.config.dial_timeout,
                                    on_leaving=lambda _: self.view.mark_leaving(self.node))

    async def next(self, timeout: float) -> TokenChunk | Final:
        """The node's next token chunk or final frame, within `timeout` seconds."""
        deadline = trio.current_time() + timeout
        while True:
            # The view cancels this scope when the node stops answering status queries;
            # NodeCall.next is cancel-safe, so reading on after that loses nothing.
            with trio.CancelScope(deadline=deadline) as scope:
                self.node.interrupts.add(scope)
                try:
                    return await self.call.next()
                finally:
                    self.node.interrupts.discard(scope)
            if trio.current_time() >= deadline:
                raise _Silent(f"nothing from the node for {timeout:.1f}s")
            if trio.current_time() - self.call.last_frame_at >= HUNG_AFTER_S:
                raise _Silent("the node stopped answering status queries and streaming")
            # Its status stream broke but this stream is alive: trust the tokens, keep reading.

    async def cancel(self) -> None:
        """The consumer left: tell the node to stop (it frees the slot at once), then close."""
        if self.call is not None:
            await self.call.stop(self.config.cancel_timeout)

    async def close(self) -> None:
        if self.call is not None:
            await self.call.close(self.config.cancel_timeout)

    async def abort(self) -> None:
        if self.call is not None:
            await self.call.abort(self.config.cancel_timeout)


@dataclass
class _Counters:
    requests: int = 0
    requests_failed: int = 0
    failovers: int = 0
    tokens: int = 0
    receipts_accepted: int = 0
    receipts_rejected: int = 0


class MeshBackend:
    """Backend over a running MeshView (see open_mesh_backend for the usual way to start one)."""

    def __init__(
        self,
        host: MeshHost,
        view: MeshView,
        *,
        config: MeshBackendConfig | None = None,
        on_receipt: Callable[[AcceptedReceipt], None] | None = None,
        receipt_book: ReceiptBook | None = None,
        on_generation_done: Callable[[GenerationRecord], None] | None = None,
        metrics=None,
    ):
        """`metrics`: the entry's registry (entry/api/metrics.py) for the queue's histogram and
        counters; None keeps them out of /metrics (tests, tools)."""
        self.host = host
        self.view = view
        self.config = config or MeshBackendConfig()
        self.on_receipt = on_receipt
        # Called once per finished generation with its GenerationRecord (credits, verification).
        self.on_generation_done = on_generation_done
        self.receipt_book = receipt_book or ReceiptBook()
        self.receipts: deque[AcceptedReceipt] = deque(maxlen=1000)  # the latest, for inspection
        self.counters = _Counters()
        # Set by whoever runs verification: {model name: sha256} the entry verifies with (model
        # names stay bound to them, router.build_catalog), and a check that the verifier can
        # take a new node's work (router.pick's `admit`).
        self.model_pins: dict[str, str] = {}
        self.admit: Callable[[NodeState], bool] | None = None
        self.queue = AdmissionQueue(view, pick=self._pick, may_serve_later=self._may_serve_later,
                                    wait=self.config.admission_wait, max_waiting=self.config.queue_max,
                                    retry_after=self.config.retry_after, model_id=self._model_id, metrics=metrics)

    # -- models ---------------------------------------------------------------------------

    def models(self) -> list[ModelEntry]:
        return router.build_catalog(self.view.nodes(), self.view.model_first_seen, self.model_pins)

    def resolve_model(self, model: str) -> ModelEntry | None:
        return router.resolve(self.models(), model)

    def select_model(self, model: str) -> ModelEntry:
        """See Backend.select_model: the one place a generation's model is chosen."""
        entry = self.resolve_model(model)
        if entry is not None:
            return entry
        if self._known_recently(model):
            raise MeshUnavailable(f"no node serves {model!r} right now", retry_after=self.config.retry_after)
        raise UnknownModel(f"no node serves a model named {model!r}")

    def _known_recently(self, model: str) -> bool:
        # A model whose nodes just left (or are still connecting) is unavailable, not unknown.
        if model in self.model_pins:
            return True
        for n in self.view.all_nodes():
            sha, name = n.model_sha256, router.display_name(n.advert.model_name, n.model_sha256)
            if model in (sha, name, f"{name}@{sha[:12]}"):
                return True
        return False

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, spec: GenerationSpec, model: ModelEntry | None = None) -> AsyncIterator[TokenEvent | DoneEvent]:
        if model is None:
            model = self.select_model(spec.model)
        request = build_request(spec, model.sha256)
        self.counters.requests += 1
        try:
            # aclosing: when our consumer closes us, _run must hear of it now (to cancel
            # the node's work), not whenever the garbage collector gets to it.
            async with aclosing(self._run(request, spec.queue_key)) as events:
                async for event in events:
                    yield event
        except (MeshUnavailable, InvalidGeneration):
            self.counters.requests_failed += 1
            raise

    async def _run(self, request: InferRequest, queue_key: str = "") -> AsyncIterator[TokenEvent | DoneEvent]:
        cfg = self.config
        delivered: list[int] = []
        parts: list[_RunningPart] = []
        exclude: set[str] = set()
        failovers = 0
        for attempt_no in range(cfg.max_attempts):
            # A retry (failover, or a node that said busy) was admitted once: it goes first.
            node = await self.queue.acquire(request.model_sha256, queue_key, exclude, priority=attempt_no > 0)
            attempt = _Attempt(self.host, self.view, node, dataclasses.replace(request, continuation=list(delivered)), cfg)
            part = _RunningPart(node)
            parts.append(part)
            final: Final | None = None
            failure: Exception | None = None
            try:
                await attempt.open()
                timeout = node_first_token_deadline(cfg, attempt.request, node)
                while final is None:
                    msg = await attempt.next(timeout)
                    if isinstance(msg, Final):
                        final = msg
                        break
                    if len(delivered) + len(msg.ids) > request.params.max_tokens:
                        raise ProtocolError("node sent more tokens than max_tokens")
                    if msg.ids:
                        timeout = cfg.token_timeout
                        part.add(msg.ids)
                        delivered += msg.ids
                        self.counters.tokens += len(msg.ids)
                    if msg.ids or msg.text:
                        yield _token_event(msg)
            except _NODE_FAILURES as e:
                if _cancelled():
                    # Our consumer left while this broke: its stream died of our own
                    # cancellation, which is no failure of the node.
                    await attempt.cancel()
                    await trio.lowlevel.checkpoint()  # raises the pending Cancelled
                failure = e
            except BaseException:
                # The consumer closed the iterator (client gone) or we are cancelled.
                await attempt.cancel()
                raise
            finally:
                self.view.release(node)
            if failure is None:
                await attempt.close()
                accepted = self._settle(part, final, request)
                self._report_done(request, parts, part, accepted, final)
                served = [p.served() for p in parts if p.ids or p is part]
                yield DoneEvent(final.finish_reason, final.prompt_tokens, len(delivered), served, failovers)
                return
            await (attempt.close() if isinstance(failure, NodeError) else attempt.abort())
            exclude.add(node.peer_id)
            if self._handle_failure(node, failure, part, delivered):
                failovers += 1
                self.counters.failovers += 1
        raise MeshUnavailable(f"gave up after {cfg.max_attempts} nodes", retry_after=cfg.retry_after)

    def _handle_failure(self, node: NodeState, e: Exception, part: _RunningPart, delivered: list[int]) -> bool:
        """Book the node's failure; raise if the request itself is at fault. Returns whether
        the node had taken on the work (so moving on counts as a failover)."""
        now = time.monotonic()
        started = bool(part.ids)
        log.info("node failed a generation", extra={"node": node.pseudonym, "error": type(e).__name__,
                                                    "detail": str(e)[:200], "tokens": len(part.ids)})
        if isinstance(e, DialError):
            self.view.drop(node, PENALTY_DISCONNECT, "unreachable")
            return False
        if isinstance(e, NodeError):
            code = e.code
            if code in (ERR_INVALID, ERR_TOO_LONG) and not delivered:
                raise InvalidGeneration(e.error.message, code)
            if code == ERR_BUSY:
                node.hold(now, e.error.retry_after or 1.0)
                return started
            if code == ERR_LEAVING:
                self.view.mark_leaving(node)
                return started
            if code in (ERR_INVALID, ERR_TOO_LONG):
                return started  # a continuation this node can't take (e.g. smaller context)
            node.penalize(now, PENALTY_FAILED)  # internal, unknown_model (its advert lied), ...
            return True
        # Died, reset, went silent or broke the protocol: out of routing until it recovers.
        self.view.drop(node, PENALTY_FAILED, type(e).__name__)
        return True

    def _pick(self, model_sha256: str, exclude: set[str]) -> NodeState | None:
        return router.pick(self.view.nodes(), model_sha256, time.monotonic(), exclude=exclude, admit=self.admit)

    def _may_serve_later(self, model_sha256: str, exclude: set[str]) -> bool:
        return router.may_serve_later(self.view.nodes(), model_sha256, exclude)

    def _model_id(self, model_sha256: str) -> str:
        return next((m.id for m in self.models() if m.sha256 == model_sha256), f"model-{model_sha256[:12]}")

    def _report_done(self, request: InferRequest, parts: list[_RunningPart], last: _RunningPart,
                     accepted: AcceptedReceipt | None, final: Final) -> None:
        if self.on_generation_done is None:
            return
        record = GenerationRecord(request, [p.record(accepted if p is last else None, p is last)
                                            for p in parts if p.ids or p is last],
                                  final.finish_reason, final.prompt_tokens)
        try:
            self.on_generation_done(record)
        except Exception:  # the ledger's or verifier's problem must not fail the user's request
            log.exception("generation-done callback failed")

    def accept_receipt(self, node: NodeState, request: InferRequest, ids: list[int], final: Final, *,
                       canary: bool = False) -> AcceptedReceipt | None:
        """Check the receipt in a node's final frame against what we relayed (`ids`: the
        tokens this node delivered, continuation excluded) and accept it once; None when it
        is refused, which costs the node reputation and the credit. Used for user
        generations and canary probes alike (`canary` only marks the log line); what a
        served generation earns beyond that (its success, its speed, the on_receipt hook) is
        the relay's, in _settle."""
        try:
            receipt = WorkReceipt.verify(final.receipt, node=node.peer_id, entry=self.host.peer_id,
                                         request_id=request.request_id, model_sha256=request.model_sha256,
                                         tokens=ids, prompt_tokens=final.prompt_tokens)
            self.receipt_book.accept(receipt)
        except RecordError as e:
            # The user got their tokens; the node loses standing and gets no credit.
            self.counters.receipts_rejected += 1
            node.penalize(time.monotonic(), PENALTY_BAD_RECEIPT)
            log.warning("receipt rejected", extra={"node": node.pseudonym, "reason": str(e),
                                                   **({"canary": True} if canary else {})})
            return None
        self.counters.receipts_accepted += 1
        return AcceptedReceipt(node.peer_id, node.pseudonym, request.request_id, request.model_sha256,
                               receipt.prompt_tokens, receipt.completion_tokens, receipt, final.receipt)

    def _settle(self, part: _RunningPart, final: Final, request: InferRequest) -> AcceptedReceipt | None:
        accepted = self.accept_receipt(part.node, request, part.ids, final)
        if accepted is None:
            return None
        part.node.succeeded()
        if (tps := part.tps()) is not None:
            part.node.observe_speed(tps)
        self.receipts.append(accepted)
        if self.on_receipt is not None:
            try:
                self.on_receipt(accepted)
            except Exception:  # the ledger's problem must not fail the user's request
                log.exception("receipt callback failed")
        return accepted

    # -- what the API shows ------------------------------------------------------------------

    def _connection_kind(self, peer_id: str) -> str | None:
        kind = getattr(self.host, "connection_kind", None)
        return kind(peer_id) if kind is not None else None

    def nodes_view(self) -> list[dict]:
        now = time.monotonic()
        ids = {m.sha256: m.id for m in self.models()}
        out = []
        for n in sorted(self.view.nodes(), key=lambda n: n.pseudonym):
            st = n.status
            out.append({
                "node": n.pseudonym,
                "model": ids.get(n.model_sha256, router.display_name(n.advert.model_name, n.model_sha256)),
                "model_sha256": n.model_sha256,
                "quantization": n.advert.quantization,
                "context_size": n.advert.context_size,
                "state": n.state(now),
                "reachability": n.reachability(getattr(self.host, "private_mesh", True)),
                # Our own connection to it right now: "direct", "relayed" or None.
                "connection": self._connection_kind(n.peer_id),
                "slots": n.total_slots,
                "free_slots": n.free_slots(),
                "queued": st.queued if st else 0,
                "in_flight": n.in_flight,
                "decode_tps": round(n.decode_tps(), 1),
                "prefill_tps": round(st.prefill_tps if st else n.advert.prefill_tps, 1),
                "latency_ms": round(n.latency * 1000, 1) if n.latency is not None else None,
                "reputation": round(n.reputation, 3),
                "served": n.served,
                "failures": n.total_failures,
                "verified": n.verified,
                "verify_failed": n.verify_failed,
                "last_verdict": n.last_verdict,
                "demoted": n.model_sha256 in n.demoted,
            })
        return out

    def queue_view(self) -> dict:
        """The admission queue, for /v1/mesh/queue: how many wait for which model, and the bounds."""
        q = self.queue
        names = {m.sha256: m.id for m in self.models()}
        return {
            "waiting": q.waiting(), "max": q.max_waiting, "wait_s": q.wait,
            "models": [{"model": names.get(sha, f"model-{sha[:12]}"), "waiting": n,
                        "oldest_wait_s": round(q.oldest_wait(sha), 3)} for sha, n in sorted(q.lengths().items())],
            "rejected": dict(q.rejected),
            "served_after_wait": q.served_after_wait,
        }

    def metrics(self) -> dict[str, float]:
        now = time.monotonic()
        nodes = self.view.nodes()
        out: dict[str, float] = {}
        models = self.models()
        for m in models:
            out[f'mesh_nodes{{model="{m.id}"}}'] = m.nodes
        queued = self.queue.lengths()
        names = {m.sha256: m.id for m in models}
        for sha in names.keys() | queued.keys():
            name = names.get(sha, f"model-{sha[:12]}")
            out[f'mesh_queue_length{{model="{name}"}}'] = queued.get(sha, 0)
            out[f'mesh_queue_oldest_wait_seconds{{model="{name}"}}'] = round(self.queue.oldest_wait(sha), 3)
        c = self.counters
        out.update({
            "mesh_nodes_known": len(nodes),
            "mesh_nodes_routable": sum(1 for n in nodes if n.routable(now)),
            "mesh_nodes_demoted": sum(1 for n in nodes if n.model_sha256 in n.demoted),
            "mesh_requests_total": c.requests,
            "mesh_requests_failed_total": c.requests_failed,
            "mesh_failovers_total": c.failovers,
            "mesh_completion_tokens_total": c.tokens,
            "mesh_receipts_accepted_total": c.receipts_accepted,
            "mesh_receipts_rejected_total": c.receipts_rejected,
            "mesh_queue_waiting": self.queue.waiting(),
            "mesh_queue_max": self.config.queue_max,
        })
        return out


def _cancelled() -> bool:
    """Is the current task cancelled (trio reports a cancelled task's deadline as -inf)?"""
    return trio.current_effective_deadline() == float("-inf")


def _token_event(chunk: TokenChunk) -> TokenEvent:
    top = ([[(int(t), float(lp), bytes(b)) for t, lp, b in per] for per in chunk.top_logprobs]
           if chunk.top_logprobs is not None else None)
    return TokenEvent(list(chunk.ids), chunk.text, list(chunk.logprobs) if chunk.logprobs is not None else None, top,
                      token_bytes=list(chunk.token_bytes) if chunk.token_bytes is not None else None)


@asynccontextmanager
async def open_mesh_backend(
    host: MeshHost,
    *,
    config: MeshBackendConfig | None = None,
    on_receipt: Callable[[AcceptedReceipt], None] | None = None,
    on_generation_done: Callable[[GenerationRecord], None] | None = None,
    metrics=None,
    **view_options,
) -> AsyncIterator[MeshBackend]:
    """A MeshView running in the background plus the backend on top; both stop on exit.

        async with open_mesh_host(identity, bootstrap=...) as host:
            async with open_mesh_backend(host) as backend:
                ...
    """
    view = MeshView(host, **view_options)
    # The caller's error is re-raised once the nursery has closed: raised inside it, trio
    # would hand the caller an ExceptionGroup instead of the error itself.
    deferred: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        try:
            yield MeshBackend(host, view, config=config, on_receipt=on_receipt, on_generation_done=on_generation_done,
                              metrics=metrics)
        except Exception as e:
            deferred = e
        finally:
            nursery.cancel_scope.cancel()
    if deferred is not None:
        raise deferred
