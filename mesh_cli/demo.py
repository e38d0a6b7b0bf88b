"""`mesh demo`: a whole mesh on loopback — one entry and two nodes on the bundled model."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from runtime import ready_file
from runtime.settings import mesh_home


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a local mesh: one entry (open mode) and two nodes on 127.0.0.1",
                       description="Start an entry node in open mode and two node daemons on the bundled model, all on "
                       "127.0.0.1, then print the web chat URL and an example curl. Ctrl-C stops everything cleanly.")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the entry (default 8000)")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument("--model", help="GGUF file the nodes serve (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--state-dir", help="where keys, ready files and logs go (default: ~/.mesh/demo)")
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
            return json.load(r).get("data", [])
    except OSError:
        return []


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from runtime.errors import CliError

    if args.nodes < 1:
        raise CliError("--nodes must be at least 1")
    # SIGTERM (e.g. from a supervisor) must clean up like Ctrl-C, not orphan the children.
    signal.signal(signal.SIGTERM, _interrupt)
    state = Path(args.state_dir) if args.state_dir else mesh_home() / "demo"
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Processes that together run more llama.cpp threads than there are cores slow down
    # by orders of magnitude (spin-waiting): split the cores between the nodes.
    threads = max(1, (os.cpu_count() or 1) // args.nodes)
    children: list[Child] = []
    try:
        print(f"starting the entry on http://127.0.0.1:{args.port} … (logs in {logs})", flush=True)
        entry = Child("entry", ["entry", "start", "--open", "--http-port", str(args.port)], state / "entry", logs)
        children.append(entry)
        info = entry.wait_ready(60)
        url, bootstrap = info["url"], info["p2p_addrs"][0]
        model_args = ["--model", args.model] if args.model else []
        for i in range(1, args.nodes + 1):
            # One at a time: each node measures its own speed at start, and two benchmarks
            # running at once would both measure contention.
            print(f"starting node {i}/{args.nodes}: loading the model and measuring its speed …", flush=True)
            node = Child(f"node{i}", ["node", "start", "--bootstrap", bootstrap, "--threads", str(threads), *model_args],
                         state / f"node{i}", logs)
            children.append(node)
            node.wait_ready(180)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(m.get("nodes", 0) for m in _models(url)) < args.nodes:
            time.sleep(0.3)
        models = _models(url)
        if not models:
            raise RuntimeError("the entry sees no node; see the logs in " + str(logs))
        model_id = models[0]["id"]
        print(f"""
mesh ready: {sum(m.get('nodes', 0) for m in models)} node(s) serving {', '.join(m['id'] for m in models)}

  web chat:  {url}/
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
