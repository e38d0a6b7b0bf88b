"""Benchmark suites and answer scorers: how the mesh measures its own models.

A suite is JSON Lines, one prompt per line::

    {"id": "arith-001", "task": "arithmetic", "prompt": "What is 7 + 5? Answer with just the number.",
     "reference": 12, "scorer": "number", "max_tokens": 16}

Running a suite over the mesh's models (:func:`routing.benchmark.run_suite`) yields a score
table in the format :mod:`routing.tables` loads, so the router can be trained on the
mesh's real models rather than on someone else's. Scorers are deliberately lenient about
*format* (tiny models rarely follow "answer with just the letter") and strict about
*content*: each returns 1.0 or 0.0.

Scorers and their ``reference``:

* ``exact`` -- a string or list of strings; the whole answer must equal one after
  normalising case, whitespace and surrounding punctuation/quotes.
* ``choice`` -- one letter; the answer's letter is taken from "B", "(B)", "B) ...",
  "Answer: B", "the answer is B", or, when no letter is given, from the one option of
  the prompt whose text the answer contains.
* ``number`` -- a number (or numeric string, fractions like "3/4" allowed); the first or
  the last number in the answer must equal it (``$``, thousands commas and fractions are
  understood; relative tolerance 1e-6).
* ``regex`` -- a pattern, searched in the answer (add ``(?i)`` for case-insensitive).
* ``contains`` -- a string or list of strings; any one appearing in the answer,
  case-insensitively, scores 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from .tables import Message, messages_text, parse_input, parse_jsonl_rows

__all__ = [
    "SCORERS",
    "SuiteError",
    "SuiteRow",
    "builtin_suite_path",
    "extract_choice",
    "extract_numbers",
    "load_suite",
    "parse_suite_lines",
    "score_answer",
]

SCORER_NAMES = ("exact", "choice", "number", "regex", "contains")
DEFAULT_MAX_TOKENS = 64


class SuiteError(ValueError):
    """A suite file is malformed; the message names file, line and problem."""


@dataclass(frozen=True)
class SuiteRow:
    """One suite prompt, its reference answer and how answers are scored."""

    id: str
    task: str
    scorer: str
    reference: Any
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def text(self) -> str:
        """The routing text: the prompt, or the system/user contents joined."""
        if self.prompt is not None:
            return self.prompt
        return messages_text(self.messages or ())

    def request(self) -> str | list[dict[str, str]]:
        """What is sent to a model: the prompt string or OpenAI-style messages."""
        if self.prompt is not None:
            return self.prompt
        return [{"role": m.role, "content": m.content} for m in self.messages or ()]

    def score(self, answer: str) -> float:
        """1.0 if ``answer`` is right by this row's scorer, else 0.0."""
        return score_answer(self.scorer, self.reference, answer, self.text)


# --- normalisation and extraction -------------------------------------------------

_STRIP = " \t\r\n.,!?;:\"'`*()[]{}"


def _normalise(s: str) -> str:
    return " ".join(s.split()).strip(_STRIP).casefold()


_NUMBER_RE = re.compile(
    r"(?<![\w.])(-|−)?\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+))?(?![\w])"
)
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def extract_numbers(text: str) -> list[Fraction]:
    """Every number in ``text`` in order: ``1,234.5``, ``$12``, ``-3``, ``3/4``, ``.5``.

    When the text has no digits, small number words ("seven") count, since tiny models
    sometimes spell the answer out.
    """
    out: list[Fraction] = []
    for m in _NUMBER_RE.finditer(text):
        sign, body, denom = m.group(1), m.group(2), m.group(3)
        value = Fraction(body.replace(",", ""))
        if denom is not None:
            if int(denom) == 0:
                continue
            value /= int(denom)
        out.append(-value if sign else value)
    if not out and not any(c.isdigit() for c in text):
        for w in re.findall(r"[a-z]+", text.casefold()):
            if w in _NUMBER_WORDS:
                out.append(Fraction(_NUMBER_WORDS[w]))
    return out


def _parse_reference_number(ref: Any) -> Fraction | None:
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        return Fraction(ref)
    if isinstance(ref, float):
        return Fraction(ref) if math.isfinite(ref) else None
    if isinstance(ref, str):
        nums = extract_numbers(ref)
        return nums[0] if len(nums) == 1 else None
    return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(1, 10**6) * max(Fraction(1), abs(b))


