"""Prompt features computed locally from the text alone (nothing is downloaded).

Two views of a prompt:

* a sparse vector for linear models: word TF-IDF (1-2 grams) plus a few cheap format
  features (length, digits, upper case, lines, code and math marks, lettered options);
* a dense, L2-normalised embedding (TruncatedSVD of the word TF-IDF) for nearest
  neighbours and clusters, where "similar prompt" has to mean similar topic.

Character n-grams were tried and dropped: in cross-validation they did not improve the
routing and they tripled the fitting time and the cost of a decision. Very long prompts
are cut to their head and tail before the TF-IDF (the format features see the whole
text), which bounds the cost of a routing decision.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import numpy.typing as npt
from scipy import sparse  # type: ignore[import-untyped]
from sklearn.decomposition import TruncatedSVD  # type: ignore[import-untyped]
from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]

__all__ = ["FeatureConfig", "TextFeaturizer", "format_features"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_NO_DIGITS = str.maketrans("", "", "0123456789")
_NO_UPPER = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OPTION_LINE = re.compile(r"^\s*\(?[A-Ja-j][.)]\s", re.MULTILINE)
_CODE_MARKS = ("```", "def ", "return", "import ", "{", "};", ";\n")
_MATH_MARKS = ("=", "^", "+", "*", "/", "<", ">", "\\frac", "\\sqrt", "$")
N_FORMAT_FEATURES = 10


def format_features(texts: Sequence[str]) -> FloatArray:
    """Cheap per-prompt format features (unscaled), one row per text."""
    rows: list[tuple[float, ...]] = []
    for t in texts:
        n = max(len(t), 1)
        digits = len(t) - len(t.translate(_NO_DIGITS))
        upper = len(t) - len(t.translate(_NO_UPPER))
        rows.append((
            math.log1p(len(t)),
            math.log1p(len(t.split())),
            digits / n,
            upper / n,
            math.log1p(t.count("\n")),
            min(t.count("?"), 5),
            min(sum(t.count(m) for m in _CODE_MARKS), 20) / 20,
            min(sum(t.count(m) for m in _MATH_MARKS), 50) / 50,
            min(len(_OPTION_LINE.findall(t)), 10) / 10,
            float(t.rstrip().endswith(("?", ":"))),
        ))
    return np.array(rows, dtype=np.float64).reshape(len(texts), N_FORMAT_FEATURES)


@dataclass(frozen=True)
class FeatureConfig:
    """Feature sizes; the defaults were chosen by cross-validation on the shared tables."""

    word_features: int = 30_000
    svd_dims: int = 128
    svd_rows: int = 4_000  # the SVD is fitted on at most this many rows (a fixed sample)
    max_chars: int = 8_000  # longer prompts: head 2/3 + tail 1/3 for the TF-IDF
    format_weight: float = 0.3  # scale of the standardised format features in the sparse view


class TextFeaturizer:
    """Fitted text features: a sparse view for linear models, an embedding for neighbours."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._word = TfidfVectorizer(
            ngram_range=(1, 2), sublinear_tf=True, min_df=2,
            max_features=self.config.word_features, dtype=np.float32,
        )
        self._fmt_mean = np.zeros(N_FORMAT_FEATURES)
        self._fmt_scale = np.ones(N_FORMAT_FEATURES)
        # [vocabulary, dims]: word TF-IDF -> embedding (float32: half the memory traffic)
        self._proj: npt.NDArray[np.float32] | None = None
        # fast single-prompt path (see transform_one)
        self._vocab: dict[str, int] = {}
        self._idf: FloatArray = np.zeros(0)
        self._token_re: re.Pattern[str] | None = None

    @property
    def n_words(self) -> int:
        """Number of word/bigram features (the sparse view adds the format features)."""
        return len(self._vocab)

    def _cut(self, texts: Sequence[str]) -> list[str]:
        m = self.config.max_chars
        return [t if len(t) <= m else t[: m * 2 // 3] + "\n" + t[-(m // 3):] for t in texts]

    def fit_transform(self, texts: Sequence[str]) -> tuple[sparse.csr_matrix, FloatArray]:
        """Fit on the training texts; return their sparse view and embedding."""
        cut = self._cut(texts)
        xw = self._word.fit_transform(cut)
        fmt = format_features(texts)
        self._fmt_mean = fmt.mean(axis=0)
        std = fmt.std(axis=0)
        self._fmt_scale = np.where(std > 1e-9, std, 1.0)
        dims = min(self.config.svd_dims, max(1, min(xw.shape) - 1))
        svd = TruncatedSVD(dims, random_state=0, n_iter=3)  # not kept: _proj holds what is used
        sample = xw
        if xw.shape[0] > self.config.svd_rows:
            pick = np.random.RandomState(0).choice(xw.shape[0], self.config.svd_rows, replace=False)
            sample = xw[np.sort(pick)]
        svd.fit(sample)
        self._proj = np.ascontiguousarray(np.asarray(svd.components_, dtype=np.float32).T)
        self._vocab = self._word.vocabulary_  # shared, so a saved router holds it once
        self._word.stop_words_ = None  # the pruned terms: only for introspection, and huge
        self._idf = np.asarray(self._word.idf_, dtype=np.float64)
        emb = np.asarray(xw @ self._proj, dtype=np.float64)
        return self._stack(xw, fmt), _l2(emb)

    def _stack(self, xw: sparse.spmatrix, fmt: FloatArray) -> sparse.csr_matrix:
        f = (fmt - self._fmt_mean) / self._fmt_scale * self.config.format_weight
        return sparse.hstack([xw, sparse.csr_matrix(f)], format="csr", dtype=np.float64)

    def transform(self, texts: Sequence[str]) -> tuple[sparse.csr_matrix, FloatArray]:
        """Sparse view and embedding of new texts."""
        if self._proj is None:
            raise RuntimeError("TextFeaturizer is not fitted")
        cut = self._cut(texts)
        xw = self._word.transform(cut)
        emb = np.asarray(xw @ self._proj, dtype=np.float64)
        return self._stack(xw, format_features(texts)), _l2(emb)


    def transform_one(self, text: str) -> tuple[IntArray, FloatArray, FloatArray, FloatArray]:
        """One prompt, fast (no sparse matrices, no input validation): the word-feature
        indices and TF-IDF values, the scaled format features, and the embedding.

        Equal to :meth:`transform` of ``[text]`` up to float rounding; this is the
        routing hot path, where sklearn's per-call overhead would cost milliseconds.
        """
        if self._proj is None:
            raise RuntimeError("TextFeaturizer is not fitted")
        if self._token_re is None:
            self._token_re = re.compile(self._word.token_pattern)
        # what the fitted TfidfVectorizer does (lowercase, its token pattern, 1-2 grams),
        # counted in C by Counter rather than token by token
        toks = self._token_re.findall(self._cut([text])[0].lower())
        counts = Counter(toks)
        counts.update(map(" ".join, zip(toks, toks[1:], strict=False)))
        known = list(counts.keys() & self._vocab.keys())  # set ops and itemgetter run in C
        if known:
            pick = itemgetter(*known)
            idx = np.array(pick(self._vocab) if len(known) > 1 else [pick(self._vocab)], dtype=np.int64)
            tf = np.array(pick(counts) if len(known) > 1 else [pick(counts)], dtype=np.float64)
        else:
            idx, tf = np.zeros(0, dtype=np.int64), np.zeros(0)
        vals = (np.log(tf) + 1.0) * self._idf[idx]
        norm = float(np.sqrt(vals @ vals))
        if norm > 0:
            vals /= norm
        fmt = (format_features([text])[0] - self._fmt_mean) / self._fmt_scale * self.config.format_weight
        # einsum, not BLAS: BLAS's idle threads take milliseconds to wake up
        emb = np.einsum("i,ij->j", vals.astype(np.float32), self._proj[idx]).astype(np.float64)
        en = float(np.sqrt(emb @ emb))
        return idx, vals, fmt, emb / en if en > 1e-12 else emb


def _l2(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 1e-12, norms, 1.0), dtype=np.float64)
