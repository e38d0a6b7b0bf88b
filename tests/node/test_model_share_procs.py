"""`mesh node start --model sha256:<hex>|<name>` between real node processes on 127.0.0.1 with
the bundled SmolLM2 GGUF: a fresh state dir fetches, verifies and serves it; a downloader
killed with SIGKILL resumes from its verified chunks. Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import trio

from engine.model_file import file_sha256
from tests.support.node_procs import REPO, mesh_cmd, spawn_node, start_node, wait_ready

pytestmark = pytest.mark.slow
NAME = "smol-shared"
# The serving node uploads at this rate so a download lasts a few seconds: long enough to
# kill it half-way, short enough for a test.
RATE_MB = 20


@pytest.fixture
async def seeder(tmp_path, smollm2_path):
    node = await start_node(tmp_path, "seeder", "--model", str(smollm2_path), "--model-name", NAME,
                            "--skip-benchmark", "--share-rate", str(RATE_MB), "--advert-interval", "1")
    try:
        yield node, file_sha256(smollm2_path)
    finally:
        node.stop()


def _boot(node) -> str:
    return f"{node.addrs[0]}/p2p/{node.peer_id}"


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


async def test_fresh_node_fetches_by_sha256_then_by_name_and_serves(tmp_path, seeder):
    seed, sha = seeder
    b = await start_node(tmp_path, "by-sha", "--model", f"sha256:{sha}", "--bootstrap", _boot(seed),
                         "--skip-benchmark", "--log-format", "json", limit=180)
    try:
        path = b.state_dir / "models" / f"{sha}.gguf"
        assert file_sha256(path) == sha
        assert not list(path.parent.glob("*.part*"))
        lines = _json_lines(b.log())
        progress = [x for x in lines if x.get("msg") == "model download"]
        assert progress and progress[-1]["done_bytes"] == progress[-1]["total_bytes"] == path.stat().st_size
        assert {"rate_mbps", "eta_s", "peers"} <= set(progress[-1])
        assert any(x.get("msg") == "node ready" and x.get("model") == NAME for x in lines)
        # A third node asks for the model by the name the mesh serves it under; two peers have it now.
        c = await start_node(tmp_path, "by-name", "--model", NAME, "--bootstrap", _boot(seed),
                             "--skip-benchmark", "--log-format", "json", limit=180)
        try:
            assert file_sha256(c.state_dir / "models" / f"{sha}.gguf") == sha
            assert any(x.get("msg") == "fetching model from the mesh" for x in _json_lines(c.log()))
        finally:
            c.stop()
    finally:
        b.stop()
    # Restarted, the node finds its file and fetches nothing.
    again = await start_node(tmp_path, "by-sha", "--model", f"sha256:{sha}", "--bootstrap", _boot(seed),
                             "--skip-benchmark", "--log-format", "json", limit=120)
    again.stop()
    assert "model file already here" in again.log()


async def test_kill9_mid_download_resumes_from_verified_chunks(tmp_path, seeder):
    seed, sha = seeder
    args = ("--model", f"sha256:{sha}", "--bootstrap", _boot(seed), "--skip-benchmark", "--log-format", "json")
    d = spawn_node(tmp_path, "resumer", *args)
    sidecar = d.state_dir / "models" / f"{sha}.gguf.part.chunks"
    try:
        with trio.fail_after(120):
            while not (sidecar.exists() and len(sidecar.read_text().splitlines()) >= 5):
                assert d.proc.poll() is None, d.log()[-2000:]
                await trio.sleep(0.05)
    finally:
        d.signal(signal.SIGKILL)
    assert await d.wait_exit(10) == -signal.SIGKILL
    assert not (d.state_dir / "models" / f"{sha}.gguf").exists()
    kept = len(sidecar.read_text().splitlines()) - 1
    d2 = await wait_ready(spawn_node(tmp_path, "resumer", *args), 180)
    d2.stop()
    assert file_sha256(d.state_dir / "models" / f"{sha}.gguf") == sha
    resumed = [x for x in _json_lines(d2.log()) if x.get("msg") == "resuming download"]
    # Every listed chunk was fsync'd before it was listed; only a line the kill cut short is lost.
    assert resumed and resumed[0]["chunks_verified"] >= max(kept - 1, 3)


def test_fetching_without_bootstrap_is_one_line(tmp_path):
    out = subprocess.run(mesh_cmd("node", "start", "--model", "sha256:" + "ab" * 32, "--state-dir", str(tmp_path / "s")),
                         capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "MESH_HOME": str(tmp_path / "home")})
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: error:") and "give --bootstrap" in lines[0], out.stderr
