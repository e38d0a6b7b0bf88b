"""Routing, model catalog, node bookkeeping and request anonymization: pure, no network."""

from __future__ import annotations

import random
import re

import pytest

from entry.backend import GenerationSpec
from entry.mesh import router
from entry.mesh.relay import MeshBackendConfig, build_request, describe_node, first_token_deadline
from entry.mesh.view import COOLDOWN_MAX_S, REPUTATION_NEUTRAL, NodeState, Pseudonyms
from protocol.messages import ChatMessage, InferRequest, SamplingParams, StatusReply
from protocol.records import CapacityAdvert

SHA = "ab" * 32
OTHER = "cd" * 32
NOW = 1000.0


def node(peer: str = "peer-a", *, sha: str = SHA, name: str = "smol", slots: int = 1, free: int | None = None,
         queued: int = 0, tps: float = 0.0, latency: float | None = 0.002, connected: bool = True,
         status: bool = True, draining: bool = False, status_sha: str | None = None) -> NodeState:
    adv = CapacityAdvert(node=peer, model_sha256=sha, model_name=name, quantization="Q4_1", context_size=2048,
                         prefill_tps=0.0, decode_tps=tps, total_slots=slots, free_slots=slots, seq=1,
                         issued_at=0.0, expires_at=1e12)
    n = NodeState(peer, "node-" + peer[-6:], adv, latency=latency, connected=connected)
    if status:
        n.status = StatusReply(status_sha or sha, name, slots, slots if free is None else free, queued, 8,
                               0.0, tps, 0, draining, 2048)
    return n


def proven(n: NodeState, tps: float | None = None) -> NodeState:
    """As if it had finished requests for us (and we had measured its speed, if given)."""
    n.served = max(n.served, router.PROVEN_AFTER)
    if tps is not None:
        n.observed_tps = tps
    return n


# -- eligibility ------------------------------------------------------------------------------

def test_pick_only_nodes_whose_advert_and_status_name_the_model():
    a, b = node("a", sha=OTHER), node("b")
    assert router.pick([a, b], SHA, NOW) is b
    assert router.pick([a], SHA, NOW) is None
    liar = node("c", status_sha=OTHER)  # advert says SHA, the live node says otherwise
    assert router.pick([liar], SHA, NOW) is None


@pytest.mark.parametrize("make", [
    lambda: node(connected=False),  # no status stream
    lambda: node(status=False),  # connected, but no status answer yet
    lambda: node(draining=True),  # its status says it is draining
])
def test_pick_skips_nodes_that_are_not_live(make):
    assert router.pick([make()], SHA, NOW) is None


def test_pick_skips_leaving_cooling_excluded_and_absent_nodes():
    n = node()
    n.leaving = True
    assert router.pick([n], SHA, NOW) is None
    n = node()
    n.penalize(NOW, 0.1)
    assert router.pick([n], SHA, NOW) is None
    assert router.pick([n], SHA, n.cooldown_until + 0.01) is n  # the cooldown runs out
    assert router.pick([node()], SHA, NOW, exclude={"peer-a"}) is None
    n = node()
    n.present = False
    assert router.pick([n], SHA, NOW) is None


def test_never_more_of_our_requests_than_slots():
    n = proven(node(slots=2))
    n.in_flight = 1
    assert router.pick([n], SHA, NOW) is n
    n.in_flight = 2
    assert router.pick([n], SHA, NOW) is None


def test_others_load_from_status_counts_but_ours_is_not_counted_twice():
    n = proven(node(slots=2, free=1))  # someone else runs one request there
    assert n.free_slots() == 1
    n.in_flight = 1
    assert n.free_slots() == 0 and router.pick([n], SHA, NOW) is None
    # Its next status includes our request: still one of theirs and one of ours.
    n.update_status(StatusReply(SHA, "smol", 2, 0, 0, 8, 0.0, 0.0, 0, False, 2048), rtt=0.002)
    assert n.busy_slots() == 2
    n.in_flight = 0  # ours finished; the status is stale but we know ours left
    assert n.free_slots() == 1
    queued = node(slots=1, free=0, queued=3)
    assert queued.free_slots() == 0


# -- scoring ------------------------------------------------------------------------------------

def _winner(*nodes: NodeState) -> NodeState:
    return router.pick(list(nodes), SHA, NOW, rng=random.Random(0))


