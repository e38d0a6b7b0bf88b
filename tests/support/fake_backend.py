"""A deterministic stand-in for the mesh backend, for testing the entry's HTTP side.

It records every GenerationSpec it receives and every generation that was closed, and can be
told to fail before the first token, fail mid-stream, hang, or go slowly.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from entry.backend import (
    DoneEvent,
    GenerationSpec,
    MeshUnavailable,
    ModelEntry,
    ServedPart,
    TokenEvent,
    UnknownModel,
)

if TYPE_CHECKING:
    import httpx

WORDS = ["Hello", ",", " I", " am", " a", " fake", " model", ".", " Nice", " to", " meet", " you", "!"]
MODEL = ModelEntry(id="fake-model", sha256="ab" * 32, name="FakeModel", quantization="Q4_1", context_size=2048,
                   nodes=2, created=1_700_000_000)
DESCRIPTION = "FakeModel Q4_1 on CPU, 100 tok/s"  # of the node that served, as users see it


def script(spec: GenerationSpec) -> list[str]:
    """The token texts a spec would produce: greedy starts at WORDS[0], a seed shifts it."""
    shift = (spec.params.seed or 0) % len(WORDS) if not spec.params.greedy else 0
    return [WORDS[(i + shift) % len(WORDS)] for i in range(len(WORDS))]


@dataclass
class FakeBackend:
    models_list: list[ModelEntry] = field(default_factory=lambda: [MODEL])
    fail_before: Exception | None = None  # raised before the first event
    fail_after: int | None = None  # tokens delivered before MeshUnavailable mid-stream
    hang_after: int | None = None  # tokens delivered before waiting forever
    delay: float = 0.0  # seconds before each token event
    per_event: int = 1  # tokens per TokenEvent
    failovers: int = 0
    unserved: set[str] = field(default_factory=set)  # ids known but with no node now: select_model says 503
    specs: list[GenerationSpec] = field(default_factory=list)
    given_models: list[ModelEntry | None] = field(default_factory=list)  # generate's `model`, per call
    selections: int = 0  # select_model calls
    closed: int = 0  # generations whose iterator was closed or cancelled before finishing
    finished: int = 0
    hanging: trio.Event = field(default_factory=trio.Event)
    closed_event: trio.Event = field(default_factory=trio.Event)

    def models(self) -> list[ModelEntry]:
        return list(self.models_list)

    def resolve_model(self, model: str) -> ModelEntry | None:
        return next((m for m in self.models_list if model in (m.id, m.sha256)), None)

    def select_model(self, model: str) -> ModelEntry:
        self.selections += 1
        entry = self.resolve_model(model)
        if entry is not None:
            return entry
        if model in self.unserved:
            raise MeshUnavailable(f"no node serves {model} right now", retry_after=4)
        raise UnknownModel(f"no node serves {model}")

    def nodes_view(self) -> list[dict]:
        return [{"node": "amber-fox", "model": MODEL.id, "slots": 2, "free": 2, "reputation": 1.0},
                {"node": "blue-owl", "model": MODEL.id, "slots": 1, "free": 0, "reputation": 0.9}]

    def metrics(self) -> dict[str, float]:
        return {f'mesh_nodes{{model="{m.id}"}}': m.nodes for m in self.models_list} | {"mesh_known_peers": 2,
                                                                                      "bad key!": 1}

    def generate(self, spec: GenerationSpec, model: ModelEntry | None = None):
        self.specs.append(spec)
        self.given_models.append(model)
        return self._run(spec, model)

    async def _run(self, spec: GenerationSpec, model: ModelEntry | None):
        if model is None:
            self.select_model(spec.model)
        if self.fail_before is not None:
            raise self.fail_before
        finished = False
        try:
            texts = script(spec)
            limit = spec.params.max_tokens
            out: list[str] = []
            finish = "stop"
            i = 0
            while i < len(texts):
                if len(out) >= limit:
                    finish = "length"
                    break
                batch = texts[i:i + min(self.per_event, limit - len(out))]
                i += len(batch)
                stop_hit = next((s for s in spec.params.stop if s in "".join(out + batch)), None)
                if stop_hit is not None:
                    break
                if self.hang_after is not None and len(out) >= self.hang_after:
                    self.hanging.set()
                    await trio.sleep_forever()
                if self.fail_after is not None and len(out) >= self.fail_after:
                    raise MeshUnavailable("every node serving this model failed", retry_after=3)
                if self.delay:
                    await trio.sleep(self.delay)
                ids = [100 + WORDS.index(t) for t in batch]
                ev = TokenEvent(ids=ids, text="".join(batch))
                if spec.logprobs:
                    ev.logprobs = [-0.25] * len(batch)
                    ev.token_texts = list(batch)
                    # The chosen token with no text, then an alternative with one.
                    ev.top_logprobs = [[(tid, -0.25), (tid + 1, -1.5, "ALT")][: spec.top_logprobs] for tid in ids]
                out.extend(batch)
                yield ev
            yield DoneEvent(finish_reason=finish, prompt_tokens=prompt_tokens(spec), completion_tokens=len(out),
                            served_by=[ServedPart("amber-fox", DESCRIPTION, len(out))], failovers=self.failovers)
            finished = True
            self.finished += 1
        finally:
            if not finished:
                self.closed += 1
                self.closed_event.set()


def prompt_tokens(spec: GenerationSpec) -> int:
    text = spec.prompt if spec.kind == "completion" else " ".join(m.content for m in spec.messages)
    return max(1, len(text.split()))


# --- serving the app for tests -------------------------------------------------------------------


@dataclass
class RunningApi:
    base_url: str
    port: int
    client: httpx.AsyncClient
    backend: FakeBackend
    metrics: object


@asynccontextmanager
async def running_api(backend: FakeBackend | None = None, *, open_mode: bool = True, keys=None, limits=None,
                      max_body_bytes: int = 1_000_000, auto=None):
    """The entry app on 127.0.0.1 (a free port) in this trio run, with an httpx client."""
    import httpx

    from entry.api.app import create_app, serve_api
    from entry.api.metrics import Metrics
    from entry.api.ratelimit import RateLimits

    backend = backend or FakeBackend()
    metrics = Metrics()
    app = create_app(backend, keys=keys, open_mode=open_mode, limits=limits or RateLimits(), metrics=metrics,
                     max_body_bytes=max_body_bytes, auto=auto)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield RunningApi(base, port, client, backend, metrics)
        nursery.cancel_scope.cancel()


def parse_sse(text: str) -> list:
    """An SSE body -> its data payloads, JSON-decoded except the final "[DONE]"."""
    out = []
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    for event in text.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
