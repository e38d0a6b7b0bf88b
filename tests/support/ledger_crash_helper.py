"""Runs a fixed ledger workload (book / verify / vest per request), optionally SIGKILLing
itself at a chosen point: the process the crash tests kill.

    python tests/support/ledger_crash_helper.py DB [--crash-at CHECKPOINT --crash-after K] [--requests N] [--slow S]

CHECKPOINT is a name Ledger._checkpoint() is called with (e.g. "book.row", "verify.row",
"vest.updated", "book.committed"); the K-th time it is reached the process kills itself with
SIGKILL, so no cleanup code runs, exactly like `kill -9`. Without --crash-at it runs to the
end. The workload is deterministic (a simulated clock) and every step is idempotent, so
running it again after a crash must converge to the state of a run that never crashed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entry.credits.ledger import Ledger, PartCredit, VestingPolicy  # noqa: E402

NODES = ("node-a", "node-b", "node-c")
POLICY = VestingPolicy(new_delay_s=45.0, trusted_delay_s=15.0, trusted_after=4, failure_memory_s=200.0)
WEIGHT = 0.1345


def workload(n: int):
    """(request id, parts, sampled, verdicts, time) per request: a mix of single-node and
    failed-over requests, some verified (a few failing), on a clock 10 s apart."""
    for i in range(n):
        rid = f"req-{i:05d}"
        first = NODES[i % 3]
        parts = [PartCredit(first, 5 + i % 7, b"receipt-%d" % i)]
        if i % 4 == 3:  # failover: the first node relayed some tokens, another finished
            parts = [PartCredit(first, 3 + i % 5, None), PartCredit(NODES[(i + 1) % 3], 4 + i % 6, b"receipt-%d" % i)]
        sampled = i % 3 == 0
        verdicts = {p.peer_id: (not (i % 9 == 0 and p.peer_id == parts[-1].peer_id), "token_mismatch") for p in parts} if sampled else {}
        yield rid, parts, sampled, verdicts, 1000.0 + 10.0 * i


class CrashingLedger(Ledger):
    def __init__(self, *args, crash_at: str | None = None, crash_after: int = 1, slow: float = 0.0, **kwargs):
        self.crash_at, self.left, self.slow = crash_at, crash_after, slow
        super().__init__(*args, **kwargs)

    def _checkpoint(self, name: str) -> None:
        if self.slow:
            time.sleep(self.slow)  # widens the windows for the random-kill test
        if name == self.crash_at:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--crash-at")
    ap.add_argument("--crash-after", type=int, default=1)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--slow", type=float, default=0.0)
    args = ap.parse_args()
    ledger = CrashingLedger(args.db, policy=POLICY, crash_at=args.crash_at, crash_after=args.crash_after, slow=args.slow)
    for rid, parts, sampled, verdicts, now in workload(args.requests):
        ledger.book(rid, "f" * 64, parts, weight=WEIGHT, pending=sampled, now=now)
        if verdicts:
            ledger.settle_verification(rid, verdicts, now=now + 1.0)
        ledger.vest_due(now=now + 2.0)
    ledger.close()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
