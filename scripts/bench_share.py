"""Model sharing (/mesh/model/1): download rate from 1 and 3 peers against a plain local copy of
the same file, and a serving node's decode speed while it uploads at full rate against idle.

    .venv/bin/python scripts/bench_share.py [--model PATH] [--runs 2] [--share-rate 1000] [--json OUT]

download  the bundled SmolLM2 GGUF (98 MB) fetched by node/model_fetch.fetch_file (verified
          chunks, fsync'd, whole-file sha256 at the end) from 1 and from 3 sharing peers, each
          a separate process (a libp2p host serving node/model_share.ModelShare, no model
          loaded); against shutil.copyfile + fsync of the same file. MB/s, best of --runs.
decode    a real `mesh node start` daemon sharing its model at --share-rate: decode tok/s of
          128-token greedy generations over /mesh/infer/1, alternately idle and while a
          separate process downloads the model from it again and again (the upload rate
          reached meanwhile is reported too); medians over max(4, --runs) rounds.
Every process started here is stopped by its pid; every wait is bounded. Not a test: numbers
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from runtime import ready_file  # noqa: E402

# ---- helper processes ------------------------------------------------------------------------

async def serve(model: str, state: Path, rate: float) -> None:
    """--serve: share the file over /mesh/model/1 until killed."""
    from engine.model_file import file_manifest
    from node.model_share import ModelShare
    from protocol.identity import Identity
    from protocol.model_transfer import MODEL_PROTOCOL_ID
    from transport.host import open_mesh_host

    share = ModelShare(Path(model), file_manifest(model), rate_mb=rate)
    async with open_mesh_host(Identity.generate()) as host:
        host.set_stream_handler(MODEL_PROTOCOL_ID, share.handle_stream)
        ready_file.write(ready_file.path_in(state), {"peer_id": host.peer_id, "addrs": host.listen_addrs})
        await trio.sleep_forever()


async def download(peers: list[dict], sha: str, root: str, dest_dir: Path, loop_until: float = 0.0) -> dict:
    """Fetch from `peers` into dest_dir; with loop_until, again and again until that time."""
    from node.model_fetch import fetch_file
    from protocol.identity import Identity
    from transport.host import open_mesh_host

    rates, total = [], 0
    async with open_mesh_host(Identity.generate()) as host:
        for p in peers:
            await host.connect(p["peer_id"], p["addrs"])
        while True:
            dest = dest_dir / f"{sha}.gguf"
            dest.unlink(missing_ok=True)
            t0 = time.perf_counter()
            with trio.fail_after(600):
                await fetch_file(host, sha, root, [p["peer_id"] for p in peers], dest)
            dt = time.perf_counter() - t0
            size = dest.stat().st_size
            total += size
            rates.append(size / dt / 1e6)
            dest.unlink()
            if time.time() >= loop_until:
                return {"mbps": rates, "bytes": total}


def spawn_self(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    log = open(tmp / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, __file__, *args, "--state", str(state)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, env={**os.environ, "MESH_HOME": str(tmp)})
    log.close()
    return proc, state


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- sections --------------------------------------------------------------------------------

def bench_copy(model: Path, tmp: Path, runs: int) -> float:
    rates = []
    for _ in range(runs):
        dst = tmp / "copy.gguf"
        t0 = time.perf_counter()
        shutil.copyfile(model, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        rates.append(model.stat().st_size / (time.perf_counter() - t0) / 1e6)
        dst.unlink()
    return max(rates)


def bench_download(model: Path, tmp: Path, runs: int) -> dict:
    from engine.model_file import file_manifest

    m = file_manifest(model)
    procs = [spawn_self(tmp, f"seed{i}", "--serve", str(model), "--rate", "100000") for i in range(3)]
    try:
        peers = [ready_file.wait(ready_file.path_in(state), proc, 60, name=f"seed{i}", log_tail=lambda: "")
                 for i, (proc, state) in enumerate(procs)]
        out = {"copy_mbps": round(bench_copy(model, tmp, runs), 1)}
        for n in (1, 3):
            best = 0.0
            for _ in range(runs):
                r = trio.run(download, peers[:n], m.sha256, m.root, tmp)
                best = max(best, r["mbps"][0])
            out[f"peers_{n}_mbps"] = round(best, 1)
        return out
    finally:
        for proc, _ in procs:
            stop(proc)


def bench_decode(model: Path, tmp: Path, rate: float, rounds: int, threads: int) -> dict:
    from engine.model_file import file_manifest

    m = file_manifest(model)
    state = tmp / "node"
    log = open(tmp / "node.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "mesh_cli", "node", "start", "--model", str(model), "--threads", str(threads),
                             "--skip-benchmark", "--share-rate", str(rate), "--state-dir", str(state), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MESH_HOME": str(tmp)})
    log.close()
    loader = None
    try:
        info = ready_file.wait(ready_file.path_in(state), node, 120, name="node", log_tail=lambda: "")
        idle, busy, uploads = [], [], []
        # Alternated, so a change in the machine's other load hits both sides alike.
        for _ in range(rounds):
            idle.append(trio.run(_decode, info, m.sha256, 1)["decode_tps"])
            loader, _ = spawn_self(tmp, "leech", "--leech", json.dumps(info), "--sha", m.sha256, "--root", m.root,
                                   "--seconds", "600")
            time.sleep(2)  # chunks are flowing
            sent0, t0 = _sent(state), time.perf_counter()
            busy.append(trio.run(_decode, info, m.sha256, 1)["decode_tps"])
            uploads.append((_sent(state) - sent0) / (time.perf_counter() - t0) / 1e6)
            stop(loader)
            loader = None
        # What uploading costs the node itself, apart from the downloader (which on a real
        # mesh is another machine, here it shares the cores): node CPU per MB sent, no generation.
        loader, _ = spawn_self(tmp, "leech", "--leech", json.dumps(info), "--sha", m.sha256, "--root", m.root,
                               "--seconds", "600")
        time.sleep(2)
        sent0, cpu0, t0 = _sent(state), _cpu_s(node.pid), time.perf_counter()
        time.sleep(10)
        sent, cpu, dt = _sent(state) - sent0, _cpu_s(node.pid) - cpu0, time.perf_counter() - t0
        stop(loader)
        loader = None
        med_idle, med_busy = statistics.median(idle), statistics.median(busy)
        return {"upload_only_mbps": round(sent / dt / 1e6, 1), "node_cpu_ms_per_mb": round(cpu * 1000 / max(sent / 1e6, 1e-9), 1),
                "idle_decode_tps": idle, "uploading_decode_tps": busy, "ratio_of_medians": round(med_busy / med_idle, 3),
                "upload_mbps_while_generating": [round(u, 1) for u in uploads], "share_rate": rate, "threads": threads}
    finally:
        if loader is not None:
            stop(loader)
        stop(node)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _sent(state: Path) -> int:
    """Bytes the node has uploaded, from its control socket (no CLI process: on a loaded
    machine starting one took over 30 s)."""
    from node.control import call

    return int(call(state / "node.sock", {"cmd": "status"})["share"]["bytes_sent"])


async def _decode(info: dict, sha: str, runs: int) -> dict:
    from bench_node import PROMPT, summarize

    from protocol.identity import Identity
    from protocol.messages import InferRequest, SamplingParams
    from transport.host import open_mesh_host
    from transport.node_client import timed_generation

    samples = []
    async with open_mesh_host(Identity.generate(), dht_server=False) as host:
        await host.connect(info["peer_id"], info["addrs"])
        for i in range(runs + 1):
            req = InferRequest(f"bench-share-{i:06d}", sha, "completion", SamplingParams(max_tokens=128), prompt=PROMPT)
            samples.append(await timed_generation(host, info["peer_id"], None, req))
    return summarize(samples[1:])


def run(model: Path | None = None, runs: int = 2, rate: float = 50.0, threads: int = 1,
        parts: tuple[str, ...] = ("download", "decode")) -> dict:
    from engine.model_file import bundled_model_path

    model = model or bundled_model_path()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        load = os.getloadavg()[0]
        out: dict = {"model": model.name, "size_mb": round(model.stat().st_size / 1e6, 1), "loadavg_1m": round(load, 2)}
        if "download" in parts:
            out["download"] = bench_download(model, tmp, runs)
        if "decode" in parts:
            out["decode"] = bench_decode(model, tmp, rate, max(4, runs), threads)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--share-rate", type=float, default=50.0, help="the serving node's --share-rate in the decode part (MB/s, default 50 as a node's)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the serving node (default 1: a core left for the upload)")
    ap.add_argument("--only", default="download,decode", help="comma-separated parts: download,decode")
    ap.add_argument("--json", help="write the results to this file")
    # helper modes
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=1000.0, help=argparse.SUPPRESS)
    ap.add_argument("--leech", help=argparse.SUPPRESS)
    ap.add_argument("--sha", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    if args.serve:
        trio.run(serve, args.serve, Path(args.state), args.rate)
        return 0
    if args.leech:
        trio.run(download, [json.loads(args.leech)], args.sha, args.root, Path(args.state), time.time() + args.seconds)
        return 0
    res = run(Path(args.model) if args.model else None, args.runs, args.share_rate, args.threads,
              tuple(p.strip() for p in args.only.split(",")))
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
