"""The learned router on synthetic tables whose right answers are known by construction."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from routing.router import Policy, Router, RoutingError, fit_router, load_router
from routing.tables import ScoreRow

MATH = ["integral", "equation", "derivative", "polynomial", "matrix", "logarithm", "algebra", "fraction"]
OTHER = ["poem", "novel", "painting", "history", "museum", "melody", "theatre", "castle"]
FILLER = ["please", "explain", "the", "following", "carefully", "about", "this", "topic", "for", "me"]
PRICES = {"mathy": 1.0, "wordy": 1.0, "big": 10.0}


def _prompt(rng: random.Random, words: list[str]) -> str:
    picked = rng.sample(words, 3) + rng.sample(FILLER, 4)
    rng.shuffle(picked)
    return " ".join(picked) + "?"


def synthetic_rows(n: int = 240, seed: int = 1) -> list[ScoreRow]:
    """'mathy' is right only on math prompts, 'wordy' only on the others, 'big' always."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        is_math = i % 2 == 0
        text = _prompt(rng, MATH if is_math else OTHER)
        scores = {"mathy": float(is_math), "wordy": float(not is_math), "big": 1.0}
        rows.append(ScoreRow(f"r{i}", scores, prompt=text, task="math" if is_math else "other"))
    return rows


@pytest.fixture(scope="module")
def router() -> Router:
    return Router.fit(synthetic_rows(), PRICES)


MATH_Q = "explain the integral of this polynomial equation please"
OTHER_Q = "explain the history of this museum painting please"
ALL = ["mathy", "wordy", "big"]


def test_predicts_the_constructed_qualities(router: Router) -> None:
    q = router.predict_one(MATH_Q)
    assert q["mathy"] > 0.7 > q["wordy"]
    q = router.predict_one(OTHER_Q)
    assert q["wordy"] > 0.7 > q["mathy"]
    assert router.predict_one(MATH_Q)["big"] > 0.9


def test_fast_single_prompt_path_matches_the_batch_path(router: Router) -> None:
    texts = [MATH_Q, OTHER_Q, "", "UPPER case Ünïcode words words words?\nA. one\nB. two",
             " ".join([MATH_Q] * 2000)]  # long: cut to head and tail the same way
    batch = router.predict(texts)
    for i, t in enumerate(texts):
        one = router.predict_one(t)
        np.testing.assert_allclose([one[m] for m in router.models], batch[i], atol=1e-6)


def test_cheapest_within_tolerance(router: Router) -> None:
    assert router.route(MATH_Q, ALL, Policy.cheapest_within(0.8)).model == "mathy"
    assert router.route(OTHER_Q, ALL, Policy.cheapest_within(0.8)).model == "wordy"
    # tolerance 1: nothing but the best predicted quality will do
    assert router.route(MATH_Q, ALL, Policy.cheapest_within(1.0)).model == "big"


def test_available_allow_and_deny(router: Router) -> None:
    assert router.route(MATH_Q, ["wordy", "big"], Policy.cheapest_within(0.8)).model == "big"
    assert router.route(MATH_Q, ALL, Policy.cheapest_within(0.8, deny=["mathy"])).model == "big"
    d = router.route(MATH_Q, ALL, Policy.cheapest_within(0.8, allow=["wordy"]))
    assert d.model == "wordy"
    assert d.excluded == {"mathy": "not in the allow list", "big": "not in the allow list"}
    d = router.route(MATH_Q, ["mathy", "brand-new"], Policy.cheapest_within(0.8))
    assert d.model == "mathy" and "brand-new" in d.excluded
    with pytest.raises(RoutingError, match="no candidate model"):
        router.route(MATH_Q, ["brand-new"], Policy())
    with pytest.raises(RoutingError, match="no candidate model"):
        router.route(MATH_Q, ALL, Policy.cheapest_within(0.9, deny=ALL))


def test_cost_cap(router: Router) -> None:
    assert router.route(MATH_Q, ALL, Policy.best_under_cap(100.0)).model == "big"
    assert router.route(MATH_Q, ALL, Policy.best_under_cap(5.0)).model == "mathy"
    assert router.route(OTHER_Q, ALL, Policy.best_under_cap(5.0)).model == "wordy"
    d = router.route(OTHER_Q, ALL, Policy.cheapest_within(1.0, max_price=5.0))
    assert d.model == "wordy" and "over the cap" in d.excluded["big"]
    with pytest.raises(RoutingError, match="no candidate"):
        router.route(MATH_Q, ALL, Policy.best_under_cap(0.5))
    with pytest.raises(RoutingError, match="needs max_price"):
        Policy(mode="best_under_cap")
    with pytest.raises(RoutingError, match="tolerance"):
        Policy.cheapest_within(1.5)


