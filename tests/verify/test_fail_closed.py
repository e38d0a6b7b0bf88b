"""Verification fails closed (issue "Hardening", attacks 3 and 4): a sampled check that cannot
run never lets credits vest, new nodes are not routed without room to check them, the cost
of a check is counted in tokens, unverifiable models earn nothing, canary passes alone do not
bring a demoted node back, and a demoted node's probe credits are withheld. No model needed:
the re-scoring itself is stubbed or never reached."""

from __future__ import annotations

import random
import time

import trio

from entry.credits.ledger import Ledger, PartCredit, VestingPolicy
from entry.mesh import router
from entry.mesh.relay import GenerationRecord, PartRecord
from entry.mesh.view import DEMOTE_AFTER, PROBATION_PASSES, REINSTATE_AFTER, MeshView, NodeState
from entry.verify.verifier import Verifier, VerifierConfig, VerifyModel, _Outcome
from protocol.messages import ChatMessage, InferRequest, SamplingParams, StatusReply
from protocol.records import CapacityAdvert

SHA = "ab" * 32
UNVERIFIED = "cd" * 32
POLICY = VestingPolicy(new_delay_s=100.0, trusted_delay_s=10.0, trusted_after=2, failure_memory_s=1000.0)


class _Host:
    peer_id = "entry"


def node(peer: str, sha: str = SHA) -> NodeState:
    adv = CapacityAdvert(node=peer, model_sha256=sha, model_name="smol", quantization="Q4_1", context_size=2048,
                         prefill_tps=0.0, decode_tps=0.0, total_slots=4, free_slots=4, seq=1, issued_at=0.0,
                         expires_at=1e12)
    n = NodeState(peer, "node-" + peer, adv, latency=0.002, connected=True)
    n.status = StatusReply(sha, "smol", 4, 4, 0, 8, 0.0, 0.0, 0, False, 2048)
    return n


_n = 0


def record(peer: str, *, sha: str = SHA, prompt: str = "Tell me about the sea.", tokens: int = 20,
           canary: bool = False) -> GenerationRecord:
    global _n
    _n += 1
    req = InferRequest(f"req-{_n:06d}", sha, "chat", SamplingParams(max_tokens=tokens), [ChatMessage("user", prompt)])
    part = PartRecord(peer, "node-" + peer, list(range(tokens)), None, False, 2048)
    return GenerationRecord(req, [part], "length", 12, canary=canary)


def verifier(tmp_path, **config) -> tuple[Verifier, Ledger, MeshView]:
    ledger = Ledger(tmp_path / "c.db", policy=POLICY)
    view = MeshView(_Host())
    v = Verifier(view=view, ledger=ledger, config=VerifierConfig(**config), rng=random.Random(0))
    # Never run: these tests look at what is queued and booked, not at re-scoring.
    v.models[SHA] = VerifyModel(engine=None, sha256=SHA, weight=0.5, end_ids=[], name="smol")
    return v, ledger, view


def rows(ledger: Ledger, peer: str) -> list[dict]:
    return ledger.node_requests(peer)


async def test_a_check_that_finds_no_room_keeps_credits_held_until_they_expire_unvested(tmp_path):
    v, ledger, view = verifier(tmp_path, max_queue=2)
    view.track(node("cheat"))
    for _ in range(5):  # a new node: every request is sampled; the queue holds two
        v.on_generation_done(record("cheat"))
    got = rows(ledger, "cheat")
    assert len(got) == 5
    assert sorted(r["reason"] or "" for r in got) == ["", ""] + ["unchecked: queue_full"] * 3
    assert all(r["verify"] == "pending" for r in got)  # was: 'none', vesting on schedule
    far = time.time() + 10 * POLICY.new_delay_s
    assert ledger.vest_due(now=far) == 0
    assert ledger.expire_unchecked(now=far) == 3
    totals = ledger.node_totals("cheat")
    assert totals["withheld"].requests == 3 and totals["vested"].requests == 0
    assert ledger.check_invariants() == []


async def test_unchecked_rows_survive_a_restart_unvested_and_do_not_make_the_node_new(tmp_path):
    led = Ledger(tmp_path / "c.db", policy=POLICY)
    led.book("r1", SHA, [PartCredit("n", 5, b"r")], weight=1.0, pending=False, unchecked="queue_full", now=0.0)
    led.book("r2", SHA, [PartCredit("n", 5, b"r")], weight=1.0, pending=True, now=0.0)
    led.close()
    led = Ledger(tmp_path / "c.db", policy=POLICY)  # restart: the queued check r2 is lost, r1 stays unchecked
    by_id = {r["request_id"]: r for r in led.node_requests("n")}
    assert (by_id["r1"]["verify"], by_id["r2"]["verify"]) == ("pending", "lost")
    assert led.vest_due(now=100.0) == 1 and led.expire_unchecked(now=100.0) == 1
    # An unchecked row is not the node's failure: its next credits vest as an established node's.
    for i in range(2):
        led.book(f"g{i}", SHA, [PartCredit("n", 1, b"r")], weight=1.0, pending=False, now=200.0)
    led.vest_due(now=300.0)
    led.book("g9", SHA, [PartCredit("n", 1, b"r")], weight=1.0, pending=False, now=400.0)
    assert led.vest_due(now=400.0 + POLICY.trusted_delay_s) == 1


