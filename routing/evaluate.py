"""Judging a router on a held-out score table: cost/quality curves and summary numbers.

The router is fitted on a train table T and routes every prompt of a test table U at each
setting of a sweep: by default the tolerance of the "cheapest good-enough model" policy,
from 0 (always the cheapest model) to 1 (the predicted best); or the weight of the
"tradeoff" policy (predicted quality minus weight * relative price). Each setting gives
one point: the mean cost and mean quality of its choices on U. The cost of a call is the chosen model's
output price per million tokens (prices are required for every candidate model).

Summary numbers, for the router, for random routing and for the per-prompt oracle:

* ``best_single``: the model with the highest mean score on T; Q* and C* are its mean
  quality and cost on U.
* ``cost_at_95``: the lowest mean cost, as a fraction of C*, at which the mean quality on
  U reaches 0.95 * Q*; ``None`` if no setting does.
* ``quality_at_best_cost``: the highest mean quality on U at mean cost <= C*.
* ``apgr`` (tables of exactly two candidate models): RouteLLM's average performance gap
  recovered: the area under quality vs share of strong-model calls, between the weak
  model's quality (0) and the strong one's (1), on U.

Between two settings the curve is interpolated linearly: sending a random fraction of
prompts to one setting and the rest to the other achieves exactly that point.

Candidates are the models scored on every test row (and on at least one train row);
models missing from some test rows are left out and listed, since a choice could not be
scored there. Only the router's fit reads T's scores; it never sees U's ``task`` or
``scores``: those are read afterwards, to score the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .baselines import KnnBaseline, TaskTableBaseline
from .router import Router, RouterConfig
from .tables import ModelPrice, ScoreRow

__all__ = [
    "CvResult",
    "EvalError",
    "EvalResult",
    "Curve",
    "MethodResult",
    "TOLERANCE_GRID",
    "apgr",
    "choose_tolerance",
    "choose_tradeoff",
    "cross_validate",
    "cv_folds",
    "evaluate_router",
    "cost_at_quality",
    "curve_for_choices",
    "evaluate_predictions",
    "oracle_choices",
    "quality_at_cost",
    "score_matrix",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Tolerances swept by the evaluation: dense near 1, where the decisions change most.
TOLERANCE_GRID: FloatArray = np.unique(
    np.concatenate([np.linspace(0.0, 1.0, 201), 1.0 - np.geomspace(1e-4, 0.2, 200)])
)
# Trade-off weights swept for the "tradeoff" policy and the oracle:
# choose argmax(quality - weight * price / max price).
TRADEOFF_GRID: FloatArray = np.concatenate([[0.0], np.geomspace(1e-4, 1e3, 400)])
SWEEPS = ("tolerance", "tradeoff")
QUALITY_FRACTION = 0.95


class EvalError(ValueError):
    """The tables cannot be evaluated (no common models, missing prices, ...)."""


@dataclass(frozen=True)
class Curve:
    """Operating points of one method on U: mean cost (fraction of C*) and mean quality."""

    cost: FloatArray
    quality: FloatArray
    strong_share: FloatArray  # share of calls to the best single model

    def points(self) -> list[list[float]]:
        """The points as ``[cost, quality, strong_share]`` triples, sorted by cost."""
        order = np.lexsort((self.quality, self.cost))
        return [
            [round(float(self.cost[i]), 6), round(float(self.quality[i]), 6), round(float(self.strong_share[i]), 6)]
            for i in order
        ]


@dataclass(frozen=True)
class MethodResult:
    """One method's summary numbers on U."""

    cost_at_95: float | None
    quality_at_best_cost: float | None
    apgr: float | None
    curve: Curve

    def to_json(self, *, with_curve: bool = True) -> dict[str, Any]:
        """JSON-ready dict; ``apgr`` is only present for two-model tables."""
        out: dict[str, Any] = {
            "cost_at_95": _round(self.cost_at_95),
            "quality_at_best_cost": _round(self.quality_at_best_cost),
        }
        if not np.isnan(self.curve.strong_share).all():
            out["apgr"] = _round(self.apgr)
        if with_curve:
            out["curve"] = _thin(self.curve.points())
        return out


