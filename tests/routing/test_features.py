"""Prompt features: the question-shape features read what they claim to, cheaply."""

from __future__ import annotations

import numpy as np

from routing.features import N_SHAPE_FEATURES, SHAPE_TAIL_CHARS, FeatureConfig, TextFeaturizer, shape_features

NAMES = ["options", "option_words", "option_words_max", "option_spread", "options_numeric", "stem_words",
         "question_words", "passage_words", "sentences", "neg_upper", "neg", "all_of", "roman", "numbers",
         "arithmetic", "calc", "judge", "units", "statements", "question_mark"]

MC = ("Which of the following is NOT a prime number?\n"
      "A. 2\nB. 3\nC. 9\nD. 11\nAnswer:")
WORDY = ("Read the passage. The treaty was signed after long talks between the two courts.\n"
         "Why did the envoy most likely leave early?\n"
         "(A) He was recalled by the king for reasons the passage never states in full detail\n"
         "(B) All of the above\n(C) Both I and II only\n(D) He fell ill")


def named(text: str) -> dict[str, float]:
    assert len(NAMES) == N_SHAPE_FEATURES
    return dict(zip(NAMES, shape_features([text])[0].tolist(), strict=True))


def test_shape_features_read_options_negation_and_numbers() -> None:
    mc, wordy = named(MC), named(WORDY)
    assert mc["options"] == wordy["options"] == np.log1p(4)
    assert mc["options_numeric"] == 1.0 and wordy["options_numeric"] == 0.0
    assert mc["neg_upper"] == 1 and mc["neg"] == 1 and wordy["neg_upper"] == 0
    assert wordy["option_words_max"] > mc["option_words_max"]
    assert wordy["all_of"] == 1.0 and wordy["roman"] == 1.0 and mc["all_of"] == 0.0
    assert wordy["passage_words"] > 0 and mc["passage_words"] == 0
    assert wordy["judge"] >= 2 and mc["question_mark"] == 1.0
    calc = named("Calculate 12 * 7 + 3 = ? How many of the 40 kg are left?")
    assert calc["calc"] == 2 and calc["arithmetic"] > 0 and calc["units"] > 0 and calc["options"] == 0


def test_shape_features_of_plain_and_empty_text() -> None:
    assert not shape_features([""]).any()
    plain = named("write a haiku about autumn")
    assert plain["options"] == 0 and plain["numbers"] == 0 and plain["stem_words"] == np.log1p(5)


def test_a_long_passage_only_changes_the_length_features() -> None:
    """The regexes read the prompt's tail, so a decision costs the same on any passage;
    the question and options at the end are read alike."""
    long = "The committee met again. " * (4 * SHAPE_TAIL_CHARS // 25) + "\n" + MC
    short, big = named(MC), named(long)
    lengths = {"stem_words", "passage_words", "sentences", "numbers"}
    assert big["passage_words"] > short["passage_words"]
    assert {k: v for k, v in big.items() if k not in lengths} == {k: v for k, v in short.items() if k not in lengths}


def test_the_sparse_view_carries_the_shape_features() -> None:
    texts = [MC, WORDY, "write a haiku about autumn", "Calculate 12 * 7 + 3 = ?"] * 3
    feat = TextFeaturizer(FeatureConfig(svd_dims=2))
    x, _ = feat.fit_transform(texts)
    assert x.shape[1] == feat.n_words + 10 + N_SHAPE_FEATURES
    idx, vals, fmt, _ = feat.transform_one(WORDY)
    np.testing.assert_allclose(fmt, feat.transform([WORDY])[0].toarray()[0, feat.n_words:], atol=1e-6)
