"""Score-table and price-file loading: strict, with file and line in every error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routing.tables import (
    Message,
    ScoreRow,
    TableError,
    load_prices,
    load_table,
    messages_text,
    write_table,
)


def _write(tmp_path: Path, lines: list[str], name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"id": "a", "task": "t", "prompt": "hello", "scores": {"m1": 1, "m2": 0.5}})


def test_loads_prompt_and_messages_rows(tmp_path: Path) -> None:
    msg = json.dumps({"id": "b", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi?"},
                                              {"role": "assistant", "content": "ignored"}],
                      "scores": {"m1": 0}})
    rows = load_table(_write(tmp_path, [GOOD, "", msg]))
    assert [r.id for r in rows] == ["a", "b"]
    assert rows[0].text == "hello" and rows[0].task == "t"
    assert rows[0].scores == {"m1": 1.0, "m2": 0.5}
    assert rows[1].text == "Be brief.\nHi?"  # system + user, not the assistant turn
    assert rows[1].task is None


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", "bad JSON"),
        ('["a list"]', "not a JSON object"),
        (json.dumps({"prompt": "x", "scores": {"m": 1}}), 'missing "id"'),
        (json.dumps({"id": "", "prompt": "x", "scores": {"m": 1}}), 'missing "id"'),
        (json.dumps({"id": "x", "scores": {"m": 1}}), 'neither "prompt" nor "messages"'),
        (json.dumps({"id": "x", "prompt": 3, "scores": {"m": 1}}), '"prompt" must be a string'),
        (json.dumps({"id": "x", "messages": [], "scores": {"m": 1}}), "non-empty list"),
        (json.dumps({"id": "x", "messages": [{"role": "user"}], "scores": {"m": 1}}), '"content"'),
        (json.dumps({"id": "x", "prompt": "p"}), 'missing "scores"'),
        (json.dumps({"id": "x", "prompt": "p", "scores": {}}), '"scores" is empty'),
        (json.dumps({"id": "x", "prompt": "p", "scores": {"m": 1.5}}), "out of [0, 1]"),
        (json.dumps({"id": "x", "prompt": "p", "scores": {"m": -0.1}}), "out of [0, 1]"),
        (json.dumps({"id": "x", "prompt": "p", "scores": {"m": "high"}}), "not a number"),
        (json.dumps({"id": "x", "prompt": "p", "scores": {"m": True}}), "not a number"),
        (json.dumps({"id": "x", "prompt": "p", "scores": {"m": None}}), "not a number"),
        (json.dumps({"id": "a", "prompt": "p", "scores": {"m": 1}}), "duplicate id 'a' (first on line 1)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, needle: str) -> None:
    p = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(TableError) as e:
        load_table(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: "), msg
    assert needle in msg, msg


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no rows"):
        load_table(_write(tmp_path, ["", "  "]))
    with pytest.raises(TableError, match="cannot read"):
        load_table(tmp_path / "nope.jsonl")


def test_write_then_load_roundtrip(tmp_path: Path) -> None:
    rows = [ScoreRow("a", {"m": 1.0}, prompt="p", task="t"),
            ScoreRow("b", {"m": 0.25}, messages=(Message("user", "q"),))]
    p = tmp_path / "out.jsonl"
    write_table(rows[:1], p)
    write_table(rows[1:], p)  # appends
    assert load_table(p) == rows


def test_messages_text_accepts_openai_parts() -> None:
    text = messages_text([
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": "no"},
    ])
    assert text == "S\nA"


def test_prices(tmp_path: Path) -> None:
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"a": {"input_per_mtok": 1, "output_per_mtok": 2.5, "size": "7B"}}))
    prices = load_prices(p)
    assert prices["a"].output_per_mtok == 2.5 and prices["a"].input_per_mtok == 1.0
    p.write_text(json.dumps({"a": {"input_per_mtok": 1}}))
    with pytest.raises(TableError, match="'a': 'output_per_mtok' must be a non-negative number"):
        load_prices(p)
    p.write_text("{")
    with pytest.raises(TableError, match="bad JSON"):
        load_prices(p)
