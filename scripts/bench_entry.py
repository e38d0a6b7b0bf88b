"""End to end: decode tok/s and time to first token through entry + node vs llama-cpp-python
directly, and the failover gap when the serving node is killed mid-stream. One run.

    .venv/bin/python scripts/bench_entry.py [--tokens 128] [--runs 5] [--failovers 3] [--json OUT]

Paths (same model, greedy, same prompt):
  direct-llama-cpp  llama-cpp-python's streaming create_completion in this process, 2 threads
  entry+node        `mesh entry start` + one `mesh node start --threads 2`, streamed over HTTP
                    (SSE) from this process, as a user would; the node is reached over libp2p
Failover: an entry and --failovers+1 nodes (1 thread each); a long streamed completion; the
node serving it is killed with SIGKILL right after the first token arrives; the gap is the
time from the kill to the next token the client receives. Targets (issue 4): >= 95% of direct
decode speed, <= 30 ms added TTFT, failover gap <= 2 s. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_node import PROMPT, bench_llama_cpp, summarize, threads_flag  # noqa: E402

from runtime import ready_file


class Proc:
    def __init__(self, tmp: Path, name: str, args: list[str]):
        self.state = tmp / name
        self.log = open(tmp / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", *args, "--state-dir", str(self.state), "--log-level", "warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MESH_HOME": str(tmp)})

    def ready(self, limit: float = 120) -> dict:
        try:
            return ready_file.wait(ready_file.path_in(self.state), self.proc, limit, name=self.state.name,
                                   log_tail=lambda: f"(see {self.log.name})")
        except RuntimeError as e:
            raise SystemExit(str(e)) from None

    def active(self) -> bool:
        out = subprocess.run([sys.executable, "-m", "mesh_cli", "node", "status", "--json", "--state-dir", str(self.state)],
                             capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and json.loads(out.stdout)["active"] > 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_nodes(url: str, n: int, limit: float = 60) -> str:
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            if sum(m["nodes"] for m in data) >= n:
                return data[0]["id"]
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"entry did not see {n} nodes in {limit} s")


def stream(url: str, model: str, n_tokens: int, on_token=None, *, prompt: str = PROMPT,
           timeout: float = 120) -> tuple[float, float, int, list[float], dict]:
    """(ttft, time after first, tokens, arrival times) of one streamed completion."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    last: dict = {}  # the usage event (with the mesh's own fields)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
                last = ev
            if ev.get("choices") and ev["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(arrivals))
    return arrivals[0] - t0, arrivals[-1] - arrivals[0], tokens, arrivals, last


def bench_entry_path(tmp: Path, model_path: str, threads: int, n_tokens: int, runs: int) -> dict:
    procs = []
    try:
        entry = Proc(tmp, "entry", ["entry", "start", "--open", "--http-port", "0"])
        procs.append(entry)
        info = entry.ready()
        node = Proc(tmp, "node", ["node", "start", "--model", model_path, *threads_flag(threads), "--skip-benchmark",
                                  "--bootstrap", info["p2p_addrs"][0]])
        procs.append(node)
        node.ready()
        model = wait_nodes(info["url"], 1)
        samples = []
        for _ in range(runs + 1):
            ttft, after, tokens, _, _ = stream(info["url"], model, n_tokens)
            samples.append((ttft, after, tokens))
        return summarize(samples[1:])
    finally:
        for p in reversed(procs):
            p.stop()


def bench_failover(tmp: Path, model_path: str, n_tokens: int, kills: int) -> dict:
    procs = []
    gaps = []
    try:
        entry = Proc(tmp, "entry-fo", ["entry", "start", "--open", "--http-port", "0"])
        procs.append(entry)
        info = entry.ready()
        nodes = []
        for i in range(kills + 1):
            n = Proc(tmp, f"fo-node{i}", ["node", "start", "--model", model_path, "--threads", "1", "--skip-benchmark",
                                           "--advert-interval", "1", "--bootstrap", info["p2p_addrs"][0]])
            procs.append(n)
            n.ready()
            nodes.append(n)
        model = wait_nodes(info["url"], kills + 1)
        for _ in range(kills):
            killed_at = {}

            def kill_serving(count: int) -> None:
                if count == 3 and not killed_at:
                    for n in nodes:
                        if n.proc.poll() is None and n.active():
                            n.proc.send_signal(signal.SIGKILL)
                            killed_at["t"] = time.perf_counter()
                            killed_at["n"] = count
                            return

            _, _, tokens, arrivals, _ = stream(info["url"], model, n_tokens, on_token=kill_serving)
            if "t" in killed_at:
                after = [a for a in arrivals if a > killed_at["t"]]
                # Tokens already in flight when the kill landed arrive first: the gap is the
                # longest pause after the kill.
                seq = [killed_at["t"]] + after
                gaps.append(max(b - a for a, b in zip(seq, seq[1:])))
            time.sleep(2)
        return {"kills": len(gaps), "gap_ms_median": round(statistics.median(gaps) * 1000, 1) if gaps else None,
                "gap_ms_max": round(max(gaps) * 1000, 1) if gaps else None, "gaps_ms": [round(g * 1000, 1) for g in gaps]}
    finally:
        for p in reversed(procs):
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--failovers", type=int, default=3, help="kills to measure the failover gap (0 = skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write results to this file")
    args = ap.parse_args()
    from engine.model_file import bundled_model_path

    model = args.model or str(bundled_model_path())
    results = {}
    print(f"{args.tokens} tokens, {args.threads} threads, median of {args.runs} runs", flush=True)
    print("  running direct-llama-cpp …", flush=True)
    results["direct-llama-cpp"] = bench_llama_cpp(model, args.threads, args.tokens, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        print("  running entry+node …", flush=True)
        results["entry+node"] = bench_entry_path(Path(tmp), model, args.threads, args.tokens, args.runs)
        if args.failovers:
            print(f"  measuring failover ({args.failovers} kills) …", flush=True)
            results["failover"] = bench_failover(Path(tmp), model, 200, args.failovers)
    base, e2e = results["direct-llama-cpp"], results["entry+node"]
    e2e["decode_ratio_vs_direct"] = round(e2e["decode_tps"] / base["decode_tps"], 4)
    e2e["ttft_added_ms"] = round(e2e["ttft_ms"] - base["ttft_ms"], 2)
    print(f"\n{'path':18s} {'TTFT ms':>9s} {'decode tok/s':>13s}")
    for name in ("direct-llama-cpp", "entry+node"):
        r = results[name]
        print(f"{name:18s} {r['ttft_ms']:9.1f} {r['decode_tps']:13.1f}")
    print(f"entry+node: {e2e['decode_ratio_vs_direct']:.1%} of direct decode, TTFT {e2e['ttft_added_ms']:+.1f} ms")
    if "failover" in results:
        f = results["failover"]
        print(f"failover gap: median {f['gap_ms_median']} ms, max {f['gap_ms_max']} ms over {f['kills']} kills")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
