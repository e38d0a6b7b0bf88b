"""The statistics of output verification: pure numpy over logits rows, no llama.cpp.

The entry replays prompt + a node's claimed tokens through its own copy of the model in one
prefill and gets, for every claimed token, the logits row the node should have sampled it
from. Those rows are not the node's: llama.cpp computes a batch of tokens with other kernels
than one-token-at-a-time decoding (any batch of 2+ gives the same numbers; a single token
gives others), so our log-probabilities differ from the node's by ~0.2 typically and up to
~1 on individual top tokens of SmolLM2-135M Q4_1, and the argmax flips at near-ties on 2-3%
of tokens. Every check is therefore phrased as a *deviation*:

    deviation = the smallest bound d on the per-logit difference between the node's row and
    ours for which the node's sampler, run as engine/sampling.py specifies, picks the claimed
    token.

- greedy: d = (max logit - claimed logit) / 2 (raise the claimed one by d, lower the best by d).
- sampled: the seed is known (the entry chose it), so we regenerate the node's uniform draw u
  for this position and ask how far the claimed token's slice of the cumulative distribution
  (ascending token ids, as the sampler walks it) is from u. Scaling the probabilities below
  the slice by e^-e and those above by e^+e (e = d / temperature) moves its lower edge A/Z to
  A/(A + (Z-A) e^{2e}); solving for u gives the closed form in `_interval_deviation`. Near a
  top-k/top-p/min-p cut the node's set may differ from ours by a few tokens: every set it
  could have had is tried (`sampled_deviation`).

Thresholds (calibrated in scripts/bench_verify.py on 500+ honest generations, 1 and 2 node
threads, greedy and sampled): honest tokens deviate by 0.07 at the 99th percentile and 0.34
at most; a token deviating more than SOFT = 0.25 happened once in 7,444 tokens (a later run:
once in 24,650, largest deviation 0.27; see BENCHMARKS.md). A part of a
generation (one node's share) fails when
  - any token deviates more than HARD = 1.0 (3x the largest honest deviation seen), or
  - more tokens deviate more than SOFT than a binomial test allows at ALPHA = 1e-6, assuming
    an honest rate of RHO0 = 0.5% per token (~40x the measured rate), or
  - (sampled) the likelihood test rejects: the tokens' total surprisal under our sampling
    distribution exceeds what an honest sampler reaches with probability ALPHA (an exact
    Chernoff bound, `chernoff_pvalue`, with LIKELIHOOD_SLACK nats per token of numeric room).
The false-positive rate per checked part is therefore at most ~2 * ALPHA as long as honest
numeric differences stay within the stated model (none seen beyond it), and 0 measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# The node's own sampling steps: the verifier must penalise and cut exactly as the sampler does.
from engine.sampling import kept_set as _sampler_kept_set
from engine.sampling import penalized, scaled  # noqa: F401 - penalized: callers and tests use it from here

SOFT = 0.25
HARD = 1.0
EDGE = 1.0  # raw-logit band around a top-k/top-p/min-p cut within which membership may differ
_MAX_BAND = 64
ALPHA = 1e-6
RHO0 = 0.005
# Per-token allowance in the likelihood test for numeric differences: the claimed token's
# log-probability under our row may be this much lower than under the node's (in nats, at
# temperature 1; divided by the temperature like the logits).
LIKELIHOOD_SLACK = 0.1
# Floor mixed into our sampling distribution (with the unfiltered one) for the likelihood
# test, so a token just outside our top-p/top-k cut has finite surprisal.
_FLOOR = 1e-4
_LAMBDAS = (0.05, 0.15, 0.3, 0.5, 0.7, 0.9)


@dataclass
class PartCheck:
    """What verification found for one node's share of a generation."""

    ok: bool
    reason: str  # "" when ok; else a short machine-friendly reason
    tokens: int
    max_deviation: float = 0.0
    soft_violations: int = 0
    first_bad: int | None = None  # index (in the whole output) of the first hard violation
    pvalue: float | None = None  # likelihood test (sampled only)
    deviations: list[float] = field(default_factory=list, repr=False)


def binomial_limit(n: int, rho: float = RHO0, alpha: float = ALPHA) -> int:
    """The most soft violations among n honest tokens we accept: the smallest k with
    P(X > k) <= alpha for X ~ Binomial(n, rho)."""
    if n <= 0:
        return 0
    # Sum the pmf from the top down until the tail passes alpha (log space: n can be large).
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(rho) + (n - k) * math.log1p(-rho)
            for k in range(n + 1)]
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.exp(logs[k])
        if tail > alpha:
            return k
    return 0


