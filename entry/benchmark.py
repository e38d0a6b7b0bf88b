"""The benchmark phase: score every target model on a suite, then refit the router.

`POST /v1/mesh/benchmark` starts a run in the entry's own nursery and answers a run id;
`GET /v1/mesh/benchmark/{id}` reports progress and, once done, the summary. A run sends
each suite prompt to each target *through the entry's own HTTP API* (loopback, with the
caller's Authorization header), so it is routed, rate-limited, verified and booked like any
request. Answers are scored with routing's scorers (routing/suite.py); the score table and
per-model latency/tokens go to STATE_DIR/routing and the router is refitted from them
(entry/targets.py AutoRouting.refit). `mesh entry benchmark` is a client of these routes.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from entry.targets import AutoRouting

log = logging.getLogger("mesh.entry.benchmark")

MAX_RUNS_KEPT = 16
DEFAULT_CONCURRENCY = 4
CALL_TIMEOUT = 300.0  # seconds for one suite answer: a slow CPU node on a long prompt
BUSY_RETRIES = 60  # tries of one call answered 503 (nodes busy) or 429 before it scores 0
MAX_BUSY_WAIT = 5.0


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(MAX_BUSY_WAIT, max(0.1, float(r.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


@dataclass
class BenchmarkRun:
    id: str
    models: list[str]
    prompts: int
    total: int
    started: float = field(default_factory=time.time)
    done: int = 0
    status: str = "running"  # running | done | failed
    error: str | None = None
    summary: dict[str, Any] | None = None
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.status == "running" else None
        return {"object": "mesh.benchmark", "id": self.id, "status": self.status, "models": self.models,
                "prompts": self.prompts, "done": self.done, "total": self.total, "elapsed_s": round(elapsed, 2),
                "rate_per_s": round(rate, 3), "eta_s": None if eta is None else round(eta, 1), "error": self.error,
                "summary": self.summary}


def summarize(run, suite_rows) -> dict[str, Any]:
    """Per model: mean score, stats; per task and model: accuracy."""
    task_of = {r.id: r.task for r in suite_rows}
    per_task: dict[str, dict[str, list[float]]] = {}
    for row in run.rows:
        for m, s in row.scores.items():
            per_task.setdefault(task_of.get(row.id, "unknown"), {}).setdefault(m, []).append(s)
    return {"models": {m: st.to_json() for m, st in run.stats.items()},
            "tasks": {t: {m: round(sum(v) / len(v), 4) for m, v in per.items()} for t, per in sorted(per_task.items())},
            "errors": [{"id": a.row_id, "model": a.model, "error": a.error} for a in run.errors[:20]],
            "error_count": len(run.errors)}


class BenchmarkRunner:
    """Runs benchmark jobs in its own nursery (started next to the HTTP server)."""

    def __init__(self, auto: AutoRouting):
        self.auto = auto
        self.runs: dict[str, BenchmarkRun] = {}
        self.base_url: str | None = None  # the entry's own API, set once it listens
        self._nursery: trio.Nursery | None = None

    async def serve(self, base_url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.base_url = base_url
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, suite_rows: list, models: list[str], authorization: str | None, concurrency: int) -> BenchmarkRun:
        if self._nursery is None or self.base_url is None:
            raise RuntimeError("the benchmark runner is not serving")
        if any(r.status == "running" for r in self.runs.values()):
            raise BenchmarkBusy("a benchmark is already running; wait for it (GET /v1/mesh/benchmark/{id})")
        run = BenchmarkRun(secrets.token_hex(8), models, len(suite_rows), len(suite_rows) * len(models))
        for old in sorted(self.runs.values(), key=lambda r: r.started)[:max(0, len(self.runs) - MAX_RUNS_KEPT + 1)]:
            del self.runs[old.id]
        self.runs[run.id] = run
        self._nursery.start_soon(self._run, run, suite_rows, authorization, concurrency)
        return run

    async def _run(self, run: BenchmarkRun, suite_rows: list, authorization: str | None, concurrency: int) -> None:
        from routing import run_suite

        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=CALL_TIMEOUT) as http:

                async def complete(model: str, request, max_tokens: int):
                    messages = [{"role": "user", "content": request}] if isinstance(request, str) else request
                    for _ in range(BUSY_RETRIES):
                        t0 = time.perf_counter()
                        r = await http.post("/v1/chat/completions", json={
                            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
                        latency = time.perf_counter() - t0
                        # Busy nodes or the caller's rate limit: a wait helps, and a 0 would
                        # teach the router that the model cannot answer.
                        if r.status_code not in (429, 503):
                            break
                        await trio.sleep(_retry_after(r))
                    if r.status_code != 200:
                        try:
                            msg = r.json()["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            msg = r.text[:200]
                        raise RuntimeError(f"HTTP {r.status_code}: {msg}")
                    body = r.json()
                    return body["choices"][0]["message"]["content"] or "", body.get("usage") or {}, latency

                def progress(done: int, total: int) -> None:
                    run.done = done

                result = await run_suite(suite_rows, run.models, complete, concurrency=concurrency,
                                         progress=progress, timeout_s=CALL_TIMEOUT)
            summary = summarize(result, suite_rows)
            stats = {m: st.to_json() for m, st in result.stats.items()}
            status = await trio.to_thread.run_sync(self.auto.refit, result.rows, stats)
            summary["router"] = status.to_json()
            run.summary, run.status = summary, "done"
            log.info("benchmark %s done: %d answers, %d errors", run.id, run.total, summary["error_count"])
        except Exception as e:  # noqa: BLE001 - a failed run is reported, the entry goes on
            log.exception("benchmark %s failed", run.id)
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            run.finished = time.time()


class BenchmarkBusy(Exception):
    pass