def test_tradeoff_policy(router: Router) -> None:
    assert router.route(MATH_Q, ALL, Policy.trade_off(0.0)).model == "big"  # best prediction
    assert router.route(MATH_Q, ALL, Policy.trade_off(0.5)).model == "mathy"
    assert router.route(OTHER_Q, ALL, Policy.trade_off(0.5)).model == "wordy"
    d = router.route(OTHER_Q, ALL, Policy.trade_off(0.5))
    assert "weight 0.5" in d.explain() and d.to_json()["policy"]["weight"] == 0.5
    with pytest.raises(RoutingError, match="weight"):
        Policy.trade_off(-1.0)


def test_missing_price_is_an_error_naming_the_model(router: Router) -> None:
    unpriced = Router.fit(synthetic_rows(60), {"mathy": 1.0})
    with pytest.raises(RoutingError, match="no price for model.*big"):
        unpriced.route(MATH_Q, ALL, Policy())
    # prices per call fill the gap
    assert unpriced.route(MATH_Q, ALL, Policy.cheapest_within(0.8), prices=PRICES).model == "mathy"


def test_decision_explains_itself(router: Router) -> None:
    d = router.route(MATH_Q, ALL, Policy.cheapest_within(0.8))
    assert d.predicted_best in ("mathy", "big")
    assert d.best_single == "big"  # best mean score on the training table
    assert d.cost_vs_best_single == pytest.approx(0.1)
    assert set(d.predicted) == set(ALL)
    text = d.explain()
    assert "chose mathy" in text and "big" in text and "10%" in text
    j = d.to_json()
    assert j["model"] == "mathy" and j["cost_vs_best_single"] == pytest.approx(0.1)


def test_missing_scores_are_skipped_when_fitting() -> None:
    rows = synthetic_rows(200)
    # 'big' is scored only on every other math prompt: it must still be predicted.
    thinned = [ScoreRow(r.id, {m: v for m, v in r.scores.items() if m != "big" or i % 4 == 0},
                        prompt=r.prompt) for i, r in enumerate(rows)]
    r = Router.fit(thinned, PRICES)
    assert set(r.models) == set(ALL)
    assert r.predict_one(OTHER_Q)["big"] > 0.5


def test_fractional_scores_fit_as_soft_labels() -> None:
    rows = [ScoreRow(r.id, {"mathy": 0.8 if r.task == "math" else 0.2, "big": 0.5}, prompt=r.prompt, task=r.task)
            for r in synthetic_rows(200)]
    r = Router.fit(rows, PRICES)
    q_math, q_other = r.predict_one(MATH_Q), r.predict_one(OTHER_Q)
    assert q_math["mathy"] > q_other["mathy"]
    assert abs(q_math["big"] - 0.5) < 0.1


def test_save_load_roundtrip(router: Router, tmp_path: Path) -> None:
    p = tmp_path / "router.pkl"
    router.save(p)
    loaded = load_router(p)
    texts = [MATH_Q, OTHER_Q, "something else entirely"]
    np.testing.assert_allclose(loaded.predict(texts), router.predict(texts))
    assert loaded.route(MATH_Q, ALL, Policy.cheapest_within(0.8)).model == "mathy"
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(RoutingError, match="not a router file"):
        load_router(tmp_path / "junk.pkl")
    with pytest.raises(RoutingError, match="cannot read"):
        load_router(tmp_path / "missing.pkl")


def test_fit_router_from_files(tmp_path: Path) -> None:
    from routing.tables import write_table

    table = tmp_path / "t.jsonl"
    write_table(synthetic_rows(80), table, append=False)
    prices = tmp_path / "p.json"
    prices.write_text('{"mathy": {"input_per_mtok": 1, "output_per_mtok": 1},'
                      ' "wordy": {"input_per_mtok": 1, "output_per_mtok": 1},'
                      ' "big": {"input_per_mtok": 10, "output_per_mtok": 10}}')
    r = fit_router(table, prices)
    assert r.prices == PRICES and r.n_train == 80


def test_a_router_file_of_an_older_format_is_refused_clearly(router: Router, tmp_path: Path) -> None:
    """Version 1 files predate the question-shape features: their featurizer would fail
    mid-decision, so loading says to refit instead."""
    import pickle

    import routing.router as rr

    p = tmp_path / "old.pkl"
    p.write_bytes(pickle.dumps({"format": "inference-mesh-router", "version": 1, "router": router}))
    assert rr._FORMAT_VERSION == 2
    with pytest.raises(RoutingError, match=r"router format version 1, expected 2: refit it"):
        load_router(p)
