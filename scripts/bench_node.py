"""Node overhead: decode tok/s and time to first token, directly vs through the node protocol.

    .venv/bin/python scripts/bench_node.py [--model PATH] [--tokens 128] [--runs 5] [--threads 2] [--json OUT]

One run, same model and settings, three paths:
  direct-llama-cpp  llama-cpp-python's own streaming create_completion (greedy, cache reset)
  direct-engine     our Engine in this process (the node's generation loop, no network)
  node-protocol     a `mesh node start` daemon in another process, reached over libp2p
                    (TCP + Noise + Yamux on 127.0.0.1) with an open connection; a new stream
                    per request, as the entry does
The direct paths run before the node starts, so nothing competes for the cores. TTFT is the
time from issuing the request to holding the first token; decode tok/s counts the tokens after
the first over the time after the first. Medians over --runs. Not a test: numbers depend on
the machine; targets (issue 3): node >= 97% of direct decode, <= 10 ms added TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime import ready_file

PROMPT = "Count slowly and carefully: 1, 2, 3, 4, 5, 6, 7, 8,"


def summarize(samples: list[tuple[float, float, int]]) -> dict:
    ttft = statistics.median(s[0] for s in samples)
    decode = statistics.median((s[2] - 1) / s[1] for s in samples if s[1] > 0)
    return {"ttft_ms": round(ttft * 1000, 2), "decode_tps": round(decode, 1), "tokens": samples[0][2], "runs": len(samples)}


def threads_flag(threads: int) -> list[str]:
    """The node's --threads; 0 = none, the node's own defaults (engine/threads.py)."""
    return ["--threads", str(threads)] if threads else []


def bench_llama_cpp(model: str, threads: int, n_tokens: int, runs: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    samples = []
    for _ in range(runs + 1):  # the first run warms caches and is dropped
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for _chunk in llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, top_k=1, stream=True):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        samples.append((first - t0, end - first, n))
    llm.close()
    return summarize(samples[1:])


def bench_engine(model: str, threads: int, n_tokens: int, runs: int) -> dict:
    from engine.llama import Engine
    from protocol.messages import InferRequest, SamplingParams

    eng = Engine(model, n_ctx=2048, n_threads=threads or None)  # 0: the engine's defaults
    samples = []
    for i in range(runs + 1):
        req = InferRequest(f"bench-{i:06d}", eng.info.sha256, "completion", SamplingParams(max_tokens=n_tokens), prompt=PROMPT)
        t0 = time.perf_counter()
        first = None
        n = 0
        for step in eng.run(req):
            if step.token is None:
                continue
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        samples.append((first - t0, end - first, n))
    eng.close()
    return summarize(samples[1:])


async def bench_node(model: str, sha: str, threads: int, n_tokens: int, runs: int) -> dict:

    from protocol.identity import Identity
    from protocol.messages import InferRequest, SamplingParams
    from transport.host import open_mesh_host
    from transport.node_client import timed_generation

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "node"
        log = open(Path(tmp) / "node.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "node", "start", "--model", model, *threads_flag(threads),
                                 "--skip-benchmark", "--state-dir", str(state), "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MESH_HOME": tmp})
        try:
            try:
                info = await ready_file.wait_async(ready_file.path_in(state), proc, 120, name="node",
                                                   log_tail=lambda: (Path(tmp) / "node.log").read_text()[-2000:])
            except RuntimeError as e:
                raise SystemExit(str(e)) from None
            samples = []
            async with open_mesh_host(Identity.generate(), dht_server=False) as host:
                await host.connect(info["peer_id"], info["addrs"])
                for i in range(runs + 1):
                    req = InferRequest(f"bench-node-{i:06d}", sha, "completion", SamplingParams(max_tokens=n_tokens), prompt=PROMPT)
                    samples.append(await timed_generation(host, info["peer_id"], None, req))
            return summarize(samples[1:])
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()

    import trio

    from engine.model_file import bundled_model_path, inspect_model

    model = args.model or str(bundled_model_path())
    info = inspect_model(model)
    print(f"model {info.name} {info.quantization}, {args.threads} threads, {args.tokens} tokens, median of {args.runs} runs", flush=True)
    results = {}
    for name, fn in (("direct-llama-cpp", lambda: bench_llama_cpp(model, args.threads, args.tokens, args.runs)),
                     ("direct-engine", lambda: bench_engine(model, args.threads, args.tokens, args.runs)),
                     ("node-protocol", lambda: trio.run(bench_node, model, info.sha256, args.threads, args.tokens, args.runs))):
        print(f"  running {name} …", flush=True)
        results[name] = fn()
    base = results["direct-llama-cpp"]
    print(f"\n{'path':18s} {'TTFT ms':>9s} {'decode tok/s':>13s} {'vs direct':>10s} {'TTFT added':>11s}")
    for name, r in results.items():
        ratio = r["decode_tps"] / base["decode_tps"]
        print(f"{name:18s} {r['ttft_ms']:9.1f} {r['decode_tps']:13.1f} {ratio:9.1%} {r['ttft_ms'] - base['ttft_ms']:+10.1f}")
        r["decode_ratio_vs_direct"] = round(ratio, 4)
        r["ttft_added_ms"] = round(r["ttft_ms"] - base["ttft_ms"], 2)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info.name, "threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