async def test_a_check_that_cannot_run_does_not_vest(tmp_path):
    v, ledger, view = verifier(tmp_path)
    view.track(node("n"))
    v._check = lambda job: _Outcome([], skipped="too_long")  # e.g. longer than the verifier's context
    async with trio.open_nursery() as nursery:
        await nursery.start(v.run)
        v.on_generation_done(record("n", prompt="x" * 20000))
        assert await v.wait_idle(10)
        nursery.cancel_scope.cancel()
    [row] = rows(ledger, "n")
    assert (row["verify"], row["reason"]) == ("pending", "unchecked: too_long")  # was: 'lost', which vests
    assert ledger.vest_due(now=time.time() + 1e6) == 0


def test_the_queue_is_bounded_by_tokens_and_long_prompts_cost_more(tmp_path):
    v, ledger, view = verifier(tmp_path, max_queue=64, max_queue_tokens=4000)
    view.track(node("n"))
    near_context = record("n", prompt="word " * 4000)  # ~20 kB: ~5,000 tokens for the verifier
    assert Verifier.job_cost(near_context) > 4000
    v.on_generation_done(near_context)
    assert rows(ledger, "n")[0]["reason"] == "unchecked: queue_full"
    short = record("n")
    v.on_generation_done(short)
    assert v._queued_tokens == Verifier.job_cost(short) < 100


def test_new_nodes_are_not_routed_while_the_verifier_has_no_room_for_their_work(tmp_path):
    v, ledger, view = verifier(tmp_path, max_queue=3, new_until=10)
    new, established, other = node("new"), node("old"), node("other", sha=UNVERIFIED)
    established.verified = 50
    established.served = new.served = 10
    for n in (new, established, other):
        view.track(n)
    assert v.admits(new) and v.admits(established)
    for _ in range(3):
        v.on_generation_done(record("new"))
    assert not v.admits(new)  # every request of a new node is checked: no room, no request
    assert v.admits(established) and v.admits(other)  # sampled at 15% / not verifiable here
    picked = router.pick([new, established], SHA, time.monotonic(), admit=v.admits)
    assert picked is established
    # Requests in flight on new nodes count against the room too.
    v2, _, view2 = verifier(tmp_path / "b", max_queue=3)
    a = view2.track(node("a"))
    a.in_flight = 2
    assert v2.admits(a)
    a.in_flight = 3
    assert not v2.admits(a)


def test_a_model_the_entry_cannot_verify_earns_nothing(tmp_path):
    v, ledger, view = verifier(tmp_path)
    view.track(node("n", sha=UNVERIFIED))
    v.on_generation_done(record("n", sha=UNVERIFIED, tokens=30))
    [row] = rows(ledger, "n")
    assert row["tokens"] == 30 and row["credits"] == 0.0  # was 0.1 per token


def test_canary_passes_alone_do_not_reinstate_a_demoted_node():
    n = node("n")
    for _ in range(DEMOTE_AFTER):
        n.verdict(0.0, SHA, False, "token_mismatch")
    assert SHA in n.demoted and not n.routable(1e9)
    for _ in range(REINSTATE_AFTER + 5):
        n.verdict(0.0, SHA, True, canary=True)
    # Probation: routable again, but only as an unproven node (one request at a time, a
    # bounded share), with every request checked; canaries do not end it.
    assert SHA not in n.demoted and SHA in n.probation and n.routable(1e9)
    assert not router.proven(n)
    n.served = 100
    assert not router.proven(n)
    for _ in range(PROBATION_PASSES - 1):
        n.verdict(0.0, SHA, True)
    assert SHA in n.probation
    n.verdict(0.0, SHA, True)
    assert SHA not in n.probation and router.proven(n)
    # A failure on probation demotes at once.
    for _ in range(DEMOTE_AFTER):
        n.verdict(0.0, SHA, False, "canned")
    for _ in range(REINSTATE_AFTER):
        n.verdict(0.0, SHA, True, canary=True)
    assert SHA in n.probation
    n.cooldown_until = 0.0
    n.verdict(0.0, SHA, False, "canned")
    assert SHA in n.demoted and SHA not in n.probation


def test_a_demoted_nodes_canary_credits_are_withheld(tmp_path):
    v, ledger, view = verifier(tmp_path)
    n = view.track(node("n"))
    for _ in range(DEMOTE_AFTER):
        n.verdict(0.0, SHA, False, "canned")
    v.on_generation_done(record("n", canary=True))
    [row] = rows(ledger, "n")
    assert (row["state"], row["reason"]) == ("withheld", "demoted")
    # While on probation its probes are credited again (held for their check, like any request).
    for _ in range(REINSTATE_AFTER):
        n.verdict(0.0, SHA, True, canary=True)
    v.on_generation_done(record("n", canary=True))
    assert rows(ledger, "n")[0]["state"] == "held"
