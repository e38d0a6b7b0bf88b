"""Prompt features computed locally from the text alone (nothing is downloaded).

Two views of a prompt:

* a sparse vector for linear models: word TF-IDF (1-2 grams) plus a few cheap format
  features (length, digits, upper case, lines, code and math marks, lettered options)
  and question-shape features (:func:`shape_features`: how long the answer options
  are and whether they are numbers, negated questions ("NOT", "EXCEPT"), "all of the
  above", Roman-numeral combinations, numbers and arithmetic, calculation verbs,
  passage length before the question line). Topic words say which models know a
  field; the shape says how hard a question of that field is to answer, which words
  do not. Both are generic to question formats, not to one benchmark's rows;
* a dense, L2-normalised embedding (TruncatedSVD of the word TF-IDF) for nearest
  neighbours and clusters, where "similar prompt" has to mean similar topic.

Tried and dropped (5-fold CV on both shared tables, see routing/router.py): character
n-grams (char_wb 2-5, hashed) did not improve the routing and made fitting ~20x slower;
IDF statistics of the words (obscure words, names, years) did not help either. Very long prompts
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

__all__ = ["FeatureConfig", "TextFeaturizer", "dense_features", "format_features", "shape_features"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_NO_DIGITS = str.maketrans("", "", "0123456789")
_NO_UPPER = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OPTION_LINE = re.compile(r"^\s*\(?[A-Ja-j][.)]\s", re.MULTILINE)
_CODE_MARKS = ("```", "def ", "return", "import ", "{", "};", ";\n")
_MATH_MARKS = ("=", "^", "+", "*", "/", "<", ">", "\\frac", "\\sqrt", "$")
N_FORMAT_FEATURES = 10
# question shape (see shape_features); word sets and plain substring counts, not
# alternations of \b-anchored regexes, which cost ~20 ms on a 2,000-token prompt
_OPTION = re.compile(r"^[ \t]*\(?[A-Ja-j][.):][ \t]*(.*)$", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z]+")
_DIGITS = re.compile(r"\d+")
_ARITH = re.compile(r"\d\s*[-+*/^×÷=]\s*\d")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_UNIT = re.compile(r"\d\s*(?:%|\$|kg|km|cm|mm|m/s|mol|J|N|W|V|Hz|K|°)")
_NEG_UPPER = frozenset({"NOT", "EXCEPT", "LEAST", "FALSE", "INCORRECT", "NEVER"})
_NEG = frozenset({"not", "except", "least", "false", "incorrect", "never", "cannot", "untrue"})
_CALC = frozenset({"calculate", "compute", "find", "solve", "evaluate", "determine", "estimate", "probability"})
_CALC_PHRASES = ("how many", "how much", "what is the value")
_JUDGE = frozenset({"why", "explain", "likely", "primarily", "mainly", "most", "best"})
_ALL_OF = ("all of the above", "none of the above", "both of the above", "neither of the above",
           "all of the following", "none of the following", "all of these", "none of these")
_ROMAN = ("i and ii", "ii and iii", "i and iii", "i, ii", "i only", "ii only", "iii only", "iv only")
N_SHAPE_FEATURES = 20
SHAPE_TAIL_CHARS = 2_000


def _numeric(option: str) -> bool:
    o = option.strip()
    return bool(o) and sum(c.isdigit() for c in o) / len(o) > 0.3


def _count_in(words: list[str], vocab: frozenset[str]) -> int:
    return sum(1 for w in words if w in vocab)


def shape_features(texts: Sequence[str]) -> FloatArray:
    """Question-shape features (unscaled), one row per text: answer options (count,
    mean/max length, spread, share numeric), stem and passage length, negation,
    "all of the above", Roman-numeral combinations, numbers, arithmetic, calculation
    and judgement words, units, "Statement 1" pairs, a question mark on the last line.
    Lengths count the whole text; the rest reads its last ``SHAPE_TAIL_CHARS``."""
    rows: list[tuple[float, ...]] = []
    for text in texts:
        # The question and its options close a prompt: the regex work reads the tail
        # only, so a decision costs the same on a long passage; lengths use the whole.
        t = text[-SHAPE_TAIL_CHARS:]
        first = _OPTION.search(t)
        options = _OPTION.findall(t, first.start()) if first else []
        lens = [len(o.split()) for o in options]
        stem = t[: first.start()] if first else t
        full_stem = text[: len(text) - len(t) + len(stem)].strip()
        # words, about: str.split on a long passage costs more than the rest together
        n_stem = full_stem.count(" ") + full_stem.count("\n") + 1 if full_stem else 0
        stem_low = stem.lower()
        stem_words = _WORD.findall(stem_low)
        lines = [ln for ln in stem.strip().split("\n") if ln.strip()]
        last = lines[-1] if lines else ""
        last_words = len(last.split())
        mean_len = sum(lens) / len(lens) if lens else 0.0
        spread = (float(np.std(lens)) / (mean_len + 1)) if lens else 0.0
        low = t.lower()
        rows.append((
            math.log1p(len(options)),
            math.log1p(mean_len),
            math.log1p(max(lens)) if lens else 0.0,
            spread,
            sum(map(_numeric, options)) / len(options) if options else 0.0,
            math.log1p(n_stem),
            math.log1p(last_words),
            math.log1p(max(n_stem - last_words, 0)),  # the passage before the question line
            math.log1p(len(_SENTENCE_END.findall(stem))),
            min(_count_in(_WORD.findall(t), _NEG_UPPER), 3),
            min(_count_in(stem_words, _NEG), 5),
            float(any(p in low for p in _ALL_OF)),
            float(any(p in low for p in _ROMAN)),
            math.log1p(len(_DIGITS.findall(t))),
            math.log1p(len(_ARITH.findall(t))),
            min(_count_in(stem_words, _CALC) + sum(stem_low.count(p) for p in _CALC_PHRASES), 3),
            min(_count_in(stem_words, _JUDGE), 3),
            math.log1p(len(_UNIT.findall(t))),
            float("statement 1" in low or "statement i" in low),
            float("?" in last),
        ))
    return np.array(rows, dtype=np.float64).reshape(len(texts), N_SHAPE_FEATURES)


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


def dense_features(texts: Sequence[str], cut: Sequence[str] | None = None) -> FloatArray:
    """Format features of ``texts`` and question-shape features of ``cut`` (the same
    texts, long ones cut to bound the regex work; default: ``texts``), side by side."""
    return np.hstack([format_features(texts), shape_features(texts if cut is None else cut)])


@dataclass(frozen=True)
class FeatureConfig:
    """Feature sizes; the defaults were chosen by cross-validation on the shared tables."""

    word_features: int = 30_000
    svd_dims: int = 128
    svd_rows: int = 4_000  # the SVD is fitted on at most this many rows (a fixed sample)
    max_chars: int = 8_000  # longer prompts: head 2/3 + tail 1/3 for the TF-IDF
    format_weight: float = 0.3  # scale of the standardised format and shape features in the sparse view


class TextFeaturizer:
    """Fitted text features: a sparse view for linear models, an embedding for neighbours."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._word = TfidfVectorizer(
            ngram_range=(1, 2), sublinear_tf=True, min_df=2,
            max_features=self.config.word_features, dtype=np.float32,
        )
        self._fmt_mean = np.zeros(N_FORMAT_FEATURES + N_SHAPE_FEATURES)
        self._fmt_scale = np.ones(N_FORMAT_FEATURES + N_SHAPE_FEATURES)
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
        fmt = dense_features(texts, cut)
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
        return self._stack(xw, dense_features(texts, cut)), _l2(emb)


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
        cut = self._cut([text])[0]
        toks = self._token_re.findall(cut.lower())
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
        fmt = (dense_features([text], [cut])[0] - self._fmt_mean) / self._fmt_scale * self.config.format_weight
        # einsum, not BLAS: BLAS's idle threads take milliseconds to wake up
        emb = np.einsum("i,ij->j", vals.astype(np.float32), self._proj[idx]).astype(np.float64)
        en = float(np.sqrt(emb @ emb))
        return idx, vals, fmt, emb / en if en > 1e-12 else emb


def _l2(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 1e-12, norms, 1.0), dtype=np.float64)
