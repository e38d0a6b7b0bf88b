"""Canary probes: requests the entry makes up itself, sent to one chosen node and checked.

User traffic is verified only when a user happens to ask; a probe lets the entry check a node
that gets little traffic, a node that just joined, and a demoted node that wants back in
(demotion keeps user traffic away, so only probes can clear it). To be useful a probe must be
indistinguishable from user traffic: the same request shape (a chat request built by
build_request, with a fresh random request id and seed), ordinary sampling parameters, and a
prompt made fresh from templates, names and numbers so no two probes repeat and no answer can
be cached. Probes go out at random (exponential) intervals, and are credited like any request
(a node that could tell them apart by their missing credit could learn which requests were
probes, after the fact).

Every probe is re-scored by the verifier (GenerationRecord.canary). Privacy: probes carry no
user data by construction.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import trio

from entry.backend import GenerationSpec
from entry.mesh.relay import GenerationRecord, MeshBackend, PartRecord, build_request
from entry.mesh.view import NodeState
from entry.verify.verifier import Verifier
from protocol.errors import ProtocolError
from protocol.messages import ChatMessage, SamplingParams
from transport.host import DialError, StreamClosed
from transport.node_client import NodeError, StreamBroken, open_call

log = logging.getLogger("mesh.entry.canary")

_TEMPLATES = (
    "Can you explain {topic} in simple terms?",
    "Write a short {form} about {topic}.",
    "What are three tips for {activity}?",
    "Summarize the idea of {topic} in a few sentences.",
    "I'm planning {activity} with {n} friends on {day}. Any suggestions?",
    "My friend {name} asked me about {topic}. How would you describe it?",
    "Give me a quick overview of {topic}, please.",
    "{name} wants to get better at {activity}. Where should they start?",
    "Write a {form} for {name} who loves {topic}.",
    "How long does {activity} usually take for a beginner? I have about {n} hours.",
)
_FILL = {
    "topic": ("photosynthesis", "compound interest", "the water cycle", "black holes", "machine learning", "volcanoes",
              "the Roman empire", "sourdough bread", "jazz music", "electric cars", "sleep", "honeybees", "chess openings",
              "the stock market", "coral reefs", "public libraries", "solar panels", "the moon landing", "tea", "origami"),
    "form": ("poem", "story", "note", "limerick", "paragraph", "letter", "haiku", "dialogue"),
    "activity": ("learning guitar", "running a 5k", "baking bread", "gardening", "learning Spanish", "painting",
                 "hiking", "saving money", "cooking dinner", "studying for exams", "woodworking", "birdwatching"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "the weekend"),
    "name": ("Alex", "Sam", "Maria", "Chen", "Priya", "Jonas", "Fatima", "Lucas", "Aiko", "Omar", "Elena", "Kofi"),
}


@dataclass
class CanaryConfig:
    interval: float = 60.0  # mean seconds between probes (0 = no probes)
    new_weight: float = 5.0  # a node with few passed checks is probed this much more often
    demoted_weight: float = 3.0  # ... and a demoted one (it can only come back through probes)
    timeout: float = 180.0
    dial_timeout: float = 5.0
    max_tokens: tuple[int, ...] = (64, 128, 256)
    temperatures: tuple[float, ...] = (0.0, 0.7, 0.8, 1.0)


def canary_prompt(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    fill = {k: rng.choice(v) for k, v in _FILL.items()}
    fill["n"] = rng.randint(2, 12)
    return template.format(**fill)


class CanaryProber:
    def __init__(self, backend: MeshBackend, verifier: Verifier, config: CanaryConfig | None = None,
                 rng: random.Random | None = None):
        self.backend = backend
        self.host = backend.host
        self.view = backend.view
        self.verifier = verifier
        self.config = config or CanaryConfig()
        self.rng = rng or random.SystemRandom()
        self.sent = 0
        self.completed = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.config.interval <= 0:
            return
        while True:
            await trio.sleep(self.rng.expovariate(1.0 / self.config.interval))
            node = self.pick()
            if node is not None:
                try:
                    await self.probe(node)
                except Exception:  # one bad probe must not end probing
                    log.exception("canary probe failed")

    def pick(self) -> NodeState | None:
        """A node to probe: serving a model we verify, connected, with a free slot; new and
        demoted nodes weigh more."""
        c = self.config
        cands, weights = [], []
        for n in self.view.nodes():
            if n.model_sha256 not in self.verifier.models or not n.live() or n.status is None or n.free_slots() <= 0:
                continue
            w = 1.0
            if n.verified < self.verifier.config.new_until:
                w *= c.new_weight
            if n.model_sha256 in n.demoted:
                w *= c.demoted_weight
            cands.append(n)
            weights.append(w)
        return self.rng.choices(cands, weights)[0] if cands else None

    def make_request(self, model_sha256: str):
        c, rng = self.config, self.rng
        temperature = rng.choice(c.temperatures)
        params = SamplingParams(temperature=temperature, max_tokens=rng.choice(c.max_tokens),
                                top_p=rng.choice((1.0, 0.9, 0.95)) if temperature else 1.0)
        spec = GenerationSpec(model=model_sha256, kind="chat", params=params,
                              messages=[ChatMessage("user", canary_prompt(rng))])
        return build_request(spec, model_sha256)

    async def probe(self, node: NodeState) -> GenerationRecord | None:
        """Send one probe to `node`, hand the result to the verifier; the record, or None when
        the node did not finish it (busy, leaving, gone: routing deals with those)."""
        request = self.make_request(node.model_sha256)
        self.sent += 1
        ids: list[int] = []
        self.view.acquire(node)
        try:
            with trio.fail_after(self.config.timeout):
                call = await open_call(self.host, node.peer_id, node.advert.addrs, request,
                                       timeout=self.config.dial_timeout)
                try:
                    async for chunk in call.chunks():
                        ids += chunk.ids
                        if len(ids) > request.params.max_tokens:
                            raise ProtocolError("node sent more tokens than max_tokens")
                finally:
                    await call.close(2.0)
        except (NodeError, StreamBroken, DialError, StreamClosed, ProtocolError, trio.TooSlowError) as e:
            log.info("canary probe not completed", extra={"node": node.pseudonym, "error": type(e).__name__})
            return None
        finally:
            self.view.release(node)
        final = call.final
        accepted = self.backend.accept_receipt(node, request, ids, final, canary=True)
        record = GenerationRecord(request, [PartRecord(node.peer_id, node.pseudonym, ids, accepted, True,
                                                       node.advert.context_size)],
                                  final.finish_reason, final.prompt_tokens, canary=True)
        self.completed += 1
        self.verifier.on_generation_done(record)
        return record