def test_score_prefers_free_fast_near_and_reputable_nodes():
    assert _winner(proven(node("a", slots=2, free=1)), proven(node("b", slots=2, free=2))).peer_id == "b"
    assert _winner(proven(node("a"), tps=20), proven(node("b"), tps=200)).peer_id == "b"
    assert _winner(node("a", latency=0.2), node("b", latency=0.002)).peer_id == "b"
    assert _winner(proven(node("a", slots=2, free=1, queued=2)), proven(node("b", slots=2, free=1))).peer_id == "b"
    bad = node("a")
    bad.reputation = 0.1
    assert _winner(bad, node("b")).peer_id == "b"
    measured = proven(node("a", tps=500))
    measured.observe_speed(10)  # what it claims loses to what we measured
    assert measured.decode_tps() == 10
    assert _winner(measured, proven(node("b"), tps=100)).peer_id == "b"


def test_a_newcomer_gets_work_beside_nodes_that_earned_reputation():
    veterans = [node(f"v{i}", slots=2) for i in range(3)]
    for v in veterans:
        for _ in range(40):
            v.succeeded()
    newcomer = node("new", slots=2)
    # Unproven, it gets about UNPROVEN_SHARE of the picks, and wins the ones it may take.
    rng = random.Random(3)
    picks = [router.pick([*veterans, newcomer], SHA, NOW, rng=rng).peer_id for _ in range(1000)]
    assert 0.05 < picks.count("new") / len(picks) < 0.15
    # Only one of our requests at a time until it is proven...
    newcomer.in_flight = 1
    assert router.pick([newcomer], SHA, NOW) is None
    # ...then it is routed on its score and slots like any node.
    for _ in range(router.PROVEN_AFTER):
        newcomer.succeeded()
    assert router.pick([newcomer], SHA, NOW) is newcomer
    for v in veterans:
        v.in_flight = 2
    assert _winner(*veterans, newcomer).peer_id == "new"
    for v in veterans:
        v.in_flight = 0
    # and a node that keeps failing does not keep it
    flaky = node("flaky", slots=2)
    for _ in range(8):
        flaky.penalize(NOW - 100, 0.15)
    assert _winner(*veterans, flaky).peer_id != "flaky"


def test_identical_nodes_share_the_load():
    nodes = [node("a"), node("b")]
    rng = random.Random(1)
    picked = {router.pick(nodes, SHA, NOW, rng=rng).peer_id for _ in range(50)}
    assert picked == {"a", "b"}


def test_may_serve_later_distinguishes_busy_from_gone():
    busy = node(slots=1)
    busy.in_flight = 1
    assert router.may_serve_later([busy], SHA)
    assert not router.may_serve_later([busy], SHA, exclude={"peer-a"})
    leaving = node()
    leaving.leaving = True
    assert not router.may_serve_later([leaving], SHA)
    assert not router.may_serve_later([node(sha=OTHER)], SHA)


# -- node bookkeeping ------------------------------------------------------------------------------

def test_cooldown_backs_off_exponentially_and_success_resets_it():
    n = node()
    assert n.reputation == REPUTATION_NEUTRAL
    lengths = []
    for _ in range(8):
        n.penalize(NOW, 0.1)
        lengths.append(n.cooldown_until - NOW)
        n.cooldown_until = 0.0
    assert lengths[:4] == [1.0, 2.0, 4.0, 8.0] and max(lengths) == COOLDOWN_MAX_S
    assert n.reputation < REPUTATION_NEUTRAL * 0.5 and n.total_failures == 8
    n.succeeded()
    assert n.failures == 0 and n.served == 1
    n.penalize(NOW, 0.1)
    assert n.cooldown_until - NOW == 1.0
    n.adjust_reputation(+5)
    assert n.reputation == 1.0
    n.adjust_reputation(-5)
    assert n.reputation == 0.0


def test_busy_hold_is_not_a_failure():
    n = node()
    n.hold(NOW, 1.0)
    assert not n.routable(NOW) and n.routable(NOW + 1.01)
    assert n.failures == 0 and n.reputation == REPUTATION_NEUTRAL


def test_states_for_the_nodes_view():
    assert node().state(NOW) == "ready"
    full = node()
    full.in_flight = 1
    assert full.state(NOW) == "busy"
    assert node(draining=True).state(NOW) == "leaving"
    down = node(connected=False)
    assert down.state(NOW) == "connecting"
    down.penalize(NOW, 0.1)
    assert down.state(NOW) == "cooldown"


def test_pseudonyms_are_stable_per_process_and_reveal_nothing():
    peer = "12D3KooWQiker5AdjLshjGtECS8qEBvp3k53WTewVvEd1fLbGEhQ"
    p, q = Pseudonyms(), Pseudonyms()
    assert p(peer) == p(peer)
    assert re.fullmatch(r"node-[0-9a-f]{6}", p(peer))
    assert p(peer) != q(peer)  # another entry process: another key, unlinkable names
    assert p(peer) != p(peer[:-1] + "R")
    assert Pseudonyms(b"k" * 32)(peer) == Pseudonyms(b"k" * 32)(peer)


