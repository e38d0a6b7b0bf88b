"""Routing benchmark: 5-fold cross-validation of the router on the shared score tables.

For each table (``mmlu_train.jsonl``: two models; ``open9_train.jsonl``: nine), fits the
router on four folds and routes the fifth, and prints cost_at_95 and
quality_at_best_cost (means over the folds) for: the router, random routing, the
per-prompt oracle, the best single model, the per-task table (an informed baseline: it
reads each test prompt's task label) and a plain kNN baseline. Then measures the latency
of one routing decision on a ~2,000-token prompt (p50/p99 over many decisions).

    python scripts/bench_routing.py [--tables DIR] [--json PATH] [--folds 5]

``--tables`` defaults to ``../shared/routing`` relative to the repository root. Progress
goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from routing.evaluate import cross_validate  # noqa: E402
from routing.router import Policy, Router  # noqa: E402
from routing.tables import load_prices, load_table  # noqa: E402

TABLES = ("mmlu_train.jsonl", "open9_train.jsonl")
METHODS = ("router", "random", "oracle", "best_single", "task_table", "knn")
LABELS = {
    "router": "router",
    "random": "random",
    "oracle": "oracle (per prompt)",
    "best_single": "best single model",
    "task_table": "per-task table*",
    "knn": "kNN baseline",
}


def log(msg: str) -> None:
    print(f"[bench_routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def long_prompt(rows_text: list[str], tokens: int = 2000) -> str:
    """A ~``tokens``-token prompt (about 0.75 words a token) stitched from real prompts."""
    words: list[str] = []
    i = 0
    while len(words) < int(tokens * 0.75):
        words.extend(rows_text[i % len(rows_text)].split())
        i += 1
    return " ".join(words[: int(tokens * 0.75)])


def latency(router: Router, prompt: str, n: int = 500) -> dict[str, Any]:
    """p50/p99 milliseconds of ``router.route`` on one prompt over every model: wall
    clock, and this thread's CPU time (what the decision costs when the host is busy)."""
    policy = Policy.cheapest_within(0.95)
    models = list(router.models)
    for _ in range(20):  # warm-up
        router.route(prompt, models, policy)
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        router.route(prompt, models, policy)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
    def pct(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)), 3)

    return {"p50_ms": pct(wall, 50), "p99_ms": pct(wall, 99), "cpu_p50_ms": pct(cpu, 50),
            "cpu_p99_ms": pct(cpu, 99), "n": n, "prompt_chars": len(prompt),
            "models": len(models), "train_rows": router.n_train, "load_avg_1min": round(os.getloadavg()[0], 2)}


def fmt(x: Any) -> str:
    if x is None:
        return "never"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=Path, default=ROOT.parent / "shared" / "routing",
                    help="folder with the score tables and prices.json (default: ../shared/routing)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    if not (args.tables / "prices.json").is_file():
        print(f"error: no prices.json in {args.tables} (pass --tables DIR)", file=sys.stderr)
        return 2
    prices = load_prices(args.tables / "prices.json")
    started = time.time()
    results: dict[str, Any] = {}
    lat: dict[str, float] | None = None
    for name in TABLES:
        path = args.tables / name
        if not path.is_file():
            log(f"skipping {name}: not in {args.tables}")
            continue
        rows = load_table(path)
        log(f"{name}: {len(rows)} rows, {args.folds}-fold cross-validation")
        t0 = time.time()
        cv = cross_validate(rows, prices, folds=args.folds, baselines=True, sweeps=("tolerance", "tradeoff"),
                            progress=lambda m: log(f"  {m}"))
        results[name] = cv.summary()
        results[name]["seconds"] = round(time.time() - t0, 1)
        if lat is None:
            log("latency: fitting on the whole table, then timing decisions on a ~2,000-token prompt")
            t1 = time.time()
            router = Router.fit(rows, prices)
            results[name]["fit_seconds_full_table"] = round(time.time() - t1, 1)
            lat = latency(router, long_prompt([r.text for r in rows]))
    out: dict[str, Any] = {"tables": results, "decision_latency_2000_tokens": lat,
                           "seconds": round(time.time() - started, 1)}

    for name, summary in results.items():
        two = "apgr" in summary["router"]
        print(f"\n{name}: {args.folds}-fold CV, means over folds; cost_at_95 as a fraction of the best single "
              "model's cost (never: 95% of its quality not reached)")
        print(f"{'':22s} {'tolerance sweep':^34s}   {'trade-off sweep':^34s}")
        head = f"{'method':22s}" + f" {'cost_at_95':>12s} {'quality@best_cost':>17s}" * 2
        print(head + (f" {'apgr':>6s}" if two else ""))
        for m in METHODS:
            s = summary.get(m)
            if s is None:
                continue
            t = summary.get(f"{m}@tradeoff", s)
            line = f"{LABELS[m]:22s}"
            for part in (s, t):
                c95 = fmt(part["cost_at_95"])
                if part.get("cost_at_95_folds") not in (None, f"{args.folds}/{args.folds}"):
                    c95 += f" ({part['cost_at_95_folds']})"
                line += f" {c95:>12s} {fmt(part['quality_at_best_cost']):>17s}"
            if two:
                line += f" {fmt(s.get('apgr', 1.0 if m == 'best_single' else None)):>6s}"
            print(line)
        bs = summary["best_single"]
        print(f"best single: {', '.join(bs['model'])} (Q*={bs['quality']:.3f}, C*={bs['cost']:g}/1M tokens); "
              f"{summary['seconds']:.0f} s")
    print("* reads each test prompt's task label: an informed baseline, not a router")
    if lat:
        print(f"\nrouting decision, ~2,000-token prompt ({lat['prompt_chars']} chars, {lat['models']} models, "
              f"{lat['train_rows']} training rows): p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms wall; "
              f"CPU p50 {lat['cpu_p50_ms']:.2f} ms, p99 {lat['cpu_p99_ms']:.2f} ms "
              f"(host load average {lat['load_avg_1min']})")
    print(f"total {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
