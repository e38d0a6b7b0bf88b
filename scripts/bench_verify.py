"""Benchmark of output verification (issue 5), in one process on the real SmolLM2:

- cost: the verifier's replay (1 thread) as a fraction of generation compute, per verified
  request and at the default sampling rate;
- false positives: >= 500 honest generations (node schedule: Engine.run, 1 and 2 threads)
  re-scored by a separate verifier engine; every flag is a false positive;
- detection: each cheating mode's per-request detection rate, and from it the chance of
  catching it within N requests under the sampling policy (new node and established node).

    .venv/bin/python scripts/bench_verify.py [--honest 500] [--cheat-requests 30] [--json out.json]

Generation and verification never overlap (one llama.cpp at work at a time). Cost is
measured in CPU seconds of this process (time.process_time), so other load on the machine
does not distort it: the verifier runs 1 thread, and generation compute is taken from the
1-thread generations (2 threads cost more CPU per token here: spin-waiting).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llama import Engine  # noqa: E402
from engine.model_file import bundled_model_path  # noqa: E402
from entry.backend import GenerationSpec  # noqa: E402
from entry.mesh.relay import GenerationRecord, PartRecord, build_request  # noqa: E402
from entry.verify.verifier import Verifier, VerifierConfig  # noqa: E402
from protocol.messages import ChatMessage, SamplingParams  # noqa: E402

TOPICS = ["the ocean", "volcanoes", "a robot painter", "bread baking", "the moon", "chess", "rainforests", "bicycles",
          "an old lighthouse", "honeybees", "jazz", "the printing press", "winter", "a lost key", "trains", "mathematics"]
FORMS = ["Write a short story about {t}.", "Explain {t} to a child.", "List three facts about {t}.",
         "Write a poem about {t}.", "What is interesting about {t}?", "Describe {t} in a few sentences."]
PARAMS = [dict(), dict(), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=0.8, top_k=40, repeat_penalty=1.1),
          dict(temperature=0.6, min_p=0.05), dict(temperature=0.9, top_p=0.95, presence_penalty=0.3), dict(stop=["."])]
CANNED = "I am a helpful assistant. The answer to your question is simple: it depends on many factors, " * 4


def make_request(rng: random.Random, sha: str, max_tokens: int):
    text = rng.choice(FORMS).format(t=rng.choice(TOPICS))
    params = SamplingParams(max_tokens=max_tokens, **rng.choice(PARAMS))
    if rng.random() < 0.5:
        spec = GenerationSpec(model=sha, kind="chat", params=params, messages=[ChatMessage("user", text)])
    else:
        spec = GenerationSpec(model=sha, kind="completion", params=params, prompt=text + "\n")
    return build_request(spec, sha)


def generate(engine: Engine, request) -> tuple[list[int], str, int, float]:
    t0 = time.process_time()
    gen = engine.run(request)
    ids = [s.token for s in gen if s.token is not None]
    return ids, gen.finish_reason, gen.prompt_tokens, time.process_time() - t0


def record(request, ids, finish, prompt_tokens, split: int | None = None) -> GenerationRecord:
    if split is not None and 0 < split < len(ids):
        parts = [PartRecord("node-a", "a", ids[:split]), PartRecord("node-b", "b", ids[split:], finished=True)]
    else:
        parts = [PartRecord("node-a", "a", ids, finished=True)]
    return GenerationRecord(request, parts, finish, prompt_tokens)


def timed_check(verifier: Verifier, rec: GenerationRecord):
    t0 = time.process_time()
    verdicts = verifier.check(rec)
    return verdicts, time.process_time() - t0


def honest_phase(args, verifier, engines, sha, rng) -> dict:
    gen_s = {1: 0.0, 2: 0.0}
    gen_tokens = {1: 0, 2: 0}
    ver_s = {1: 0.0, 2: 0.0}
    devs, pvals, flagged, n_verdicts, soft, tokens = [], [], [], 0, 0, 0
    worst: list[tuple] = []
    for i in range(args.honest):
        threads = 1 if i % 2 == 0 else 2
        req = make_request(rng, sha, rng.choice((32, 48, 64, 96)))
        ids, finish, n_prompt, gs = generate(engines[threads], req)
        gen_s[threads] += gs
        gen_tokens[threads] += len(ids)
        split = rng.randrange(1, len(ids)) if len(ids) > 2 and i % 5 == 0 else None  # some failover splits
        verdicts, vs = timed_check(verifier, record(req, ids, finish, n_prompt, split))
        ver_s[threads] += vs
        for v in verdicts:
            n_verdicts += 1
            devs.append(v.max_deviation)
            soft += v.soft_violations
            tokens += v.tokens
            worst.append((v.max_deviation, "greedy" if req.params.temperature == 0 else "sampled",
                          {k: val for k, val in req.params.to_wire().items() if val not in (None, [], 0.0, 1.0, 64, 256)},
                          v.tokens, threads))
            if v.pvalue is not None:
                pvals.append(v.pvalue)
            if not v.passed:
                flagged.append((req.request_id, v.reason, v.max_deviation))
        if (i + 1) % 50 == 0:
            print(f"  honest {i + 1}/{args.honest}: {len(flagged)} flagged, worst deviation {max(devs):.3f}", flush=True)
    return {"requests": args.honest, "verdicts": n_verdicts, "false_positives": len(flagged), "flagged": flagged[:10],
            "max_deviation": {"p50": statistics.median(devs), "p99": sorted(devs)[int(0.99 * (len(devs) - 1))], "max": max(devs)},
            "min_likelihood_pvalue": min(pvals) if pvals else None,
            "tokens_checked": tokens, "soft_violations": soft,
            "worst_cases": sorted(worst, key=lambda w: -w[0])[:5],
            "gen_seconds": gen_s, "gen_tokens": gen_tokens, "verify_seconds": ver_s}


def cheat_phase(args, verifier, honest: Engine, cheats: dict[str, Engine | None], sha, rng) -> dict:
    out = {}
    for mode, engine in cheats.items():
        caught, reasons = 0, {}
        for _ in range(args.cheat_requests):
            req = make_request(rng, sha, rng.choice((32, 48, 64)))
            if mode == "canned":
                ids, n_prompt = honest.tokenize(CANNED)[:req.params.max_tokens], len(honest.prompt_tokens(req))
                finish = "length"
            elif mode == "truncate-stop":
                ids, _, n_prompt, _ = generate(honest, req)
                ids, finish = ids[:3], "stop"
            else:
                ids, finish, n_prompt, _ = generate(engine, req)
            verdicts, _ = timed_check(verifier, record(req, ids, finish, n_prompt))
            bad = [v for v in verdicts if not v.passed]
            if bad:
                caught += 1
                reasons[bad[0].reason] = reasons.get(bad[0].reason, 0) + 1
        out[mode] = {"requests": args.cheat_requests, "caught": caught, "rate": caught / args.cheat_requests, "reasons": reasons}
        print(f"  {mode}: caught {caught}/{args.cheat_requests} {reasons}", flush=True)
    return out


def within(p_detect: float, rates: list[float]) -> float:
    """P(at least one of these requests is sampled and flagged)."""
    miss = 1.0
    for r in rates:
        miss *= 1.0 - r * p_detect
    return 1.0 - miss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--honest", type=int, default=500)
    ap.add_argument("--cheat-requests", type=int, default=30)
    ap.add_argument("--within", type=int, default=20)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    path = bundled_model_path()
    cfg = VerifierConfig()
    verifier = Verifier(config=cfg)
    model = verifier.load_model(path)
    sha = model.sha256
    engines = {1: Engine(path, n_ctx=2048, n_threads=1), 2: Engine(path, n_ctx=2048, n_threads=2)}

    print(f"honest: {args.honest} generations (threads 1 and 2), each re-scored", flush=True)
    honest = honest_phase(args, verifier, engines, sha, rng)

    tmp = Path("/tmp") / "bench-verify-models"
    tmp.mkdir(exist_ok=True)
    from tests.support.tiny_model import write_tiny_llama
    from tests.support.wrong_model import noised_copy

    cheats = {
        "wrong-model (2% noise)": Engine(noised_copy(path, tmp / "n2.gguf", fraction=0.02, seed=1), n_ctx=2048, n_threads=2),
        "wrong-model (0.5% noise)": Engine(noised_copy(path, tmp / "n05.gguf", fraction=0.005, seed=2), n_ctx=2048, n_threads=2),
        "wrong-model (tiny)": Engine(write_tiny_llama(tmp / "tiny.gguf"), n_ctx=2048, n_threads=1),
        "canned": None,
        "truncate-stop": None,
    }
    print(f"cheaters: {args.cheat_requests} requests each, all re-scored", flush=True)
    detection = cheat_phase(args, verifier, engines[2], cheats, sha, rng) if args.cheat_requests else {}

    g1 = honest["gen_seconds"][1] / max(1, honest["gen_tokens"][1])  # CPU s per generated token
    g2 = honest["gen_seconds"][2] / max(1, honest["gen_tokens"][2])
    # Verification of the 1-thread half against its generation: the same requests, the
    # cheapest generation per CPU second, so the strictest ratio.
    per_request = honest["verify_seconds"][1] / max(1e-9, honest["gen_seconds"][1])
    per_request_2 = honest["verify_seconds"][2] / max(1e-9, honest["gen_seconds"][2])
    new_phase = [cfg.new_rate] * cfg.new_until
    n = args.within
    result = {
        "honest": honest,
        "cost": {"verify_over_generation_per_verified_request": per_request,
                 "same_vs_2_thread_generation": per_request_2,
                 "at_default_rate": cfg.rate * per_request,
                 "default_rate": cfg.rate,
                 "first_1000_requests_of_a_new_node": (cfg.new_until + cfg.rate * (1000 - cfg.new_until)) / 1000 * per_request,
                 "gen_cpu_s_per_token": {"1 thread": g1, "2 threads": g2}},
        "detection": {mode: {**d,
                             f"within_{n}_new_node": within(d["rate"], (new_phase + [cfg.rate] * n)[:n]),
                             f"within_{n}_established_node": within(d["rate"], [cfg.rate] * n)}
                      for mode, d in detection.items()},
        "receipt_cheats": "inflate, forge, replay, truncate (length): checked on every request, no sampling "
                          "(tests/verify/test_cheaters.py)",
    }
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
