"""Score tables and price files: the data a router learns from and is judged on.

A score table is JSON Lines, one object per prompt::

    {"id": "q1", "task": "mmlu/law", "prompt": "...", "scores": {"model-a": 1, "model-b": 0.5}}

``messages`` (a list of ``{"role", "content"}``) may replace ``prompt``. Scores are in
[0, 1]; rows may score different subsets of models. The loader is strict because a
silently skipped or mis-parsed row changes every number the evaluation prints: every
problem raises :class:`TableError` naming the file, the line and what is wrong.

A price file maps each model to ``{"input_per_mtok": float, "output_per_mtok": float, ...}``
(USD per million tokens); extra keys such as ``size`` are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = [
    "Message",
    "ModelPrice",
    "ScoreRow",
    "TableError",
    "load_prices",
    "load_table",
    "messages_text",
    "parse_table_lines",
    "write_table",
]

# Roles whose content says what is asked; an assistant turn is the model's own words.
_TEXT_ROLES = ("system", "user")


class TableError(ValueError):
    """A score table or price file is malformed; the message names file, line and problem."""


@dataclass(frozen=True)
class Message:
    """One chat message of a ``messages`` row."""

    role: str
    content: str


@dataclass(frozen=True)
class ScoreRow:
    """One prompt and each scored model's quality on it (in [0, 1]).

    ``task`` is kept for reporting and for the clearly labelled per-task baseline only;
    the router never reads it.
    """

    id: str
    scores: Mapping[str, float]
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    task: str | None = None

    @property
    def text(self) -> str:
        """The text a router sees: the prompt, or the system/user contents joined."""
        if self.prompt is not None:
            return self.prompt
        return messages_text(self.messages or ())

    def to_json(self) -> dict[str, Any]:
        """The row as the JSON object of its table line."""
        out: dict[str, Any] = {"id": self.id}
        if self.task is not None:
            out["task"] = self.task
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = [{"role": m.role, "content": m.content} for m in self.messages or ()]
        out["scores"] = dict(self.scores)
        return out


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens; the evaluation's cost of a call is ``output_per_mtok``."""

    input_per_mtok: float
    output_per_mtok: float


def messages_text(messages: Iterable[Message | Mapping[str, Any]]) -> str:
    """The routing text of a chat: its system and user contents joined by newlines.

    Accepts :class:`Message` objects or OpenAI-style dicts, whose ``content`` may be a
    string or a list of ``{"type": "text", "text": ...}`` parts (other parts are skipped),
    so the entry can route a request with the same text the router was trained on.
    """
    parts: list[str] = []
    for m in messages:
        role: object
        content: object
        if isinstance(m, Message):
            role, content = m.role, m.content
        else:
            role, content = m.get("role"), m.get("content")
        if role not in _TEXT_ROLES:
            continue
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
    return "\n".join(parts)


def _parse_messages(value: object) -> tuple[Message, ...] | str:
    """The messages, or a description of what is wrong with them."""
    if not isinstance(value, list) or not value:
        return '"messages" must be a non-empty list'
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f'"messages"[{i}] is not an object'
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            return f'"messages"[{i}] has no "role" string'
        if not isinstance(content, str):
            return f'"messages"[{i}] has no "content" string'
        out.append(Message(role, content))
    if not any(m.role in _TEXT_ROLES for m in out):
        return '"messages" has no system or user message'
    return tuple(out)


def parse_input(obj: Mapping[str, Any], rid: str, *, non_empty: bool
                ) -> tuple[str | None, tuple[Message, ...] | None] | str:
    """A row's input: exactly one of "prompt" (a string; ``non_empty`` for suites, which send
    it) or "messages" -> (prompt, messages), or a message naming what is wrong. Score tables
    and suites share it."""
    if "prompt" in obj and "messages" in obj:
        return f'row {rid!r}: has both "prompt" and "messages"'
    if "messages" in obj:
        parsed = _parse_messages(obj["messages"])
        if isinstance(parsed, str):
            return f"row {rid!r}: {parsed}"
        return None, parsed
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            return f'row {rid!r}: "prompt" must be a {"non-empty " if non_empty else ""}string'
        if non_empty and not prompt.strip():
            return f'row {rid!r}: "prompt" must be a non-empty string'
        return prompt, None
    return f'row {rid!r}: has neither "prompt" nor "messages"'


