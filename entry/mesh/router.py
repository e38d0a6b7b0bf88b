"""Routing: which node gets a request, and which model a user's `model` names. Pure logic.

A node is eligible for a request only if
- its signed advert names the requested model's sha256 (and its live status agrees),
- it is connected, not leaving, not cooling down after a failure, not already tried for
  this request,
- it has a free slot by our count: our own requests there plus everyone else's (from its
  last status), never more than its slots, so we don't queue behind ourselves.
Among the eligible, the best score wins: free slots, an empty queue, measured decode speed,
low latency and good reputation each add to it. A node we have sent little work to gets an
exploration bonus that fades with every request it handles: reputation grows with served work,
so without it a newcomer would never win against nodes that were there first, and we would
never measure it.

Claims never outrank measurements. A node is *proven* once it has finished PROVEN_AFTER
requests for us (its receipts accepted); until then its advert and status are only claims: it
is scored as if its speed were min(claim, UNPROVEN_TPS), it gets at most one of our requests at
a time whatever slots it claims, and while a proven node of the model has a free slot an
unproven node gets a request only with probability UNPROVEN_SHARE (and never more than that
share of the model's requests in flight), so a swarm of fresh identities that claim to be fast
and then answer nothing or garbage gets a bounded share of the traffic, not all of it. The
exploration bonus still applies among the requests they may get, so newcomers earn a history.
A node on probation (demoted, then cleared by canary probes: entry/mesh/view.py) is routed
like an unproven one. `admit`, when given, may refuse a node still in its verification "new"
period: the verifier has no room to check its work (entry/verify/verifier.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from entry.backend import ModelEntry
from entry.mesh.view import NodeState

# Score weights. Each term lies in [0, 1], so a weight is how much that term may swing the
# choice: a faster node wins over a slightly less loaded one, but a node we distrust loses.
W_FREE = 1.0
W_SPEED = 1.0
W_REPUTATION = 1.5
W_QUEUE = 0.5
W_LATENCY = 0.5
W_EXPLORE = 1.0  # times 1/sqrt(1 + requests it handled): 1.0 for a newcomer, 0.3 after 10
SPEED_HALF_TPS = 50.0  # decode tok/s worth half of the speed term; unknown speed scores this
LATENCY_HALF_S = 0.05  # status round trip that costs half of the latency term
JITTER = 1e-3  # breaks ties at random, so identical nodes share the load
# Unproven nodes (see the module doc).
PROVEN_AFTER = 3  # requests it finished for us
UNPROVEN_TPS = 10.0  # the speed an unmeasured node is scored at, at most: a slow CPU node
UNPROVEN_SHARE = 0.1  # of a model's requests, while proven nodes have room


def proven(node: NodeState) -> bool:
    """Has it a measured history with us? (Probation counts as none: it has to earn it again.)"""
    return node.served >= PROVEN_AFTER and node.model_sha256 not in getattr(node, "probation", ())


def routing_slots(node: NodeState) -> int:
    """The slots we use on it: what it claims once proven, one until then."""
    return node.total_slots if proven(node) else min(1, node.total_slots)


def free_routing_slots(node: NodeState) -> int:
    free = node.free_slots()
    return free if proven(node) else min(free, max(0, routing_slots(node) - node.in_flight))


def eligible(node: NodeState, model_sha256: str, now: float, exclude: Iterable[str] = ()) -> bool:
    return (
        node.model_sha256 == model_sha256
        and node.peer_id not in exclude
        and node.routable(now)
        and free_routing_slots(node) > 0
    )


def routing_tps(node: NodeState) -> float:
    """Decode speed for scoring: what we measured, else the claim but never above UNPROVEN_TPS."""
    if node.observed_tps:
        return node.observed_tps
    claim = node.decode_tps()
    return min(claim, UNPROVEN_TPS) if claim else UNPROVEN_TPS


def score(node: NodeState) -> float:
    total = max(1, routing_slots(node))
    speed = routing_tps(node)
    queued = node.status.queued if node.status else 0
    latency = node.latency if node.latency is not None else LATENCY_HALF_S
    return (
        W_FREE * free_routing_slots(node) / total
        + W_SPEED * speed / (speed + SPEED_HALF_TPS)
        + W_REPUTATION * node.reputation
        - W_QUEUE * queued / (queued + 1)
        - W_LATENCY * latency / (latency + LATENCY_HALF_S)
        + W_EXPLORE / (1.0 + node.served + node.total_failures) ** 0.5
    )


def pick(nodes: Iterable[NodeState], model_sha256: str, now: float, *, exclude: Iterable[str] = (),
         rng: random.Random | None = None, admit: Callable[[NodeState], bool] | None = None) -> NodeState | None:
    """The best eligible node, or None. `admit(node)` False keeps a node out (see module doc)."""
    rng = rng or random
    exclude = set(exclude)
    nodes = [n for n in nodes if n.model_sha256 == model_sha256]
    candidates = [n for n in nodes if eligible(n, model_sha256, now, exclude) and (admit is None or admit(n))]
    known = [n for n in candidates if proven(n)]
    if known and len(known) < len(candidates):
        # Both kinds can take it: this request explores (an unproven node gets it) or not.
        candidates = [n for n in candidates if not proven(n)] if _explore(nodes, rng) else known
    best, best_score = None, float("-inf")
    for node in candidates:
        s = score(node) + rng.random() * JITTER
        if s > best_score:
            best, best_score = node, s
    return best


def _explore(nodes: list[NodeState], rng) -> bool:
    """Does this request go to an unproven node while a proven one has room? With probability
    UNPROVEN_SHARE, and only while unproven nodes hold less than that share of the model's
    requests in flight (one is always allowed, so newcomers get work at any load)."""
    unproven = sum(n.in_flight for n in nodes if not proven(n))
    total = sum(n.in_flight for n in nodes)
    if unproven >= max(1.0, UNPROVEN_SHARE * (total + 1)):
        return False
    return rng.random() < UNPROVEN_SHARE


def may_serve_later(nodes: Iterable[NodeState], model_sha256: str, exclude: Iterable[str] = ()) -> bool:
    """Is waiting worth it: is some untried node for the model still around and not leaving
    (busy, cooling down or still connecting)?"""
    exclude = set(exclude)
    return any(n.model_sha256 == model_sha256 and n.peer_id not in exclude and n.present and not n.leaving
               for n in nodes)


# -- models --------------------------------------------------------------------------------

_NAME_OK = re.compile(r"^[A-Za-z0-9._:+/-]{1,128}$")


def display_name(advert_name: str, sha256: str) -> str:
    """The node chooses its model name: keep it only if it is a plain identifier (it ends up
    in URLs, metrics labels and HTML), else name the model by its digest."""
    return advert_name if _NAME_OK.match(advert_name or "") else f"model-{sha256[:12]}"


@dataclass
class _Group:
    sha256: str
    name: str
    quantization: str
    context_size: int
    nodes: int


def build_catalog(nodes: Iterable[NodeState], first_seen: dict[str, float] | None = None,
                  pinned: dict[str, str] | None = None) -> list[ModelEntry]:
    """One entry per model digest served by a live node. A model's id is its name; when
    nodes serve different files under one name, the name is bound to one digest (`name_owner`)
    and every other digest is only `name@<sha256[:12]>`. How many nodes serve a digest never
    decides: anyone can start nodes, so counting them would hand a name to whoever starts most.

    pinned: {name: sha256} of the models this entry verifies with (--verify-model files, named
    like nodes name them by default: the file name without .gguf)."""
    first_seen = first_seen or {}
    pinned = pinned or {}
    groups: dict[str, _Group] = {}
    for n in nodes:
        if not n.live():
            continue
        adv = n.advert
        g = groups.get(adv.model_sha256)
        if g is None:
            groups[adv.model_sha256] = _Group(adv.model_sha256, display_name(adv.model_name, adv.model_sha256),
                                               adv.quantization, adv.context_size, 1)
        else:
            g.nodes += 1
            g.context_size = min(g.context_size, adv.context_size)  # what every one of them fits
    by_name: dict[str, list[_Group]] = {}
    for g in groups.values():
        by_name.setdefault(g.name, []).append(g)
    out: list[ModelEntry] = []
    for name, gs in sorted(by_name.items()):
        owner = name_owner(name, [g.sha256 for g in gs], first_seen, pinned)
        for g in sorted(gs, key=lambda g: (g.sha256 != owner, g.sha256)):
            out.append(ModelEntry(
                id=name if g.sha256 == owner else f"{name}@{g.sha256[:12]}", sha256=g.sha256, name=name,
                quantization=g.quantization, context_size=g.context_size, nodes=g.nodes,
                created=int(first_seen.get(g.sha256, 0)),
            ))
    return out


def name_owner(name: str, digests: list[str], first_seen: dict[str, float], pinned: dict[str, str]) -> str | None:
    """The digest a model name means: the one the entry verifies with under that name (even
    while no node serves it: then the name is unavailable rather than someone else's), else a
    verified digest served under it, else the digest seen first (ties: the lower sha256)."""
    if name in pinned:
        return pinned[name]
    verified = set(pinned.values())
    mine = [d for d in digests if d in verified]
    pool = mine or digests
    return min(pool, key=lambda d: (first_seen.get(d, float("inf")), d)) if pool else None


def resolve(catalog: Iterable[ModelEntry], model: str) -> ModelEntry | None:
    """`model` as users may write it: the id, the full sha256, or name@sha12."""
    if not isinstance(model, str) or not model:
        return None
    catalog = list(catalog)
    for m in catalog:
        if model == m.id:
            return m
    wanted = model.lower()
    for m in catalog:
        if wanted == m.sha256 or model == f"{m.name}@{m.sha256[:12]}":
            return m
    return None
