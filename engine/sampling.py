"""Token selection over a raw logits row, in numpy.

We do not use llama.cpp's sampler: its chain and its RNG differ between llama.cpp versions
and builds, while the mesh needs (a) the same token on every node for the same logits and
seed, and (b) a verifier that can recompute exactly what a node was supposed to do.

Semantics (documented because verifiers and failover depend on them):
- temperature == 0: greedy = argmax of the raw logits (lowest id on ties). Penalties,
  top_k/top_p/min_p and the seed are ignored, so a verifier needs only the logits.
- otherwise, in this order:
  1. penalties over the last `repeat_last_n` tokens of the whole sequence (prompt,
     continuation and generated tokens), llama.cpp style: for a token seen c > 0 times,
     logit = logit / repeat_penalty if logit > 0 else logit * repeat_penalty, then
     logit -= c * frequency_penalty + presence_penalty (repeat_penalty <= 0 counts as 1);
  2. logits / temperature; where that overflows (a temperature so small that the largest
     scaled logit is not finite), (logits - max) / temperature instead: the same
     distribution, which tends to greedy with ties shared;
  3. top_k (k > 0): keep tokens whose logit >= the k-th largest (ties at the edge are kept);
  4. top_p (< 1): keep the smallest most-probable set whose probability reaches top_p
     (ties at the edge are kept), renormalise;
  5. min_p (> 0): keep tokens with p >= min_p * max p;
  6. draw one uniform double u from numpy's Generator(PCG64(seed)) and pick the token where
     u * total falls in the cumulative sum of kept probabilities taken in ascending token-id
     order. Exactly one draw per sampled token, so skipping n draws (`skip`) puts the
     generator where an uninterrupted run would be after n tokens.
Probabilities are computed in float64 from the float32 logits.
A constraint (engine.grammar.Grammar: a request's grammar) comes before all of this: the raw
row's disallowed tokens become -inf, then the steps above run on the masked row (greedy: the
most likely allowed token). A verifier applies the same mask to the same rows.
Non-finite logits (a broken model or a hostile row) never make sampling fail: NaN counts as
-inf; if some logits are +inf they share all the probability equally; if every logit is -inf
every token is equally likely. Any parameters SamplingParams.from_wire accepts give a token.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Selection works on block maxima first: np.partition over a 49k vocabulary costs ~0.4 ms,
# far over the per-token budget, while a max over 768 groups + a threshold scan costs ~50 us.
_BLOCK = 64


class SamplingSettings(Protocol):
    """What the sampler reads of a request's parameters: protocol.messages.SamplingParams
    fits (engine/ imports nothing of ours, so it names the shape, not the class)."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repeat_penalty(self) -> float: ...
    @property
    def repeat_last_n(self) -> int: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...


class TokenConstraint(Protocol):
    """What the sampler needs of a grammar (engine.grammar.Grammar fits)."""

    accepted: int

    def allows(self, token: int) -> bool: ...
    def accept(self, token: int) -> None: ...
    def mask(self, logits: np.ndarray) -> np.ndarray: ...


def _top_set(v: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of every element >= the k-th largest of v (ties kept)."""
    n = v.shape[0]
    if k >= n:
        return np.arange(n)
    nb = n // _BLOCK
    if nb >= k:
        # Groups are strided (element i is in group i % nb): a column max over _BLOCK rows
        # is one vectorised pass, unlike per-row maxima of short rows.
        bm = v[: nb * _BLOCK].reshape(_BLOCK, nb).max(axis=0)
        if n % _BLOCK:
            bm = np.append(bm, v[nb * _BLOCK :].max())
        # The k largest group maxima are k distinct elements, so the k-th of them is a
        # lower bound for the k-th largest element: everything above it is a candidate.
        cand = np.flatnonzero(v >= np.partition(bm, bm.shape[0] - k)[bm.shape[0] - k])
    else:
        cand = np.arange(n)
    vals = v[cand]
    kth = np.partition(vals, vals.shape[0] - k)[vals.shape[0] - k]
    top: np.ndarray = cand[vals >= kth]
    return top


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log p(token) under softmax(logits), the model's raw distribution."""
    return float(logits[token]) - _logsumexp(logits)


def top_logprobs(logits: np.ndarray, k: int, lse: float | None = None) -> list[tuple[int, float]]:
    """The k most likely tokens and their raw log-probabilities, most likely first
    (lowest id first on ties)."""
    n = logits.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    if lse is None:
        lse = _logsumexp(logits)
    idx = _top_set(logits, k)
    vals = logits[idx]
    order = np.lexsort((idx, -vals))[:k]
    return [(int(idx[i]), float(vals[i]) - lse) for i in order]


def logprob_report(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]] | None]:
    """Chosen token's logprob and (k > 0) the top-k, sharing one normaliser."""
    lse = _logsumexp(logits)
    lp = float(logits[token]) - lse
    return lp, (top_logprobs(logits, k, lse) if k > 0 else None)


