"""The node engine's batching and prefix reuse (issue 11), side by side in one run.

    .venv/bin/python scripts/bench_engine.py [--model PATH] [--threads 2] [--steps 48] [--json OUT] [--quick]
    (also: scripts/bench --only engine)

1. aggregate decode tok/s with 1, 2, 4, 8 concurrent greedy generations:
   direct  llama-cpp-python's low-level API batching N sequences in one context, one
           llama_decode per step, argmax in numpy: the ceiling for this llama.cpp build
   engine  engine.batched.BatchedEngine(slots=8) with N generations from N threads: the
           node's scheduler thread, TokenSampler, text stream and Step handover included
   Both run the same prompt, steps and threads, interleaved (direct, engine per N) so load
   changes hit both alike. Target: engine >= 90% of direct at 8.
2. RSS of a process holding a BatchedEngine with slots=1 vs slots=8 (after one generation):
   the extra memory of 7 slots is their KV cache.
3. time to first token of turn 2 of a ~1,500-token chat, cold (another scope) vs reusing
   turn 1's cached prefix. Target: >= 5x.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Count slowly and carefully: 1, 2, 3, 4, 5, 6, 7, 8,"


def direct_tps(model: str, threads: int, n: int, steps: int) -> float:
    """N sequences decoded together through llama-cpp-python's low-level API."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=32, n_batch=32, n_threads=threads, n_threads_batch=threads, verbose=False)
    p = type(llm.context_params).from_buffer_copy(llm.context_params)
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = 8 * 512, 512, 512, 8, True
    ctx = llama_cpp.llama_init_from_model(llm.model, p)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n_vocab = llm.n_vocab()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)

    def decode(entries):
        i = 0
        for sid, toks, pos in entries:
            for j, t in enumerate(toks):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + j, 1
                batch.seq_id[i][0] = sid
                batch.logits[i] = j == len(toks) - 1
                i += 1
        batch.n_tokens = i
        assert llama_cpp.llama_decode(ctx, batch) == 0

    def row(i):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    try:
        decode([(s, prompt, 0) for s in range(n)])
        toks = [int(np.argmax(row((s + 1) * len(prompt) - 1))) for s in range(n)]
        t0 = time.perf_counter()
        for k in range(steps):
            decode([(s, [toks[s]], len(prompt) + k) for s in range(n)])
            toks = [int(np.argmax(row(s))) for s in range(n)]
        return n * steps / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_memory_seq_rm(mem, -1, -1, -1)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()


def engine_tps(engine, n: int, steps: int) -> float:
    """N generations from N threads; aggregate tok/s from the moment all N stream to the end."""
    from protocol.messages import SamplingParams

    prompt = engine.tokenize(PROMPT, add_bos=True)
    times: list[list[float]] = [[] for _ in range(n)]

    def work(i: int) -> None:
        gen = engine.generate(prompt, SamplingParams(max_tokens=steps + 1), scope=f"bench{i}")
        for s in gen:
            if s.token is not None:
                times[i].append(time.perf_counter())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    # From the moment every stream had its first token to the last token: all N decode
    # together in that window.
    start = max(ts[0] for ts in times)
    end = max(ts[-1] for ts in times)
    tokens = sum(1 for ts in times for x in ts if x > start)
    return tokens / (end - start) if end > start else 0.0


