"""The shared sampler (engine/sampling.py) never fails on parameters the protocol accepts.

A sampler that raised let a user make the entry blame honest nodes: `temperature=1e-320`
with `top_p=0.5` (or `min_p=1`) overflowed the scaled logits to inf, the kept set came out
empty and every node answered with an internal error.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.sampling import TokenSampler, scaled
from entry.verify import stats as vs
from protocol.messages import SamplingParams

# Values that broke, or could break, the scaling and the cuts: subnormal and tiny
# temperatures, the extremes of every bound.
_TEMPERATURES = st.one_of(
    st.floats(min_value=0.0, max_value=5.0, allow_subnormal=True),
    st.sampled_from([0.0, 5e-324, 1e-320, 1e-310, 1e-300, 1e-45, 1e-5, 5.0]),
)
_LOGIT = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def logits_rows(draw) -> np.ndarray:
    n = draw(st.integers(1, 1500))
    kind = draw(st.sampled_from(["any", "finite", "equal", "neg_inf", "nan", "one_hot"]))
    if kind == "equal":
        return np.full(n, draw(_LOGIT), dtype=np.float32)
    if kind == "neg_inf":
        return np.full(n, -np.inf, dtype=np.float32)
    if kind == "nan":
        row = np.full(n, np.nan, dtype=np.float32)
        row[draw(st.integers(0, n - 1))] = draw(_LOGIT)
        return row
    if kind == "one_hot":
        row = np.full(n, -np.inf, dtype=np.float32)
        row[draw(st.integers(0, n - 1))] = draw(st.floats(-1e30, 1e30).map(np.float32))
        return row
    if kind == "finite" or n > 200:
        # Big rows drawn element by element are slow: a seeded normal row, scaled.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1e-30, 1.0, 30.0, 1e30]))
        return (rng.standard_normal(n) * scale).astype(np.float32)
    return draw(hnp.arrays(np.float32, n, elements=_LOGIT))


@st.composite
def params(draw) -> SamplingParams:
    # Through from_wire, so the strategy cannot drift from what a node accepts.
    return SamplingParams.from_wire({
        "temperature": draw(_TEMPERATURES),
        "top_p": draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 5e-324, 1e-300, 0.5, 1.0]))),
        "top_k": draw(st.one_of(st.integers(0, 1_000_000), st.integers(0, 3))),
        "min_p": draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0]))),
        "repeat_penalty": draw(st.one_of(st.floats(0.0, 10.0), st.just(1.0))),
        "repeat_last_n": draw(st.integers(0, 4096)),
        "presence_penalty": draw(st.floats(-2.0, 2.0)),
        "frequency_penalty": draw(st.floats(-2.0, 2.0)),
        "seed": draw(st.integers(0, 2**63 - 1)),
    })


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(row=logits_rows(), p=params(), history=st.lists(st.integers(0, 2**31 - 1), max_size=50))
# The attacks as reported, on an ordinary row.
@example(row=np.linspace(-5, 5, 1000, dtype=np.float32), history=[],
         p=SamplingParams(temperature=1e-320, top_p=0.5, seed=1))
@example(row=np.linspace(-5, 5, 1000, dtype=np.float32), history=[],
         p=SamplingParams(temperature=1e-320, min_p=1.0, seed=1))
@example(row=-np.linspace(1, 5, 1000, dtype=np.float32), history=[],
         p=SamplingParams(temperature=1e-320, top_k=1, seed=1))
def test_sampler_returns_a_valid_token_for_any_accepted_params(row, p, history):
    history = [t % row.shape[0] if t % 2 else t for t in history]  # in and out of the vocabulary
    sampler = TokenSampler(p)
    token = sampler.choose(row, history)
    assert isinstance(token, int) and 0 <= token < row.shape[0]
    if p.greedy:
        return
    # The verifier rebuilds the same distribution: the node's honest choice is in its kept set
    # and deviates by nothing (it must never be blamed for it).
    x = scaled(row, p, history)
    assert not np.isnan(x).any() and np.isfinite(x.max())
    ids, probs = vs.kept_set(x, p)
    assert token in ids and probs.shape[0] >= 1
    u = vs.draws(sampler.seed, 1)[0]
    assert vs.sampled_deviation(x, p, token, float(u)) <= 1e-6


def test_tiny_temperature_is_greedy_with_ties_shared():
    row = np.array([1.0, 3.0, -2.0, 3.0, 2.999], dtype=np.float32)
    p = SamplingParams(temperature=1e-320, top_p=0.5, seed=7)
    picks = {TokenSampler(p, seed=s).choose(row) for s in range(64)}
    assert picks == {1, 3}


@pytest.mark.parametrize(("row", "allowed"), [
    ([np.nan, 1.0, np.nan], {1}),  # NaN counts as -inf
    ([np.inf, 0.0, np.inf, np.nan], {0, 2}),  # +inf logits share everything
    ([-np.inf] * 4, {0, 1, 2, 3}),  # nothing to prefer: uniform
    ([np.nan] * 3, {0, 1, 2}),
])
def test_non_finite_logits_have_a_defined_distribution(row, allowed):
    row = np.array(row, dtype=np.float32)
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.1, min_p=1.0, top_k=1)):
        picks = {TokenSampler(p, seed=s).choose(row) for s in range(40)}
        assert picks <= allowed and picks


def test_ordinary_temperatures_scale_exactly_as_before():
    """Nodes with the previous sampler must keep agreeing token for token."""
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(5000) * 4).astype(np.float32)
    for t in (1e-5, 0.3, 1.0, 5.0):
        p = SamplingParams(temperature=t, repeat_penalty=1.3)
        assert np.array_equal(scaled(row, p, [1, 2, 2]), vs.penalized(row, p, [1, 2, 2]) / t)


def test_verifier_accepts_honest_tokens_at_a_subnormal_temperature():
    rng = np.random.default_rng(5)
    p = SamplingParams(temperature=1e-320, top_p=0.5, seed=11)
    sampler = TokenSampler(p)
    rows = [(rng.standard_normal(300) * 3).astype(np.float32) for _ in range(20)]
    hist: list[int] = [1, 2]
    tokens = []
    for row in rows:
        tokens.append(sampler.choose(row, hist + tokens))
    checker = vs.PartChecker(p, hist, vs.draws(p.seed, len(rows)), 0)
    for row, tok in zip(rows, tokens):
        checker.add(row, tok)
    check = checker.finish()
    assert check.ok, check