def _parse_row(obj: object) -> ScoreRow | str:
    """The row, or a description of what is wrong with it."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        return 'missing "id" (a non-empty string)'
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        return f'row {rid!r}: "task" must be a string'
    given = parse_input(obj, rid, non_empty=False)
    if isinstance(given, str):
        return given
    prompt, messages = given
    scores = obj.get("scores")
    if not isinstance(scores, dict):
        return f'row {rid!r}: missing "scores" (an object of model -> number)'
    if not scores:
        return f'row {rid!r}: "scores" is empty'
    clean: dict[str, float] = {}
    for model, value in scores.items():
        if not model:
            return f'row {rid!r}: "scores" has an empty model name'
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"row {rid!r}: score of {model!r} is not a number: {value!r}"
        if not 0.0 <= value <= 1.0:
            return f"row {rid!r}: score of {model!r} is out of [0, 1]: {value!r}"
        clean[model] = float(value)
    return ScoreRow(
        id=rid,
        scores=clean,
        prompt=prompt if messages is None else None,
        messages=messages,
        task=task,
    )


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_HasId)


def parse_jsonl_rows(lines: Iterable[str], source: str, parse_row: Callable[[Any], R | str],
                     error: type[Exception]) -> list[R]:
    """One JSON object per line (blank lines skipped), each parsed by ``parse_row`` (a row,
    or a message saying what is wrong); ids must be unique. Every problem raises ``error``
    naming ``source`` and the line number. Score tables and suites share this."""
    rows: list[R] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{source}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from None
        parsed = parse_row(obj)
        if isinstance(parsed, str):
            raise error(f"{source}:{lineno}: {parsed}")
        if parsed.id in seen:
            raise error(f"{source}:{lineno}: duplicate id {parsed.id!r} (first on line {seen[parsed.id]})")
        seen[parsed.id] = lineno
        rows.append(parsed)
    if not rows:
        raise error(f"{source}: no rows")
    return rows


def parse_table_lines(lines: Iterable[str], source: str = "<table>") -> list[ScoreRow]:
    """Parse score-table lines (blank lines skipped); ``source`` names them in errors."""
    return parse_jsonl_rows(lines, source, _parse_row, TableError)


def load_table(path: str | Path) -> list[ScoreRow]:
    """Load and validate a score table; raises :class:`TableError` on any malformed line."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            return parse_table_lines(f, str(p))
    except OSError as e:
        raise TableError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TableError(f"{p}: not UTF-8 text: {e.reason}") from None


def write_table(rows: Sequence[ScoreRow], path: str | Path, *, append: bool = True) -> None:
    """Write rows as score-table lines (appending by default, so runs accumulate)."""
    with Path(path).open("a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")


def load_prices(path: str | Path) -> dict[str, ModelPrice]:
    """Load a price file ``{model: {"input_per_mtok", "output_per_mtok", ...}}``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise TableError(f"{p}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{p}: bad JSON: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise TableError(f"{p}: must be a non-empty object of model -> prices")
    out: dict[str, ModelPrice] = {}
    for model, entry in obj.items():
        if not isinstance(entry, dict):
            raise TableError(f"{p}: {model!r}: must be an object")
        values: list[float] = []
        for key in ("input_per_mtok", "output_per_mtok"):
            v = entry.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TableError(f"{p}: {model!r}: {key!r} must be a non-negative number, got {v!r}")
            values.append(float(v))
        out[model] = ModelPrice(values[0], values[1])
    return out
