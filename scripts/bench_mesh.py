"""Measure the mesh: overhead vs direct llama.cpp, entry capacity, routing reaction times,
failover, and a many-node mesh. One command, results as tables and as JSON.

    scripts/bench [--quick] [--only SECTION[,SECTION...]] [--json bench-results/latest.json]

Sections (all by default; --only picks some):
  overhead  decode tok/s and TTFT: llama-cpp-python directly, our engine, through a node
            (libp2p), through entry + node (HTTP SSE); real model (bundled SmolLM2), 2 threads
  capacity  entry relay capacity: synthetic nodes (engine/synthetic.py: the real node
            stack, no model) behind one entry, 1/16/64 concurrent SSE streams from a separate
            load-generator process (scripts/loadgen.py): aggregate tok/s, p50/p99 gap between
            text events, TTFT, entry CPU and RSS, the load generator's own CPU
  routing   time for a new node to become routable after its model is loaded; time for a
            SIGKILLed node to leave routing (as /v1/mesh/nodes shows it)
  taskrouting  the task-level router (scripts/bench_routing.py): 5-fold cross-validation on the
            shared score tables (cost_at_95, quality_at_best_cost for the router, random, the
            oracle, the best single model, a per-task table and kNN) and the decision latency
  engine    the node's batched engine (scripts/bench_engine.py): aggregate decode tok/s at
            1/2/4/8 concurrent generations vs llama.cpp batching directly, RSS slots=1 vs 8,
            TTFT of a chat's turn 2 with and without prefix reuse
  failover  the longest pause a streaming client sees when the serving node is SIGKILLed
            (synthetic nodes at --failover-rate tok/s)
  burst     bursts of 40 and 200 concurrent chat requests (max_tokens 32) against an entry and
            2 single-slot nodes (synthetic; --burst-real: also the bundled model): completed
            and failed (target 0: the entry queues what the nodes cannot take yet), p50/p99
            latency, and /health latency during the burst (is the entry still responsive?)
  scale     a many-node mesh (synthetic nodes as separate processes, real libp2p DHT on
            127.0.0.1): grown to 5, 10, 30 nodes (--scale-sizes): time until every node is
            discovered, RSS per node, DHT lookup latency from a fresh client; then traffic while
            nodes are SIGKILLed and new ones added: failed requests (target 0) and how requests
            spread over nodes
  share     model sharing (scripts/bench_share.py): download MB/s from 1 and 3 peers vs a local
            file copy; a serving node's decode tok/s while uploading vs idle
Targets (issue 6): entry >= 10,000 tok/s at 64 streams with p99 gap <= 50 ms on 2 cores; a
new node routable <= 2 s; a killed node out of routing <= 5 s.

CPU placement: in the capacity section (--pin, on by default on a machine with 2+ cores) the
entry runs on the last core and everything else (nodes, load generator) on the others, so the
entry's numbers are its own and not the nodes'. The entry is one Python process on one event
loop: one core is what it can use. Other sections let the OS place processes.
Before each section the run waits (--wait-quiet, bounded) for other work on the machine to
settle, and records the background load it saw; the capacity rows also show "other CPU", busy
time on the machine that was none of ours. Every process started here is stopped (by its pid)
when the run ends, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from runtime import ready_file

CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable


# ---- processes -----------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK_TCK


def wait_quiet(limit: float, threshold: float = 0.25) -> float:
    """Wait (at most `limit` s) until the machine's busy CPU, none of it ours, stays under
    `threshold` cores for a second: another job's load would distort every number here.
    Returns the last background load measured (cores)."""
    deadline = time.monotonic() + limit
    while True:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(1.0)
        load = (machine_busy_s() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return round(load, 2)
        say(f"  (machine busy with other work: {load:.2f} cores; waiting for it to settle)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Proc:
    """A `mesh ...` daemon we started; JSON logs; stopped by its pid."""

    def __init__(self, tmp: Path, name: str, args: list[str], cpus: set[int] | None = None):
        self.name = name
        self.state = tmp / name
        self.state.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / f"{name}.log"
        env = {**os.environ, "MESH_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "mesh_cli", *args, "--state-dir", str(self.state), "--log-format", "json"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        self.pid = self.proc.pid
        self.started = time.time()
        if cpus:
            try:
                os.sched_setaffinity(self.pid, cpus)
            except OSError:
                pass
        self.info: dict = {}

    def ready(self, limit: float = 120.0) -> dict:
        self.info = ready_file.wait(ready_file.path_in(self.state), self.proc, limit, name=self.name,
                                    log_tail=self.log_tail, poll=0.02)
        return self.info

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_events(self) -> list[dict]:
        out = []
        try:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        except OSError:
            pass
        return out

    def log_ts(self, msg_prefix: str) -> float | None:
        for ev in self.log_events():
            if str(ev.get("msg", "")).startswith(msg_prefix):
                return float(ev["ts"])
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL; returns when it was sent."""
        t = time.time()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return t

    def stop(self, limit: float = 10.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(limit)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass

    def control(self, cmd: str = "status") -> dict | None:
        from node.control import ControlError, call

        try:
            return call(self.state / "node.sock", {"cmd": cmd}, timeout=5)
        except ControlError:
            return None

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.pid)


