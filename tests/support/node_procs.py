"""Start real `mesh node start` daemons in their own processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from runtime import ready_file

REPO = Path(__file__).resolve().parents[2]


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


def spawn(tmp: Path, name: str, command: Callable[[Path], list[str]]) -> NodeProc:
    """Run `command(state_dir)` with its own state directory and log file under tmp."""
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_HOME": str(tmp / "mesh-home")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command(state), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env)
    return NodeProc(proc, state, log_path)


def spawn_node(tmp: Path, name: str, *args: str) -> NodeProc:
    return spawn(tmp, name, lambda state: mesh_cmd("node", "start", "--state-dir", str(state), *args))


def _wait_args(node: NodeProc) -> dict:
    return {"name": node.state_dir.name, "log_tail": lambda: node.log()[-3000:]}


async def wait_ready(node: NodeProc, limit: float = 120.0) -> NodeProc:
    """Wait (bounded) until a started node has written its ready file; stop it if it fails."""
    try:
        info = await ready_file.wait_async(ready_file.path_in(node.state_dir), node.proc, limit, **_wait_args(node))
    except BaseException:
        node.stop()
        raise
    node.peer_id, node.addrs = info["peer_id"], info["addrs"]
    return node


async def start_node(tmp: Path, name: str, *args: str, limit: float = 120.0) -> NodeProc:
    """Start a node and wait (bounded) until it has written its ready file."""
    return await wait_ready(spawn_node(tmp, name, *args), limit)


def wait_ready_sync(node: NodeProc, limit: float = 120.0) -> dict:
    """Blocking twin of wait_ready, for fixtures outside trio."""
    try:
        return ready_file.wait(ready_file.path_in(node.state_dir), node.proc, limit, **_wait_args(node))
    except RuntimeError:
        node.stop()
        raise


def spawn_entry(tmp: Path, name: str, *args: str) -> NodeProc:
    """An entry daemon (`mesh entry start`), HTTP on a free port; its ready file holds the URL."""
    return spawn(tmp, name, lambda state: mesh_cmd("entry", "start", "--http-port", "0", "--state-dir", str(state), *args))
