"""The learned router: predicts each model's quality on a prompt from its text, then picks.

Why this design: a routing decision must cost a few milliseconds on a CPU and must keep
working on prompts unlike the training tables, so the router is an average of three
small, differently-biased predictors over local text features (:mod:`routing.features`):

* ``linear`` -- per-model ridge regression of the score on sparse word TF-IDF, format
  and question-shape features (answer options, negation, numbers, passage length: see
  :mod:`routing.features`); the words say which models know a field, the shape how
  hard a question of it is to answer;
* ``neighbours`` -- similarity-weighted mean score of the k most similar training
  prompts (cosine over the SVD embedding), shrunk towards the model's global mean;
* ``clusters`` -- the Avengers idea: KMeans clusters of the embedding, each with its
  per-model mean score, shrunk towards the global mean.

Averaging them was better in 5-fold cross-validation than any one alone, and none of them
reads a prompt's ``task``: the router only ever sees text. A model missing from some
training rows is fitted on the rows that score it.

What else was tried (5-fold CV on both shared tables, two fold seeds; cost_at_95 moves
by up to 0.025 on MMLU between fold seeds, so only larger changes count) and left out,
because no idea moved MMLU's cost_at_95 out of 0.44-0.47 and none helped both tables:
logistic regression ("which models are right", soft labels for fractional scores, in
place of or beside ridge: the same within noise, 3x slower to fit on nine models); for
the two MMLU models, a joint four-outcome classifier (P(only the strong one right) -
P(only the weak one right); within noise, and it does not extend to nine models) and a
direct classifier of "only the strong one is right" (worse: 0.51);
hashed character n-grams (char_wb 2-5: no better, ~20x slower to fit); IDF statistics
of the words (obscure words, names, years: no better); histogram gradient boosting on
the SVD embedding plus format and shape features (at most 0.01 better in the average,
but 30-140 s to fit a fold on a loaded 2-core host, over the one-minute budget); weights for the
three predictors other than equal (even weights picked on the test folds themselves
gained < 0.015: a stacking fit cannot gain more); other neighbour counts, similarity
powers and priors. The per-prompt oracle is at 0.10: what separates a question the
strong model alone answers from one both or neither answer is mostly not in these
surface features.

Choosing (:class:`Policy`): the cheapest candidate whose predicted quality is at least
``tolerance`` times the best predicted quality; or the best predicted quality among
candidates priced at most ``max_price``; or the best predicted quality minus a weight
times the relative price. Candidates are the models available now, minus
the deny list, within the allow list, that the router was trained on.

A fitted router is saved with :meth:`Router.save` and loaded with :func:`load_router`;
both use pickle, so **only load router files you trust** (loading one runs its code).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import sklearn  # type: ignore[import-untyped]
from scipy import sparse  # type: ignore[import-untyped]
from sklearn.cluster import KMeans  # type: ignore[import-untyped]
from sklearn.linear_model import Ridge  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from .features import FeatureConfig, TextFeaturizer
from .tables import ModelPrice, ScoreRow, load_prices, load_table

__all__ = [
    "Decision",
    "Policy",
    "Router",
    "RouterConfig",
    "RoutingError",
    "fit_router",
    "load_router",
]

FloatArray = npt.NDArray[np.float64]
_FORMAT = "inference-mesh-router"
_FORMAT_VERSION = 2  # 2: question-shape features in the sparse view (v1 files lack them)


class RoutingError(ValueError):
    """No decision can be made (no candidate model, a missing price, a bad file...)."""


# --- policy and decision ----------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How to trade predicted quality for price.

    ``mode="cheapest_within"``: the cheapest candidate whose predicted quality is >=
    ``tolerance`` * the best candidate's (0.95: give up at most 5% of quality).
    ``mode="best_under_cap"``: the best predicted quality among candidates whose output
    price per 1M tokens is <= ``max_price``.
    ``mode="tradeoff"``: the candidate maximising predicted quality minus ``weight`` *
    its price / the dearest candidate's price (``weight`` 0.1: paying the top price must
    buy at least 0.1 of predicted quality). With several price tiers this was the
    better policy in cross-validation (scripts/bench_routing.py); with two models they tie.
    ``max_price`` caps every mode when set. ``allow`` (if given) and ``deny`` filter the
    candidates by model name.
    """

    mode: Literal["cheapest_within", "best_under_cap", "tradeoff"] = "cheapest_within"
    tolerance: float = 0.95
    max_price: float | None = None
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    weight: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("cheapest_within", "best_under_cap", "tradeoff"):
            raise RoutingError(f"unknown policy mode {self.mode!r}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise RoutingError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if not self.weight >= 0.0:
            raise RoutingError(f"weight must be >= 0, got {self.weight}")
        if self.mode == "best_under_cap" and self.max_price is None:
            raise RoutingError('policy "best_under_cap" needs max_price')
        if self.max_price is not None and not self.max_price >= 0:
            raise RoutingError(f"max_price must be >= 0, got {self.max_price}")

    @classmethod
    def cheapest_within(cls, tolerance: float = 0.95, *, allow: Iterable[str] | None = None,
                        deny: Iterable[str] = (), max_price: float | None = None) -> Policy:
        """Policy (a): cheapest model within ``tolerance`` of the best predicted quality."""
        return cls("cheapest_within", tolerance, max_price,
                   None if allow is None else frozenset(allow), frozenset(deny))

    @classmethod
    def best_under_cap(cls, max_price: float, *, allow: Iterable[str] | None = None,
                       deny: Iterable[str] = ()) -> Policy:
        """Policy (b): best predicted quality among models priced <= ``max_price``."""
        return cls("best_under_cap", 1.0, max_price,
                   None if allow is None else frozenset(allow), frozenset(deny))

    @classmethod
    def trade_off(cls, weight: float, *, allow: Iterable[str] | None = None, deny: Iterable[str] = (),
                  max_price: float | None = None) -> Policy:
        """Policy (c): maximise predicted quality - ``weight`` * relative price."""
        return cls("tradeoff", 1.0, max_price, None if allow is None else frozenset(allow),
                   frozenset(deny), weight)


@dataclass(frozen=True)
class Decision:
    """A routing decision and why it was made."""

    model: str
    predicted: Mapping[str, float]  # predicted quality of every candidate
    predicted_best: str  # the candidate with the highest predicted quality
    best_single: str | None  # the candidate best on the training table overall
    price: float | None  # chosen model's output price per 1M tokens
    best_single_price: float | None
    excluded: Mapping[str, str]  # available model -> why it was not a candidate
    policy: Policy

    @property
    def cost_vs_best_single(self) -> float | None:
        """Chosen price / the best single model's price (None without prices)."""
        if self.price is None or not self.best_single_price:
            return None
        return self.price / self.best_single_price

    def explain(self) -> str:
        """A few human-readable lines: choice, predictions, and cost vs best single."""
        knob = (f"weight {self.policy.weight:g}" if self.policy.mode == "tradeoff"
                else f"tolerance {self.policy.tolerance:g}")
        lines = [f"chose {self.model} ({self.policy.mode}, {knob}"
                 + (f", max price {self.policy.max_price:g}" if self.policy.max_price is not None else "")
                 + ")"]
        lines.append(f"predicted best: {self.predicted_best}; best single model on training data: {self.best_single}")
        ratio = self.cost_vs_best_single
        if ratio is not None:
            lines.append(f"price {self.price:g} vs best single {self.best_single_price:g} per 1M tokens ({ratio:.0%})")
        for m, q in sorted(self.predicted.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {m:40s} predicted quality {q:.3f}{'  <- chosen' if m == self.model else ''}")
        for m, why in sorted(self.excluded.items()):
            lines.append(f"  {m:40s} not a candidate: {why}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of the decision."""
        return {
            "model": self.model,
            "predicted": {m: round(q, 6) for m, q in self.predicted.items()},
            "predicted_best": self.predicted_best,
            "best_single": self.best_single,
            "price": self.price,
            "best_single_price": self.best_single_price,
            "cost_vs_best_single": self.cost_vs_best_single,
            "excluded": dict(self.excluded),
            "policy": {"mode": self.policy.mode, "tolerance": self.policy.tolerance,
                       "weight": self.policy.weight, "max_price": self.policy.max_price,
                       "allow": None if self.policy.allow is None else sorted(self.policy.allow),
                       "deny": sorted(self.policy.deny)},
        }


# --- the learned predictor --------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Hyper-parameters; the defaults were picked by 5-fold CV on the shared tables and
    kept round, to generalise rather than fit those rows."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    components: tuple[str, ...] = ("linear", "neighbours", "clusters")
    linear_alpha: float = 3.0  # L2 strength of the ridge regressions
    neighbours: int = 100
    neighbour_prior: float = 5.0  # pseudo-weight of the global mean per 100 neighbours
    clusters: int = 48
    cluster_prior: float = 10.0  # pseudo-count of the global mean in a cluster's mean
    cluster_restarts: int = 2
    seed: int = 0


def _fit_linear(x: sparse.csr_matrix, y: FloatArray, alpha: float) -> tuple[FloatArray, FloatArray]:
    """(coef ``[features, models]``, intercept ``[models]``) of ridge regressions of each
    model's score on the sparse features, each on the rows that score that model. Models
    scored on the same rows share one multi-output fit."""
    n_models = y.shape[1]
    coef = np.zeros((x.shape[1], n_models))
    intercept = np.zeros(n_models)
    groups: dict[bytes, list[int]] = {}
    for j in range(n_models):
        groups.setdefault(np.isfinite(y[:, j]).tobytes(), []).append(j)
    for cols in groups.values():
        has = np.isfinite(y[:, cols[0]])
        target = y[has][:, cols]
        if int(has.sum()) < 2 or float(np.ptp(target)) == 0.0:
            intercept[cols] = target.mean(axis=0) if len(target) else 0.5
            continue
        model = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-4).fit(x[has], target)
        coef[:, cols] = np.asarray(model.coef_, dtype=np.float64).reshape(len(cols), -1).T
        intercept[cols] = np.asarray(model.intercept_, dtype=np.float64).reshape(len(cols))
    return coef, intercept


class Router:
    """Predicts each known model's quality on a prompt and routes by :class:`Policy`.

    Build with :meth:`fit` (or :func:`fit_router` from files), persist with :meth:`save`
    and :func:`load_router`. Thread-safe for concurrent :meth:`route` calls after fitting.
    """

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.models: tuple[str, ...] = ()
        self.prices: dict[str, float] = {}
        self.train_means: dict[str, float] = {}
        self.n_train = 0
        self._feat = TextFeaturizer(self.config.features)
        self._coef: FloatArray = np.zeros((0, 0))
        self._intercept: FloatArray = np.zeros(0)
        self._emb: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)
        self._y: FloatArray = np.zeros((0, 0))  # training scores, NaN where missing
        self._centers: FloatArray = np.zeros((0, 0))
        self._cluster_means: FloatArray = np.zeros((0, 0))
        self._global: FloatArray = np.zeros(0)

    # fitting

    @classmethod
    def fit(cls, rows: Sequence[ScoreRow], prices: Mapping[str, ModelPrice | float] | None = None,
            config: RouterConfig | None = None) -> Router:
        """Fit on score-table rows (only their text and scores are read).

        ``prices`` (output price per 1M tokens, or :class:`ModelPrice`) are kept for
        routing; they can also be given per :meth:`route` call.
        """
        if len(rows) < 2:
            raise RoutingError("need at least two training rows")
        r = cls(config)
        r.models = tuple(sorted({m for row in rows for m in row.scores}))
        y = np.full((len(rows), len(r.models)), np.nan)
        index = {m: j for j, m in enumerate(r.models)}
        for i, row in enumerate(rows):
            for m, v in row.scores.items():
                y[i, index[m]] = v
        r._y = y
        r._global = np.array([float(np.nanmean(y[:, j])) for j in range(len(r.models))])
        r.train_means = dict(zip(r.models, r._global.tolist(), strict=True))
        r.n_train = len(rows)
        r.set_prices(prices or {})
        # One BLAS/OpenMP thread: the dense steps are small, and extra threads only
        # oversubscribe a host that is also serving (measured: 2x the CPU time when busy).
        with threadpool_limits(limits=1):
            r._fit_models([row.text for row in rows], y)
        return r

    def _fit_models(self, texts: list[str], y: FloatArray) -> None:
        r, cfg = self, self.config
        x, emb = r._feat.fit_transform(texts)
        r._emb = np.ascontiguousarray(emb, dtype=np.float32)  # half the memory traffic per decision
        if "linear" in cfg.components:
            r._coef, r._intercept = _fit_linear(x, y, cfg.linear_alpha)
        if "clusters" in cfg.components:
            k = max(1, min(cfg.clusters, len(texts) // 30))  # >= 30 rows a cluster on average
            km = KMeans(k, random_state=cfg.seed, n_init=cfg.cluster_restarts).fit(emb)
            r._centers = np.asarray(km.cluster_centers_, dtype=np.float64)
            means = np.empty((k, len(r.models)))
            for c in range(k):
                sel = y[km.labels_ == c]
                has = np.isfinite(sel)
                means[c] = (np.where(has, sel, 0.0).sum(0) + cfg.cluster_prior * r._global) / (
                    has.sum(0) + cfg.cluster_prior)
            r._cluster_means = means

    def set_prices(self, prices: Mapping[str, ModelPrice | float]) -> None:
        """Set or update output prices per 1M tokens used by the policies."""
        for m, p in prices.items():
            self.prices[m] = float(p.output_per_mtok if isinstance(p, ModelPrice) else p)

    # predicting

    def _components(self, x: sparse.csr_matrix | None, emb: FloatArray, single: bool = False
                    ) -> list[FloatArray]:
        """Each component's predictions for the rows of ``emb`` (and ``x``, the sparse
        view; without it the linear part is left to the caller). ``single``: one row, on
        the hot path, where numpy's einsum beats BLAS, whose idle threads take
        milliseconds to wake."""
        cfg = self.config
        out: list[FloatArray] = []
        if "linear" in cfg.components and x is not None:
            out.append(np.clip(np.asarray(x @ self._coef) + self._intercept, 0.0, 1.0))
        if "neighbours" in cfg.components:
            # small tables: a fixed share of the rows, not half of them
            k = max(1, min(cfg.neighbours, len(self._emb) // 20 or 1))
            e32 = emb.astype(np.float32)
            sims = np.einsum("ij,j->i", self._emb, e32[0])[None, :] if single else e32 @ self._emb.T
            idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            w = np.maximum(np.take_along_axis(sims, idx, axis=1), 0.0) ** 2
            ys = self._y[idx]  # [n, k, models]
            has = np.isfinite(ys)
            num = np.einsum("nk,nkm->nm", w, np.where(has, ys, 0.0))
            den = np.einsum("nk,nkm->nm", w, has.astype(np.float64))
            prior = cfg.neighbour_prior * k / 100  # the same share of the weight at any k
            out.append((num + prior * self._global) / (den + prior))
        if "clusters" in cfg.components:
            dots = np.einsum("ij,j->i", self._centers, emb[0])[None, :] if single else emb @ self._centers.T
            d = (self._centers ** 2).sum(1)[None, :] - 2.0 * dots
            out.append(self._cluster_means[d.argmin(axis=1)])
        return out

    def predict(self, texts: Sequence[str]) -> FloatArray:
        """Predicted quality ``[len(texts), len(self.models)]`` (columns: ``self.models``)."""
        if not self.models:
            raise RoutingError("the router is not fitted")
        x, emb = self._feat.transform(texts)
        parts = self._components(x, emb)
        return np.asarray(np.mean(parts, axis=0), dtype=np.float64)

    def _predict_fast(self, text: str) -> FloatArray:
        """:meth:`predict` of one text on the fast feature path (the routing hot path)."""
        if not self.models:
            raise RoutingError("the router is not fitted")
        cfg = self.config
        idx, vals, fmt, emb = self._feat.transform_one(text)
        parts: list[FloatArray] = []
        if "linear" in cfg.components:
            n_words = self._feat.n_words
            z = (np.einsum("i,ij->j", vals, self._coef[idx]) + np.einsum("i,ij->j", fmt, self._coef[n_words:])
                 + self._intercept)
            parts.append(np.clip(z, 0.0, 1.0))
        parts.extend(r[0] for r in self._components(None, emb[None, :], single=True))
        return np.asarray(np.mean(parts, axis=0), dtype=np.float64)

    def predict_rows(self, rows: Sequence[ScoreRow], models: Sequence[str]) -> FloatArray:
        """Predicted quality of ``models`` on rows (reads only each row's text)."""
        pred = self.predict([r.text for r in rows])
        index = {m: j for j, m in enumerate(self.models)}
        cols = [index[m] if m in index else -1 for m in models]
        out = pred[:, [max(c, 0) for c in cols]]
        out[:, [i for i, c in enumerate(cols) if c < 0]] = 0.0
        return out

    def predict_one(self, text: str) -> dict[str, float]:
        """Predicted quality of every known model on one prompt (the fast path)."""
        return dict(zip(self.models, self._predict_fast(text).tolist(), strict=True))

    # routing

    def route(self, text: str, available: Iterable[str], policy: Policy | None = None,
              prices: Mapping[str, float] | None = None) -> Decision:
        """Pick a model for ``text`` among ``available`` (the models reachable now).

        ``prices`` (output price per 1M tokens) override the router's for this call.
        Raises :class:`RoutingError` when no candidate remains or a needed price is missing.
        """
        policy = policy or Policy()
        price_of = dict(self.prices)
        if prices:
            price_of.update({m: float(p) for m, p in prices.items()})
        known = set(self.models)
        excluded: dict[str, str] = {}
        cands: list[str] = []
        for m in dict.fromkeys(available):
            if m not in known:
                excluded[m] = "not in the router's training data"
            elif m in policy.deny:
                excluded[m] = "denied"
            elif policy.allow is not None and m not in policy.allow:
                excluded[m] = "not in the allow list"
            elif policy.max_price is not None and m not in price_of:
                excluded[m] = "no price (a cost cap is set)"
            elif policy.max_price is not None and price_of[m] > policy.max_price:
                excluded[m] = f"price {price_of[m]:g} over the cap {policy.max_price:g}"
            else:
                cands.append(m)
        if not cands:
            raise RoutingError("no candidate model: " + (
                "; ".join(f"{m}: {why}" for m, why in excluded.items()) or "none available"))
        if policy.mode != "best_under_cap" and len(cands) > 1:
            unpriced = [m for m in cands if m not in price_of]
            if unpriced:
                raise RoutingError(f"no price for model(s) {', '.join(unpriced)}: cannot weigh cost")
        q = self.predict_one(text)
        pred = {m: q[m] for m in cands}
        best = max(cands, key=lambda m: (pred[m], -price_of.get(m, 0.0)))
        if policy.mode == "cheapest_within":
            floor = policy.tolerance * pred[best] - 1e-12
            ok = [m for m in cands if pred[m] >= floor]
            chosen = min(ok, key=lambda m: (price_of.get(m, 0.0), -pred[m]))
        elif policy.mode == "tradeoff":
            top = max(max(price_of.get(m, 0.0) for m in cands), 1e-12)
            chosen = max(cands, key=lambda m: (pred[m] - policy.weight * price_of.get(m, 0.0) / top,
                                               -price_of.get(m, 0.0)))
        else:
            chosen = best
        single = max(cands, key=lambda m: (self.train_means[m], -price_of.get(m, 0.0)))
        return Decision(
            model=chosen,
            predicted=pred,
            predicted_best=best,
            best_single=single,
            price=price_of.get(chosen),
            best_single_price=price_of.get(single),
            excluded=excluded,
            policy=policy,
        )

    # persistence

    def save(self, path: str | Path) -> None:
        """Write the fitted router to ``path`` (pickle; load only trusted files)."""
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "sklearn": sklearn.__version__,
                   "router": self}
        Path(path).write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def load_router(path: str | Path) -> Router:
    """Load a router written by :meth:`Router.save`.

    Uses pickle: **only load files you trust**, such as ones you fitted yourself; a
    crafted file runs arbitrary code when loaded.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RoutingError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        payload = pickle.load(io.BytesIO(data))
    except Exception as e:  # unpickling can fail in many ways on a foreign file
        raise RoutingError(f"{p}: not a router file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise RoutingError(f"{p}: not a router file")
    if payload.get("version") != _FORMAT_VERSION:
        raise RoutingError(f"{p}: router format version {payload.get('version')}, expected {_FORMAT_VERSION}: refit it")
    router = payload.get("router")
    if not isinstance(router, Router):
        raise RoutingError(f"{p}: not a router file")
    return router


def fit_router(table: str | Path | Sequence[ScoreRow],
               prices: str | Path | Mapping[str, ModelPrice | float] | None = None,
               config: RouterConfig | None = None) -> Router:
    """Fit a router from a score-table file (or rows) and an optional prices file (or map)."""
    rows = load_table(table) if isinstance(table, (str, Path)) else table
    price_map = load_prices(prices) if isinstance(prices, (str, Path)) else prices
    return Router.fit(rows, price_map, config)
