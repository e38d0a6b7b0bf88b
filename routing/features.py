"""Prompt features computed locally from the text alone (nothing is downloaded).

Two views of a prompt:

* a sparse vector for linear models: word TF-IDF (1-2 grams), case-sensitive character
  TF-IDF (2-4 grams: catches "NOT", "EXCEPT", LaTeX, code punctuation, numbers) and a
  few cheap format features (length, digits, upper case, lines, code and math marks,
  lettered options);
* a dense, L2-normalised embedding (TruncatedSVD of the word TF-IDF) for nearest
  neighbours and clusters, where "similar prompt" has to mean similar topic.

Very long prompts are cut to their head and tail before the TF-IDF (the format features
still see the whole text), which bounds the cost of a routing decision.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

__all__ = ["FeatureConfig", "TextFeaturizer", "format_features"]

FloatArray = npt.NDArray[np.float64]

_OPTION_LINE = re.compile(r"^\s*\(?[A-Ja-j][.)]\s", re.MULTILINE)
_CODE_MARK = re.compile(r"```|\bdef |\breturn\b|\bimport |[{};]\s*$", re.MULTILINE)
_MATH_MARK = re.compile(r"[=^+*/<>]|\\frac|\\sqrt|\$")
N_FORMAT_FEATURES = 10


def format_features(texts: Sequence[str]) -> FloatArray:
    """Cheap per-prompt format features (unscaled), one row per text."""
    out = np.zeros((len(texts), N_FORMAT_FEATURES), dtype=np.float64)
    for i, t in enumerate(texts):
        n = max(len(t), 1)
        digits = sum(c.isdigit() for c in t)
        upper = sum(c.isupper() for c in t)
        out[i] = (
            np.log1p(len(t)),
            np.log1p(len(t.split())),
            digits / n,
            upper / n,
            np.log1p(t.count("\n")),
            min(t.count("?"), 5),
            min(len(_CODE_MARK.findall(t)), 20) / 20,
            min(len(_MATH_MARK.findall(t)), 50) / 50,
            min(len(_OPTION_LINE.findall(t)), 10) / 10,
            float(t.rstrip().endswith(("?", ":"))),
        )
    return out


@dataclass(frozen=True)
class FeatureConfig:
    """Feature sizes; the defaults were chosen by cross-validation on the shared tables."""

    word_features: int = 50_000
    char_features: int = 50_000
    svd_dims: int = 128
    max_chars: int = 8_000  # longer prompts: head 2/3 + tail 1/3 for the TF-IDF
    format_weight: float = 0.3  # scale of the standardised format features in the sparse view


class TextFeaturizer:
    """Fitted text features: :meth:`sparse` for linear models, :meth:`embed` for neighbours."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._word = TfidfVectorizer(
            ngram_range=(1, 2), sublinear_tf=True, min_df=2,
            max_features=self.config.word_features, dtype=np.float32,
        )
        self._char = TfidfVectorizer(
            analyzer="char", lowercase=False, ngram_range=(2, 4), sublinear_tf=True, min_df=3,
            max_features=self.config.char_features, dtype=np.float32,
        )
        self._svd = TruncatedSVD(self.config.svd_dims, random_state=0, n_iter=4)
        self._fmt_mean = np.zeros(N_FORMAT_FEATURES)
        self._fmt_scale = np.ones(N_FORMAT_FEATURES)
        self._components: FloatArray | None = None

    def _cut(self, texts: Sequence[str]) -> list[str]:
        m = self.config.max_chars
        return [t if len(t) <= m else t[: m * 2 // 3] + "\n" + t[-(m // 3):] for t in texts]

    def fit_transform(self, texts: Sequence[str]) -> tuple[sparse.csr_matrix, FloatArray]:
        """Fit on the training texts; return their sparse view and embedding."""
        cut = self._cut(texts)
        xw = self._word.fit_transform(cut)
        xc = self._char.fit_transform(cut)
        fmt = format_features(texts)
        self._fmt_mean = fmt.mean(axis=0)
        std = fmt.std(axis=0)
        self._fmt_scale = np.where(std > 1e-9, std, 1.0)
        dims = min(self.config.svd_dims, max(1, min(xw.shape) - 1))
        if dims != self._svd.n_components:
            self._svd = TruncatedSVD(dims, random_state=0, n_iter=4)
        emb = self._svd.fit_transform(xw)
        self._components = np.asarray(self._svd.components_, dtype=np.float64)
        return self._stack(xw, xc, fmt), _l2(emb)

    def _stack(self, xw: sparse.spmatrix, xc: sparse.spmatrix, fmt: FloatArray) -> sparse.csr_matrix:
        f = (fmt - self._fmt_mean) / self._fmt_scale * self.config.format_weight
        return sparse.hstack([xw, xc, sparse.csr_matrix(f)], format="csr", dtype=np.float64)

    def transform(self, texts: Sequence[str]) -> tuple[sparse.csr_matrix, FloatArray]:
        """Sparse view and embedding of new texts."""
        if self._components is None:
            raise RuntimeError("TextFeaturizer is not fitted")
        cut = self._cut(texts)
        xw = self._word.transform(cut)
        xc = self._char.transform(cut)
        emb = np.asarray(xw @ self._components.T, dtype=np.float64)
        return self._stack(xw, xc, format_features(texts)), _l2(emb)

    @property
    def n_sparse(self) -> int:
        """Width of the sparse view."""
        return len(self._word.vocabulary_) + len(self._char.vocabulary_) + N_FORMAT_FEATURES


def _l2(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 1e-12, norms, 1.0), dtype=np.float64)
