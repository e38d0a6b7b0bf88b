"""The node daemon as a volunteer runs it: a separate process, reached over real libp2p."""

import json
import signal
import subprocess

import pytest
import trio

from protocol import INFER_PROTOCOL_ID
from protocol.identity import Identity
from protocol.messages import ERR_LEAVING, InferRequest, SamplingParams
from protocol.records import WorkReceipt
from tests.support.node_procs import mesh_cmd, start_node
from transport.discovery import discover_model
from transport.host import open_mesh_host
from transport.node_client import NodeCall, NodeError, query_status

FAST = ("--skip-benchmark", "--threads", "1", "--advert-interval", "1")


async def run_request(host, node, req: InferRequest):
    stream = await host.open_stream(node.peer_id, INFER_PROTOCOL_ID, node.addrs)
    call = NodeCall(stream, req)
    await call.send()
    ids = []
    async for chunk in call.chunks():
        ids += chunk.ids
    await stream.close()
    return ids, call


def completion(sha: str, rid: str, prompt: str, max_tokens: int) -> InferRequest:
    return InferRequest(rid, sha, "completion", SamplingParams(max_tokens=max_tokens), prompt=prompt)


async def test_node_serves_over_libp2p_and_is_discoverable(tmp_path, tiny_gguf):
    me = Identity.generate()
    async with open_mesh_host(me) as host:
        node = await start_node(tmp_path, "n1", "--model", str(tiny_gguf), "--bootstrap", host.listen_addrs[0], "--buffer-mb", "8", *FAST)
        try:
            from engine.model_file import inspect_model

            sha = inspect_model(tiny_gguf).sha256
            with trio.fail_after(30):
                while not (found := await discover_model(host, sha, timeout=5)):
                    await trio.sleep(0.2)
            assert [a.node for a in found] == [node.peer_id]
            assert found[0].total_slots == 1 and found[0].model_sha256 == sha

            ids, call = await run_request(host, node, completion(sha, "req-proc-0001", "Hello", 12))
            assert len(ids) == 12
            WorkReceipt.verify(call.final.receipt, node=node.peer_id, entry=me.peer_id, request_id="req-proc-0001",
                               model_sha256=sha, tokens=ids)
            again, _ = await run_request(host, node, completion(sha, "req-proc-0002", "Hello", 12))
            assert again == ids

            stream = await host.open_stream(node.peer_id, INFER_PROTOCOL_ID, node.addrs)
            st = await query_status(stream)
            assert st.tokens_served == 24 and not st.draining
            await stream.close()

            out = subprocess.run(mesh_cmd("node", "status", "--state-dir", str(node.state_dir)), capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert node.peer_id in out.stdout and "24 tokens" in out.stdout
            out = subprocess.run(mesh_cmd("node", "status", "--json", "--state-dir", str(node.state_dir)), capture_output=True, text=True, timeout=30)
            status = json.loads(out.stdout)
            assert (status["buffer_limit"], status["buffered_bytes"]) == (8 << 20, 0)

            out = subprocess.run(mesh_cmd("node", "stop", "--state-dir", str(node.state_dir)), capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert await node.wait_exit(30) == 0
            assert not (node.state_dir / "ready.json").exists()
        finally:
            node.stop()


@pytest.mark.slow
async def test_sigterm_drains_in_flight_and_refuses_new(tmp_path, smollm2_path):
    me = Identity.generate()
    async with open_mesh_host(me) as host:
        node = await start_node(tmp_path, "n1", "--threads", "2", "--skip-benchmark", "--drain-seconds", "60")
        try:
            from engine.model_file import inspect_model

            sha = inspect_model(smollm2_path).sha256
            stream = await host.open_stream(node.peer_id, INFER_PROTOCOL_ID, node.addrs)
            # Counting never hits end-of-text, so the generation is long and still running
            # when the signal arrives.
            call = NodeCall(stream, completion(sha, "req-drain-001", "1, 2, 3, 4, 5, 6,", 160))
            await call.send()
            chunks = call.chunks()
            ids = list((await chunks.__anext__()).ids)
            node.signal(signal.SIGTERM)

            late = None
            with trio.fail_after(30):
                while late is None:
                    try:
                        await run_request(host, node, completion(sha, "req-late-0001", "Hi", 4))
                        await trio.sleep(0.05)  # the signal may not have landed yet
                    except NodeError as e:
                        late = e
            assert late.code == ERR_LEAVING

            async for chunk in chunks:
                ids += chunk.ids
            assert call.final is not None and call.final.finish_reason == "length" and len(ids) == 160
            assert call.node_leaving is not None
            assert await node.wait_exit(60) == 0
            assert "leaving the mesh" in node.log() and "in_flight=1" in node.log()
        finally:
            node.stop()


@pytest.mark.parametrize("content,what", [(b"", "empty"), (b"GGUF\x03\x00\x00\x00" + b"\x00" * 10, "truncated"), (b"not a model at all" * 100, "not gguf")])
def test_bad_model_file_is_one_line_and_nonzero(tmp_path, content, what):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    out = subprocess.run(mesh_cmd("node", "start", "--model", str(bad), "--state-dir", str(tmp_path / "s")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: error:") and "bad.gguf" in lines[0], out.stderr


def test_missing_model_file_and_bad_config(tmp_path):
    out = subprocess.run(mesh_cmd("node", "start", "--model", str(tmp_path / "nope.gguf"), "--state-dir", str(tmp_path / "s")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "nope.gguf" in out.stderr
    cfg = tmp_path / "node.toml"
    cfg.write_text("[node]\nslots = 0\n")
    out = subprocess.run(mesh_cmd("node", "start", "--config", str(cfg)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--slots must be at least 1" in out.stderr
    cfg.write_text("[node]\nslotz = 2\n")
    out = subprocess.run(mesh_cmd("node", "start", "--config", str(cfg)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "unknown setting(s) slotz" in out.stderr
