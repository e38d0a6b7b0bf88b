"""Run a benchmark suite over models and produce a score table the router can learn from.

The mesh calls its models through whatever transport it has; this module only needs an
injected async ``complete(model, prompt_or_messages, max_tokens)`` returning
``(text, usage, latency_s)``, so it runs the same against the real mesh, a local engine
or a test fake. A call that raises (or times out) scores 0 and is recorded as an error:
one bad node never aborts a run or loses the other results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .suite import SuiteRow
from .tables import ScoreRow, write_table

__all__ = ["AnswerRecord", "Complete", "ModelStats", "SuiteRun", "run_suite", "write_suite_table"]

Request = str | list[dict[str, str]]
Complete = Callable[[str, Request, int], Awaitable[tuple[str, Mapping[str, Any], float]]]
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class AnswerRecord:
    """One model's answer to one suite prompt."""

    row_id: str
    model: str
    answer: str
    score: float
    latency_s: float | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class ModelStats:
    """Per-model totals over a suite run."""

    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    score_sum: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Summary: mean score, error count, tokens and latency p50/mean."""
        lat = self.latencies_s
        return {
            "calls": self.calls,
            "errors": self.errors,
            "mean_score": round(self.score_sum / self.calls, 4) if self.calls else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_p50_s": round(statistics.median(lat), 4) if lat else None,
            "latency_mean_s": round(statistics.fmean(lat), 4) if lat else None,
        }


@dataclass
class SuiteRun:
    """What :func:`run_suite` returns: score-table rows, every answer, per-model stats."""

    rows: list[ScoreRow]
    answers: list[AnswerRecord]
    stats: dict[str, ModelStats]

    @property
    def errors(self) -> list[AnswerRecord]:
        """The calls that failed (each scored 0)."""
        return [a for a in self.answers if a.error is not None]


def _tokens(usage: Mapping[str, Any], key: str) -> int:
    v = usage.get(key, 0)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


async def run_suite(
    suite_rows: Sequence[SuiteRow],
    models: Sequence[str],
    complete: Complete,
    *,
    concurrency: int = 4,
    progress: ProgressFn | None = None,
    timeout_s: float | None = None,
) -> SuiteRun:
    """Ask every model every suite prompt (at most ``concurrency`` calls at once) and score
    the answers. Returns one score-table row per prompt with a score for every model
    (failed calls score 0 and appear in ``SuiteRun.errors``), plus per-model stats.
    ``progress(done, total)`` is called after each call; ``timeout_s`` bounds each call.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    models = list(dict.fromkeys(models))
    total = len(suite_rows) * len(models)
    limiter = trio.CapacityLimiter(concurrency)
    results: dict[tuple[int, str], AnswerRecord] = {}
    done = 0

    async def one(i: int, row: SuiteRow, model: str) -> None:
        nonlocal done
        async with limiter:
            started = trio.current_time()
            record: AnswerRecord
            try:
                with trio.fail_after(math.inf if timeout_s is None else timeout_s):
                    text, usage, latency = await complete(model, row.request(), row.max_tokens)
                if not isinstance(text, str):
                    raise TypeError(f"complete() returned {type(text).__name__}, not str")
                record = AnswerRecord(row.id, model, text, row.score(text), float(latency),
                                      _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens"))
            except trio.TooSlowError:
                record = AnswerRecord(row.id, model, "", 0.0, trio.current_time() - started, 0, 0,
                                      f"timed out after {timeout_s:g} s")
            except Exception as e:  # a failing model or node must not abort the run
                record = AnswerRecord(row.id, model, "", 0.0, None, 0, 0, f"{type(e).__name__}: {e}")
        results[(i, model)] = record
        done += 1
        if progress is not None:
            progress(done, total)

    async with trio.open_nursery() as nursery:
        for i, row in enumerate(suite_rows):
            for model in models:
                nursery.start_soon(one, i, row, model)

    stats = {m: ModelStats() for m in models}
    answers: list[AnswerRecord] = []
    rows: list[ScoreRow] = []
    for i, row in enumerate(suite_rows):
        scores: dict[str, float] = {}
        for model in models:
            rec = results[(i, model)]
            answers.append(rec)
            scores[model] = rec.score
            st = stats[model]
            st.calls += 1
            st.score_sum += rec.score
            st.prompt_tokens += rec.prompt_tokens
            st.completion_tokens += rec.completion_tokens
            if rec.error is not None:
                st.errors += 1
            elif rec.latency_s is not None:
                st.latencies_s.append(rec.latency_s)
        rows.append(ScoreRow(id=row.id, scores=scores, prompt=row.prompt, messages=row.messages, task=row.task))
    return SuiteRun(rows, answers, stats)


def write_suite_table(run: SuiteRun, path: str | Path, *, append: bool = True) -> None:
    """Append (or write) the run's score-table rows to ``path`` for the router to fit on."""
    write_table(run.rows, path, append=append)
