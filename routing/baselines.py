"""Simple baselines the learned router is measured against (benchmarks only).

* :class:`TaskTableBaseline` -- per-task mean score of each model (shrunk towards the
  global mean). It reads each test row's ``task`` label, which a router in the field is
  never told: it is an *informed* baseline, for the benchmark comparison only.
* :class:`KnnBaseline` -- mean score of the k most similar training prompts by word
  TF-IDF cosine, with no learned model on top: what plain retrieval gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import sparse  # type: ignore[import-untyped]
from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]

from .tables import ScoreRow

__all__ = ["KnnBaseline", "TaskTableBaseline"]

FloatArray = npt.NDArray[np.float64]


def _scores(rows: Sequence[ScoreRow]) -> tuple[list[str], FloatArray]:
    models = sorted({m for r in rows for m in r.scores})
    y = np.full((len(rows), len(models)), np.nan)
    index = {m: j for j, m in enumerate(models)}
    for i, r in enumerate(rows):
        for m, v in r.scores.items():
            y[i, index[m]] = v
    return models, y


def _nan_mean_shrunk(y: FloatArray, prior: FloatArray, strength: float) -> FloatArray:
    has = np.isfinite(y)
    return np.asarray((np.where(has, y, 0.0).sum(0) + strength * prior) / (has.sum(0) + strength))


def _columns(pred: FloatArray, models: list[str], wanted: Sequence[str]) -> FloatArray:
    out = np.zeros((pred.shape[0], len(wanted)))
    for j, m in enumerate(wanted):
        out[:, j] = pred[:, models.index(m)] if m in models else 0.0
    return out


class TaskTableBaseline:
    """Per-task table: predicted quality = the model's mean score on the row's task.

    USES THE TEST ROW'S ``task`` -- an informed baseline for benchmarks, not a router.
    """

    def __init__(self, prior_strength: float = 5.0) -> None:
        self.prior_strength = prior_strength
        self.models: list[str] = []
        self._global: FloatArray = np.zeros(0)
        self._table: dict[str, FloatArray] = {}

    def fit(self, rows: Sequence[ScoreRow]) -> TaskTableBaseline:
        """Fit per-task means on rows (rows without a task share one "" task)."""
        self.models, y = _scores(rows)
        self._global = np.array([float(np.nanmean(y[:, j])) for j in range(len(self.models))])
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r.task or "", []).append(i)
        self._table = {t: _nan_mean_shrunk(y[ix], self._global, self.prior_strength) for t, ix in by_task.items()}
        return self

    def predict_rows(self, rows: Sequence[ScoreRow], models: Sequence[str]) -> FloatArray:
        """Predicted quality from each row's ``task`` (unknown task: global means)."""
        pred = np.stack([self._table.get(r.task or "", self._global) for r in rows])
        return _columns(pred, self.models, models)


class KnnBaseline:
    """k nearest training prompts by word TF-IDF cosine; their mean scores."""

    def __init__(self, k: int = 50) -> None:
        self.k = k
        self.models: list[str] = []
        self._vec = TfidfVectorizer(ngram_range=(1, 1), sublinear_tf=True, min_df=1, dtype=np.float32)
        self._x: sparse.csr_matrix = sparse.csr_matrix((0, 0))
        self._y: FloatArray = np.zeros((0, 0))
        self._global: FloatArray = np.zeros(0)

    def fit(self, rows: Sequence[ScoreRow]) -> KnnBaseline:
        """Index the training prompts."""
        self.models, self._y = _scores(rows)
        self._global = np.array([float(np.nanmean(self._y[:, j])) for j in range(len(self.models))])
        self._x = self._vec.fit_transform([r.text for r in rows])
        return self

    def predict_rows(self, rows: Sequence[ScoreRow], models: Sequence[str]) -> FloatArray:
        """Mean score of each row's k nearest training prompts (reads only text)."""
        q = self._vec.transform([r.text for r in rows])
        sims = np.asarray((q @ self._x.T).toarray(), dtype=np.float64)
        k = min(self.k, sims.shape[1])
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ys = self._y[idx]
        has = np.isfinite(ys)
        pred = np.where(has.any(1), np.where(has, ys, 0.0).sum(1) / np.maximum(has.sum(1), 1), self._global)
        return _columns(np.asarray(pred, dtype=np.float64), self.models, models)
