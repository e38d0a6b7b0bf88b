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
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
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


def eligible(node: NodeState, model_sha256: str, now: float, exclude: Iterable[str] = ()) -> bool:
    return (
        node.model_sha256 == model_sha256
        and node.peer_id not in exclude
        and node.routable(now)
        and node.free_slots() > 0
    )


def score(node: NodeState) -> float:
    total = max(1, node.total_slots)
    speed = node.decode_tps() or SPEED_HALF_TPS
    queued = node.status.queued if node.status else 0
    latency = node.latency if node.latency is not None else LATENCY_HALF_S
    return (
        W_FREE * node.free_slots() / total
        + W_SPEED * speed / (speed + SPEED_HALF_TPS)
        + W_REPUTATION * node.reputation
        - W_QUEUE * queued / (queued + 1)
        - W_LATENCY * latency / (latency + LATENCY_HALF_S)
        + W_EXPLORE / (1.0 + node.served + node.total_failures) ** 0.5
    )


def pick(nodes: Iterable[NodeState], model_sha256: str, now: float, *, exclude: Iterable[str] = (),
         rng: random.Random | None = None) -> NodeState | None:
    """The best eligible node, or None."""
    rng = rng or random
    exclude = set(exclude)
    best, best_score = None, float("-inf")
    for node in nodes:
        if not eligible(node, model_sha256, now, exclude):
            continue
        s = score(node) + rng.random() * JITTER
        if s > best_score:
            best, best_score = node, s
    return best


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


def build_catalog(nodes: Iterable[NodeState], first_seen: dict[str, float] | None = None) -> list[ModelEntry]:
    """One entry per model digest served by a live node. A model's id is its name; when
    nodes serve different files under one name, the digest with the most nodes keeps the
    plain name and the others are `name@<sha256[:12]>`."""
    first_seen = first_seen or {}
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
        gs.sort(key=lambda g: (-g.nodes, g.sha256))
        for i, g in enumerate(gs):
            out.append(ModelEntry(
                id=name if i == 0 else f"{name}@{g.sha256[:12]}", sha256=g.sha256, name=name,
                quantization=g.quantization, context_size=g.context_size, nodes=g.nodes,
                created=int(first_seen.get(g.sha256, 0)),
            ))
    return out


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