_OPTION_RE = re.compile(r"^\s*\(?([A-J])[\).:]\s+(.+?)\s*$", re.MULTILINE)
_CHOICE_PATTERNS = (
    # "Answer: B", "answer is (B)", "correct option is B", "Answer - **B**"
    re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:|-|=)?\s*(?i:option\s*)?[\(\[*]*([A-J])\b(?![\w'])"),
    # "B", "(B)", "B)", "B.", "B:", "**B**" at the very start
    re.compile(r"^\W*?[\(\[*]*([A-J])(?:[\)\].:,*]|\s*$|\s+-|\s*\n)"),
    # a parenthesised letter anywhere: "I think (C)"
    re.compile(r"\(([A-J])\)"),
)


def extract_choice(answer: str, prompt: str = "") -> str | None:
    """The multiple-choice letter an answer gives, or ``None``.

    Tries, in order: an explicit "answer/option ... X"; a letter opening the answer
    ("B", "(B)", "B) text", "B."); a parenthesised letter; and, when the prompt lists
    options ("A. Paris" lines), the single option whose text the answer contains.
    """
    text = answer.strip()
    for pat in _CHOICE_PATTERNS:
        m = pat.search(text)
        if m:
            return str(m.group(1)).upper()
    if text and len(text) == 1 and text.upper() in "ABCDEFGHIJ":
        return text.upper()
    options: dict[str, str] = {str(letter): _normalise(str(body)) for letter, body in _OPTION_RE.findall(prompt)}
    said = _normalise(text)
    hits = [letter for letter, body in options.items() if body and re.search(
        r"(?<!\w)" + re.escape(body) + r"(?!\w)", said)]
    if len(hits) == 1:
        return hits[0]
    return None


def _as_str_list(ref: Any) -> list[str] | None:
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, list) and ref and all(isinstance(x, str) for x in ref):
        return list(ref)
    return None


def _score_exact(ref: Any, answer: str, prompt: str) -> float:
    refs = _as_str_list(ref) or []
    said = _normalise(answer)
    return float(any(said == _normalise(r) for r in refs))


def _score_choice(ref: Any, answer: str, prompt: str) -> float:
    got = extract_choice(answer, prompt)
    return float(got is not None and got == str(ref).strip().upper())


def _score_number(ref: Any, answer: str, prompt: str) -> float:
    want = _parse_reference_number(ref)
    nums = extract_numbers(answer)
    if want is None or not nums:
        return 0.0
    return float(_numbers_equal(nums[0], want) or _numbers_equal(nums[-1], want))


def _score_regex(ref: Any, answer: str, prompt: str) -> float:
    return float(re.search(str(ref), answer) is not None)


def _score_contains(ref: Any, answer: str, prompt: str) -> float:
    said = answer.casefold()
    return float(any(r.casefold() in said for r in _as_str_list(ref) or []))


SCORERS: Mapping[str, Callable[[Any, str, str], float]] = {
    "exact": _score_exact,
    "choice": _score_choice,
    "number": _score_number,
    "regex": _score_regex,
    "contains": _score_contains,
}


def score_answer(scorer: str, reference: Any, answer: str, prompt: str = "") -> float:
    """Score ``answer`` against ``reference`` with the named scorer (1.0 or 0.0)."""
    try:
        fn = SCORERS[scorer]
    except KeyError:
        raise SuiteError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORER_NAMES)}") from None
    return fn(reference, answer, prompt)


# --- loading ----------------------------------------------------------------------


def _check_reference(scorer: str, ref: Any) -> str | None:
    """What is wrong with ``ref`` for ``scorer``, or ``None``."""
    if scorer in ("exact", "contains"):
        if _as_str_list(ref) is None:
            return f'scorer "{scorer}" needs "reference" as a string or non-empty list of strings'
    elif scorer == "choice":
        if not (isinstance(ref, str) and len(ref.strip()) == 1 and ref.strip().upper() in "ABCDEFGHIJ"):
            return 'scorer "choice" needs "reference" as one letter A-J'
    elif scorer == "number":
        if _parse_reference_number(ref) is None:
            return 'scorer "number" needs "reference" as a number (or a string holding one number)'
    elif scorer == "regex":
        if not isinstance(ref, str):
            return 'scorer "regex" needs "reference" as a pattern string'
        try:
            re.compile(ref)
        except re.error as e:
            return f"bad regex in \"reference\": {e}"
    return None


def _parse_suite_row(obj: object) -> SuiteRow | str:
    if not isinstance(obj, dict):
        return "not a JSON object"
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        return 'missing "id" (a non-empty string)'
    task = obj.get("task")
    if not isinstance(task, str) or not task:
        return f'row {rid!r}: missing "task" (a non-empty string)'
    given = parse_input(obj, rid, non_empty=True)
    if isinstance(given, str):
        return given
    prompt, messages = given
    scorer = obj.get("scorer")
    if scorer not in SCORERS:
        return f'row {rid!r}: "scorer" must be one of {", ".join(SCORER_NAMES)}, got {scorer!r}'
    if "reference" not in obj:
        return f'row {rid!r}: missing "reference"'
    problem = _check_reference(str(scorer), obj["reference"])
    if problem:
        return f"row {rid!r}: {problem}"
    max_tokens = obj.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        return f'row {rid!r}: "max_tokens" must be a positive integer, got {max_tokens!r}'
    return SuiteRow(
        id=rid,
        task=task,
        scorer=str(scorer),
        reference=obj["reference"],
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
    )


def parse_suite_lines(lines: Iterable[str], source: str = "<suite>") -> list[SuiteRow]:
    """Parse suite lines (blank lines skipped); ``source`` names them in errors."""
    return parse_jsonl_rows(lines, source, _parse_suite_row, SuiteError)


def builtin_suite_path(name: str = "basic") -> Path:
    """Path of a suite shipped with the package (``routing/suites/<name>.jsonl``)."""
    return Path(str(resources.files("routing").joinpath("suites", f"{name}.jsonl")))


def load_suite(path: str | Path | None = None) -> list[SuiteRow]:
    """Load and validate a suite; ``None`` loads the shipped ``basic`` suite."""
    p = builtin_suite_path() if path is None else Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            return parse_suite_lines(f, str(p))
    except OSError as e:
        raise SuiteError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SuiteError(f"{p}: not UTF-8 text: {e.reason}") from None

