"""run_suite under trio: failures score 0 and are recorded; nothing is lost."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from routing.benchmark import run_suite, write_suite_table
from routing.suite import load_suite
from routing.tables import load_table


class FakeModels:
    """'good' answers every prompt right, 'bad' always says 'no idea', 'broken' raises
    on every call, and 'slow' hangs on one prompt. Tracks concurrency."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        self.answers = answers
        self.active = 0
        self.max_active = 0
        self.calls = 0

    async def complete(self, model: str, request: str | list[dict[str, str]], max_tokens: int
                       ) -> tuple[str, dict[str, Any], float]:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await trio.sleep(0)  # a real checkpoint, so calls interleave
            text = request if isinstance(request, str) else request[-1]["content"]
            if model == "broken":
                raise ConnectionError("node went away")
            if model == "slow" and "capital of France" in text:
                await trio.sleep_forever()
            answer = self.answers[text] if model in ("good", "slow") else "no idea"
            return answer, {"prompt_tokens": len(text.split()), "completion_tokens": 3}, 0.01
        finally:
            self.active -= 1


async def test_run_suite_records_failures_and_keeps_everything(tmp_path: Path) -> None:
    suite = load_suite()
    rows = [r for task in ("arithmetic", "capitals", "multiple_choice", "facts")
            for r in [r for r in suite if r.task == task][:5]]
    assert any("capital of France" in r.text for r in rows)
    assert any(r.messages is not None for r in rows)
    answers = {}
    for r in rows:
        ref = r.reference if not isinstance(r.reference, list) else r.reference[0]
        answers[r.prompt if r.prompt is not None else (r.messages or ())[-1].content] = str(ref)
    fake = FakeModels(answers)
    seen: list[tuple[int, int]] = []
    run = await run_suite(rows, ["good", "bad", "broken", "slow"], fake.complete, concurrency=3,
                          progress=lambda done, total: seen.append((done, total)), timeout_s=5.0)

    total = len(rows) * 4
    assert fake.calls == total and fake.max_active <= 3
    assert seen[-1] == (total, total) and [d for d, _ in seen] == list(range(1, total + 1))
    assert [r.id for r in run.rows] == [r.id for r in rows]  # one score row per prompt, in order
    for row in run.rows:
        assert set(row.scores) == {"good", "bad", "broken", "slow"}
        assert row.scores["good"] == 1.0 and row.scores["bad"] == 0.0 and row.scores["broken"] == 0.0
    assert len(run.answers) == total

    errors = run.errors
    assert {e.model for e in errors} == {"broken", "slow"}
    assert sum(e.model == "broken" for e in errors) == len(rows)
    assert all("ConnectionError: node went away" in (e.error or "") for e in errors if e.model == "broken")
    (slow,) = [e for e in errors if e.model == "slow"]
    assert "timed out" in (slow.error or "")

    st = run.stats
    assert st["broken"].errors == len(rows) and st["broken"].to_json()["mean_score"] == 0.0
    assert st["good"].to_json()["mean_score"] == 1.0 and st["good"].completion_tokens == 3 * len(rows)
    assert st["good"].to_json()["latency_p50_s"] == pytest.approx(0.01)

    out = tmp_path / "scores.jsonl"
    write_suite_table(run, out)
    write_suite_table(run, out, append=False)
    loaded = load_table(out)  # the written table is a valid score table
    assert [r.id for r in loaded] == [r.id for r in rows]
    assert loaded[0].task == rows[0].task


async def test_run_suite_rejects_bad_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await run_suite(load_suite()[:1], ["m"], FakeModels({}).complete, concurrency=0)