def rss_child(model: str, slots: int, threads: int) -> int:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from engine.batched import BatchedEngine\n"
        "from protocol.messages import SamplingParams\n"
        f"e = BatchedEngine({model!r}, slots={slots}, n_ctx=2048, n_threads={threads}, prefix_cache_tokens=2048)\n"
        "list(e.generate(e.tokenize('hello', add_bos=True), SamplingParams(max_tokens=4)))\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def ttft_turn2(model: str, threads: int) -> dict:
    from engine.batched import BatchedEngine
    from protocol.messages import ChatMessage, InferRequest, SamplingParams

    # Room for the conversation and the cold runs beside it: LRU would otherwise evict turn 1
    # while the cold (other-scope) runs are cached.
    e = BatchedEngine(model, slots=1, n_ctx=2048, n_threads=threads, prefix_cache_tokens=4 * 2048)
    try:
        filler = ("The mesh routes each request to a volunteer node that runs the model locally and streams the "
                  "generated tokens back while the entry keeps track of credits. ") * 40
        turn1 = [ChatMessage("user", filler + "\nSummarise the text above in one sentence.")]
        r1 = InferRequest("t1", "0" * 64, "chat", SamplingParams(max_tokens=24), messages=turn1)
        answer = "".join(s.text for s in e.run(r1, scope="conv"))
        turn2 = turn1 + [ChatMessage("assistant", answer), ChatMessage("user", "Now in five words?")]
        r2 = InferRequest("t2", "0" * 64, "chat", SamplingParams(max_tokens=1), messages=turn2)
        n_prompt = len(e.prompt_tokens(r2))
        cold, warm = [], []
        for k in range(2):
            t0 = time.perf_counter()
            g = e.run(r2, scope=f"cold{k}")
            next(iter(g))
            cold.append(time.perf_counter() - t0)
            list(g)
            # The conversation's own scope: turn 1 (and previous turn 2s) are cached.
            t0 = time.perf_counter()
            g = e.run(r2, scope="conv")
            next(iter(g))
            warm.append(time.perf_counter() - t0)
            list(g)
            reused = g.reused_tokens
        c, w = statistics.median(cold), statistics.median(warm)
        return {"prompt_tokens": n_prompt, "reused_tokens": reused, "cold_ms": round(c * 1000, 1),
                "reuse_ms": round(w * 1000, 1), "speedup": round(c / w, 1)}
    finally:
        e.close()


def main(argv: list[str] | None = None) -> dict:
    from engine.model_file import bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the bundled SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48, help="decode steps per measurement")
    ap.add_argument("--quick", action="store_true", help="fewer steps, N up to 4")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    model = args.model or str(bundled_model_path())
    steps = 16 if args.quick else args.steps
    ns = (1, 2, 4) if args.quick else (1, 2, 4, 8)
    results: dict = {"load_avg": os.getloadavg()[0], "threads": args.threads, "steps": steps}

    from engine.batched import BatchedEngine

    eng = BatchedEngine(model, slots=max(ns), n_ctx=512, n_threads=args.threads, prefix_cache_tokens=0)
    rows = []
    try:
        engine_tps(eng, 1, 4)  # warm-up
        for n in ns:
            d = direct_tps(model, args.threads, n, steps)
            g = engine_tps(eng, n, steps)
            rows.append({"n": n, "direct_tps": round(d, 1), "engine_tps": round(g, 1), "ratio": round(g / d, 3)})
            print(f"decode N={n}: direct {d:7.1f} tok/s  engine {g:7.1f} tok/s  ({g / d:.0%})", flush=True)
    finally:
        eng.close()
    results["decode"] = rows
    r1, r8 = rss_child(model, 1, args.threads), rss_child(model, 8, args.threads)
    results["rss"] = {"slots1_mib": round(r1 / 2**20, 1), "slots8_mib": round(r8 / 2**20, 1),
                      "per_extra_slot_mib": round((r8 - r1) / 7 / 2**20, 1)}
    print(f"RSS: slots=1 {r1 / 2**20:.0f} MiB, slots=8 {r8 / 2**20:.0f} MiB ({(r8 - r1) / 7 / 2**20:.1f} MiB per extra slot)")
    results["ttft_turn2"] = t = ttft_turn2(model, args.threads)
    print(f"turn 2 TTFT ({t['prompt_tokens']} prompt tokens, {t['reused_tokens']} reused): cold {t['cold_ms']} ms, "
          f"with reuse {t['reuse_ms']} ms ({t['speedup']}x)")
    results["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
