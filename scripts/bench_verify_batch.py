"""Verifier calibration under batching (issue 11): honest generations made by the node's
batched engine (engine/batched.py, slots=4, prefix reuse on), 4 at a time, re-scored by the
entry's verifier (entry/verify). Every flag is a false positive.

    .venv/bin/python scripts/bench_verify_batch.py [--generations 500] [--threads 2] [--json OUT]

The mix: chat and completion requests with every sampling parameter the bench_verify.py mix
has; a third of them are a conversation's next turn in the same scope (prompt-prefix reuse);
every fifth is split at a random token and its tail produced as a failover continuation
while the other slots keep running. Verification (the entry's own engine, one thread) runs
beside generation and writes partial results to --json as it goes. tests/verify/test_verify_batch.py runs a small version of this.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.batched import BatchedEngine  # noqa: E402
from entry.backend import GenerationSpec  # noqa: E402
from entry.mesh.relay import GenerationRecord, PartRecord, build_request  # noqa: E402
from entry.verify.verifier import Verifier, VerifierConfig  # noqa: E402
from protocol.messages import ChatMessage, SamplingParams  # noqa: E402

TOPICS = ["the ocean", "volcanoes", "a robot painter", "bread baking", "the moon", "chess", "rainforests", "bicycles",
          "an old lighthouse", "honeybees", "jazz", "the printing press", "winter", "a lost key", "trains", "mathematics"]
FORMS = ["Write a short story about {t}.", "Explain {t} to a child.", "List three facts about {t}.",
         "Write a poem about {t}.", "What is interesting about {t}?", "Describe {t} in a few sentences."]
FOLLOW_UPS = ["Tell me more.", "Can you make it shorter?", "Why?", "Give one more example."]
PARAMS = [dict(), dict(), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=0.8, top_k=40, repeat_penalty=1.1),
          dict(temperature=0.6, min_p=0.05), dict(temperature=0.9, top_p=0.95, presence_penalty=0.3), dict(stop=["."]),
          dict(temperature=0.7, frequency_penalty=0.4, seed=3)]


def _spec(rng: random.Random, sha: str, max_tokens: int, history: list[ChatMessage] | None) -> GenerationSpec:
    params = SamplingParams(max_tokens=max_tokens, **rng.choice(PARAMS))
    if history is not None:
        return GenerationSpec(model=sha, kind="chat", params=params, messages=history + [ChatMessage("user", rng.choice(FOLLOW_UPS))])
    text = rng.choice(FORMS).format(t=rng.choice(TOPICS))
    if rng.random() < 0.6:
        return GenerationSpec(model=sha, kind="chat", params=params, messages=[ChatMessage("user", text)])
    return GenerationSpec(model=sha, kind="completion", params=params, prompt=text + "\n")


def generate_honest(engine: BatchedEngine, sha: str, n: int, *, seed: int = 11, workers: int = 4,
                    max_tokens: tuple[int, ...] = (24, 32, 48, 64), progress=None,
                    on_record=None) -> tuple[list[GenerationRecord], dict]:
    """n generations from `workers` threads at once; returns their records (as the entry's relay
    would have kept them) and counts of what was exercised."""
    lock = threading.Lock()
    records: list[GenerationRecord] = []
    counts = {"turn2": 0, "reused_tokens": 0, "failover": 0, "tokens": 0}
    issued = [0]

    def work(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        history: list[ChatMessage] | None = None
        scope = f"entry-{w}"
        while True:
            with lock:
                if issued[0] >= n:
                    return
                issued[0] += 1
                i = issued[0]
            follow = history is not None and rng.random() < 0.5
            spec = _spec(rng, sha, rng.choice(max_tokens), history if follow else None)
            req = build_request(spec, sha)
            gen = engine.run(req, scope=scope)
            ids = [s.token for s in gen if s.token is not None]
            finish = gen.finish_reason or "stop"
            parts = [PartRecord("node-a", "a", ids, finished=True)]
            if i % 5 == 0 and len(ids) > 2:
                # Failover: another "node" (the same engine, a fresh sequence) continues after
                # `split` delivered tokens, while the other workers' sequences keep decoding.
                split = rng.randrange(1, len(ids))
                req.continuation = ids[:split]
                cont = engine.run(req, scope=f"other-{w}")
                tail = [s.token for s in cont if s.token is not None]
                req.continuation = []
                finish = cont.finish_reason or "stop"
                parts = [PartRecord("node-a", "a", ids[:split]), PartRecord("node-b", "b", tail, finished=True)]
                ids = ids[:split] + tail
            rec = GenerationRecord(req, parts, finish, gen.prompt_tokens)
            if on_record is not None:
                on_record(rec)
            with lock:
                records.append(rec)
                counts["tokens"] += len(ids)
                counts["turn2"] += follow
                counts["reused_tokens"] += gen.reused_tokens
                counts["failover"] += len(parts) > 1
                if progress is not None and len(records) % 50 == 0:
                    progress(f"  generated {len(records)}/{n}")
            if spec.kind == "chat" and finish != "cancelled":
                history = (spec.messages or []) + [ChatMessage("assistant", engine.detokenize(ids))]
                if len(engine.prompt_tokens(build_request(_spec(rng, sha, 8, history), sha))) > engine.n_ctx - 200:
                    history = None
            else:
                history = None

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, counts


class Tally:
    """Verdicts so far (the full run takes long on a busy machine: partial results count)."""

    def __init__(self) -> None:
        self.devs: list[float] = []
        self.pvals: list[float] = []
        self.flagged: list[tuple] = []
        self.soft = self.tokens = self.generations = 0

    def add(self, verifier: Verifier, rec: GenerationRecord) -> None:
        self.generations += 1
        for v in verifier.check(rec):
            self.devs.append(v.max_deviation)
            self.soft += v.soft_violations
            self.tokens += v.tokens
            if v.pvalue is not None:
                self.pvals.append(v.pvalue)
            if not v.passed:
                self.flagged.append((rec.request.request_id, v.reason, round(v.max_deviation, 3)))

    def result(self) -> dict:
        devs = sorted(self.devs) or [0.0]
        return {"generations": self.generations, "verdicts": len(self.devs), "false_positives": len(self.flagged),
                "flagged": self.flagged[:10], "tokens_checked": self.tokens, "soft_violations": self.soft,
                "max_deviation": {"p50": statistics.median(devs), "p99": devs[int(0.99 * (len(devs) - 1))], "max": devs[-1]},
                "min_likelihood_pvalue": min(self.pvals) if self.pvals else None}


def verify_all(verifier: Verifier, records: list[GenerationRecord]) -> dict:
    tally = Tally()
    for rec in records:
        tally.add(verifier, rec)
    return tally.result()


def main() -> int:
    from engine.model_file import bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-tokens", default="24,32,48,64", help="comma-separated max_tokens to draw from")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    path = bundled_model_path()
    verifier = Verifier(config=VerifierConfig())
    sha = verifier.load_model(path).sha256
    engine = BatchedEngine(path, slots=4, n_ctx=2048, n_threads=args.threads, prefix_cache_tokens=4096)
    # Verification runs beside generation (its own engine, its own thread), so partial results
    # are there if the run is cut short; it is written to --json every 25 verified generations.
    import queue

    todo: queue.Queue = queue.Queue()
    tally = Tally()

    def verify_loop() -> None:
        while (rec := todo.get()) is not None:
            tally.add(verifier, rec)
            if tally.generations % 25 == 0:
                print(f"  verified {tally.generations}: {len(tally.flagged)} flagged, worst deviation "
                      f"{max(tally.devs):.3f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"partial": True, "verification": tally.result()}, indent=2, default=str))

    checker = threading.Thread(target=verify_loop)
    checker.start()
    t0 = time.perf_counter()
    try:
        records, counts = generate_honest(engine, sha, args.generations, seed=args.seed, progress=print,
                                          max_tokens=tuple(int(x) for x in args.max_tokens.split(",")), on_record=todo.put)
    finally:
        engine.close()
        todo.put(None)
    gen_s = time.perf_counter() - t0
    checker.join()
    result = {"generation": {**counts, "seconds": round(gen_s, 1), "aggregate_tps": round(counts["tokens"] / gen_s, 1)},
              "verification": tally.result()}
    verifier.close()
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["verification"]["false_positives"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