class Mesh:
    """An entry and synthetic nodes in a temporary directory; close() stops them all."""

    def __init__(self, tmp: Path, *, pin: bool):
        self.tmp = tmp
        ncpu = len(os.sched_getaffinity(0))
        self.pin = pin and ncpu >= 2
        cpus = sorted(os.sched_getaffinity(0))
        self.entry_cpus = {cpus[-1]} if self.pin else None
        self.other_cpus = set(cpus[:-1]) if self.pin else None
        self.entry: Proc | None = None
        self.nodes: list[Proc] = []
        self._n = 0

    def start_entry(self, *extra: str) -> Proc:
        self.entry = Proc(self.tmp, "entry", ["entry", "start", "--open", "--http-port", "0", "--log-level", "info", *extra],
                          self.entry_cpus)
        info = self.entry.ready(60)
        self.url = info["url"]
        self.bootstrap = info["p2p_addrs"][0]
        return self.entry

    def spawn_node(self, model: str, *, rate: float, slots: int = 1, queue: int = 0, advert_interval: float = 5.0,
                   max_tokens: int = 4096, extra: tuple[str, ...] = ()) -> Proc:
        self._n += 1
        name = f"node{self._n:03d}"
        node = Proc(self.tmp, name, ["node", "start", "--synthetic", model, "--synthetic-rate", str(rate), "--slots", str(slots),
                                     "--queue", str(queue), "--max-tokens", str(max_tokens), "--advert-interval", str(advert_interval),
                                     "--bootstrap", self.bootstrap, "--log-level", "info", *extra], self.other_cpus)
        self.nodes.append(node)
        return node

    def add_nodes(self, count: int, model: str, *, batch: int = 6, **kw) -> list[Proc]:
        """Start `count` nodes, `batch` at a time (each start imports libp2p: ~1 s of CPU)."""
        out = []
        for i in range(0, count, batch):
            group = [self.spawn_node(model, **kw) for _ in range(min(batch, count - i))]
            for n in group:
                n.ready(120)
            out += group
        return out

    def live_nodes(self) -> list[Proc]:
        return [n for n in self.nodes if n.alive()]

    def nodes_view(self) -> list[dict]:
        import httpx

        return httpx.get(f"{self.url}/v1/mesh/nodes", timeout=10).json()["data"]

    def wait_ready_count(self, model: str, count: int, limit: float) -> float:
        """Seconds until the entry shows `count` nodes of `model` in state ready."""
        t0 = time.monotonic()
        deadline = t0 + limit
        while time.monotonic() < deadline:
            try:
                if sum(1 for n in self.nodes_view() if n["model"] == model and n["state"] == "ready") >= count:
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the entry did not show {count} ready nodes of {model} within {limit} s")

    def close(self) -> None:
        for n in self.nodes:
            if n.alive():
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop(10)
        if self.entry is not None:
            self.entry.stop(10)


@contextmanager
def mesh(pin: bool, keep: bool = False):
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    m = Mesh(tmp, pin=pin)
    try:
        yield m
    finally:
        m.close()
        if not keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"  (kept {tmp})", flush=True)


def loadgen(url: str, model: str, *, streams: int, duration: float, max_tokens: int, cpus: set[int] | None,
            warmup: float = 1.0, expect_full: bool = True, background: bool = False):
    cmd = [PY, str(REPO / "scripts" / "loadgen.py"), "--url", url, "--model", model, "--streams", str(streams),
           "--duration", str(duration), "--max-tokens", str(max_tokens), "--warmup", str(warmup), "--request-timeout", "60"]
    if expect_full:
        cmd.append("--expect-full")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if cpus:
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except OSError:
            pass
    if background:
        return proc
    return finish_loadgen(proc, duration)


def finish_loadgen(proc: subprocess.Popen, duration: float) -> dict:
    try:
        out, err = proc.communicate(timeout=duration + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"load generator failed: {err[-2000:]}") from None


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))]


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for k, _, fmt in cols:
            v = r.get(k)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- sections ------------------------------------------------------------------------------

def section_overhead(args) -> dict:
    """Real model: direct llama.cpp vs our engine vs node vs entry + node."""
    import trio
    from bench_entry import bench_entry_path
    from bench_node import bench_engine, bench_llama_cpp, bench_node

    from engine.model_file import bundled_model_path, inspect_model
    from engine.threads import default_threads

    model = args.model or str(bundled_model_path())
    info = inspect_model(model)
    runs, tokens, threads = args.overhead_runs, args.overhead_tokens, args.threads
    # --threads 0: every path on its defaults; llama-cpp-python has none of its own here, so
    # it gets every core, as llama.cpp's own tools do.
    direct_threads = threads or default_threads()[1]
    node_threads = f"{threads}" if threads else "default {}/{}".format(*default_threads())
    say(f"[overhead] {info.name} {info.quantization}, {node_threads} threads (direct {direct_threads}), {tokens} tokens, "
        f"median of {runs} runs, OMP_WAIT_POLICY here {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    res: dict = {"model": info.name, "threads": threads, "node_threads": node_threads, "direct_threads": direct_threads,
                 "tokens": tokens, "runs": runs}
    paths = {}
    say("  direct llama-cpp-python …")
    paths["direct-llama-cpp"] = bench_llama_cpp(model, direct_threads, tokens, runs)
    say("  our engine in-process …")
    paths["engine"] = bench_engine(model, threads, tokens, runs)
    say("  through a node (libp2p) …")
    paths["node"] = trio.run(bench_node, model, info.sha256, threads, tokens, runs)
    say("  through entry + node (HTTP SSE) …")
    with tempfile.TemporaryDirectory() as tmp:
        paths["entry+node"] = bench_entry_path(Path(tmp), model, threads, tokens, runs)
    base = paths["direct-llama-cpp"]
    rows = []
    for name, r in paths.items():
        r["decode_ratio"] = round(r["decode_tps"] / base["decode_tps"], 4)
        r["ttft_added_ms"] = round(r["ttft_ms"] - base["ttft_ms"], 2)
        rows.append({"path": name, **r})
    res["paths"] = paths
    say(table(rows, [("path", "path", ""), ("ttft_ms", "TTFT ms", ".1f"), ("decode_tps", "decode tok/s", ".1f"),
                     ("decode_ratio", "vs direct", ".1%"), ("ttft_added_ms", "TTFT added ms", "+.1f")]))
    return res


