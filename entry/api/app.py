"""The entry's HTTP side: an OpenAI-compatible API, the web chat and the operator endpoints.

A Starlette app served by hypercorn's trio worker, so it shares one trio event loop with the
mesh backend. Generation requests are validated into GenerationSpecs that hold only what
generation needs (entry/api/parsing.py) and answered from Backend events
(entry/api/responses.py). Hypercorn's access log stays off: the entry keeps no record of who
asked what.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from entry.api.apikeys import ApiKeyStore
from entry.api.console import Console
from entry.api.metrics import TTFT_BUCKETS, Metrics
from entry.api.parsing import ApiError, GenerationPlan, parse_chat, parse_completion
from entry.api.ratelimit import OPEN_SUBJECT, RateLimited, RateLimits, Reservation
from entry.api.responses import SSE_DONE, ChoiceState, ResponseBuilder, dumps, model_object, sse
from entry.api.responses_api import ResponsesAdapter, ResponsesRequest, responses_error
from entry.api.seeds import SeedMixer
from entry.backend import Backend, DoneEvent, InvalidGeneration, MeshUnavailable, ModelEntry, TokenEvent, UnknownModel
from entry.benchmark import DEFAULT_CONCURRENCY, BenchmarkBusy, BenchmarkRunner
from entry.providers import ProviderError
from entry.targets import AutoRouting, NoTarget, RouteRequestError, Target, parse_route_options
from entry.targets import Route as RoutePlan
from protocol.credit_query import ReplayGuard

log = logging.getLogger("mesh.entry.api")

WEBCHAT_DIR = Path(__file__).parent / "webchat"
_WEBCHAT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere and runs no inline script.
_WEBCHAT_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_CLOSE_TIMEOUT = 5.0  # how long closing a backend iterator may take once the client is gone
_END = object()  # a producer's iterator ran out


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def backend_error(e: BaseException) -> ApiError:
    """A failure from the backend, in OpenAI's shape."""
    if isinstance(e, UnknownModel):
        return ApiError(404, str(e) or "no node serves this model", param="model", code="model_not_found")
    if isinstance(e, MeshUnavailable):
        return ApiError(503, str(e) or "no node can serve this request now", type="server_error",
                        code=getattr(e, "code", "mesh_unavailable"), headers={"Retry-After": _retry_after(e.retry_after)})
    if isinstance(e, InvalidGeneration):
        return ApiError(400, str(e), code=e.code)
    if isinstance(e, ProviderError):
        headers = {} if e.retry_after is None else {"Retry-After": _retry_after(e.retry_after)}
        return ApiError(502, str(e), type="server_error", code="provider_error", headers=headers)
    return ApiError(500, "internal error in the entry", type="server_error", code="internal_error")


@dataclass
class _Settings:
    backend: Backend
    keys: ApiKeyStore | None
    open_mode: bool
    limits: RateLimits
    metrics: Metrics
    max_body_bytes: int
    started: int
    ledger: Any = None  # entry/credits/ledger.py Ledger, for /v1/mesh/credits/{node}
    seeds: SeedMixer = field(default_factory=SeedMixer.random)
    # Longest a streamed write may wait for the client to read before the generation is
    # cancelled: a client that stops reading must not hold node slots.
    sse_write_timeout: float = 10.0
    credit_queries: ReplayGuard = field(default_factory=ReplayGuard)
    auto: AutoRouting = field(default_factory=AutoRouting)  # `model: "auto"`, provider targets


class _Instruments:
    def __init__(self, m: Metrics):
        self.requests = m.counter("mesh_entry_requests_total", "HTTP requests by endpoint and status", ("endpoint", "status"))
        self.latency = m.histogram("mesh_entry_request_duration_seconds", "Time from request to the end of the response",
                                   ("endpoint",))
        self.ttft = m.histogram("mesh_entry_time_to_first_token_seconds", "Time from request to the first generated token",
                                ("endpoint",), TTFT_BUCKETS)
        self.completion_tokens = m.counter("mesh_entry_completion_tokens_total", "Tokens generated", ("model",))
        self.prompt_tokens = m.counter("mesh_entry_prompt_tokens_total", "Prompt tokens processed", ("model",))
        self.failovers = m.counter("mesh_entry_failovers_total", "Generations continued on another node", ("model",))
        self.disconnects = m.counter("mesh_entry_client_disconnects_total", "Generations cancelled because the client left")
        self.stalled = m.counter("mesh_entry_stalled_clients_total",
                                 "Streamed generations cancelled because the client stopped reading")
        self.in_flight = m.gauge("mesh_entry_generations_in_flight", "Generation requests being answered")
        self.in_flight.set(0)
        self.model_nodes = m.gauge("mesh_entry_model_nodes", "Live nodes serving each model", ("model",))
        self.routed = m.counter("mesh_routed_requests_total", "Requests for auto routed, by model used and task "
                                "(task: known for prompts of the router's table, else unknown)", ("model", "task"))
        self.cost_saved = m.counter("mesh_routing_cost_saved_total", "USD saved by routing against always using the "
                                    "best single model (price difference x completion tokens)")
        self.cost_saved.inc(0)


_KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses",
                "/v1/embeddings", "/v1/mesh/nodes", "/v1/mesh/queue", "/v1/mesh/routing", "/v1/mesh/benchmark", "/console",
                "/v1/mesh/console")


def _endpoint_label(path: str) -> str:
    # Templates, not raw paths: a scanner must not be able to mint new series.
    if path in _KNOWN_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/webchat/"):
        return "/webchat/{file}"
    if path.startswith(("/console/", "/vendor/")):
        return path[:path.index("/", 1)] + "/{file}"
    if path.startswith("/v1/mesh/credits/"):
        return "/v1/mesh/credits/{node}"
    if path.startswith("/v1/mesh/benchmark/"):
        return "/v1/mesh/benchmark/{id}"
    return "other"


class _RequestMetrics:
    """Counts every response by endpoint and status and times it to its last byte."""

    def __init__(self, app, instruments: _Instruments):
        self.app = app
        self.ins = instruments

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint_label(scope["path"])
        t0 = time.perf_counter()
        started = False

        async def send_wrapper(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                # Counted when the status is known rather than at the end, so the count is
                # already there when the client has read the response.
                started = True
                self.ins.requests.inc(endpoint=endpoint, status=str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not started:
                self.ins.requests.inc(endpoint=endpoint, status="500")
            self.ins.latency.observe(time.perf_counter() - t0, endpoint=endpoint)


class GenerationResponse(Response):
    """Runs a plan's generations and answers: JSON, or SSE once the first events are in.

    Each generation is read by one producer task from start to close, so a backend iterator
    that keeps a nursery or cancel scope open across its yields is never resumed from another
    task. A watcher cancels everything when the client disconnects, another when a streamed
    write waits longer than sse_write_timeout for the client to read; the producers then close
    their iterators, which cancels the work on the nodes.
    """

    def __init__(self, settings: _Settings, ins: _Instruments, plan: GenerationPlan, model: ModelEntry,
                 reservation: Reservation, t0: float, targets: list[Target] | None = None, route: RoutePlan | None = None):
        self.s, self.ins, self.plan, self.model = settings, ins, plan, model
        self.reservation, self.t0 = reservation, t0
        # targets: the routed request's targets in the order to try (None: `model` only, on the mesh)
        self.targets, self.route = targets, route
        self.used: dict[int, Target] = {}  # choice index -> the target that answered it
        self.fallbacks: list[dict[str, str]] = []
        prefix = "chatcmpl-" if plan.endpoint == "chat" else "cmpl-"
        self.builder = ResponseBuilder(plan.endpoint, prefix + secrets.token_hex(12), int(time.time()), model,
                                       plan.include_usage)
        if route is not None:
            self.builder.route = route.info
        self.builder.tool_names = plan.tool_names
        self.states = [ChoiceState(i, plan.prompt_of[i]) for i in range(len(plan.specs))]
        self.endpoint = "/v1/chat/completions" if plan.endpoint == "chat" else "/v1/completions"
        self.first_token_seen = False
        self.finishing = False
        self.left = False
        self.ended = 0  # choices whose events are all in
        self.write_seq = 0  # streamed writes begun
        self.write_since: float | None = None  # when the write in progress began
        self.write_begun = trio.Event()

    async def __call__(self, scope, receive, send) -> None:
        # The path asked for, not the plan's: a /v1/responses request runs as a chat plan.
        self.endpoint = _endpoint_label(scope.get("path", self.endpoint))
        self.ins.in_flight.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                tx, rx = trio.open_memory_channel(64)
                async with tx:
                    for i, spec in enumerate(self.plan.specs):
                        nursery.start_soon(self._produce, i, spec, tx.clone())
                try:
                    if self.plan.stream:
                        nursery.start_soon(self._watch_writes, nursery.cancel_scope)
                        await self._answer_stream(rx, self._watched(send))
                    else:
                        await self._answer_json(rx, send)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._leave()

    def _finish(self) -> None:
        """Settle tokens and count them, once, before the last byte goes out: a client that
        reads its answer and then /metrics sees its own request counted."""
        if self.finishing:
            return
        self.finishing = True
        self._account()

    def _leave(self) -> None:
        """The generations are over (answered, failed, cancelled), once."""
        if self.left:
            return
        self.left = True
        self.ins.in_flight.dec()
        self._finish()

    def _watched(self, send):
        async def watched_send(message) -> None:
            self.write_seq += 1
            self.write_since = trio.current_time()
            self.write_begun.set()
            try:
                await send(message)
            finally:
                self.write_since = None
        return watched_send

    async def _watch_writes(self, scope: trio.CancelScope) -> None:
        """Cancel the generations once one streamed write has waited sse_write_timeout for the
        client to read. The write itself cannot be interrupted (hypercorn shields its socket
        writes) and stays pending until the client reads or closes, but the node slots are
        freed. Wakes at most once per timeout while writes flow."""
        timeout = self.s.sse_write_timeout
        while True:
            since, seq = self.write_since, self.write_seq
            if since is None:
                self.write_begun = trio.Event()
                await self.write_begun.wait()
                continue
            await trio.sleep_until(since + timeout)
            if self.write_seq == seq and self.write_since is not None:
                log.info("a streaming client read nothing for %g s: its generation is cancelled", timeout)
                self.ins.stalled.inc()
                scope.cancel()
                self._leave()
                return

    async def _watch_disconnect(self, receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            # Hypercorn also reports a disconnect once the answer is complete; only one that
            # comes before means the client left.
            if message["type"] == "http.disconnect":
                if not self.finishing:
                    self.ins.disconnects.inc()
                    scope.cancel()
                return

    async def _produce(self, index: int, spec, tx: trio.MemorySendChannel) -> None:
        async with tx:
            events = None
            try:
                if self.targets is None:
                    events = self.s.backend.generate(spec, self.model)
                else:
                    events = self._routed(index, spec)
                async for ev in events:
                    await tx.send((index, ev))
                await tx.send((index, _END))
            except Exception as e:  # noqa: BLE001 - every failure becomes an answer to the client
                if not isinstance(e, (UnknownModel, MeshUnavailable, InvalidGeneration, ProviderError)):
                    log.exception("generation failed in the backend")
                await tx.send((index, e))
            finally:
                if events is not None:
                    await _close_events(events)

    async def _routed(self, index: int, spec):
        """Events from the first target that starts answering: one with no free node
        (MeshUnavailable, UnknownModel: it just left) or whose provider fails before any text
        hands over to the next. Once a target has sent an event, its failures are final: the
        user must not see text twice."""
        last: BaseException | None = None
        for t in self.targets:
            events = None
            started = False
            try:
                if t.kind == "mesh":
                    entry = self.s.backend.select_model(t.id)
                    events = self.s.backend.generate(replace(spec, model=t.id), entry)
                else:
                    events = t.provider.generate(replace(spec, model=t.id))
                async for ev in events:
                    if not started:
                        started = True
                        self.used.setdefault(index, t)
                    yield ev
                return
            except (MeshUnavailable, UnknownModel, ProviderError) as e:
                if started:
                    raise
                last = e
                if not any(f["model"] == t.id for f in self.fallbacks):
                    self.fallbacks.append({"model": t.id, "error": str(e)})
                log.info("routed target %s could not start (%s): trying the next", t.id, type(e).__name__)
            finally:
                if events is not None:
                    await _close_events(events)
        raise last if last is not None else MeshUnavailable("no model could serve this request")

    def _settle_model(self) -> dict[str, str]:
        """Name the target that answered in the response (its first choice's), and return
        the headers saying so."""
        if self.targets is not None and self.used:
            t = self.used.get(0) or next(iter(self.used.values()))
            self.builder.model = t.id
            self.builder.fingerprint = "fp_" + t.entry.sha256[:12] if t.entry.sha256 else None
            if self.route is not None:
                self.route.info["model"] = t.id
                self.route.info["fallbacks"] = self.fallbacks
        return {"x-mesh-model": self.builder.model}

    def _record(self, index: int, item: Any) -> tuple[str, Any]:
        """Fold an item into its choice's state: ("token", lps) | ("done", None) | ("error", exc)."""
        state = self.states[index]
        if isinstance(item, TokenEvent):
            if not self.first_token_seen and item.ids:
                self.first_token_seen = True
                self.ins.ttft.observe(time.perf_counter() - self.t0, endpoint=self.endpoint)
            return "token", state.add(item, self.plan.top_logprobs)
        if isinstance(item, DoneEvent):
            state.done = item
            return "done", None
        if item is _END:
            if state.done is None:
                log.error("backend generation ended without a DoneEvent")
                return "error", MeshUnavailable("the generation ended before it finished")
            return "end", None
        if isinstance(item, BaseException):
            return "error", item
        log.error("backend yielded %r, not an event", type(item).__name__)
        return "error", RuntimeError("bad backend event")

    async def _answer_json(self, rx, send) -> None:
        finished = 0
        while finished < len(self.states):
            index, item = await rx.receive()
            what, value = self._record(index, item)
            if what == "error":
                e = backend_error(value)
                self._finish()
                await _send_json(send, e.status, e.body(), e.headers)
                return
            finished += what == "end"
        headers = self._settle_model()
        body = self.builder.response(self.states, self.plan.logprobs)
        self._finish()
        await _send_json(send, 200, body, headers)

    async def _answer_stream(self, rx, send) -> None:
        # Hold the headers until every choice has an event or an error, so a request that
        # cannot start gets a real status code (404, 503 + Retry-After) instead of a 200
        # whose body is an error.
        waiting = set(range(len(self.states)))
        pending: list[tuple[int, Any]] = []
        while waiting:
            index, item = await rx.receive()
            # A choice may run to its end before another starts (a one-slot node serves n=2 in
            # turn): its DoneEvent is then still in `pending`, not yet in its state.
            ended_early = item is _END and not any(i == index and isinstance(ev, DoneEvent) for i, ev in pending)
            if isinstance(item, BaseException) or ended_early:
                _, err = self._record(index, item)
                e = backend_error(err)
                self._finish()
                await _send_json(send, e.status, e.body(), e.headers)
                return
            waiting.discard(index)
            pending.append((index, item))

        headers = self._settle_model()
        await send({"type": "http.response.start", "status": 200, "headers": _raw_headers(
            {"Content-Type": "text/event-stream; charset=utf-8", **_SSE_HEADERS, **headers})})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if self.plan.endpoint == "chat":
            for i in range(len(self.states)):
                await emit(sse(self.builder.role_chunk(i)))
        ended = False
        for index, item in pending:
            ended = await self._stream_item(index, item, emit)
            if ended:
                break
        while not ended:
            ended = await self._stream_item(*await rx.receive(), emit)
        self._finish()
        await emit(SSE_DONE)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_item(self, index: int, item: Any, emit) -> bool:
        """Send what one item adds to the stream; True once the stream is complete."""
        what, value = self._record(index, item)
        if what == "token":
            chunk = self.builder.token_chunk(self.states[index], item, value, self.plan.logprobs)
            for c in chunk if isinstance(chunk, list) else [chunk] if chunk is not None else []:
                await emit(sse(c))
        elif what == "done":
            await emit(sse(self.builder.final_chunk(self.states[index])))
        elif what == "error":
            # Headers are gone: the error travels as an event, as OpenAI's stream does.
            await emit(sse(backend_error(value).body()))
            return True
        else:
            self.ended += 1
            if self.ended == len(self.states):
                if self.plan.include_usage:
                    await emit(sse(self.builder.usage_chunk(self.states)))
                return True
        return False

    def _account(self) -> None:
        tokens = sum(s.completion_tokens for s in self.states)
        model = self.builder.model
        if self.route is not None and self.used:
            self.ins.routed.inc(model=model, task=self.route.task or "unknown")
            if self.route.best_single_price is not None:
                saved = sum((self.route.best_single_price - self.used[s.index].price) * s.completion_tokens
                            for s in self.states if s.index in self.used) / 1e6
                if saved > 0:
                    self.ins.cost_saved.inc(saved)
        self.ins.completion_tokens.inc(tokens, model=model)
        prompt, cut = {}, set()
        for s in self.states:
            if s.done:
                prompt[s.prompt_index] = s.done.prompt_tokens
                if s.done.failovers:
                    self.ins.failovers.inc(s.done.failovers, model=model)
            elif s.tokens:
                cut.add(s.prompt_index)
        self.ins.prompt_tokens.inc(sum(prompt.values()), model=model)
        # A generation cut before its DoneEvent had its prompt read by a node all the same:
        # its estimate is charged, so leaving early does not make long prompts free.
        estimates = self.plan.prompt_estimates()
        charged = tokens + sum(prompt.values()) + sum(estimates[i] for i in cut - prompt.keys())
        self.reservation.settle(charged)


async def _close_events(events) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    # Shielded: this runs while the request is being cancelled, and the close is what tells
    # the node to stop.
    with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
        scope.shield = True
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - a failing close must not mask the answer
            log.exception("closing a backend generation failed")


def _routing_text(spec) -> str:
    """What the router reads: the same text its tables were built from."""
    from routing.tables import messages_text

    if spec.kind == "chat":
        return messages_text({"role": m.role, "content": m.content} for m in spec.messages)
    return spec.prompt


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _send_json(send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status, "headers": _raw_headers(
        {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})})})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class _Handlers:
    def __init__(self, s: _Settings):
        self.s = s
        self.ins = _Instruments(s.metrics)
        self.webchat = {p.name: p.read_bytes() for p in WEBCHAT_DIR.glob("*") if p.suffix in _WEBCHAT_TYPES}
        self.route_limiter = trio.CapacityLimiter(2)
        self.benchmarks = BenchmarkRunner(s.auto)
        self.queue_secret = secrets.token_bytes(32)

    # --- access -------------------------------------------------------------------------------

    def authenticate(self, request: Request, *, operator: bool = False) -> tuple[str, int | None, int | None]:
        """(rate-limit subject, rpm, tpm) of the caller. operator: the call changes the entry
        for everyone, so a plain key gets 403 (open mode has no keys: anyone may)."""
        if self.s.open_mode:
            return OPEN_SUBJECT, None, None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        info = self.s.keys.verify(token)
        if info is None:
            raise ApiError(401, "invalid or revoked API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if operator and not info.operator:
            raise ApiError(403, "this needs an operator key (`mesh entry keys create --operator`): it spends mesh "
                                "capacity and changes routing for every user", type="permission_error",
                           code="operator_key_required")
        return f"key:{info.id}", info.rpm, info.tpm

    async def read_json(self, request: Request) -> dict:
        limit = self.s.max_body_bytes
        too_big = ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad Content-Length header")
            if int(declared) > limit:
                raise too_big
        buf = bytearray()
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise too_big
        except ClientDisconnect:
            raise ApiError(400, "client disconnected while sending the body") from None
        try:
            body = json.loads(bytes(buf))
        except (ValueError, RecursionError):
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body

    # --- generation ---------------------------------------------------------------------------

    async def _generate(self, request: Request, parse: Callable[[dict], GenerationPlan],
                        adapt: Callable[[dict], dict] | None = None) -> Response:
        """adapt: turns another API's body into a chat-completions body first (/v1/responses)."""
        t0 = time.perf_counter()
        subject, rpm, tpm = self.authenticate(request)
        body = await self.read_json(request)
        if adapt is not None:
            body = adapt(body)
        plan = parse(body, mix_seed=self.s.seeds.for_subject(subject))
        # Fair turns in the entry's queue per API key. Opaque (keyed with a secret of this
        # process), so not even the key's id travels with the spec; the relay never sends it on.
        queue_key = hmac.new(self.queue_secret, subject.encode(), hashlib.sha256).hexdigest()[:24]
        for spec in plan.specs:
            spec.queue_key = queue_key
        try:
            opts = parse_route_options(body)
        except RouteRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        # The one place a request's model is chosen; generations run on it without asking again.
        # `auto` yields an ordered list of targets; the first that can start answers.
        auto = self.s.auto
        targets: list[Target] | None = None
        route: RoutePlan | None = None
        if auto.is_auto(plan.model):
            route = await self._route(plan, opts)
            targets = route.targets
            model = targets[0].entry
        elif (provider := auto.provider_target(plan.model)) is not None:
            if any(spec.grammar for spec in plan.specs):
                raise ApiError(400, f"{plan.model} is an external provider's model: response_format and tools are "
                               "enforced only on the mesh's own models; use one of those or model 'auto'",
                               param="model", code="unsupported_parameter")
            targets = [provider]
            model = provider.entry
        else:
            try:
                model = self.s.backend.select_model(plan.model)
            except UnknownModel:
                raise ApiError(404, f"the model {plan.model!r} is not served by the mesh right now; see /v1/models",
                               param="model", code="model_not_found") from None
            except MeshUnavailable as e:
                raise backend_error(e) from None
        try:
            reservation = self.s.limits.acquire(subject, rpm=rpm, tpm=tpm, tokens=plan.max_tokens())
        except RateLimited as e:
            # No Retry-After when waiting cannot help: the request alone is over the limit.
            headers = {} if e.retry_after is None else {"Retry-After": _retry_after(e.retry_after)}
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           param="max_tokens" if e.retry_after is None else None, headers=headers) from None
        return GenerationResponse(self.s, self.ins, plan, model, reservation, t0, targets, route)

    async def _route(self, plan: GenerationPlan, opts) -> RoutePlan:
        auto = self.s.auto
        try:
            policy = auto.policy(plan.model)
        except RouteRequestError as e:
            raise ApiError(400, str(e), param=e.param, code="model_not_found") from None
        targets = auto.targets(self.s.backend.models())
        why = ""
        if any(spec.grammar for spec in plan.specs) and any(t.kind != "mesh" for t in targets):
            # Our nodes enforce response_format and tools with a grammar; a provider would be
            # asked for free text, so it is no candidate for them.
            targets = [t for t in targets if t.kind == "mesh"]
            why = " (external providers are no candidates for response_format or tools)"
        text = _routing_text(plan.specs[0])
        try:
            if auto.router is None:
                return auto.decide(text, policy, opts, targets)
            # A learned decision takes milliseconds of CPU (features, three predictors): off the loop.
            return await trio.to_thread.run_sync(auto.decide, text, policy, opts, targets, limiter=self.route_limiter)
        except NoTarget as e:
            if e.filtered:
                raise ApiError(400, str(e) + why, param="mesh.route", code="no_route") from None
            raise backend_error(MeshUnavailable(str(e) + why)) from None

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def responses(self, request: Request):
        req = ResponsesRequest()
        try:
            inner = await self._generate(request, parse_chat, adapt=req.to_chat)
        except ApiError as e:
            raise responses_error(e) from None
        return ResponsesAdapter(inner, req)

    async def embeddings(self, request: Request) -> Response:
        self.authenticate(request)
        raise ApiError(404, "embeddings are not served by this mesh: no embedding model (a GGUF made for embeddings) "
                       "is available to its nodes; use a text-generation model through /v1/chat/completions",
                       param="model", code="model_not_found")

    # --- mesh views ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self.authenticate(request)
        return JSONResponse({"object": "list", "data": [model_object(m, self.s.started) for m in self.s.backend.models()]
                             + self._routed_model_objects()})

    def _routed_model_objects(self) -> list[dict]:
        auto = self.s.auto
        # "nodes": 0 keeps clients that sum the mesh's nodes over the list right.
        out = [{"id": name, "object": "model", "created": self.s.started, "owned_by": "mesh-router", "nodes": 0}
               for name in auto.model_names()]
        out += [{"id": tid, "object": "model", "created": self.s.started, "owned_by": p.provider, "nodes": 0,
                 "price_per_mtok": {"input": p.prices.input_per_mtok, "output": p.prices.output_per_mtok}}
                for tid, p in auto.providers.items()]
        return out

    async def get_model(self, request: Request) -> Response:
        self.authenticate(request)
        model_id = request.path_params["model_id"]
        m = self.s.backend.resolve_model(model_id)
        if m is None:
            routed = next((o for o in self._routed_model_objects() if o["id"] == model_id), None)
            if routed is not None:
                return JSONResponse(routed)
            raise ApiError(404, f"the model {model_id!r} is not served by the mesh right now", param="model",
                           code="model_not_found")
        return JSONResponse(model_object(m, self.s.started))

    async def nodes(self, request: Request) -> Response:
        self.authenticate(request)
        return JSONResponse({"object": "list", "data": self.s.backend.nodes_view()})

    async def queue(self, request: Request) -> Response:
        """Requests waiting for a free slot, per model (entry/mesh/queue.py); counts only, never whose."""
        self.authenticate(request)
        view = getattr(self.s.backend, "queue_view", None)
        return JSONResponse(view() if view is not None else {"waiting": 0, "models": []})

    async def credits(self, request: Request) -> Response:
        """A node's credit statement, for that node only (signed query, protocol/credit_query.py):
        totals per escrow state and every booked request id with its tokens, so the node can
        check them against the receipts it kept."""
        from protocol.credit_query import ACCEPTED, FULL, HEADER, MAX_AGE, MAX_AHEAD, REPLAYED

        node = request.path_params["node"]
        if self.s.ledger is None:
            raise ApiError(404, "this entry keeps no credits ledger", code="no_ledger")
        verdict = self.s.credit_queries.accept(node, request.headers.get(HEADER))
        if verdict == FULL:
            raise ApiError(503, "too many statement queries right now", type="server_error", code="busy",
                           headers={"Retry-After": _retry_after(MAX_AGE)})
        if verdict == REPLAYED:
            raise ApiError(401, "this signed query was used already: sign a fresh one (one per second)",
                           code="replayed_node_signature")
        if verdict != ACCEPTED:
            raise ApiError(401, f"a credit statement is for its node only: sign the query with the node's key, dated "
                           f"within the last {MAX_AGE:g} s (at most {MAX_AHEAD:g} s ahead of the entry's clock) "
                           f"(header {HEADER}; `mesh node credits` does this)", code="invalid_node_signature")
        totals = {state: {"requests": t.requests, "tokens": t.tokens, "credits": round(t.credits, 6)}
                  for state, t in self.s.ledger.node_totals(node).items()}
        entry = getattr(getattr(self.s.backend, "host", None), "peer_id", None)  # receipts name it
        return JSONResponse({"node": node, "entry": entry, "totals": totals,
                             "requests": self.s.ledger.node_requests(node, limit=10_000)})

    async def routing(self, request: Request) -> Response:
        """Per task and model: mean quality on the router's table, price, latency, and what each
        policy picks now; plus the router's status."""
        self.authenticate(request)
        auto = self.s.auto
        targets = auto.targets(self.s.backend.models())
        return JSONResponse(await trio.to_thread.run_sync(auto.view, targets, limiter=self.route_limiter))

    async def start_benchmark(self, request: Request) -> Response:
        """Score every target (or `models`) on a suite (`suite`: JSON Lines text; default the
        shipped basic suite) through this API, then refit the router. Answers a run id."""
        from routing.suite import SuiteError, load_suite, parse_suite_lines

        self.authenticate(request, operator=True)
        body = await self.read_json(request)
        unknown = sorted(set(body) - {"suite", "models", "concurrency"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; expected suite, models, concurrency",
                           param=unknown[0])
        suite = body.get("suite")
        try:
            if suite is None:
                rows = load_suite(None)
            elif isinstance(suite, str):
                rows = parse_suite_lines(suite.splitlines(), "suite")
            else:
                raise ApiError(400, "'suite' must be the suite file's text (JSON Lines)", param="suite")
        except SuiteError as e:
            raise ApiError(400, str(e), param="suite", code="invalid_suite") from None
        available = [t.id for t in self.s.auto.targets(self.s.backend.models())]
        models = body.get("models")
        if models is None:
            models = available
        elif not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise ApiError(400, "'models' must be a non-empty list of model ids", param="models")
        missing = [m for m in models if m not in available]
        if missing:
            raise ApiError(400, f"not available now: {', '.join(missing)}; available: {', '.join(available) or 'none'}",
                           param="models", code="model_not_found")
        if not models:
            raise backend_error(MeshUnavailable("no model is available to benchmark"))
        conc = body.get("concurrency", DEFAULT_CONCURRENCY)
        if isinstance(conc, bool) or not isinstance(conc, int) or not 1 <= conc <= 64:
            raise ApiError(400, "'concurrency' must be an integer in 1-64", param="concurrency")
        try:
            run = self.benchmarks.start(rows, list(dict.fromkeys(models)), request.headers.get("authorization"), conc)
        except BenchmarkBusy as e:
            raise ApiError(409, str(e), code="benchmark_running") from None
        return JSONResponse(run.to_json(), status_code=202)

    async def get_benchmark(self, request: Request) -> Response:
        self.authenticate(request, operator=True)
        run = self.benchmarks.runs.get(request.path_params["run_id"])
        if run is None:
            raise ApiError(404, "no such benchmark run (runs are kept until the entry restarts)", code="not_found")
        return JSONResponse(run.to_json())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "nodes": len(self.s.backend.nodes_view()),
                             "models": len(self.s.backend.models())})

    async def metrics(self, request: Request) -> Response:
        models = self.s.backend.models()
        self.ins.model_nodes.clear()  # models that left the mesh drop out
        for m in models:
            self.ins.model_nodes.set(m.nodes, model=m.id)
        try:
            extra = self.s.backend.metrics()
        except Exception:  # noqa: BLE001 - the entry's own metrics still matter
            log.exception("backend metrics failed")
            extra = {}
        return PlainTextResponse(self.s.metrics.render(extra), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- web chat -----------------------------------------------------------------------------

    async def webchat_index(self, request: Request) -> Response:
        return self._static("index.html")

    async def webchat_file(self, request: Request) -> Response:
        return self._static(request.path_params["name"])

    def _static(self, name: str) -> Response:
        data = self.webchat.get(name)
        if data is None:
            raise ApiError(404, f"no such file: {name}", code="unknown_url")
        return Response(data, media_type=_WEBCHAT_TYPES[Path(name).suffix], headers=_WEBCHAT_HEADERS)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        err = ApiError(404, f"unknown URL: {request.method} {request.url.path}", code="unknown_url")
    elif exc.status_code == 405:
        err = ApiError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                       headers=dict(exc.headers or {}))
    else:
        err = ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    return error_response(err)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this answer, so the server logs the traceback once.
    return error_response(ApiError(500, "internal error in the entry", type="server_error", code="internal_error"))