def _logsumexp(logits: np.ndarray) -> float:
    m = float(logits.max())
    return m + float(np.log(np.exp(logits.astype(np.float64) - m).sum()))


class TokenSampler:
    """Picks tokens for one request. Create one per request: it owns the RNG stream."""

    def __init__(self, params: SamplingSettings, *, seed: int | None = None,
                 constraint: TokenConstraint | None = None, prompt_len: int = 0) -> None:
        """constraint: the request's grammar, fed the tokens of `history` past prompt_len
        (continuation included) that it has not seen, whatever loop calls choose()."""
        self.params = params
        self.constraint = constraint
        self.prompt_len = prompt_len
        self.greedy = params.temperature == 0.0
        s = params.seed if seed is None else seed
        # A random seed is still a seed: reporting it lets a verifier replay the draws.
        self.seed: int = s if s is not None else secrets.randbits(63)
        self._rng = None if self.greedy else np.random.Generator(np.random.PCG64(self.seed))

    def skip(self, n_tokens: int) -> None:
        """Advance the RNG past tokens another node already sampled (failover)."""
        if self._rng is not None and n_tokens > 0:
            self._rng.random(n_tokens)

    def choose(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token. `logits` is the raw float32 row (not modified); `history` is the
        sequence so far (only its last repeat_last_n tokens matter, and under a constraint,
        the tokens past the prompt). Raises engine.grammar.GrammarError if those break the
        constraint."""
        c = self.constraint
        if c is not None:
            self.sync(history)
            if self.greedy:
                # The raw argmax is the masked argmax whenever it is allowed (lowest id on
                # ties either way), which spares the full-vocabulary mask most of the time.
                best = int(np.argmax(logits))
                if c.allows(best):
                    return best
            logits = c.mask(logits)
        if self.greedy:
            return int(np.argmax(logits))
        p = self.params
        ids, probs = kept_set(scaled(logits, p, history), p)
        cum = np.cumsum(probs)
        assert self._rng is not None  # set whenever not greedy
        u = self._rng.random() * cum[-1]
        # u < total, so j is in range; the clamp only covers rounding at the very end.
        j = min(int(np.searchsorted(cum, u, side="right")), cum.shape[0] - 1)
        return int(j if ids is None else ids[j])

    def sync(self, history: Sequence[int]) -> None:
        """Feed the constraint the tokens of history past the prompt it has not seen."""
        c = self.constraint
        if c is None:
            return
        start = self.prompt_len + c.accepted
        for t in history[start:]:
            c.accept(int(t))


# Steps 1-5, shared with the verifier (entry/verify/stats.py), which must cut exactly where
# the sampler cuts.

def scaled(logits: np.ndarray, params: SamplingSettings, history: Sequence[int] = ()) -> np.ndarray:
    """Steps 1-2: the penalised logits divided by the temperature (float64, `logits` not
    modified), with a finite maximum and no NaN, so that the cuts after it always keep at
    least the most likely token."""
    x = penalized(logits, params, history)
    top = float(x.max())  # NaN anywhere makes the max NaN
    if not math.isfinite(top):
        x, top = _finite_top(x)
    t = params.temperature
    # In place: x is our own copy, and a fresh 49k-float array costs ~1 ms of page faults
    # on a busy machine, 10x the arithmetic.
    with np.errstate(over="ignore", under="ignore"):
        # Division is monotone, so max(x / t) == top / t: no second pass in the usual case,
        # and the usual case stays bit-identical to a plain x / t.
        if not math.isfinite(top / t):
            # Only an overflowing temperature gets here: the largest logit becomes exactly 0
            # and the rest fall to -inf at worst, never NaN.
            x -= top
        x /= t
    return x


def _finite_top(x: np.ndarray) -> tuple[np.ndarray, float]:
    """x with NaN as -inf and a finite maximum: +inf logits become 0 and all others -inf
    (they share the probability); an all -inf row becomes all 0 (uniform)."""
    x = np.where(np.isnan(x), -np.inf, x)
    if np.isposinf(x).any():
        return np.where(np.isposinf(x), 0.0, -np.inf), 0.0
    if np.isneginf(x).all():
        return np.zeros_like(x), 0.0
    return x, float(x.max())


def penalized(logits: np.ndarray, params: SamplingSettings, history: Sequence[int]) -> np.ndarray:
    """A float64 copy of the raw logits after the repeat/frequency/presence penalties
    (step 1; `logits` is not modified)."""
    p = params
    x = logits.astype(np.float64)
    active = p.repeat_last_n > 0 and (p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)
    if active and len(history):
        window = np.asarray(history[-p.repeat_last_n :], dtype=np.int64)
        ids, counts = np.unique(window, return_counts=True)
        ok = (ids >= 0) & (ids < x.shape[0])
        ids, counts = ids[ok], counts[ok]
        v = x[ids]
        # A tiny repeat_penalty overflows to inf on purpose: `scaled` gives +inf logits a
        # defined meaning (they share the probability).
        with np.errstate(over="ignore"):
            if p.repeat_penalty > 0.0 and p.repeat_penalty != 1.0:
                v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
            x[ids] = v - counts * p.frequency_penalty - p.presence_penalty
    return x


def kept_set(x: np.ndarray, params: SamplingSettings) -> tuple[np.ndarray | None, np.ndarray]:
    """(ascending ids, unnormalised probs) left after top_k, top_p and min_p (steps 3-5)
    for scaled logits x (from `scaled`: finite max, no NaN); ids None means the whole
    vocabulary, in order. Never empty: the most likely token always stays."""
    p = params
    ids = None
    if 0 < p.top_k < x.shape[0]:
        ids = _top_set(x, p.top_k)
        x = x[ids]
    probs = np.exp(x - x.max())
    if p.top_p < 1.0:
        sel = _nucleus(probs, p.top_p)
        ids, probs = (sel if ids is None else ids[sel]), probs[sel]
    if p.min_p > 0.0:
        # After the steps above the largest prob is still exp(0) = 1.
        sel = np.flatnonzero(probs >= p.min_p)
        ids, probs = (sel if ids is None else ids[sel]), probs[sel]
    return ids, probs


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending indices of the smallest most-probable set reaching top_p of the total,
    plus anything tied with its least probable member. probs: positive, unnormalised,
    max exactly 1."""
    target = top_p * probs.sum()
    n = probs.shape[0]
    # Each candidate set holds every element above some value, i.e. it is a prefix of
    # the descending order; if its sorted cumulative sum reaches the target, the answer
    # equals a full sort's (2-3 ms for 49k tokens) at the cost of sorting the prefix only.
    tiers = (
        lambda: _top_set(probs, min(64, n)),
        lambda: np.flatnonzero(probs >= 1e-3),
        lambda: np.flatnonzero(probs >= 1e-6),
        lambda: np.arange(n),
    )
    for tier in tiers:
        cand = tier()
        top = np.sort(probs[cand])[::-1]
        cum = np.cumsum(top)
        if cum[-1] >= target or cand.shape[0] == n:
            threshold = top[min(int(np.searchsorted(cum, target, side="left")), top.shape[0] - 1)]
            kept: np.ndarray = cand[probs[cand] >= threshold]
            return kept
    raise AssertionError("unreachable")
