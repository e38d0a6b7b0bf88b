"""A real third-party OpenAI-compatible server for provider tests: llama-cpp-python's own
(`python -m llama_cpp.server`, the `[server]` extra) on 127.0.0.1, serving the bundled SmolLM2.

Use the `provider_server` fixture (module scope: the server takes seconds to start) by
binding it in the test module:

    from tests.support import provider_server as support
    provider_server = support.provider_server
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "test-operator-key"  # the server refuses requests without it, so tests see it was sent
MODEL_ALIAS = "smollm2"
START_LIMIT = 90.0  # seconds; loading SmolLM2 takes ~2 s, importing the server stack a few more


@dataclass
class ProviderServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """End the server we started, by its pid: politely, then firmly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return any(m.get("id") == MODEL_ALIAS for m in json.load(r).get("data", []))
    except (OSError, ValueError):
        return False


def start_provider_server(model: Path, log_path: Path, limit: float = START_LIMIT) -> ProviderServer:
    """Start the server on a free port and wait (bounded) until /v1/models answers. The port is
    free when picked but could be taken before the server binds it: then it exits, and we try
    another one (3 tries)."""
    for _attempt in range(3):
        port = _free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                 "--model_alias", MODEL_ALIAS, "--api_key", API_KEY, "--n_threads", "1", "--n_ctx", "1024",
                 "--verbose", "False"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = ProviderServer(proc, port, log_path)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(port):
                return server
            time.sleep(0.2)
        server.stop()
        if "address already in use" not in server.log().lower():
            break
    raise RuntimeError(f"llama_cpp.server did not answer within {limit:g} s; its log ends:\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def provider_server(tmp_path_factory, smollm2_path):
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}): run scripts/setup.sh")
    server = start_provider_server(smollm2_path, tmp_path_factory.mktemp("provider") / "server.log")
    try:
        yield server
    finally:
        server.stop()