def create_app(backend: Backend, *, keys: ApiKeyStore | None, open_mode: bool, limits: RateLimits, metrics: Metrics,
               max_body_bytes: int = 1_000_000, ledger=None, seeds: SeedMixer | None = None,
               sse_write_timeout: float = 10.0, auto: AutoRouting | None = None) -> Starlette:
    """The entry's ASGI app. Without open_mode every /v1 route needs a key from `keys`;
    /, /health and /metrics are open (they show no user data). /v1/mesh/credits/{node}
    needs the node's own signature instead, in any mode. `seeds` mixes users' seeds (a
    secret for this process when None); `sse_write_timeout`: seconds a streaming client may
    read nothing before its generation is cancelled."""
    if not open_mode and keys is None:
        raise ValueError("an entry that is not in open mode needs an ApiKeyStore")
    if not sse_write_timeout > 0:
        raise ValueError("sse_write_timeout must be > 0")
    h = _Handlers(_Settings(backend, keys, open_mode, limits, metrics, max_body_bytes, int(time.time()), ledger,
                            seeds or SeedMixer.random(), sse_write_timeout, auto=auto or AutoRouting()))
    routes = [
        Route("/", h.webchat_index, methods=["GET"]),
        Route("/webchat/{name}", h.webchat_file, methods=["GET"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/v1/models", h.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", h.get_model, methods=["GET"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/responses", h.responses, methods=["POST"]),
        Route("/v1/embeddings", h.embeddings, methods=["POST"]),
        Route("/v1/mesh/nodes", h.nodes, methods=["GET"]),
        Route("/v1/mesh/queue", h.queue, methods=["GET"]),
        Route("/v1/mesh/credits/{node}", h.credits, methods=["GET"]),
        Route("/v1/mesh/routing", h.routing, methods=["GET"]),
        Route("/v1/mesh/benchmark", h.start_benchmark, methods=["POST"]),
        Route("/v1/mesh/benchmark/{run_id}", h.get_benchmark, methods=["GET"]),
        *Console(h).routes(),  # /console, its JSON at /v1/mesh/console, /vendor/ (chart + markdown libraries)
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_RequestMetrics, instruments=h.ins)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.benchmarks = h.benchmarks  # serve_api starts it once the API listens
    return app


async def serve_api(app, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` until cancelled; `task_status.started(port)` reports the bound port
    (useful with port 0)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # no per-request log line with client addresses
    config.include_server_header = False
    config.graceful_timeout = 3.0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        bound = int(binds[0].rsplit(":", 1)[1])
        runner = getattr(getattr(app, "state", None), "benchmarks", None)
        if runner is not None:
            # Benchmark runs call this API over loopback, like any client would.
            own = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            await nursery.start(runner.serve, f"http://[{own}]:{bound}" if ":" in own else f"http://{own}:{bound}")
        task_status.started(bound)
