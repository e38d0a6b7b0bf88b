"""Evaluation numbers and the ``route eval`` command on small tables written to tmp_path."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest

from routing.cli import RouteCliError, add_parser, main
from routing.evaluate import (
    apgr,
    choose_tolerance,
    cost_at_quality,
    cv_folds,
    quality_at_cost,
)
from routing.tables import ScoreRow, write_table

PRICES = {"cheap": {"input_per_mtok": 1, "output_per_mtok": 1},
          "strong": {"input_per_mtok": 10, "output_per_mtok": 10}}

EASY = ["capital", "colour", "animal", "river", "city", "fruit"]
HARD = ["theorem", "proof", "lemma", "integral", "manifold", "eigenvalue"]


def _rows(n: int, kind: str, scores: dict[str, float], seed: int, start: int = 0) -> list[ScoreRow]:
    rng = random.Random(seed)
    words = EASY if kind == "easy" else HARD
    return [ScoreRow(f"{kind}{start + i}", dict(scores), prompt=" ".join(rng.sample(words, 3)) + " question?")
            for i in range(n)]


def _write(tmp_path: Path, name: str, rows: list[ScoreRow]) -> Path:
    p = tmp_path / name
    write_table(rows, p, append=False)
    return p


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().out


def test_curve_metrics_by_hand() -> None:
    cost = np.array([0.1, 0.5, 1.0])
    quality = np.array([0.5, 0.9, 1.0])
    assert cost_at_quality(cost, quality, 0.7) == pytest.approx(0.3)  # halfway 0.1 -> 0.5
    assert cost_at_quality(cost, quality, 0.4) == pytest.approx(0.1)
    assert cost_at_quality(cost, quality, 1.01) is None
    assert quality_at_cost(cost, quality, 0.75) == pytest.approx(0.95)
    assert quality_at_cost(cost, quality, 0.05) is None
    # random mixing: a straight line recovers half the gap
    share = np.linspace(0, 1, 11)
    assert apgr(share, 0.5 + 0.5 * share, 0.5, 1.0) == pytest.approx(0.5)
    # reaching the strong model's quality at once recovers (almost) all of it
    assert apgr(np.array([0.0, 0.001, 1.0]), np.array([0.5, 1.0, 1.0]), 0.5, 1.0) == pytest.approx(1.0, abs=1e-3)
    assert apgr(share, share, 0.7, 0.7) is None


def test_tolerance_choices() -> None:
    pred = np.array([[0.9, 1.0], [0.5, 1.0]])
    prices = np.array([1.0, 10.0])
    ch = choose_tolerance(pred, prices, np.array([0.0, 0.8, 1.0]))
    assert ch.tolist() == [[0, 0], [0, 1], [1, 1]]


def test_cv_folds_keep_duplicates_together() -> None:
    rows = [ScoreRow(f"r{i}", {"m": 1.0}, prompt=f"Prompt {i % 7}") for i in range(30)]
    rows.append(ScoreRow("dup", {"m": 0.0}, prompt="  PROMPT 3 "))
    folds = cv_folds(rows, 5)
    assert sorted(i for _, te in folds for i in te) == list(range(31))
    for tr, te in folds:
        keys_tr = {" ".join(rows[i].text.casefold().split()) for i in tr}
        assert not keys_tr & {" ".join(rows[i].text.casefold().split()) for i in te}


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path, Path]:
    # the strong model is needed only on hard prompts; the cheap one suffices on easy ones
    train = _rows(60, "easy", {"cheap": 1, "strong": 1}, 1) + _rows(60, "hard", {"cheap": 0, "strong": 1}, 2)
    test = _rows(20, "easy", {"cheap": 1, "strong": 1}, 3, 100) + _rows(20, "hard", {"cheap": 0, "strong": 1}, 4, 100)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    return _write(tmp_path, "train.jsonl", train), _write(tmp_path, "test.jsonl", test), prices


def test_eval_json(capsys: pytest.CaptureFixture[str], tables: tuple[Path, Path, Path]) -> None:
    train, test, prices = tables
    rc, out = _run(capsys, ["eval", "--train", str(train), "--test", str(test), "--prices", str(prices), "--json"])
    assert rc == 0
    j = json.loads(out)
    assert set(j) == {"router", "random", "oracle", "best_single"}
    for name in ("router", "random", "oracle", "best_single"):
        assert {"cost_at_95", "quality_at_best_cost", "apgr"} <= set(j[name]), name
    assert j["best_single"]["model"] == "strong"
    # routing easy prompts to the cheap model keeps full quality at ~half the cost
    assert j["router"]["cost_at_95"] < 0.6
    assert j["router"]["quality_at_best_cost"] == pytest.approx(1.0)
    assert j["random"]["apgr"] == pytest.approx(0.5)
    # half the prompts need the strong model: a perfect router's APGR is 0.75 here
    assert j["router"]["apgr"] == pytest.approx(0.75, abs=0.02)
    assert j["oracle"]["cost_at_95"] <= j["router"]["cost_at_95"] + 1e-9
    assert isinstance(j["router"]["curve"], list)


def test_eval_table_output(capsys: pytest.CaptureFixture[str], tables: tuple[Path, Path, Path]) -> None:
    train, test, prices = tables
    rc, out = _run(capsys, ["eval", "--train", str(train), "--test", str(test), "--prices", str(prices),
                            "--sweep", "tradeoff"])
    assert rc == 0
    assert "router swept over its tradeoff setting" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "cost_at_95", "quality_at_best_cost", "apgr"]
    assert any(line.startswith("router") for line in lines)


def test_cost_at_95_is_null_when_never_reached(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Train: the cheap model wins on easy prompts, the strong one (best overall) on hard ones.
    # Test: easy prompts only, where the cheap model now always fails: the router, sure the
    # cheap model is better there, never reaches 95% of the strong model's quality.
    train = _rows(40, "easy", {"cheap": 1, "strong": 0}, 1) + _rows(60, "hard", {"cheap": 0, "strong": 1}, 2)
    test = _rows(30, "easy", {"cheap": 0, "strong": 1}, 3, 100)
    (tmp_path / "prices.json").write_text(json.dumps(PRICES))  # found beside --train
    rc, out = _run(capsys, ["eval", "--train", str(_write(tmp_path, "tr.jsonl", train)),
                            "--test", str(_write(tmp_path, "te.jsonl", test)), "--json", "--no-curves"])
    assert rc == 0
    j = json.loads(out)
    assert j["router"]["cost_at_95"] is None
    assert j["random"]["cost_at_95"] is not None
    assert "curve" not in j["router"]


def test_missing_price_names_the_model(capsys: pytest.CaptureFixture[str], tables: tuple[Path, Path, Path],
                                       tmp_path: Path) -> None:
    train, test, _ = tables
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"strong": PRICES["strong"]}))
    assert main(["eval", "--train", str(train), "--test", str(test), "--prices", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "no price for model(s) cheap" in err and len(err.strip().splitlines()) == 1


def test_errors_raise_route_cli_error(tmp_path: Path, tables: tuple[Path, Path, Path]) -> None:
    train, test, prices = tables
    parser = argparse.ArgumentParser(prog="mesh")
    add_parser(parser.add_subparsers(dest="command"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "p", "scores": {"cheap": 2}}\n')
    args = parser.parse_args(["route", "eval", "--train", str(bad), "--test", str(test), "--prices", str(prices)])
    with pytest.raises(RouteCliError, match=r"bad.jsonl:1: .*out of \[0, 1\]"):
        args.func(args)
    lone = tmp_path / "lone" / "t.jsonl"
    lone.parent.mkdir()
    lone.write_text(train.read_text())
    args = parser.parse_args(["route", "eval", "--train", str(lone), "--test", str(test)])
    with pytest.raises(RouteCliError, match="no prices: pass --prices"):
        args.func(args)


def test_fit_and_explain(capsys: pytest.CaptureFixture[str], tables: tuple[Path, Path, Path], tmp_path: Path) -> None:
    train, _, prices = tables
    out = tmp_path / "router.pkl"
    assert main(["fit", "--table", str(train), "--prices", str(prices), "--out", str(out)]) == 0
    capsys.readouterr()
    rc, text = _run(capsys, ["explain", "--router", str(out), "--prompt", "capital city fruit question?",
                             "--tolerance", "0.8", "--json"])
    assert rc == 0
    d = json.loads(text)
    assert d["model"] == "cheap" and d["best_single"] == "strong"
    rc, text = _run(capsys, ["explain", "--router", str(out), "--prompt", "theorem proof lemma question?"])
    assert rc == 0 and text.startswith("chose strong")