# -- sampling distributions, exactly as engine/sampling.py builds them ---------------------------

def kept_set(x: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """(ascending ids, unnormalised probs) the sampler draws from, for scaled logits x."""
    ids, probs = _sampler_kept_set(x, params)
    return (np.arange(x.shape[0]) if ids is None else ids), probs


def draws(seed: int, n: int) -> np.ndarray:
    """The node's uniform draws: one per sampled token, from PCG64(seed) (engine/sampling.py)."""
    return np.random.Generator(np.random.PCG64(seed)).random(n)


# -- per-token deviations ---------------------------------------------------------------------

def greedy_deviation(row: np.ndarray, token: int) -> float:
    return float(row.max() - row[token]) / 2.0


def _interval_deviation(lo, hi, total, u: float):
    """Smallest e (in scaled-logit units) for which u falls in [lo, hi) / total when every
    probability may move by a factor within [e^-e, e^e]. Arrays in, array out."""
    lo, hi, total = (np.asarray(v, dtype=np.float64) for v in (lo, hi, total))
    with np.errstate(divide="ignore", invalid="ignore"):
        # Below the slice: its lower edge must come down to u; above: its upper edge up.
        down = lo * (1.0 - u) / (u * (total - lo))
        up = u * (total - hi) / (hi * (1.0 - u))
        ratio = np.where(u * total < lo, down, np.where(u * total >= hi, up, 1.0))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        return 0.5 * np.log(np.maximum(ratio, 1.0))


def sampled_deviation(x: np.ndarray, params, token: int, u: float, kept: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Deviation (in raw logit units) of a sampled token given the scaled, penalised row x
    (x = penalised logits / temperature) and the node's draw u.

    Top-k, top-p and min-p keep "every token above some value", so with slightly different
    numbers the node's set can hold a few more or fewer tokens near our cut, which moves
    every later token's slice of the cumulative sum by those tokens' probability. The tokens
    within EDGE (raw logits) of the cut are therefore optional: we try each set the node could
    have had (ours, minus or plus the band's tokens in order of likelihood) and keep the best."""
    temp = params.temperature
    ids, probs = kept if kept is not None else kept_set(x, params)
    xmax = float(x.max())
    xt = float(x[token])
    if ids.shape[0] == x.shape[0]:  # nothing cut
        below = float(probs[:token].sum())
        return temp * float(_interval_deviation(below, below + float(probs[token]), float(probs.sum()), u))
    pos = int(np.searchsorted(ids, token))
    if pos < ids.shape[0] and ids[pos] == token:  # our own set first: the usual case
        below = float(probs[:pos].sum())
        exact = float(_interval_deviation(below, below + float(probs[pos]), float(probs.sum()), u))
        if exact == 0.0:
            return 0.0
    else:
        exact = math.inf
    cut = float(x[ids].min())
    tau = EDGE / temp
    band = np.flatnonzero(np.abs(x - cut) <= tau)
    if band.shape[0] > _MAX_BAND:  # a flat tail: the nearest ones (and the token) will do
        band = band[np.argsort(np.abs(x[band] - cut), kind="stable")[:_MAX_BAND]]
        if abs(xt - cut) <= tau and token not in band:
            band = np.append(band, token)
    band = band[np.argsort(-x[band], kind="stable")]  # the order in which a cut admits them
    sure = ids[x[ids] > cut + tau]
    p_sure = np.exp(x[sure] - xmax)
    p_band = np.exp(x[band] - xmax)
    below_sure = float(p_sure[sure < token].sum())
    # Candidate sets: sure + the first j band tokens, j = 0..len(band).
    below = below_sure + np.concatenate(([0.0], np.cumsum(p_band * (band < token))))
    total = float(p_sure.sum()) + np.concatenate(([0.0], np.cumsum(p_band)))
    gap = 0.0
    p_tok = math.exp(xt - xmax)
    where = np.flatnonzero(band == token)
    if xt > cut + tau:
        feasible = slice(0, None)
    elif where.shape[0]:
        feasible = slice(int(where[0]) + 1, None)  # the set must reach the token itself
    else:
        # Far outside our cut: it must first climb to the band's lower edge.
        gap = max(0.0, cut - tau - xt) / 2.0
        p_tok = math.exp(xt + gap - xmax)
        below, total = below[-1:], total[-1:] + p_tok
        feasible = slice(0, None)
    dev = _interval_deviation(below[feasible], below[feasible] + p_tok, total[feasible], u)
    return temp * min(exact, gap + float(dev.min()))


# -- the likelihood test ------------------------------------------------------------------------

def log_sampling_dist(x: np.ndarray, kept: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """log q (float32) over the whole vocabulary: our sampling distribution (`kept`, from
    kept_set) mixed with _FLOOR of the unfiltered one, so every token has finite surprisal."""
    ids, probs = kept
    full = (x - x.max()).astype(np.float32)
    q = np.exp(full)
    q *= np.float32(_FLOOR / float(q.sum(dtype=np.float64)))
    q[ids] += ((1.0 - _FLOOR) * probs / probs.sum()).astype(np.float32)
    # Far-off tokens underflow float32 to 0: give them the smallest positive value instead of
    # a log of -inf (their share of the bound is nil either way).
    return np.log(np.maximum(q, np.finfo(np.float32).tiny))


def log_mgf(logq: np.ndarray) -> np.ndarray:
    """log E[e^{l s}] for s = -log q(t), t ~ q, at each l in _LAMBDAS: log sum_j q_j^{1-l}.
    float32 is plenty: the bound needs a few digits, and this runs once per row."""
    out = np.empty(len(_LAMBDAS))
    m = float(logq.max())
    centred = logq - np.float32(m)
    for k, lam in enumerate(_LAMBDAS):
        a = 1.0 - lam
        out[k] = a * m + math.log(float(np.exp(centred * np.float32(a)).sum(dtype=np.float64)))
    return out


def chernoff_pvalue(mgf_total: np.ndarray, observed: float) -> float:
    """Upper bound on P(S >= observed) given sum_i log E[e^{l s_i}] per lambda (S = sum s_i of
    independent draws): min over l of exp(sum log mgf - l * observed)."""
    lams = np.asarray(_LAMBDAS)
    return float(min(1.0, math.exp(min(0.0, float((mgf_total - lams * observed).min())))))


# -- a part of a generation -------------------------------------------------------------------

class PartChecker:
    """Checks one node's share of an output, one logits row at a time (rows are large: 49k
    floats for SmolLM2; keeping a 1000-token output's rows would take 200 MB).

    add(row, token): row is our logits row predicting `token`, the next claimed token;
    history: prompt + output before this part (for the penalties); u: the node's draws for
    the whole output (None when greedy); start: index of this part's first token in it."""

    def __init__(self, params, history: Sequence[int], u: np.ndarray | None, start: int):
        self.params = params
        self.greedy = params.temperature == 0.0
        self.hist = list(history)
        self.u = u
        self.i = start
        self.devs: list[float] = []
        self.surprisal = 0.0
        self.mgf = np.zeros(len(_LAMBDAS))

    def add(self, row: np.ndarray, token: int) -> None:
        p = self.params
        if self.greedy:
            self.devs.append(greedy_deviation(row, token))
        else:
            x = scaled(row, p, self.hist)
            kept = kept_set(x, p)
            self.devs.append(sampled_deviation(x, p, token, float(self.u[self.i]), kept))
            logq = log_sampling_dist(x, kept)
            self.surprisal -= float(logq[token])
            self.mgf += log_mgf(logq)
        self.hist.append(token)
        self.i += 1

    def finish(self) -> PartCheck:
        devs, n = self.devs, len(self.devs)
        hard = [i for i, d in enumerate(devs) if d > HARD]
        soft = sum(1 for d in devs if d > SOFT)
        check = PartCheck(True, "", n, max(devs, default=0.0), soft, hard[0] if hard else None, deviations=devs)
        if not self.greedy and n:
            slack = n * LIKELIHOOD_SLACK / self.params.temperature
            check.pvalue = chernoff_pvalue(self.mgf, self.surprisal - slack)
        if hard:
            check.ok, check.reason = False, "token_mismatch"
        elif soft > binomial_limit(n):
            check.ok, check.reason = False, "too_many_deviations"
        elif check.pvalue is not None and check.pvalue < ALPHA:
            check.ok, check.reason = False, "unlikely_tokens"
        return check


def end_deviation(row: np.ndarray, params, history: Sequence[int], u: float | None, end_ids: Sequence[int]) -> float:
    """Deviation of 'the node drew an end-of-generation token here' (the smallest over the
    model's end tokens)."""
    if params.temperature == 0.0:
        return min(greedy_deviation(row, e) for e in end_ids)
    x = scaled(row, params, history)
    return min(sampled_deviation(x, params, e, u) for e in end_ids)
