"""Answer scorers, the suite loader, and the shipped basic suite."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from routing.suite import (
    SuiteError,
    builtin_suite_path,
    extract_choice,
    extract_numbers,
    load_suite,
    score_answer,
)

MC_PROMPT = "Which planet is red?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer with just the letter."


@pytest.mark.parametrize("answer", ["Paris", "  paris. ", '"PARIS"', "Paris!", "**Paris**"])
def test_exact_positive(answer: str) -> None:
    assert score_answer("exact", "Paris", answer) == 1.0


@pytest.mark.parametrize("answer", ["The capital is Paris", "Pari", "", "Paris, France"])
def test_exact_negative(answer: str) -> None:
    assert score_answer("exact", "Paris", answer) == 0.0


def test_exact_alternatives() -> None:
    assert score_answer("exact", ["USA", "United States"], "united  states") == 1.0


@pytest.mark.parametrize(
    "answer",
    ["B", "(B)", "B)", "B) Mars", "B. Mars", "Answer: B", "The answer is B.", "answer is (B)",
     "**B**", "The correct option is B", "I think (B) because it is red", "Mars", "It is Mars."],
)
def test_choice_positive(answer: str) -> None:
    assert extract_choice(answer, MC_PROMPT) == "B"
    assert score_answer("choice", "B", answer, MC_PROMPT) == 1.0


@pytest.mark.parametrize("answer", ["A", "C) Jupiter", "Answer: D", "Venus", "", "A planet", "Mars or Venus"])
def test_choice_negative(answer: str) -> None:
    assert score_answer("choice", "B", answer, MC_PROMPT) == 0.0


def test_choice_does_not_read_an_article_as_a_letter() -> None:
    assert extract_choice("A planet that looks red.", MC_PROMPT) is None
    assert extract_choice("the answer is a mystery") is None


@pytest.mark.parametrize(
    ("answer", "reference"),
    [("42", 42), ("The answer is 42.", 42), ("$1,234.50", 1234.5), ("12 + 30 = 42", 42), ("-7", -7),
     ("3/4", 0.75), ("It is 0.75", "3/4"), ("seven", 7), ("42 apples", "42"), ("about 1,000,000", 1_000_000)],
)
def test_number_positive(answer: str, reference: object) -> None:
    assert score_answer("number", reference, answer) == 1.0


@pytest.mark.parametrize(
    ("answer", "reference"),
    [("41", 42), ("no idea", 42), ("", 3), ("12 and 13 and 14", 13), ("420", 42), ("4.2", 42)],
)
def test_number_negative(answer: str, reference: object) -> None:
    assert score_answer("number", reference, answer) == 0.0


def test_extract_numbers() -> None:
    assert extract_numbers("from -3 to $1,200 or 1/2, x2 and 3.5.") == [
        Fraction(-3), Fraction(1200), Fraction(1, 2), Fraction(7, 2)]


def test_regex_and_contains() -> None:
    pat = r"(?is)^(?!.*\bnegative\b).*\bpositive\b"
    assert score_answer("regex", pat, "Positive.") == 1.0
    assert score_answer("regex", pat, "Sentiment: positive") == 1.0
    assert score_answer("regex", pat, "positive or negative") == 0.0
    assert score_answer("regex", r"^\W*APPLE\W*$", "apple") == 0.0
    assert score_answer("contains", ["Buenos Aires"], "It is buenos aires.") == 1.0
    assert score_answer("contains", ["Ottawa", "Ottawa, Ontario"], "Toronto") == 0.0
    assert score_answer("contains", "cow", "A COW says moo") == 1.0
    with pytest.raises(SuiteError, match="unknown scorer"):
        score_answer("fuzzy", "x", "x")


def _suite(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "suite.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"id": "a", "task": "t", "prompt": "2+2? Answer with just the number.",
                   "reference": 4, "scorer": "number", "max_tokens": 8})


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{oops", "bad JSON"),
        (json.dumps({"task": "t", "prompt": "p", "reference": 1, "scorer": "number"}), 'missing "id"'),
        (json.dumps({"id": "b", "prompt": "p", "reference": 1, "scorer": "number"}), 'missing "task"'),
        (json.dumps({"id": "b", "task": "t", "reference": 1, "scorer": "number"}), 'neither "prompt" nor "messages"'),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "scorer": "number"}), 'missing "reference"'),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": 1, "scorer": "fuzzy"}),
         '"scorer" must be one of'),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": "many", "scorer": "number"}),
         'needs "reference" as a number'),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": "BB", "scorer": "choice"}), "one letter"),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": "(", "scorer": "regex"}), "bad regex"),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": [], "scorer": "contains"}), "list of strings"),
        (json.dumps({"id": "b", "task": "t", "prompt": "p", "reference": 1, "scorer": "number", "max_tokens": 0}),
         "max_tokens"),
        (json.dumps({"id": "a", "task": "t", "prompt": "p", "reference": 1, "scorer": "number"}), "duplicate id"),
    ],
)
def test_suite_loader_errors_name_the_line(tmp_path: Path, bad: str, needle: str) -> None:
    p = _suite(tmp_path, [GOOD, bad])
    with pytest.raises(SuiteError) as e:
        load_suite(p)
    assert str(e.value).startswith(f"{p}:2: ") and needle in str(e.value), str(e.value)


def test_suite_messages_row(tmp_path: Path) -> None:
    row = json.dumps({"id": "m", "task": "t", "messages": [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Capital of France?"}],
                      "reference": ["Paris"], "scorer": "contains"})
    (r,) = load_suite(_suite(tmp_path, [row]))
    assert r.request() == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Capital of France?"}]
    assert r.text == "Be brief.\nCapital of France?" and r.max_tokens == 64
    assert r.score("It's Paris.") == 1.0


def test_shipped_suite() -> None:
    assert builtin_suite_path().is_file()
    rows = load_suite()
    assert len(rows) >= 120
    tasks = {r.task for r in rows}
    assert len(tasks) >= 6
    for r in rows:
        assert "answer" in r.text.lower(), r.id  # every prompt states the answer format
        # the reference answer itself scores 1 (regex rows are checked by their own tests)
        if r.scorer == "number":
            assert r.score(str(r.reference)) == 1.0, r.id
        elif r.scorer == "choice":
            assert r.score(r.reference) == 1.0, r.id
        elif r.scorer in ("exact", "contains"):
            ref = r.reference if isinstance(r.reference, str) else r.reference[0]
            assert r.score(ref) == 1.0, r.id


def test_shipped_suite_regex_rows_accept_the_intended_answer() -> None:
    rows = {r.id: r for r in load_suite()}
    assert rows["sentiment-01"].score("positive") == 1.0
    assert rows["sentiment-01"].score("negative") == 0.0
    assert rows["topic-01"].score("Sports") == 1.0
    assert rows["topic-01"].score("food") == 0.0
    assert rows["string-01"].score("RIVER") == 1.0
    assert rows["string-01"].score("river") == 0.0
    assert rows["string-07"].score("pocket") == 1.0
    name = rows["extract-name-01"]
    assert name.score("Liam") == 1.0 and name.score("Brian") == 0.0
