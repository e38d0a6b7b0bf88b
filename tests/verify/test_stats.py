"""The verification statistics on synthetic logits (no llama.cpp): the deviation measure is
zero for the node's own choice and bounded by the numeric difference that caused a mismatch,
the likelihood test keeps its false-positive rate and rejects a different distribution, and
the small pieces around them (signed credit queries, the node's receipt log, its statement
check) behave."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import TokenSampler
from entry.verify import stats as vs
from node.credits_cli import compare
from node.receipt_log import ReceiptLog
from protocol.credit_query import check_query, sign_query
from protocol.identity import Identity
from protocol.messages import SamplingParams
from protocol.records import WorkReceipt, token_digest

V = 2000  # vocabulary of the synthetic rows


def rows(rng, n, scale=3.0):
    return [(rng.standard_normal(V) * scale).astype(np.float32) for _ in range(n)]


def test_binomial_limit_allows_few_soft_violations():
    assert vs.binomial_limit(0) == 0
    limits = [vs.binomial_limit(n) for n in (10, 100, 1000)]
    assert limits == sorted(limits) and limits[0] <= 4 and limits[-1] < 50


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=40), dict(temperature=0.8, top_p=0.9),
                                    dict(temperature=0.9, min_p=0.05, repeat_penalty=1.2)])
def test_deviation_is_zero_for_the_nodes_choice_and_bounded_by_the_numeric_difference(params):
    rng = np.random.default_rng(0)
    p = SamplingParams(seed=1234, **params)
    sampler = TokenSampler(p)
    u = vs.draws(1234, 200)
    hist: list[int] = list(range(10))
    d = 0.05
    worst = 0.0
    for i, row in enumerate(rows(rng, 200)):
        noise = rng.uniform(-d, d, V).astype(np.float32)
        node_row = row + noise  # the node's numbers differ from ours by at most d per logit
        tok = sampler.choose(node_row, hist)
        x_node = vs.penalized(node_row, p, hist) / p.temperature
        assert vs.sampled_deviation(x_node, p, tok, float(u[i])) == 0.0  # exactly the sampler's pick
        x = vs.penalized(row, p, hist) / p.temperature
        dev = vs.sampled_deviation(x, p, tok, float(u[i]))
        worst = max(worst, dev)
        hist.append(tok)
    # Within the bound (penalties scale logits by up to repeat_penalty; cuts add a little).
    assert worst <= 2.5 * d


def test_greedy_deviation_is_half_the_margin():
    row = np.array([0.0, 2.0, 1.5, -1.0], dtype=np.float32)
    assert vs.greedy_deviation(row, 1) == 0.0
    assert vs.greedy_deviation(row, 2) == pytest.approx(0.25)


def _sample(rng, row, p, hist, u):
    sampler = TokenSampler(p, seed=0)
    sampler._rng = type("U", (), {"random": lambda self: u})()
    return sampler.choose(row, hist)


def test_part_checker_passes_honest_and_fails_another_model():
    rng = np.random.default_rng(1)
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=99)
    ours = rows(rng, 60)
    theirs = rows(rng, 60)  # a different model: unrelated rows
    u = vs.draws(99, 60)
    honest = [_sample(rng, r + rng.uniform(-0.05, 0.05, V).astype(np.float32), p, [], u[i]) for i, r in enumerate(ours)]
    cheat = [_sample(rng, r, p, [], u[i]) for i, r in enumerate(theirs)]
    for toks, expect in ((honest, True), (cheat, False)):
        c = vs.PartChecker(p, [], u, 0)
        for r, t in zip(ours, toks):
            c.add(r, t)
        res = c.finish()
        assert res.ok is expect, res


def test_likelihood_test_keeps_its_false_positive_rate_and_rejects_a_different_distribution():
    rng = np.random.default_rng(2)
    p = SamplingParams(temperature=1.0)
    ours = rows(rng, 40, scale=2.0)
    logq = [vs.log_sampling_dist(r.astype(np.float64), vs.kept_set(r.astype(np.float64), p)) for r in ours]
    mgf = sum(vs.log_mgf(lq) for lq in logq)
    qs = [np.exp(lq.astype(np.float64)) / np.exp(lq.astype(np.float64)).sum() for lq in logq]
    honest_p = []
    for _ in range(300):
        toks = [int(rng.choice(V, p=q)) for q in qs]
        honest_p.append(vs.chernoff_pvalue(mgf, -sum(float(lq[t]) for lq, t in zip(logq, toks))))
    assert min(honest_p) > vs.ALPHA
    # Tokens from another distribution (uniform: a very different model) are rejected.
    toks = [int(t) for t in rng.integers(0, V, 40)]
    assert vs.chernoff_pvalue(mgf, -sum(float(lq[t]) for lq, t in zip(logq, toks))) < vs.ALPHA


def test_credit_queries_are_signed_by_the_node_and_fresh():
    node, other = Identity.generate(), Identity.generate()
    assert check_query(node.peer_id, sign_query(node))
    assert not check_query(node.peer_id, sign_query(other))
    assert not check_query(node.peer_id, sign_query(node, now=0))
    assert not check_query(node.peer_id, None) and not check_query(node.peer_id, "12.zz")
    assert not check_query("not-a-peer-id", sign_query(node))


def test_node_keeps_receipts_and_checks_statements(tmp_path):
    node, entry = Identity.generate(), Identity.generate()
    log = ReceiptLog(tmp_path / "receipts.log")

    def receipt(rid, n, who=entry.peer_id):
        return WorkReceipt(rid, "a" * 64, 5, n, token_digest(list(range(n))), node.peer_id, who, 1.0).sign(node)

    for rid, n in (("r1", 4), ("r2", 6), ("r3", 2)):
        log.append(receipt(rid, n))
    log.append(receipt("elsewhere", 9, who=Identity.generate().peer_id))
    with open(log.path, "ab") as f:
        f.write(b"torn-line-without-newl")
    assert [r.request_id for r in log.receipts()] == ["r1", "r2", "r3", "elsewhere"]
    statement = {"entry": entry.peer_id, "requests": [
        {"request_id": "r1", "tokens": 4, "state": "vested", "source": "receipt"},
        {"request_id": "r2", "tokens": 5, "state": "held", "source": "receipt"},
        {"request_id": "r9", "tokens": 3, "state": "withheld", "reason": "token_mismatch", "source": "receipt"},
        {"request_id": "r7", "tokens": 2, "state": "held", "source": "relayed"}]}
    problems = {(p["request_id"], p["problem"]) for p in compare(statement, log.receipts(), entry.peer_id)["problems"]}
    assert problems == {("r2", "fewer_tokens"), ("r3", "not_credited"), ("r9", "no_receipt_kept"), ("r9", "withheld")}
