"""Canary probes: requests the entry makes up itself, sent to one chosen node and checked.

User traffic is verified only when a user happens to ask; a probe lets the entry check a node
that gets little traffic, a node that just joined, and a demoted node that wants back in.
A probe is useful only if a node cannot tell it from user traffic, so everything about it is
drawn like users' requests:
- the conversation: a dialogue prefix (one user turn, or earlier turns plus the assistant's
  answers and the next user turn) from ChatterBot's multilingual dialog corpus (the
  `chatterbot-corpus` package, BSD-3-Clause, installed by scripts/setup.sh): ~7,600 distinct
  conversations written by people in 28 languages, not a handful of templates a regex
  matches (scripts/bench_canary.py measures that a TF-IDF classifier does no better than
  chance at telling them from held-out conversations of the same corpus);
- the sampling parameters: the mixture the entry's own clients send (the web chat's 0.7 and
  512 tokens, the API's defaults, SDK-style settings; USER_PROFILES);
- the shape: a chat request built by build_request, with a fresh random request id and seed;
- the timing: exponential intervals; and probes are credited like any request, so their
  missing credit does not give them away afterwards (except to a demoted node, whose probe
  credits are withheld: it cannot earn while it is only being tested).
Limit: the corpus is public, so a node that keeps a copy can recognise its conversations
verbatim; an operator who needs more should probe with prompts nobody else has.

Every probe is re-scored by the verifier (GenerationRecord.canary). Privacy: probes carry no
user data by construction.
"""

from __future__ import annotations

import importlib.resources
import logging
import random
from dataclasses import dataclass
from functools import lru_cache

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

CORPUS_PACKAGE = "chatterbot_corpus"
MAX_TURN_CHARS = 2000  # a few corpus answers are whole code listings; a user turn is shorter

# (weight, temperatures, max_tokens, top_p): what our clients send. None = the API default
# (temperature 0, max_tokens 256, top_p 1), i.e. the field left out.
USER_PROFILES: tuple[tuple[float, tuple, tuple, tuple], ...] = (
    (0.35, (0.7, 0.7, 0.7, 0.5, 1.0), (512,), (None,)),  # the web chat: its defaults, sometimes changed
    (0.30, (None,), (None,), (None,)),  # a bare API call
    (0.35, (None, 0.0, 0.2, 0.5, 0.7, 0.8, 1.0), (None, 64, 100, 128, 150, 200, 256, 300, 500, 512, 1000, 1024),
     (None, None, None, 0.9, 0.95)),  # SDK code with its own settings
)


class CanaryCorpusMissing(RuntimeError):
    pass


@lru_cache(maxsize=1)
def dialogues() -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Every conversation of the corpus as a tuple of turns (user, assistant, user, ...), in a
    fixed order. Loaded once; ~1 MB of YAML."""
    try:
        import yaml

        root = importlib.resources.files(CORPUS_PACKAGE) / "data"
        files = sorted((f for lang in root.iterdir() if lang.is_dir() for f in lang.iterdir()
                        if f.name.endswith(".yml")), key=lambda f: (f.parent.name, f.name))
    except (ImportError, FileNotFoundError) as e:
        raise CanaryCorpusMissing(f"canary probes need the {CORPUS_PACKAGE.replace('_', '-')} package "
                                  f"(scripts/setup.sh installs it): {e}") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~20x faster, same result
    out = []
    for f in files:
        try:
            data = yaml.load(f.read_text(encoding="utf-8"), Loader=loader) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            log.warning("skipping an unreadable corpus file", extra={"file": f.name})
            continue
        for conv in data.get("conversations") or []:
            turns = []
            for t in conv if isinstance(conv, list) else []:
                # YAML reads "yes" as True and 42 as an int: keep strings and numbers as written.
                if isinstance(t, bool) or not isinstance(t, (str, int, float)) or not str(t).strip():
                    break
                turns.append(str(t).strip()[:MAX_TURN_CHARS])
            if turns:
                out.append(tuple(turns))
    return tuple(out)


def prefixes(convs) -> list[tuple[str, ...]]:
    """Distinct dialogue prefixes that end with a user turn: what a chat client sends."""
    return list(dict.fromkeys(c[:k + 1] for c in convs for k in range(0, len(c), 2)))


@lru_cache(maxsize=1)
def canary_pool() -> tuple[tuple[str, ...], ...]:
    return tuple(prefixes(dialogues()))


def canary_messages(rng: random.Random, pool=None) -> list[ChatMessage]:
    turns = rng.choice(pool if pool is not None else canary_pool())
    return [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


def user_like_params(rng: random.Random) -> SamplingParams:
    """Sampling parameters drawn like our users' (USER_PROFILES); the seed is build_request's."""
    profile = rng.choices(USER_PROFILES, [p[0] for p in USER_PROFILES])[0]
    _, temps, lengths, top_ps = profile
    values = {"temperature": rng.choice(temps), "max_tokens": rng.choice(lengths), "top_p": rng.choice(top_ps)}
    return SamplingParams(**{k: v for k, v in values.items() if v is not None})


@dataclass
class CanaryConfig:
    interval: float = 60.0  # mean seconds between probes (0 = no probes)
    new_weight: float = 5.0  # a node with few passed checks is probed this much more often
    demoted_weight: float = 3.0  # ... and a demoted one (probes are its way to probation)
    timeout: float = 180.0
    dial_timeout: float = 5.0
    # Fixed choices instead of the user-like mixture (tests keep probes short with these).
    max_tokens: tuple[int, ...] | None = None
    temperatures: tuple[float, ...] | None = None


class CanaryProber:
    def __init__(self, backend: MeshBackend, verifier: Verifier, config: CanaryConfig | None = None,
                 rng: random.Random | None = None):
        canary_pool()  # fail at start, not at the first probe, when the corpus is missing
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
        params = user_like_params(rng)
        if c.max_tokens:
            params.max_tokens = rng.choice(c.max_tokens)
        if c.temperatures:
            params.temperature = rng.choice(c.temperatures)
        spec = GenerationSpec(model=model_sha256, kind="chat", params=params, messages=canary_messages(rng))
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
                # No advert addresses (entry/mesh/view.py's module doc).
                call = await open_call(self.host, node.peer_id, None, request,
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
