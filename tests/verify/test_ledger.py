"""The credits ledger: split bookings, replay refusal, escrow, and crash safety with a real
SQLite file and a process killed with SIGKILL between (and inside) its steps."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from entry.credits.ledger import DEFAULT_WEIGHT, Ledger, PartCredit, VestingPolicy, model_weight

HELPER = Path(__file__).parents[1] / "support" / "ledger_crash_helper.py"
POLICY = VestingPolicy(new_delay_s=100.0, trusted_delay_s=10.0, trusted_after=2, failure_memory_s=1000.0)


def test_failover_split_books_each_node_its_own_tokens_and_a_replay_books_nothing(tmp_path):
    led = Ledger(tmp_path / "c.db", policy=POLICY)
    parts = [PartCredit("node-a", 7, None), PartCredit("node-b", 5, b"sig-receipt")]
    assert led.book("req-1", "f" * 64, parts, weight=0.5, pending=False, now=0.0) == 2
    assert led.book("req-1", "f" * 64, parts, weight=0.5, pending=False, now=1.0) == 0  # replayed
    assert led.book("req-1", "f" * 64, [PartCredit("node-b", 50, b"other")], weight=0.5, pending=False, now=2.0) == 0
    a, b = led.node_totals("node-a"), led.node_totals("node-b")
    assert (a["held"].tokens, a["held"].credits) == (7, 3.5)
    assert (b["held"].tokens, b["held"].credits) == (5, 2.5)
    assert [r["source"] for r in led.node_requests("node-a")] == ["relayed"]
    assert [r["source"] for r in led.node_requests("node-b")] == ["receipt"]
    assert led.check_invariants() == []


def test_escrow_vests_after_verification_and_later_for_new_nodes(tmp_path):
    led = Ledger(tmp_path / "c.db", policy=POLICY)
    book = lambda rid, node, now, pending=False: led.book(rid, "f" * 64, [PartCredit(node, 10, b"r")], weight=1.0,
                                                         pending=pending, now=now)
    book("r1", "n", 0.0, pending=True)
    book("r2", "n", 0.0)
    assert led.vest_due(now=99.0) == 0  # a new node waits new_delay_s
    assert led.vest_due(now=100.0) == 1  # r2 vests; r1 still awaits its verdict
    led.settle_verification("r1", {"n": (True, "")}, now=101.0)
    assert led.vest_due(now=101.0) == 1
    # Two good requests: the node is established, its next credits vest after trusted_delay_s.
    book("r3", "n", 200.0)
    assert led.vest_due(now=210.0) == 1
    # A failed check withholds, a second verdict changes nothing, and the node is new again.
    book("r4", "n", 300.0, pending=True)
    assert led.settle_verification("r4", {"n": (False, "token_mismatch")}, now=301.0) == 1
    assert led.settle_verification("r4", {"n": (True, "")}, now=302.0) == 0
    book("r5", "n", 400.0)
    assert led.vest_due(now=411.0) == 0 and led.vest_due(now=500.0) == 1
    t = led.node_totals("n")
    assert (t["vested"].requests, t["withheld"].requests, t["held"].requests) == (4, 1, 0)
    assert led.node_requests("n")[1]["reason"] == "token_mismatch"
    assert led.check_invariants() == []


def test_pending_verifications_of_a_dead_process_become_lost_and_vest(tmp_path):
    led = Ledger(tmp_path / "c.db", policy=POLICY)
    led.book("r1", "f" * 64, [PartCredit("n", 3, b"r")], weight=1.0, pending=True, now=0.0)
    led.close()
    led = Ledger(tmp_path / "c.db", policy=POLICY)  # a restart: the verification queue is gone
    assert led.node_requests("n")[0]["verify"] == "lost"
    assert led.vest_due(now=100.0) == 1


def test_model_weight_is_parameters_in_billions():
    assert model_weight(134_515_008) == pytest.approx(0.1345, abs=1e-4)
    assert model_weight(None) == DEFAULT_WEIGHT


def _run_helper(db: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), str(db), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def expected_rows(tmp_path_factory):
    db = tmp_path_factory.mktemp("clean") / "c.db"
    out = _run_helper(db)
    assert out.returncode == 0, out.stderr
    led = Ledger(db)
    rows = led.rows()
    assert led.check_invariants() == [] and len(rows) == 75
    states = {r[8] for r in rows}
    assert states == {"held", "vested", "withheld"}  # the workload exercises every state
    return rows


CRASH_POINTS = [("book.begin", 1), ("book.row", 1), ("book.row", 8), ("book.committed", 5), ("verify.row", 1),
                ("verify.row", 4), ("verify.committed", 3), ("vest.updated", 6), ("vest.committed", 9),
                ("book.row", 40), ("vest.updated", 45)]


@pytest.mark.parametrize("point,after", CRASH_POINTS)
def test_sigkill_at_a_checkpoint_neither_loses_nor_double_books(tmp_path, expected_rows, point, after):
    db = tmp_path / "c.db"
    out = _run_helper(db, "--crash-at", point, "--crash-after", str(after))
    assert out.returncode == -9, (out.returncode, out.stderr)
    led = Ledger(db)
    assert led.check_invariants() == []
    led.close()
    out = _run_helper(db)  # the same work again, as a restarted entry would redo it
    assert out.returncode == 0, out.stderr
    led = Ledger(db)
    assert led.rows() == expected_rows
    assert led.check_invariants() == []


def test_sigkill_at_random_moments_converges(tmp_path, expected_rows):
    db = tmp_path / "c.db"
    rng = random.Random(5)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(HELPER), str(db), "--slow", "0.003"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, 1.2))
        if proc.poll() is None:
            proc.kill()  # SIGKILL, by pid: only this helper
            kills += 1
        proc.wait(30)
        led = Ledger(db)
        assert led.check_invariants() == []
        led.close()
    assert kills >= 3
    out = _run_helper(db)
    assert out.returncode == 0, out.stderr
    assert Ledger(db).rows() == expected_rows
    shutil.rmtree(tmp_path, ignore_errors=True)
