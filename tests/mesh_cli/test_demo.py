"""`mesh demo`: which nodes it starts on which models with how many threads, and a real run
serving two different models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from mesh_cli.demo import plan_nodes
from tests.support.node_procs import REPO
from tests.support.tiny_model import write_tiny_llama


def test_one_node_per_model_and_the_cores_split_between_them():
    a, b = Path("a.gguf"), Path("b.gguf")
    assert plan_nodes([a, b], 1, 2) == [("node1", a, 1), ("node2", b, 1)]
    assert plan_nodes([a, b], 2, 16) == [("node1", a, 4), ("node2", a, 4), ("node3", b, 4), ("node4", b, 4)]
    assert plan_nodes([a], 3, 2) == [("node1", a, 1), ("node2", a, 1), ("node3", a, 1)]  # never 0 threads


@pytest.mark.slow
def test_demo_serves_two_models_and_stops_cleanly(tmp_path, tiny_gguf):
    other = write_tiny_llama(tmp_path / "tiny-b.gguf", seed=1)  # another file: another model
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "demo", "--port", "0", "--model", str(tiny_gguf),
                             "--model", str(other), "--state-dir", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "MESH_HOME": str(tmp_path / "home")})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("mesh ready"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "".join(lines)
        url = next(ln.split()[1] for ln in lines if ln.strip().startswith("API:"))  # ".../v1"
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            models = {m["id"]: m["nodes"] for m in json.load(r)["data"] if m["owned_by"] == "mesh"}
        assert models == {"tiny-llama": 1, "tiny-b": 1}
        assert "mesh ready: tiny-b (1 node), tiny-llama (1 node)" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        reader.join(5)
    assert proc.returncode == 0 and "mesh stopped" in "".join(lines)