# -- model catalog --------------------------------------------------------------------------------

def test_catalog_groups_by_digest_and_disambiguates_names():
    nodes = [node("a", name="smol"), node("b", name="smol"), node("c", sha=OTHER, name="smol"),
             node("d", sha="ef" * 32, name="gemma")]
    cat = router.build_catalog(nodes, {SHA: 1234.5})
    by_id = {m.id: m for m in cat}
    assert set(by_id) == {"smol", f"smol@{OTHER[:12]}", "gemma"}
    assert by_id["smol"].sha256 == SHA and by_id["smol"].nodes == 2 and by_id["smol"].created == 1234
    assert by_id[f"smol@{OTHER[:12]}"].nodes == 1 and by_id[f"smol@{OTHER[:12]}"].name == "smol"
    assert router.resolve(cat, "smol").sha256 == SHA
    assert router.resolve(cat, OTHER).sha256 == OTHER
    assert router.resolve(cat, OTHER.upper()).sha256 == OTHER
    assert router.resolve(cat, f"smol@{SHA[:12]}").sha256 == SHA  # the preferred one too
    assert router.resolve(cat, f"smol@{OTHER[:12]}").sha256 == OTHER
    for missing in ("nope", "", "smol@000000000000", None):
        assert router.resolve(cat, missing) is None


def test_catalog_counts_only_live_nodes_and_cleans_names():
    gone, leaving = node("a"), node("b")
    gone.connected = False
    leaving.leaving = True
    assert router.build_catalog([gone, leaving]) == []
    weird = node("c", name='x"}<script>')
    [m] = router.build_catalog([weird])
    assert m.id == f"model-{SHA[:12]}"
    assert router.display_name("SmolLM2-135M-Instruct", SHA) == "SmolLM2-135M-Instruct"


def test_describe_node_without_identifying():
    n = node("12D3KooWsecret", tps=95.4)
    description = describe_node(n)
    assert description == "smol Q4_1, 95 tok/s" and "12D3" not in description
    assert describe_node(node(tps=0.0)) == "smol Q4_1"


# -- what a node receives ---------------------------------------------------------------------------

def _spec(**params) -> GenerationSpec:
    return GenerationSpec(model="smol", kind="chat", params=SamplingParams(**params),
                          messages=[ChatMessage("user", "hi")], logprobs=True, top_logprobs=2)


def test_request_carries_only_generation_fields_under_a_fresh_random_id():
    a, b = build_request(_spec(max_tokens=7, stop=["x"]), SHA), build_request(_spec(), SHA)
    assert a.request_id != b.request_id
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", a.request_id)
    wire = a.to_wire()
    assert set(wire) == {"id", "model", "kind", "params", "cont", "logprobs", "top_logprobs", "messages"}
    assert wire["messages"] == [{"role": "user", "content": "hi"}] and wire["cont"] == []
    assert InferRequest.from_wire(wire) == a  # valid on the node's side
    assert a.params.max_tokens == 7 and a.params.stop == ["x"] and a.logprobs and a.top_logprobs == 2
    comp = build_request(GenerationSpec(model="m", kind="completion", params=SamplingParams(), prompt="p"), SHA)
    assert set(comp.to_wire()) == {"id", "model", "kind", "params", "cont", "logprobs", "top_logprobs", "prompt"}


def test_sampling_gets_a_seed_so_continuations_reproduce():
    spec = _spec(temperature=0.8)
    seeds = {build_request(spec, SHA).params.seed for _ in range(5)}
    assert None not in seeds and len(seeds) == 5
    assert spec.params.seed is None  # the caller's spec is not modified
    assert build_request(_spec(temperature=0.8, seed=42), SHA).params.seed == 42
    assert build_request(_spec(temperature=0.0), SHA).params.seed is None  # greedy needs none


def test_first_token_deadline_grows_with_prompt_and_continuation():
    cfg = MeshBackendConfig(first_token_timeout=10.0)
    req = build_request(GenerationSpec(model="m", kind="completion", params=SamplingParams(), prompt=""), SHA)
    assert first_token_deadline(cfg, req) == 10.0
    req.prompt = "x" * 30000
    longer = first_token_deadline(cfg, req)
    assert longer > 10.0
    req.continuation = [1] * 400
    assert first_token_deadline(cfg, req) == pytest.approx(longer + 20.0)
