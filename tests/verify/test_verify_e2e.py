"""End to end with real processes: `mesh entry start --verify-model --ledger` and a SmolLM2
node; HTTP requests, verdicts in /v1/mesh/nodes and /metrics, the signed credit statement,
`mesh node credits` checking it against the node's own receipts, `mesh entry credits`."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from node.receipt_log import FILE_NAME, ReceiptLog
from protocol.credit_query import HEADER, sign_query
from protocol.identity import Identity
from protocol.records import WorkReceipt, token_digest
from tests.support.node_procs import mesh_cmd, spawn_entry, spawn_node, wait_ready_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _poll(cond, limit: float, what: str):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_entry_verifies_books_and_nodes_check_their_statements(tmp_path, smollm2_path):
    ledger = tmp_path / "credits.db"
    entry = spawn_entry(tmp_path, "entry", "--open", "--verify-model", str(smollm2_path), "--ledger", str(ledger),
                        "--canary-interval", "0", "--token-timeout", "5")
    procs = [entry]
    try:
        info = wait_ready_sync(entry, 60)
        url, entry_peer = info["url"], info["peer_id"]
        node = spawn_node(tmp_path, "node", "--bootstrap", info["p2p_addrs"][0], "--threads", "1", "--skip-benchmark",
                          "--advert-interval", "1")
        procs.append(node)
        node_peer = wait_ready_sync(node, 120)["peer_id"]
        model = _poll(lambda: [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]], 60, "model")[0]

        tokens = 0
        for i, temperature in enumerate((0.0, 0.8, 0.0)):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 16, "temperature": temperature,
                "messages": [{"role": "user", "content": f"Say something nice about the number {i}."}]})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]

        metrics = _poll(lambda: (t := httpx.get(f"{url}/metrics", timeout=5).text)
                        and _metric(t, 'mesh_verify_checks_total{outcome="passed",kind="rescored"}') >= 3 and t, 60,
                        "three passed checks")
        assert _metric(metrics, 'mesh_verify_checks_total{outcome="failed",kind="rescored"}') == 0
        assert _metric(metrics, "mesh_credits_booked_total") == pytest.approx(tokens * 0.134515008)
        [row] = httpx.get(f"{url}/v1/mesh/nodes", timeout=5).json()["data"]
        assert (row["verified"], row["verify_failed"], row["last_verdict"], row["demoted"]) == (3, 0, "passed", False)
        assert node_peer not in json.dumps(row)  # users see pseudonyms only

        # The statement is the node's alone: unsigned, wrongly signed and stale queries fail.
        stmt_url = f"{url}/v1/mesh/credits/{node_peer}"
        assert httpx.get(stmt_url, timeout=5).status_code == 401
        assert httpx.get(stmt_url, headers={HEADER: sign_query(Identity.generate())}, timeout=5).status_code == 401
        node_id = Identity.load(node.state_dir / "node.key")
        assert httpx.get(stmt_url, headers={HEADER: sign_query(node_id, time.time() - 3600)}, timeout=5).status_code == 401
        stmt = httpx.get(stmt_url, headers={HEADER: sign_query(node_id)}, timeout=5).json()
        assert stmt["entry"] == entry_peer and stmt["totals"]["held"]["tokens"] == tokens
        assert sorted(r["tokens"] for r in stmt["requests"]) == sorted(
            r.completion_tokens for r in ReceiptLog(node.state_dir / FILE_NAME).receipts())

        out = subprocess.run(mesh_cmd("node", "credits", "--entry", url, "--state-dir", str(node.state_dir)),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "everything matches" in out.stdout and "3 request(s) booked" in out.stdout

        # A receipt the entry never credited (as if it had dropped one) shows up as a discrepancy.
        fake = WorkReceipt("never-credited-123", stmt["requests"][0]["model_sha256"], 5, 4, token_digest([1, 2, 3, 4]),
                           node_peer, entry_peer, time.time()).sign(node_id)
        ReceiptLog(node.state_dir / FILE_NAME).append(fake)
        out = subprocess.run(mesh_cmd("node", "credits", "--entry", url, "--state-dir", str(node.state_dir), "--json"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert json.loads(out.stdout)["problems"] == [{"request_id": "never-credited-123", "problem": "not_credited",
                                                       "receipt_tokens": 4}]

        out = subprocess.run(mesh_cmd("entry", "credits", "--ledger", str(ledger), "--json"), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["all"][0]["tokens"] == tokens and report["node"][0]["key"] == node_peer
        assert len(report["model"]) == 1
        out = subprocess.run(mesh_cmd("entry", "credits", "--ledger", str(ledger)), capture_output=True, text=True, timeout=60)
        assert node_peer in out.stdout and "per model" in out.stdout
    finally:
        for p in procs:
            p.stop()