@dataclass(frozen=True)
class EvalResult:
    """Everything ``mesh route eval`` reports for one train/test pair."""

    models: tuple[str, ...]
    best_single: str
    best_quality: float  # Q*: best single model's mean quality on U
    best_cost: float  # C*: its mean cost (output price per 1M tokens) on U
    weak_model: str
    methods: Mapping[str, MethodResult]
    n_test: int
    left_out: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self, *, with_curve: bool = True) -> dict[str, Any]:
        """One JSON object: a key per method plus ``best_single``."""
        out: dict[str, Any] = {name: m.to_json(with_curve=with_curve) for name, m in self.methods.items()}
        out["best_single"] = {
            "model": self.best_single,
            "quality": _round(self.best_quality),
            "cost": _round(self.best_cost),
            "cost_at_95": 1.0,
            "quality_at_best_cost": _round(self.best_quality),
            "weak_model": self.weak_model,
            "models": list(self.models),
            "left_out_models": list(self.left_out),
            "n_test": self.n_test,
        }
        if len(self.models) == 2:
            out["best_single"]["apgr"] = 1.0
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _thin(points: list[list[float]], limit: int = 60) -> list[list[float]]:
    """At most ``limit`` points of a curve (the JSON stays readable)."""
    if len(points) <= limit:
        return points
    idx = np.unique(np.linspace(0, len(points) - 1, limit).round().astype(int))
    return [points[i] for i in idx]


# --- choices ----------------------------------------------------------------------


def _price_order(pred: FloatArray, prices: FloatArray) -> IntArray:
    """Per row, the models in order of price, then of predicted quality (best first)."""
    n, m = pred.shape
    # lexsort sorts by the last key first: price ascending, then -quality ascending.
    keys = np.stack([np.broadcast_to(-pred, (n, m)), np.broadcast_to(prices, (n, m))])
    return np.asarray(np.lexsort(keys, axis=-1), dtype=np.int64)


def choose_tolerance(pred: FloatArray, prices: FloatArray, tolerances: FloatArray) -> IntArray:
    """Choices ``[len(tolerances), n_rows]``: per row the cheapest model whose predicted
    quality is >= tolerance * the row's best predicted quality (ties: the better one)."""
    order = _price_order(pred, prices)
    sorted_pred = np.take_along_axis(pred, order, axis=1)
    best = pred.max(axis=1, keepdims=True)
    out = np.empty((len(tolerances), pred.shape[0]), dtype=np.int64)
    for t, tol in enumerate(tolerances):
        ok = sorted_pred >= tol * best - 1e-12
        first = ok.argmax(axis=1)
        out[t] = order[np.arange(pred.shape[0]), first]
    return out


def choose_tradeoff(pred: FloatArray, prices: FloatArray, weights: FloatArray) -> IntArray:
    """Choices ``[len(weights), n_rows]``: per row the model maximising
    ``quality - weight * price / max price`` (ties: the cheaper one)."""
    rel = prices / max(float(prices.max()), 1e-12)
    out = np.empty((len(weights), pred.shape[0]), dtype=np.int64)
    for t, lam in enumerate(weights):
        utility = pred - lam * rel - 1e-9 * rel  # tiny tie-break towards cheaper
        out[t] = utility.argmax(axis=1)
    return out


def oracle_choices(scores: FloatArray, prices: FloatArray) -> IntArray:
    """The per-prompt oracle: the trade-off sweep on the true scores, i.e. the best
    cost/quality frontier any router could reach on these prompts."""
    return choose_tradeoff(scores, prices, TRADEOFF_GRID)


def curve_for_choices(choices: IntArray, scores: FloatArray, prices: FloatArray, best_cost: float,
                      strong: int | None) -> Curve:
    """Mean cost (fraction of ``best_cost``) and mean true quality of each sweep setting."""
    rows = np.arange(scores.shape[0])
    quality = scores[rows[None, :], choices].mean(axis=1)
    cost = prices[choices].mean(axis=1) / best_cost
    share = (choices == strong).mean(axis=1) if strong is not None else np.full(len(choices), np.nan)
    return Curve(np.asarray(cost, dtype=np.float64), np.asarray(quality, dtype=np.float64),
                 np.asarray(share, dtype=np.float64))


