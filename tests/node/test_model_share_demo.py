"""`mesh demo --join-by-name`: a second node joins with only the model's name, fetches the file
from the serving node, and the entry then routes to two nodes of that model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.support.node_procs import REPO

pytestmark = pytest.mark.slow


def test_demo_second_node_joins_by_name(tmp_path, tiny_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "demo", "--port", "0", "--model", str(tiny_gguf),
                             "--join-by-name", "--state-dir", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "MESH_HOME": str(tmp_path / "home")})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("mesh ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "".join(lines)
        assert any("only --model tiny-llama" in ln for ln in lines)
        url = next(ln.split()[1] for ln in lines if ln.strip().startswith("API:"))
        deadline = time.monotonic() + 60
        models: dict = {}
        while time.monotonic() < deadline and models.get("tiny-llama") != 2:
            with urllib.request.urlopen(url + "/models", timeout=10) as r:
                models = {m["id"]: m["nodes"] for m in json.load(r)["data"] if m["owned_by"] == "mesh"}
            time.sleep(0.3)
        assert models == {"tiny-llama": 2}
        fetched = list((tmp_path / "demo" / "joiner" / "models").glob("*.gguf"))
        assert len(fetched) == 1 and fetched[0].read_bytes() == tiny_gguf.read_bytes()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
