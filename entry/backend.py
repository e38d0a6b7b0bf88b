"""The seam between the entry's HTTP API and the mesh.

The API layer (entry/api/app.py) turns an OpenAI request into a GenerationSpec that holds only
what generation needs — never the caller's IP, API key, `user` field or headers — and asks a
Backend for events. The mesh backend (entry/mesh/relay.py) routes the spec to nodes, fails
over mid-stream, and yields one uninterrupted, duplicate-free sequence of TokenEvents followed
by one DoneEvent. Closing the event iterator early (client went away) cancels the work on the
node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from protocol.messages import ChatMessage, SamplingParams


@dataclass
class GenerationSpec:
    model: str  # the model id the user asked for (a name from /v1/models, or a sha256)
    kind: str  # "chat" | "completion"
    params: SamplingParams
    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str = ""  # GBNF the output must follow (entry/api/structured.py builds it), "" for none
    # Whose turn it is in the entry's queue (entry/mesh/queue.py): an opaque id per API key,
    # set by the API. It stays in the entry: nodes must never learn who asked.
    queue_key: str = ""


@dataclass
class TokenEvent:
    ids: list[int]
    text: str
    logprobs: list[float] | None = None
    # per token: [(id, logprob, bytes of that token), ...]; the bytes may be missing (id, logprob)
    top_logprobs: list[list[tuple]] | None = None
    token_texts: list[str] | None = None  # per token text, when logprobs were asked for
    token_bytes: list[bytes] | None = None  # per token, the bytes it renders as (nodes send them with logprobs)


@dataclass
class ServedPart:
    """Which node produced which share of a generation (several after a failover), as users
    see it: the API shows it as `mesh.served_by` (keys "node" and "kind", for the pseudonym
    and the description). The relay's PartRecord is the same share with what only the
    ledger and the verifier may see."""

    pseudonym: str  # never a peer id or address
    description: str  # of the node, for humans, e.g. "SmolLM2 Q4_1 on CPU, 95 tok/s"
    completion_tokens: int


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    served_by: list[ServedPart] = field(default_factory=list)
    failovers: int = 0


@dataclass
class ModelEntry:
    id: str  # what users put in `model`
    sha256: str
    name: str
    quantization: str
    context_size: int
    nodes: int  # live nodes serving it now
    created: int = 0  # unix time the entry first saw it


class MeshUnavailable(Exception):
    """No node can serve this now (maps to HTTP 503 with Retry-After). `code` is the error
    code clients see: "mesh_unavailable", or the queue's "queue_full" / "queue_timeout"."""

    def __init__(self, message: str, retry_after: float = 2.0, code: str = "mesh_unavailable"):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class UnknownModel(Exception):
    """No node serves a model by this id (HTTP 404)."""


class InvalidGeneration(Exception):
    """The nodes refused the request as invalid (HTTP 400), e.g. the prompt is too long."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


class Backend(Protocol):
    def models(self) -> list[ModelEntry]: ...

    def resolve_model(self, model: str) -> ModelEntry | None:
        """The served model with this id (or sha256), if any: a lookup, for /v1/models/{id}."""
        ...

    def select_model(self, model: str) -> ModelEntry:
        """The model a generation request asking for `model` runs on, chosen once per request
        (the API does, before anything else costs): raises UnknownModel when no node serves a
        model by that id, MeshUnavailable when it is known but no node serves it right now
        (its nodes just left, or are still connecting)."""
        ...

    def generate(self, spec: GenerationSpec, model: ModelEntry | None = None) -> AsyncIterator[TokenEvent | DoneEvent]:
        """Run `spec` on `model`, which select_model chose for spec.model (None: choose it
        here, for callers other than the API). Raises UnknownModel, MeshUnavailable or
        InvalidGeneration before the first event when nothing could be generated; once
        tokens flowed, a failure that no node can recover from raises MeshUnavailable
        mid-stream."""
        ...

    def nodes_view(self) -> list[dict]:
        """What the entry sees of the mesh, for /v1/mesh/nodes: pseudonyms, models, load,
        reputation; never peer ids or addresses."""
        ...

    def metrics(self) -> dict[str, float]:
        """Gauges for /metrics, e.g. {"mesh_nodes{model=\"x\"}": 2}."""
        ...
