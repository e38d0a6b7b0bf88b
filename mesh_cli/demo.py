"""`mesh demo`: a whole mesh on loopback — one entry and one node per bundled model (SmolLM2
and Gemma 3 270M), so requests can be routed between two different models."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

from runtime import ready_file
from runtime.settings import mesh_home

# Shipped with the routing package (routing/tables/README.md says how it was made).
DEMO_TABLE = Path(str(resources.files("routing").joinpath("tables", "demo_basic.jsonl")))


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a local mesh: one entry (open mode) and a node per bundled model on 127.0.0.1",
                       description="Start an entry node in open mode and node daemons on 127.0.0.1 (by default one for "
                       "each bundled model: SmolLM2-135M-Instruct and Gemma 3 270M), then print the web chat URL and "
                       "an example curl. The nodes share the CPU cores. Ctrl-C stops everything cleanly.")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the entry (default 8000)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per model (default 1)")
    p.add_argument("--model", action="append", metavar="PATH",
                   help="GGUF file to serve (repeatable; default: the bundled SmolLM2-135M-Instruct and Gemma 3 270M)")
    p.add_argument("--state-dir", help="where keys, ready files and logs go (default: ~/.mesh/demo)")
    p.add_argument("--join-by-name", action="store_true", help="once the mesh is ready, start one more node given only "
                   "the first model's name (--model NAME): it fetches the file from the serving node, then serves it")
    p.set_defaults(func=run)


class Child:
    def __init__(self, name: str, args: list[str], state: Path, log_dir: Path):
        self.name = name
        self.state = state
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", *args, "--state-dir", str(state)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, limit: float) -> dict:
        return ready_file.wait(ready_file.path_in(self.state), self.proc, limit, name=self.name, log_tail=self.tail, poll=0.1)

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def _models(url: str) -> list[dict]:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
            # Only the models nodes serve: "auto" and provider models are the entry's own.
            return [m for m in json.load(r).get("data", []) if m.get("owned_by") == "mesh"]
    except OSError:
        return []


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def plan_nodes(models: list[Path], per_model: int, cores: int) -> list[tuple[str, Path, int]]:
    """(name, model, llama.cpp threads) for every node: `per_model` nodes on each model.
    Processes that together run more llama.cpp threads than there are cores slow down by
    orders of magnitude (spin-waiting), so the nodes split the cores."""
    total = len(models) * per_model
    threads = max(1, cores // total)
    return [(f"node{i + 1}", model, threads) for i, model in enumerate(m for m in models for _ in range(per_model))]


def run(args: argparse.Namespace) -> int:
    from runtime.errors import CliError

    if args.nodes < 1:
        raise CliError("--nodes must be at least 1")
    from engine.model_file import ModelFileError, bundled_models

    try:
        # Resolved here, once: the Gemma file is assembled on first use, not by every node.
        models = [Path(m) for m in args.model] if args.model else bundled_models()
    except ModelFileError as e:
        raise CliError(str(e)) from None
    plan = plan_nodes(models, args.nodes, os.cpu_count() or 1)
    # SIGTERM (e.g. from a supervisor) must clean up like Ctrl-C, not orphan the children.
    signal.signal(signal.SIGTERM, _interrupt)
    state = Path(args.state_dir) if args.state_dir else mesh_home() / "demo"
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    try:
        print(f"starting the entry on http://127.0.0.1:{args.port} … (logs in {logs})", flush=True)
        # Routing works out of the box: the router is fitted from the committed benchmark of
        # the bundled models until a `mesh entry benchmark` against this demo replaces it.
        entry = Child("entry", ["entry", "start", "--open", "--http-port", str(args.port),
                                "--routing-table", str(DEMO_TABLE)], state / "entry", logs)
        children.append(entry)
        info = entry.wait_ready(60)
        url, bootstrap = info["url"], info["p2p_addrs"][0]
        for i, (name, model, threads) in enumerate(plan, 1):
            # One at a time: each node measures its own speed at start, and two benchmarks
            # running at once would both measure contention.
            print(f"starting node {i}/{len(plan)} on {model.name}: loading the model and measuring its speed …", flush=True)
            node = Child(name, ["node", "start", "--bootstrap", bootstrap, "--threads", str(threads), "--model", str(model)],
                         state / name, logs)
            children.append(node)
            node.wait_ready(180)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(m.get("nodes", 0) for m in _models(url)) < len(plan):
            time.sleep(0.3)
        served = _models(url)
        if not served:
            raise RuntimeError("the entry sees no node; see the logs in " + str(logs))
        model_id = served[0]["id"]
        if args.join_by_name:
            name = plan[0][1].name.removesuffix(".gguf")  # what the first node advertises
            print(f"starting one more node with only --model {name}: fetching the file from the mesh …", flush=True)
            joiner = Child("joiner", ["node", "start", "--bootstrap", bootstrap, "--threads", str(plan[0][2]), "--model", name],
                           state / "joiner", logs)
            children.append(joiner)
            joiner.wait_ready(300)
            served = _models(url)
        listing = ", ".join(f"{m['id']} ({m.get('nodes', 0)} node{'s' if m.get('nodes', 0) != 1 else ''})" for m in served)
        print(f"""
mesh ready: {listing}

  web chat:  {url}/
  console:   {url}/console
  API:       {url}/v1  (OpenAI-compatible, open mode: any or no API key)

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model_id}", "messages": [{{"role": "user", "content": "Say hello"}}], "stream": true}}'

Ctrl-C stops the mesh.""", flush=True)
        while all(c.proc.poll() is None for c in children):
            time.sleep(0.5)
        dead = next(c for c in children if c.proc.poll() is not None)
        raise RuntimeError(f"{dead.name} exited unexpectedly; last log lines:\n{dead.tail()}")
    except KeyboardInterrupt:
        print("\nstopping: nodes drain, then the entry stops …", flush=True)
        return 0
    except RuntimeError as e:
        raise CliError(str(e)) from None
    finally:
        # Nodes first, so they can tell the entry they are leaving; then the entry.
        for c in reversed(children):
            try:
                c.stop(grace=40)
            except KeyboardInterrupt:  # a second Ctrl-C: don't wait for anyone
                for k in children:
                    if k.proc.poll() is None:
                        k.proc.kill()
                raise
        if children:
            print("mesh stopped", flush=True)
