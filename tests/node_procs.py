"""Start real `mesh node start` daemons in their own processes for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]


@dataclass
class NodeProc:
    proc: subprocess.Popen
    state_dir: Path
    log_path: Path
    peer_id: str = ""
    addrs: list | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, limit: float) -> int:
        with trio.fail_after(limit):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        """End the process we started, by its pid: politely, then firmly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def mesh_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh_cli", *args]


def spawn_node(tmp: Path, name: str, *args: str) -> NodeProc:
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_HOME": str(tmp / "mesh-home")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(mesh_cmd("node", "start", "--state-dir", str(state), *args),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    return NodeProc(proc, state, log_path)


async def start_node(tmp: Path, name: str, *args: str, limit: float = 120.0) -> NodeProc:
    """Start a node and wait (bounded) until it has written its ready file."""
    node = spawn_node(tmp, name, *args)
    ready = node.state_dir / "ready.json"
    try:
        with trio.fail_after(limit):
            while not ready.exists():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited with {node.proc.returncode}:\n{node.log()[-3000:]}")
                await trio.sleep(0.05)
    except BaseException:
        node.stop()
        raise
    info = json.loads(ready.read_text())
    node.peer_id, node.addrs = info["peer_id"], info["addrs"]
    return node


def wait_ready_sync(node: NodeProc, limit: float = 120.0) -> dict:
    """Blocking twin of start_node's wait, for fixtures outside trio."""
    import time

    ready = node.state_dir / "ready.json"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                return json.loads(ready.read_text())
            except ValueError:
                pass  # mid-replace
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.state_dir.name} exited with {node.proc.returncode}:\n{node.log()[-3000:]}")
        time.sleep(0.05)
    node.stop()
    raise RuntimeError(f"{node.state_dir.name} not ready within {limit} s:\n{node.log()[-3000:]}")


def spawn_entry(tmp: Path, name: str, *args: str) -> NodeProc:
    """An entry daemon (`mesh entry start`), HTTP on a free port; its ready file holds the URL."""
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_HOME": str(tmp / "mesh-home")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(mesh_cmd("entry", "start", "--http-port", "0", "--state-dir", str(state), *args),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    return NodeProc(proc, state, log_path)