def section_capacity(args) -> dict:
    model = "synth-capacity"
    streams_list = [int(s) for s in args.capacity_streams.split(",")]
    max_streams = max(streams_list)
    n_nodes = args.capacity_nodes
    # Every stream gets a slot with a quarter to spare, as a mesh in service would have:
    # at exactly one slot per stream each new request would wait for the one just freed.
    slots = -(-max_streams * 5 // (4 * n_nodes))
    say(f"[capacity] {n_nodes} synthetic nodes x {slots} slots at {args.rate:g} tok/s per stream, "
        f"{args.capacity_tokens} tokens per request, {args.capacity_seconds:g} s per level"
        + (", entry pinned to its own core" if args.pin else ""))
    res: dict = {"nodes": n_nodes, "slots_per_node": slots, "rate_per_stream": args.rate,
                 "tokens_per_request": args.capacity_tokens, "seconds": args.capacity_seconds, "pinned": args.pin, "levels": []}
    with mesh(args.pin, args.keep) as m:
        m.start_entry()
        m.add_nodes(n_nodes, model, rate=args.rate, slots=slots, queue=0)
        m.wait_ready_count(model, n_nodes, 30)
        # One short warm-up so connections and code paths are hot.
        loadgen(m.url, model, streams=4, duration=1.5, max_tokens=32, cpus=m.other_cpus, warmup=0)
        for streams in streams_list:
            e0, t0, b0 = m.entry.cpu_s(), time.monotonic(), machine_busy_s()
            n0 = sum(n.cpu_s() for n in m.nodes)
            r = loadgen(m.url, model, streams=streams, duration=args.capacity_seconds, max_tokens=args.capacity_tokens,
                        cpus=m.other_cpus)
            wall = time.monotonic() - t0
            e1, b1 = m.entry.cpu_s(), machine_busy_s()
            n1 = sum(n.cpu_s() for n in m.nodes)
            r.update({
                # Busy CPU on the machine that was neither entry, nodes nor load generator:
                # another job's work, which these numbers did not have to themselves.
                "other_cpu_share": round(max(0.0, (b1 - b0) - (e1 - e0) - (n1 - n0) - r["cpu_s"]) / wall, 3),
                "offered_tok_per_s": round(streams * args.rate, 1),
                "entry_cpu_share": round((e1 - e0) / wall, 3),
                "entry_rss_mb": round(m.entry.rss_mb(), 1),
                "nodes_cpu_share": round((n1 - n0) / wall, 3),
                "entry_cpu_us_per_token": round((e1 - e0) / max(1, r["tokens"]) * 1e6, 1) if r["tokens"] else None,
            })
            res["levels"].append(r)
            say(f"  {streams:3d} streams: {r['tok_per_s']:.0f} tok/s, gap p99 {r['gap_ms_p99']} ms, "
                f"entry CPU {r['entry_cpu_share']:.0%}, failed {r['failed']}")
            time.sleep(0.5)
    say(table(res["levels"], [("streams", "streams", ""), ("offered_tok_per_s", "offered", ".0f"), ("tok_per_s", "tok/s", ".0f"),
                              ("tokens_per_event", "tok/event", ".1f"), ("gap_ms_p50", "gap p50 ms", ".1f"),
                              ("gap_ms_p99", "gap p99 ms", ".1f"), ("ttft_ms_p50", "TTFT p50 ms", ".1f"),
                              ("ttft_ms_p99", "TTFT p99 ms", ".1f"), ("entry_cpu_share", "entry CPU", ".0%"),
                              ("entry_cpu_us_per_token", "entry us/tok", ".1f"), ("entry_rss_mb", "entry RSS MB", ".0f"),
                              ("nodes_cpu_share", "nodes CPU", ".0%"), ("cpu_share", "loadgen CPU", ".0%"),
                              ("other_cpu_share", "other CPU", ".0%"), ("failed", "failed", "")]))
    return res


def _probe_routing(m: Mesh, node: Proc, model: str, loaded_msgs: tuple[str, ...], limit: float = 60.0) -> dict:
    """Wait until the entry shows `node` (its own model name) ready, then SIGKILL it and wait
    until the entry no longer routes to it. Times from the node's JSON log and our clock."""
    seen = None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and seen is None:
        try:
            if any(n["model"] == model and n["state"] == "ready" for n in m.nodes_view()):
                seen = time.time()
        except Exception:
            pass
        if seen is None:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited:\n{node.log_tail()}")
            time.sleep(0.02)
    node.ready(30)
    loaded = None
    for msg in loaded_msgs:  # the last of these that the node logged
        loaded = node.log_ts(msg) or loaded
    ready = node.log_ts("node ready")
    row = {"start_to_loaded_s": round(loaded - node.started, 3) if loaded else None,
           "routable_after_start_s": round(seen - node.started, 3) if seen else None,
           "routable_after_loaded_s": round(seen - loaded, 3) if (seen and loaded) else None,
           "routable_after_ready_s": round(seen - ready, 3) if (seen and ready) else None}
    time.sleep(1.0)
    killed = node.kill()
    gone = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and gone is None:
        try:
            if not any(n["model"] == model and n["state"] in ("ready", "busy") for n in m.nodes_view()):
                gone = time.time()
        except Exception:
            pass
        if gone is None:
            time.sleep(0.02)
    row["out_of_routing_after_kill_s"] = round(gone - killed, 3) if gone else None
    return row


def section_routing(args) -> dict:
    """New node routable after its model is loaded; killed node out of routing."""
    from engine.model_file import bundled_model_path

    probes = args.routing_probes
    real = str(bundled_model_path()) if args.routing_real else None
    if real and not Path(real).exists():
        real = None
    say(f"[routing] {probes} synthetic probes" + (" + 2 with the real model" if real else "")
        + ": start a node, time until the entry routes to it; SIGKILL it, time until it doesn't")
    rows = []
    with mesh(False, args.keep) as m:
        m.start_entry()
        # A few other nodes, so the DHT is a mesh and not just entry + probe.
        m.add_nodes(3, "synth-background", rate=args.rate, slots=1)
        m.wait_ready_count("synth-background", 3, 30)
        kinds = ["synthetic"] * probes + (["real"] * 2 if real else [])
        for i, kind in enumerate(kinds):
            if kind == "synthetic":
                model = f"synth-probe-{i}"
                node = m.spawn_node(model, rate=args.rate, slots=1)
                row = _probe_routing(m, node, model, ("synthetic engine: no model is loaded",))
            else:
                model = f"real-probe-{i}"
                m._n += 1
                node = Proc(m.tmp, f"node{m._n:03d}", ["node", "start", "--model", real, "--model-name", model, "--threads", "1",
                                                       "--bootstrap", m.bootstrap, "--log-level", "info"], m.other_cpus)
                m.nodes.append(node)
                # Loaded = the model is in memory and its speed measured: ready to serve.
                row = _probe_routing(m, node, model, ("slot 1/1 loaded", "benchmark done"))
            row = {"probe": i, "kind": kind, **row}
            rows.append(row)
            say(f"  probe {i} ({kind}): routable {row['routable_after_loaded_s']} s after load "
                f"({row['routable_after_start_s']} s after process start), out of routing "
                f"{row['out_of_routing_after_kill_s']} s after SIGKILL")
    res = {"probes": rows}
    for k in ("routable_after_loaded_s", "routable_after_ready_s", "routable_after_start_s", "out_of_routing_after_kill_s"):
        vals = [r[k] for r in rows if r[k] is not None]
        res[k + "_median"] = round(statistics.median(vals), 3) if vals else None
        res[k + "_max"] = round(max(vals), 3) if vals else None
    say(table(rows, [("probe", "probe", ""), ("kind", "kind", ""), ("start_to_loaded_s", "start->loaded s", ".3f"),
                     ("routable_after_loaded_s", "routable after load s", ".3f"),
                     ("routable_after_ready_s", "after ready s", "+.3f"), ("routable_after_start_s", "after start s", ".3f"),
                     ("out_of_routing_after_kill_s", "out after kill s", ".3f")]))
    return res


def _stream_and_kill(url: str, model: str, max_tokens: int, kill_after: int, find_serving) -> dict:
    """Stream one completion; after `kill_after` text events SIGKILL the serving node.
    Returns the longest pause after the kill, and the stream's own health."""
    from bench_entry import stream

    killed_at = None

    def on_token(n: int) -> None:
        nonlocal killed_at
        if n == kill_after and killed_at is None:
            node = find_serving()
            if node is not None:
                node.kill()
                killed_at = time.perf_counter()

    _, _, tokens, arrivals, usage = stream(url, model, max_tokens, on_token, prompt=f"failover {time.time()}", timeout=60)
    failovers = usage.get("mesh", {}).get("failovers") if usage else None
    gap = None
    if killed_at is not None:
        seq = [killed_at] + [a for a in arrivals if a > killed_at]
        gap = max((b - a for a, b in zip(seq, seq[1:])), default=None)
    return {"gap_s": gap, "tokens": tokens, "failovers": failovers, "killed": killed_at is not None}


def section_engine(args) -> dict:
    """The batched engine's numbers, from its own script (it prints its table as it goes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        cmd = [PY, str(REPO / "scripts" / "bench_engine.py"), "--json", str(out)]
        if args.quick:
            cmd += ["--quick"]
        subprocess.run(cmd, check=True, cwd=REPO, timeout=1800)
        return json.loads(out.read_text())


def section_taskrouting(args) -> dict:
    """The learned router's numbers, from its own script (it prints its table as it goes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "routing.json"
        cmd = [PY, str(REPO / "scripts" / "bench_routing.py"), "--json", str(out)]
        if args.quick:
            cmd += ["--folds", "2"]
        subprocess.run(cmd, check=True, cwd=REPO, timeout=900)
        return json.loads(out.read_text())


def section_share(args) -> dict:
    """Model sharing, from its own script (scripts/bench_share.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "share.json"
        cmd = [PY, str(REPO / "scripts" / "bench_share.py"), "--json", str(out)]
        if args.quick:
            cmd += ["--runs", "1"]
        subprocess.run(cmd, check=True, cwd=REPO, timeout=1200)
        return json.loads(out.read_text())


def section_failover(args) -> dict:
    kills = args.failover_kills
    model = "synth-failover"
    say(f"[failover] {kills} kills of the serving node mid-stream, synthetic nodes at {args.failover_rate:g} tok/s")
    rows = []
    with mesh(False, args.keep) as m:
        m.start_entry()
        m.add_nodes(kills + 1, model, rate=args.failover_rate, slots=1)
        m.wait_ready_count(model, kills + 1, 30)

        def find_serving():
            for n in m.live_nodes():
                st = n.control()
                if st and st.get("active", 0) > 0:
                    return n
            return None

        for k in range(kills):
            r = _stream_and_kill(m.url, model, int(args.failover_rate * 4), 20, find_serving)
            r["kill"] = k
            r["gap_ms"] = round(r["gap_s"] * 1000, 1) if r["gap_s"] is not None else None
            rows.append(r)
            say(f"  kill {k}: gap {r['gap_ms']} ms, {r['tokens']} tokens, failovers {r['failovers']}")
            time.sleep(1.0)
    gaps = [r["gap_ms"] for r in rows if r["gap_ms"] is not None]
    res = {"rate": args.failover_rate, "kills": rows, "gap_ms_median": statistics.median(gaps) if gaps else None,
           "gap_ms_max": max(gaps) if gaps else None,
           "complete": all(r["tokens"] == int(args.failover_rate * 4) for r in rows)}
    if args.failover_real:
        # The same with the real model: the new node replays the delivered tokens one at a
        # time (bit-exact continuation), so the gap includes that replay.
        from bench_entry import bench_failover

        from engine.model_file import bundled_model_path

        say(f"  with the real model: {args.failover_real} kills of 1-thread SmolLM2 nodes after 3 tokens …")
        with tempfile.TemporaryDirectory() as tmp:
            res["real_model"] = bench_failover(Path(tmp), str(args.model or bundled_model_path()), 200, args.failover_real)
        say(f"  real model: gaps {res['real_model']['gaps_ms']} ms")
    return res


def burst_once(url: str, model: str, n: int, max_tokens: int, limit: float) -> dict:
    """n chat requests sent at once (non-streaming), while /health is asked every 50 ms:
    completed / failed, latency percentiles, /health latency during the burst."""
    import httpx
    import trio

    async def main() -> dict:
        lat: list[float] = []
        errors: dict[str, int] = {}
        health: list[float] = []
        done = trio.Event()
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a short story about a lighthouse."}]}

        async def one(client: httpx.AsyncClient, i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json={**body, "seed": i})
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                what = "ok" if ok else f"HTTP {r.status_code}: {r.text[:120]}"
            except httpx.HTTPError as e:
                what = f"{type(e).__name__}: {e}"[:160]
            if what == "ok":
                lat.append(time.perf_counter() - t0)
            else:
                errors[what] = errors.get(what, 0) + 1

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as hc:
                while not done.is_set():
                    t0 = time.perf_counter()
                    try:
                        await hc.get("/health")
                        health.append(time.perf_counter() - t0)
                    except httpx.HTTPError:
                        health.append(float("inf"))
                    with trio.move_on_after(0.05):
                        await done.wait()

        limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
        t0 = time.perf_counter()
        with trio.move_on_after(limit):
            async with httpx.AsyncClient(base_url=url, timeout=limit, limits=limits) as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(probe)
                    async with trio.open_nursery() as reqs:
                        for i in range(n):
                            reqs.start_soon(one, client, i)
                    done.set()
        wall = time.perf_counter() - t0
        failed = n - len(lat)
        ms = [x * 1000 for x in lat]
        hms = [x * 1000 for x in health]
        return {"requests": n, "completed": len(lat), "failed": failed, "errors": errors, "wall_s": round(wall, 2),
                "latency_ms_p50": _r(pct(ms, 50)), "latency_ms_p99": _r(pct(ms, 99)), "latency_ms_max": _r(max(ms, default=None)),
                "health_probes": len(hms), "health_ms_p50": _r(pct(hms, 50)), "health_ms_p99": _r(pct(hms, 99)),
                "health_ms_max": _r(max(hms, default=None))}

    return trio.run(main)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def section_burst(args) -> dict:
    """Bursts of concurrent chat requests against a `mesh demo`-like mesh: an entry (open, no
    rate limits, default queue bounds unless --burst-queue-wait) and 2 single-slot nodes."""
    sizes = [int(x) for x in args.burst_sizes.split(",")]
    say(f"[burst] {', '.join(map(str, sizes))} concurrent chat requests (max_tokens {args.burst_tokens}) "
        f"against an entry + 2 nodes (1 slot each)")
    res: dict = {"sizes": sizes, "max_tokens": args.burst_tokens, "queue_wait": args.burst_queue_wait, "runs": []}
    entry_args = ("--queue-wait", str(args.burst_queue_wait)) if args.burst_queue_wait else ()
    kinds = [("synthetic", f"{args.burst_rate:g} tok/s")]
    if args.burst_real:
        kinds.append(("SmolLM2", "bundled model, 1 thread per node"))
    for kind, detail in kinds:
        with mesh(False, args.keep) as m:
            m.start_entry(*entry_args)
            if kind == "synthetic":
                model = "synth-burst"
                m.add_nodes(2, model, rate=args.burst_rate, slots=1, queue=8)
            else:
                from engine.model_file import bundled_model_path

                path = Path(args.model) if args.model else bundled_model_path()
                model = path.name.removesuffix(".gguf")
                for _ in range(2):
                    m._n += 1
                    node = Proc(m.tmp, f"node{m._n:03d}", ["node", "start", "--model", str(path), "--threads", "1",
                                                            "--bootstrap", m.bootstrap, "--log-level", "info"])
                    m.nodes.append(node)
                    node.ready(180)
            m.wait_ready_count(model, 2, 60)
            for n in (sizes if kind == "synthetic" else [int(x) for x in (args.burst_real_sizes or args.burst_sizes).split(",")]):
                e0, w0 = m.entry.cpu_s(), time.monotonic()
                r = burst_once(m.url, model, n, args.burst_tokens, args.burst_limit)
                r.update({"engine": kind, "engine_detail": detail,
                          "entry_cpu": round((m.entry.cpu_s() - e0) / max(1e-9, time.monotonic() - w0), 2),
                          "entry_rss_mb": round(m.entry.rss_mb(), 1)})
                res["runs"].append(r)
                say(f"  {kind} {n}: {r['completed']} completed, {r['failed']} failed in {r['wall_s']} s; latency p50 "
                    f"{r['latency_ms_p50']} ms p99 {r['latency_ms_p99']} ms; /health p99 {r['health_ms_p99']} ms "
                    f"(max {r['health_ms_max']})" + (f"; errors {r['errors']}" if r["errors"] else ""))
    say(table(res["runs"], [("engine", "engine", ""), ("requests", "burst", ""), ("completed", "completed", ""),
                            ("failed", "failed", ""), ("wall_s", "wall s", ".1f"), ("latency_ms_p50", "p50 ms", ".0f"),
                            ("latency_ms_p99", "p99 ms", ".0f"), ("health_ms_p50", "/health p50 ms", ".1f"),
                            ("health_ms_p99", "/health p99 ms", ".1f"), ("entry_cpu", "entry CPU", ".0%")]))
    return res


def dht_probe(bootstrap: str, samples: int) -> dict:
    """Run in a subprocess: a fresh DHT client times lookups against the mesh."""
    import trio

    from protocol.identity import Identity
    from transport.dht_keys import advert_key, directory_key
    from transport.discovery import discover_all
    from transport.host import open_mesh_host

    async def main() -> dict:
        out: dict = {"find_providers_ms": [], "get_value_ms": [], "discover_all_ms": [], "providers": []}
        async with open_mesh_host(Identity.generate(), bootstrap=[bootstrap], dht_server=False) as host:
            for _ in range(samples):
                t0 = time.perf_counter()
                provs = await host.find_providers(directory_key(), count=500, timeout=10)
                out["find_providers_ms"].append((time.perf_counter() - t0) * 1000)
                out["providers"].append(len(provs))
                for p in provs[:3]:
                    t0 = time.perf_counter()
                    await host.get_value(advert_key(p.peer_id), timeout=5)
                    out["get_value_ms"].append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                ads = await discover_all(host, timeout=10, max_providers=500)
                out["discover_all_ms"].append((time.perf_counter() - t0) * 1000)
                out.setdefault("adverts", []).append(len(ads))
        return out

    return trio.run(main)


def run_dht_probe(bootstrap: str, samples: int, cpus) -> dict:
    proc = subprocess.Popen([PY, str(Path(__file__)), "--dht-probe", bootstrap, "--dht-samples", str(samples)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if cpus:
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except OSError:
            pass
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    try:
        raw = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"DHT probe failed: {err[-2000:]}") from None

    def s(xs):
        return {"p50": round(statistics.median(xs), 1), "max": round(max(xs), 1)} if xs else None

    return {"find_providers_ms": s(raw["find_providers_ms"]), "get_value_ms": s(raw["get_value_ms"]),
            "discover_all_ms": s(raw["discover_all_ms"]), "providers_found": min(raw["providers"]) if raw["providers"] else 0,
            "adverts_found": min(raw.get("adverts", [0]))}


def section_scale(args) -> dict:
    sizes = [int(s) for s in args.scale_sizes.split(",")]
    model = "synth-scale"
    say(f"[scale] growing a mesh of synthetic nodes to {', '.join(map(str, sizes))} nodes, then churn under traffic")
    res: dict = {"sizes": [], "churn": None}
    with mesh(False, args.keep) as m:
        m.start_entry()
        for size in sizes:
            t0 = time.monotonic()
            m.add_nodes(size - len(m.live_nodes()), model, rate=args.scale_rate, slots=args.scale_slots, queue=0)
            started = time.monotonic() - t0
            try:
                routable = started + m.wait_ready_count(model, size, 60)
            except RuntimeError as e:
                # Keep what was measured; the rows so far and the churn run still count.
                seen = sum(1 for x in m.nodes_view() if x["model"] == model and x["state"] == "ready")
                res["sizes"].append({"nodes": size, "start_s": round(started, 1), "error": str(e), "ready_seen": seen})
                say(f"  {size} nodes: only {seen} routable after 60 s ({e})")
                break
            time.sleep(2.0)
            # Idle cost of the mesh at this size: adverts, provider records, status polls.
            live = m.live_nodes()
            e0, n0, w0 = m.entry.cpu_s(), sum(n.cpu_s() for n in live), time.monotonic()
            time.sleep(args.idle_seconds)
            w = time.monotonic() - w0
            idle_entry = (m.entry.cpu_s() - e0) / w
            idle_nodes = (sum(n.cpu_s() for n in live) - n0) / w
            rss = [n.rss_mb() for n in live]
            dht = run_dht_probe(m.bootstrap, args.dht_samples, m.other_cpus)
            row = {"nodes": size, "start_s": round(started, 1), "all_routable_s": round(routable, 2),
                   "node_rss_mb_mean": round(statistics.mean(rss), 1), "node_rss_mb_max": round(max(rss), 1),
                   "entry_rss_mb": round(m.entry.rss_mb(), 1),
                   "find_providers_ms_p50": dht["find_providers_ms"]["p50"], "find_providers_ms_max": dht["find_providers_ms"]["max"],
                   "get_value_ms_p50": dht["get_value_ms"]["p50"] if dht["get_value_ms"] else None,
                   "discover_all_ms_p50": dht["discover_all_ms"]["p50"], "providers_found": dht["providers_found"],
                   "adverts_found": dht["adverts_found"],
                   "idle_entry_cpu": round(idle_entry, 3), "idle_nodes_cpu": round(idle_nodes, 3),
                   "idle_cpu_per_node": round(idle_nodes / len(live), 4)}
            res["sizes"].append(row)
            say(f"  {size} nodes: all routable {routable:.1f} s after the first of them started, RSS/node "
                f"{row['node_rss_mb_mean']:.0f} MB, find_providers p50 {row['find_providers_ms_p50']} ms, "
                f"discover_all p50 {row['discover_all_ms_p50']} ms, {row['adverts_found']} adverts found")
        say(table([r for r in res["sizes"] if "error" not in r], [("nodes", "nodes", ""), ("all_routable_s", "all routable s", ".1f"),
                                 ("node_rss_mb_mean", "RSS/node MB", ".0f"), ("node_rss_mb_max", "max", ".0f"),
                                 ("entry_rss_mb", "entry RSS MB", ".0f"),
                                 ("find_providers_ms_p50", "find_providers p50 ms", ".0f"), ("find_providers_ms_max", "max", ".0f"),
                                 ("get_value_ms_p50", "get_value p50 ms", ".0f"), ("discover_all_ms_p50", "discover_all p50 ms", ".0f"),
                                 ("adverts_found", "adverts", ""), ("idle_entry_cpu", "idle entry CPU", ".0%"),
                                 ("idle_nodes_cpu", "idle nodes CPU", ".0%"), ("idle_cpu_per_node", "per node", ".1%")]))
        res["churn"] = churn(m, model, args)
    return res


def churn(m: Mesh, model: str, args) -> dict:
    """Traffic while nodes are SIGKILLed and new ones join; every request must succeed."""
    kills, adds = args.churn_kills, args.churn_adds
    duration = args.churn_seconds
    streams = args.churn_streams
    tokens = args.churn_tokens
    say(f"  churn: {streams} streams for {duration:g} s; SIGKILL {kills} serving nodes and add {adds} while they run")
    before = {n.pid: (n.control() or {}).get("requests_served", 0) for n in m.live_nodes()}
    lg = loadgen(m.url, model, streams=streams, duration=duration, max_tokens=tokens, cpus=m.other_cpus, warmup=0,
                 background=True)
    t0 = time.monotonic()
    events = []
    step = duration / (max(kills, adds) + 2)
    killed = added = 0
    new_nodes: list[Proc] = []
    while (killed < kills or added < adds) and time.monotonic() - t0 < duration - 2:
        time.sleep(step)
        if killed < kills:
            # A node that is serving right now: its streams must fail over.
            victim = next((n for n in m.live_nodes() if n not in new_nodes and (n.control() or {}).get("active", 0) > 0), None)
            if victim is not None:
                victim.kill()
                killed += 1
                events.append({"t": round(time.monotonic() - t0, 2), "event": "kill", "node": victim.name})
        if added < adds:
            new_nodes.append(m.spawn_node(model, rate=args.scale_rate, slots=args.scale_slots, queue=0))
            added += 1
            events.append({"t": round(time.monotonic() - t0, 2), "event": "add", "node": new_nodes[-1].name})
    for n in new_nodes:
        n.ready(60)
    r = finish_loadgen(lg, duration)
    served = {}
    for n in m.live_nodes():
        st = n.control() or {}
        served[n.name] = st.get("requests_served", 0) - before.get(n.pid, 0)
    counts = sorted(served.values())
    new_served = sum(served.get(n.name, 0) for n in new_nodes if n.alive())
    out = {"streams": streams, "seconds": duration, "kills": killed, "adds": added, "events": events,
           "requests": r["requests"], "failed": r["failed"], "errors": r["errors"], "tok_per_s": r["tok_per_s"],
           "gap_ms_p99": r["gap_ms_p99"], "gap_ms_max": r["gap_ms_max"],
           "served_per_live_node": {"min": counts[0] if counts else 0, "median": statistics.median(counts) if counts else 0,
                                    "max": counts[-1] if counts else 0},
           "served_by_new_nodes": new_served, "live_nodes": len(counts)}
    say(f"  churn: {r['requests']} requests, {r['failed']} failed, {killed} killed, {added} added; requests per live node "
        f"min {out['served_per_live_node']['min']} median {out['served_per_live_node']['median']} max {out['served_per_live_node']['max']}; "
        f"new nodes served {new_served}")
    return out


# ---- main ----------------------------------------------------------------------------------

SECTIONS = ("overhead", "capacity", "routing", "taskrouting", "engine", "failover", "scale", "burst", "share")


def summary(results: dict) -> list[dict]:
    """Targets vs results, one row each."""
    rows = []
    cap = results.get("capacity")
    if cap:
        top = max(cap["levels"], key=lambda r: r["streams"])
        rows.append({"metric": f"entry tok/s at {top['streams']} streams", "target": ">= 10000", "result": top["tok_per_s"],
                     "ok": top["tok_per_s"] >= 10000})
        rows.append({"metric": f"p99 gap at {top['streams']} streams (ms)", "target": "<= 50", "result": top["gap_ms_p99"],
                     "ok": top["gap_ms_p99"] is not None and top["gap_ms_p99"] <= 50})
    rt = results.get("routing")
    if rt:
        v = rt.get("routable_after_loaded_s_max")
        rows.append({"metric": "new node routable after load (s, max)", "target": "<= 2", "result": v, "ok": v is not None and v <= 2})
        v = rt.get("out_of_routing_after_kill_s_max")
        rows.append({"metric": "killed node out of routing (s, max)", "target": "<= 5", "result": v, "ok": v is not None and v <= 5})
    fo = results.get("failover")
    if fo:
        rows.append({"metric": "failover gap, synthetic (ms, max)", "target": "<= 2000", "result": fo["gap_ms_max"],
                     "ok": fo["gap_ms_max"] is not None and fo["gap_ms_max"] <= 2000 and fo["complete"]})
        real = fo.get("real_model")
        if real and real.get("gap_ms_max") is not None:
            rows.append({"metric": "failover gap, SmolLM2 (ms, max)", "target": "<= 2000", "result": real["gap_ms_max"],
                         "ok": real["gap_ms_max"] <= 2000})
    eng = results.get("engine")
    if eng and eng.get("decode"):
        top = max(eng["decode"], key=lambda r: r["n"])
        rows.append({"metric": f"engine / direct llama.cpp decode at {top['n']} sequences", "target": ">= 0.9",
                     "result": top["ratio"], "ok": top["ratio"] >= 0.9})
        t = eng["ttft_turn2"]
        rows.append({"metric": "turn-2 TTFT speed-up from prefix reuse", "target": ">= 5", "result": t["speedup"],
                     "ok": t["speedup"] >= 5})
    sc = results.get("scale")
    if sc and sc.get("churn"):
        c = sc["churn"]
        rows.append({"metric": f"failed requests under churn ({c['kills']} killed, {c['adds']} added)", "target": "0",
                     "result": c["failed"], "ok": c["failed"] == 0})
        big = sc["sizes"][-1]
        found = big.get("adverts_found", big.get("ready_seen", 0))
        rows.append({"metric": f"nodes discovered at {big['nodes']}", "target": str(big["nodes"]), "result": found,
                     "ok": found >= big["nodes"]})
    bu = results.get("burst")
    if bu:
        for r in bu["runs"]:
            rows.append({"metric": f"failed requests in a burst of {r['requests']} ({r['engine']})", "target": "0",
                         "result": r["failed"], "ok": r["failed"] == 0})
    ov = results.get("overhead")
    if ov:
        e2e = ov["paths"]["entry+node"]
        rows.append({"metric": "entry+node decode vs direct", "target": ">= 95%", "result": f"{e2e['decode_ratio']:.1%}",
                     "ok": e2e["decode_ratio"] >= 0.95})
        rows.append({"metric": "entry+node TTFT added (ms)", "target": "<= 30", "result": e2e["ttft_added_ms"],
                     "ok": e2e["ttft_added_ms"] <= 30})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs and a smaller mesh (a few minutes in all)")
    ap.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--json", default=str(REPO / "bench-results" / "latest.json"), help="where to write the results")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="don't give the entry its own core")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories (logs) of each section")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each section wait up to this many seconds for other work on the machine to settle (0 = don't)")
    ap.add_argument("--model", help="GGUF for the overhead section (default: the bundled SmolLM2)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the overhead section (0: the node's "
                    "defaults, engine/threads.py; direct llama.cpp then gets every core)")
    ap.add_argument("--rate", type=float, default=250.0, help="synthetic tok/s per stream (capacity, routing)")
    ap.add_argument("--capacity-streams", default="1,16,64")
    # 2: the nodes share one core with the load generator here, and every extra node process
    # adds scheduling contention that shows up as gaps (p99 at 64 streams: 1 node 50 ms,
    # 2 nodes 43-44, 4 nodes 50-84, 8 nodes 104), not as entry load.
    ap.add_argument("--capacity-nodes", type=int, default=2,
                    help="synthetic nodes serving the capacity run (default 2; see BENCHMARKS.md)")
    ap.add_argument("--capacity-tokens", type=int, default=500, help="tokens per request in the capacity run")
    ap.add_argument("--capacity-seconds", type=float, default=None)
    ap.add_argument("--routing-probes", type=int, default=None)
    ap.add_argument("--no-routing-real", dest="routing_real", action="store_false",
                    help="routing probes with synthetic nodes only (default: also 2 with the bundled model)")
    ap.add_argument("--failover-kills", type=int, default=None)
    ap.add_argument("--failover-rate", type=float, default=50.0, help="synthetic tok/s of the failover nodes")
    ap.add_argument("--failover-real", type=int, default=None, help="kills measured with the real model too (default 2; --quick 0)")
    ap.add_argument("--scale-sizes", default=None, help="mesh sizes to grow through (default 5,10,30; --quick 5,10)")
    ap.add_argument("--scale-rate", type=float, default=100.0)
    ap.add_argument("--scale-slots", type=int, default=2)
    ap.add_argument("--dht-samples", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="how long the idle cost of the mesh is measured at each size")
    ap.add_argument("--churn-streams", type=int, default=16)
    ap.add_argument("--churn-seconds", type=float, default=None)
    ap.add_argument("--churn-tokens", type=int, default=200)
    ap.add_argument("--churn-kills", type=int, default=None)
    ap.add_argument("--churn-adds", type=int, default=None)
    ap.add_argument("--overhead-runs", type=int, default=None)
    ap.add_argument("--overhead-tokens", type=int, default=None)
    ap.add_argument("--burst-sizes", default="40,200", help="concurrent requests per burst (default 40,200)")
    ap.add_argument("--burst-tokens", type=int, default=32, help="max_tokens of each burst request")
    ap.add_argument("--burst-rate", type=float, default=100.0,
                    help="synthetic tok/s per slot in the burst section (about what SmolLM2 does on one thread)")
    ap.add_argument("--burst-queue-wait", type=float, default=None,
                    help="the entry's --queue-wait in the burst section (default: the entry's default)")
    ap.add_argument("--burst-limit", type=float, default=600.0, help="give up on a burst after this many seconds")
    ap.add_argument("--burst-real", action="store_true", help="also burst 2 nodes serving the bundled model")
    ap.add_argument("--burst-real-sizes", default=None, help="burst sizes for the bundled model (default: --burst-sizes)")
    ap.add_argument("--dht-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dht_probe:
        print(json.dumps(dht_probe(args.dht_probe, args.dht_samples)))
        return 0
    q = args.quick
    defaults = {"capacity_seconds": 6.0 if q else 12.0, "routing_probes": 3 if q else 5, "failover_kills": 2 if q else 3,
                "scale_sizes": "5,10" if q else "5,10,30", "churn_seconds": 15.0 if q else 30.0,
                "churn_kills": 2 if q else 4, "churn_adds": 2 if q else 4, "overhead_runs": 3 if q else 5,
                "overhead_tokens": 64 if q else 128, "failover_real": 0 if q else 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    args.pin = args.pin and len(os.sched_getaffinity(0)) >= 2

    machine = {"cpu_model": cpu_model(), "cores": len(os.sched_getaffinity(0)),
               "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "python": platform.python_version(), "kernel": platform.release()}
    say(f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gb']} GB, Python {machine['python']}")
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "quick": q,
                     "args": {k: v for k, v in vars(args).items() if k != "dht_probe"}}
    t_all = time.monotonic()
    fns = {"overhead": section_overhead, "capacity": section_capacity, "routing": section_routing,
           "taskrouting": section_taskrouting, "engine": section_engine, "failover": section_failover,
           "scale": section_scale, "burst": section_burst, "share": section_share}
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.monotonic()
        if args.wait_quiet > 0:
            results.setdefault("background_cores_at_start", {})[name] = wait_quiet(args.wait_quiet)
        try:
            results[name] = fns[name](args)
        except Exception as e:  # one broken section must not lose the others' numbers
            say(f"[{name}] FAILED: {type(e).__name__}: {e}")
            results[name + "_error"] = f"{type(e).__name__}: {e}"[:4000]
        results.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
        out_path.write_text(json.dumps(results, indent=2))
        say("")
    results["summary"] = summary(results)
    results["total_seconds"] = round(time.monotonic() - t_all, 1)
    out_path.write_text(json.dumps(results, indent=2))
    if results["summary"]:
        say("summary (targets from issue 6 and the entry/node issues)")
        say(table(results["summary"], [("metric", "metric", ""), ("target", "target", ""), ("result", "result", ""),
                                       ("ok", "ok", "")]))
    say(f"\nwrote {out_path} ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