# --- summary numbers --------------------------------------------------------------


def _frontier(cost: FloatArray, quality: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The cost-ascending points that raise the best quality so far (Pareto frontier)."""
    order = np.lexsort((-quality, cost))
    fc: list[float] = []
    fq: list[float] = []
    for i in order:
        if not fq or quality[i] > fq[-1] + 1e-12:
            if fc and abs(cost[i] - fc[-1]) <= 1e-12:
                fq[-1] = float(quality[i])
            else:
                fc.append(float(cost[i]))
                fq.append(float(quality[i]))
    return np.asarray(fc), np.asarray(fq)


def cost_at_quality(cost: FloatArray, quality: FloatArray, target: float) -> float | None:
    """Lowest cost on the (interpolated) frontier whose quality reaches ``target``."""
    fc, fq = _frontier(cost, quality)
    if len(fq) == 0 or fq[-1] < target - 1e-12:
        return None
    i = int(np.argmax(fq >= target - 1e-12))
    if i == 0:
        return float(fc[0])
    c0, c1, q0, q1 = fc[i - 1], fc[i], fq[i - 1], fq[i]
    return float(c0 + (target - q0) * (c1 - c0) / (q1 - q0))


def quality_at_cost(cost: FloatArray, quality: FloatArray, budget: float) -> float | None:
    """Highest quality on the (interpolated) frontier at cost <= ``budget``."""
    fc, fq = _frontier(cost, quality)
    if len(fc) == 0 or fc[0] > budget + 1e-12:
        return None
    i = int(np.searchsorted(fc, budget + 1e-12, side="right")) - 1
    if i == len(fc) - 1:
        return float(fq[i])
    c0, c1, q0, q1 = fc[i], fc[i + 1], fq[i], fq[i + 1]
    return float(q0 + (budget - c0) * (q1 - q0) / (c1 - c0))


def apgr(share: FloatArray, quality: FloatArray, q_weak: float, q_strong: float) -> float | None:
    """Average performance gap recovered (RouteLLM): area under quality vs strong-call
    share on [0, 1], anchored at (0, weak) and (1, strong), normalised so the weak model
    scores 0 and the strong one 1. ``None`` when the two models are equally good."""
    if abs(q_strong - q_weak) < 1e-12:
        return None
    xs = np.concatenate([[0.0, 1.0], share])
    ys = np.concatenate([[q_weak, q_strong], quality])
    ux = np.unique(xs)
    uy = np.array([ys[xs == x].max() for x in ux])
    grid = np.linspace(0.0, 1.0, 1001)
    curve = np.interp(grid, ux, uy)
    auc = float(((curve[1:] + curve[:-1]) / 2 * np.diff(grid)).sum())
    return (auc - q_weak) / (q_strong - q_weak)


def _method(curve: Curve, q_star: float, q_weak: float, two_models: bool) -> MethodResult:
    return MethodResult(
        cost_at_95=cost_at_quality(curve.cost, curve.quality, QUALITY_FRACTION * q_star),
        quality_at_best_cost=quality_at_cost(curve.cost, curve.quality, 1.0),
        apgr=apgr(curve.strong_share, curve.quality, q_weak, q_star) if two_models else None,
        curve=curve,
    )


# --- whole evaluation -------------------------------------------------------------


def score_matrix(rows: Sequence[ScoreRow], models: Sequence[str]) -> FloatArray:
    """``[n_rows, n_models]`` scores; NaN where a row does not score a model."""
    out = np.full((len(rows), len(models)), np.nan)
    for i, r in enumerate(rows):
        for j, m in enumerate(models):
            v = r.scores.get(m)
            if v is not None:
                out[i, j] = v
    return out


def candidate_models(train: Sequence[ScoreRow], test: Sequence[ScoreRow]) -> tuple[list[str], list[str]]:
    """(models scored on every test row and some train row, the others seen anywhere)."""
    in_train = {m for r in train for m in r.scores}
    everywhere = set(test[0].scores)
    for r in test[1:]:
        everywhere &= set(r.scores)
    models = sorted(everywhere & in_train)
    seen = in_train | {m for r in test for m in r.scores}
    return models, sorted(seen - set(models))


def require_prices(models: Sequence[str], prices: Mapping[str, ModelPrice]) -> FloatArray:
    """Output prices of ``models``; :class:`EvalError` naming any model without one."""
    missing = [m for m in models if m not in prices]
    if missing:
        raise EvalError(f"no price for model(s) {', '.join(missing)}: add them to the prices file")
    return np.array([prices[m].output_per_mtok for m in models], dtype=np.float64)


def evaluate_predictions(
    train: Sequence[ScoreRow],
    test: Sequence[ScoreRow],
    prices: Mapping[str, ModelPrice],
    predictors: Mapping[str, Callable[[Sequence[ScoreRow], list[str]], FloatArray]],
    *,
    models: Sequence[str] | None = None,
    sweeps: Sequence[str] = ("tolerance",),
) -> EvalResult:
    """Evaluate routers given as ``predict(test_rows, models) -> [n_test, n_models]``
    predicted qualities (already fitted on ``train``), plus random routing and the oracle.

    Each predictor is routed with each sweep of ``sweeps`` ("tolerance": the cheapest
    model within a fraction of the best prediction; "tradeoff": the best predicted
    quality minus a weight times the relative price); the first sweep's result is named
    after the predictor, the others ``name@sweep``. ``random`` mixes the weak (cheapest)
    model with the best single one at every ratio, in expectation; ``oracle`` picks per
    prompt with the true scores.
    """
    for sweep in sweeps:
        if sweep not in SWEEPS:
            raise EvalError(f"unknown sweep {sweep!r}; expected one of {', '.join(SWEEPS)}")
    if not test:
        raise EvalError("the test table has no rows")
    if models is None:
        cand, left_out = candidate_models(train, test)
    else:
        cand, left_out = list(models), []
    if len(cand) < 2:
        raise EvalError(
            "fewer than two models are scored on every test row and in the train table"
            f" (found: {', '.join(cand) or 'none'})"
        )
    price = require_prices(cand, prices)
    y_train = score_matrix(train, cand)
    train_means = np.array([np.nanmean(y_train[:, j]) if np.isfinite(y_train[:, j]).any() else -1.0
                            for j in range(len(cand))])
    strong = int(np.lexsort((price, -train_means))[0])  # best on T; ties: cheaper
    weak = int(np.lexsort((-train_means, price))[0])  # cheapest; ties: better on T
    scores = score_matrix(test, cand)
    q_star = float(scores[:, strong].mean())
    c_star = float(price[strong])
    if c_star <= 0:
        raise EvalError(f"the best single model {cand[strong]!r} has price 0: costs cannot be compared")
    q_weak = float(scores[:, weak].mean())
    two = len(cand) == 2
    strong_idx = strong if two else None

    methods: dict[str, MethodResult] = {}
    for name, predict in predictors.items():
        pred = np.asarray(predict(test, cand), dtype=np.float64)
        for k, sweep in enumerate(sweeps):
            if sweep == "tolerance":
                choices = choose_tolerance(pred, price, TOLERANCE_GRID)
            else:
                choices = choose_tradeoff(pred, price, TRADEOFF_GRID)
            curve = curve_for_choices(choices, scores, price, c_star, strong_idx)
            methods[name if k == 0 else f"{name}@{sweep}"] = _method(curve, q_star, q_weak, two)

    ratios = np.linspace(0.0, 1.0, 101)
    rq = (1 - ratios) * q_weak + ratios * q_star
    rc = ((1 - ratios) * price[weak] + ratios * c_star) / c_star
    methods["random"] = _method(Curve(rc, rq, ratios if two else np.full(len(ratios), np.nan)), q_star, q_weak, two)

    oc = oracle_choices(scores, price)
    methods["oracle"] = _method(curve_for_choices(oc, scores, price, c_star, strong_idx), q_star, q_weak, two)

    return EvalResult(
        models=tuple(cand),
        best_single=cand[strong],
        best_quality=q_star,
        best_cost=c_star,
        weak_model=cand[weak],
        methods=methods,
        n_test=len(test),
        left_out=tuple(left_out),
    )


# --- fitting and cross-validation ---------------------------------------------------

Predictor = Callable[[Sequence[ScoreRow], list[str]], FloatArray]
Progress = Callable[[str], None]


def evaluate_router(
    train: Sequence[ScoreRow],
    test: Sequence[ScoreRow],
    prices: Mapping[str, ModelPrice],
    *,
    config: RouterConfig | None = None,
    baselines: bool = False,
    sweeps: Sequence[str] = ("tolerance",),
) -> EvalResult:
    """Fit the router on ``train`` and evaluate it on ``test`` with random and oracle;
    ``baselines`` adds the per-task table (reads test tasks) and the kNN baseline."""
    predictors: dict[str, Predictor] = {"router": Router.fit(train, prices, config).predict_rows}
    if baselines:
        predictors["task_table"] = TaskTableBaseline().fit(train).predict_rows
        predictors["knn"] = KnnBaseline().fit(train).predict_rows
    return evaluate_predictions(train, test, prices, predictors, sweeps=sweeps)


def cv_folds(rows: Sequence[ScoreRow], folds: int = 5, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """K folds of row indices; rows with the same (whitespace/case-normalised) text share
    a fold, so duplicated prompts cannot leak from train to test."""
    if folds < 2:
        raise EvalError("need at least 2 folds")
    keys = [" ".join(r.text.casefold().split()) for r in rows]
    groups = list(dict.fromkeys(keys))
    if len(groups) < folds:
        raise EvalError(f"only {len(groups)} distinct prompts: too few for {folds} folds")
    perm = np.random.RandomState(seed).permutation(len(groups))
    fold_of = {g: int(perm[i]) % folds for i, g in enumerate(groups)}
    out: list[tuple[list[int], list[int]]] = []
    for k in range(folds):
        test = [i for i, key in enumerate(keys) if fold_of[key] == k]
        train = [i for i, key in enumerate(keys) if fold_of[key] != k]
        out.append((train, test))
    return out


@dataclass(frozen=True)
class CvResult:
    """Per-fold results and their means."""

    folds: tuple[EvalResult, ...]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Mean of each method's numbers over folds. ``cost_at_95`` is averaged over the
        folds that reach 95% of Q*; ``cost_at_95_folds`` says how many did."""
        out: dict[str, dict[str, Any]] = {}
        names = list(self.folds[0].methods)
        for name in names:
            ms = [f.methods[name] for f in self.folds]
            c95 = [m.cost_at_95 for m in ms if m.cost_at_95 is not None]
            qbc = [m.quality_at_best_cost for m in ms if m.quality_at_best_cost is not None]
            ap = [m.apgr for m in ms if m.apgr is not None]
            out[name] = {
                "cost_at_95": _round(float(np.mean(c95))) if c95 else None,
                "cost_at_95_folds": f"{len(c95)}/{len(ms)}",
                "quality_at_best_cost": _round(float(np.mean(qbc))) if qbc else None,
            }
            if ap:
                out[name]["apgr"] = _round(float(np.mean(ap)))
        qs = [f.best_quality for f in self.folds]
        out["best_single"] = {
            "model": sorted({f.best_single for f in self.folds}),
            "quality": _round(float(np.mean(qs))),
            "cost": _round(float(np.mean([f.best_cost for f in self.folds]))),
            "cost_at_95": 1.0,
            "quality_at_best_cost": _round(float(np.mean(qs))),
        }
        return out


def cross_validate(
    rows: Sequence[ScoreRow],
    prices: Mapping[str, ModelPrice],
    *,
    folds: int = 5,
    config: RouterConfig | None = None,
    baselines: bool = True,
    sweeps: Sequence[str] = ("tolerance",),
    progress: Progress | None = None,
) -> CvResult:
    """K-fold cross-validation of the router (and baselines) on one table."""
    results: list[EvalResult] = []
    for k, (tr, te) in enumerate(cv_folds(rows, folds)):
        if progress:
            progress(f"fold {k + 1}/{folds}: fit on {len(tr)} rows, route {len(te)}")
        results.append(evaluate_router([rows[i] for i in tr], [rows[i] for i in te], prices,
                                       config=config, baselines=baselines, sweeps=sweeps))
    return CvResult(tuple(results))
