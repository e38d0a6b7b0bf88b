"""The credits ledger: completion tokens booked to the nodes that produced them, in SQLite.

One row per (node, request): the tokens that node delivered for that request (after a
failover, each node of the chain gets its own row with exactly its share), the model's weight
and the credits (tokens x weight). Rows move through escrow:

    held --(verification passed or not sampled, and vest_at reached)--> vested
    held --(verification failed)--> withheld
    held --(sampled, but the check could not run, and vest_at reached)--> withheld ('unchecked')

Verification fails closed: a request drawn for a check that cannot run (the verifier's queue
is full, the request is longer than the verifier's context, the check errored) keeps its rows
`pending` with reason 'unchecked: <why>'; they never vest, and at their vest_at they become
withheld (`expire_unchecked`). Otherwise flooding the verifier would be a way to be paid for
work nobody checked. Such rows do not count against the node's standing (it may be honest).

- Weight: a model's parameter count in billions, read by the entry from its own copy of the
  GGUF (the one it verifies with), so a token of a 7B model earns ~50x a token of
  SmolLM2-135M (0.1345 per token) — roughly the compute it took. Models the entry does not
  hold earn DEFAULT_WEIGHT = 0: it can verify neither what they are nor that the tokens came
  from them, so they earn nothing until an operator loads the model with --verify-model
  (their tokens are still booked, at weight 0, so a node's statement lists them).
- Vesting (AI Horde's escrow idea): credits vest `trusted_delay_s` after booking for nodes
  with a history (>= trusted_after settled-good requests and no withheld credit within
  failure_memory_s), else `new_delay_s`: a new identity's credits stay at risk longer, which
  makes hit-and-run cheating with fresh identities unprofitable.
- Uniqueness: UNIQUE(node, request_id) in the schema: a replayed receipt books nothing,
  whatever the process did before (the entry's in-memory receipt book forgets on restart).
- Crash safety: every operation is one transaction (WAL, synchronous=FULL), and each is
  idempotent: booking an existing (node, request) is a no-op, a verdict only moves rows still
  held and awaiting one, vesting only moves rows due. Killing the process at any point leaves
  either the state before or after an operation, and redoing the operation converges.
  Verifications queued in memory when the entry died can never run (the prompt was never
  written down: privacy), so at open their rows become verify='lost' and vest on schedule
  (a crash is the operator's fault, not the node's; rows already 'unchecked' stay so).

The entry's trio thread is the only writer; `mesh entry credits` and the API read.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WEIGHT = 0.0
UNCHECKED = "unchecked"  # reason prefix of rows whose sampled check could not run
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credits (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    part INTEGER NOT NULL,             -- position in the failover chain, 0 = first node
    tokens INTEGER NOT NULL CHECK (tokens >= 0),
    weight REAL NOT NULL CHECK (weight >= 0),
    credits REAL NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('receipt', 'relayed')),
    receipt BLOB,                      -- the node's signed receipt; NULL for a relayed part
    canary INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('held', 'vested', 'withheld')),
    verify TEXT NOT NULL CHECK (verify IN ('none', 'pending', 'passed', 'failed', 'lost')),
    reason TEXT,
    booked_at REAL NOT NULL,
    vest_at REAL NOT NULL,
    settled_at REAL,
    UNIQUE (node, request_id)
);
CREATE INDEX IF NOT EXISTS credits_due ON credits (state, vest_at);
CREATE INDEX IF NOT EXISTS credits_request ON credits (request_id);
"""


@dataclass(frozen=True)
class VestingPolicy:
    new_delay_s: float = 24 * 3600.0
    trusted_delay_s: float = 3600.0
    trusted_after: int = 50  # settled-good requests before a node counts as established
    failure_memory_s: float = 7 * 24 * 3600.0  # a withheld credit this recent makes it new again


@dataclass(frozen=True)
class PartCredit:
    """One node's share of a request to book (the verifier makes one from each of a
    generation's PartRecords, entry/mesh/relay.py): `tokens` is what it is paid for,
    `receipt` its signed receipt when the node finished the request, None for a part the
    entry relayed before failing over. Stored in the `node` column."""

    peer_id: str
    tokens: int
    receipt: bytes | None = None


@dataclass(frozen=True)
class Totals:
    tokens: int
    credits: float
    requests: int


def model_weight(n_params: int | None) -> float:
    """Credits per completion token for a model of n_params parameters (see module doc)."""
    return n_params / 1e9 if n_params else DEFAULT_WEIGHT


class Ledger:
    def __init__(self, path: str | Path, *, policy: VestingPolicy | None = None, readonly: bool = False):
        self.path = Path(path)
        self.policy = policy or VestingPolicy()
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._recover()

    def close(self) -> None:
        self._db.close()

    # -- transactions -----------------------------------------------------------------------

    def _checkpoint(self, name: str) -> None:
        """A named point inside an operation. Does nothing; the crash tests override it to
        kill the process exactly there."""

    def _tx(self):
        return _Transaction(self._db)

    def _recover(self) -> None:
        with self._tx():
            self._db.execute("UPDATE credits SET verify = 'lost' WHERE verify = 'pending'"
                             " AND (reason IS NULL OR reason NOT LIKE ?)", (UNCHECKED + "%",))

    # -- writing ----------------------------------------------------------------------------

    def book(self, request_id: str, model_sha256: str, parts: Iterable[PartCredit], *, weight: float,
             pending: bool, canary: bool = False, now: float | None = None, unchecked: str = "") -> int:
        """Book every part of a request in one transaction; returns rows booked (a (node,
        request) already in the ledger books nothing). pending: a verification will follow.
        unchecked: the request was drawn for a check that cannot run (why): held until it
        expires unvested."""
        now = time.time() if now is None else now
        booked = 0
        with self._tx():
            self._checkpoint("book.begin")
            for i, p in enumerate(parts):
                if p.tokens <= 0:
                    continue
                vest_at = now + self._vesting_delay(p.peer_id, now)
                cur = self._db.execute(
                    "INSERT INTO credits (node, request_id, model_sha256, part, tokens, weight, credits, source, receipt,"
                    " canary, state, verify, reason, booked_at, vest_at) VALUES (?,?,?,?,?,?,?,?,?,?,'held',?,?,?,?)"
                    " ON CONFLICT (node, request_id) DO NOTHING",
                    (p.peer_id, request_id, model_sha256, i, p.tokens, weight, p.tokens * weight,
                     "receipt" if p.receipt is not None else "relayed", p.receipt, int(canary),
                     "pending" if pending or unchecked else "none", _unchecked_reason(unchecked), now, vest_at))
                booked += cur.rowcount
                self._checkpoint("book.row")
        self._checkpoint("book.committed")
        return booked

    def settle_verification(self, request_id: str, results: dict[str, tuple[bool, str]], now: float | None = None) -> int:
        """Apply verdicts {peer id: (passed, reason)} for a request; returns rows changed. Only
        rows still held and awaiting a verdict move: a second verdict changes nothing."""
        now = time.time() if now is None else now
        changed = 0
        with self._tx():
            for peer_id, (passed, reason) in sorted(results.items()):
                if passed:
                    cur = self._db.execute(
                        "UPDATE credits SET verify = 'passed' WHERE request_id = ? AND node = ?"
                        " AND state = 'held' AND verify IN ('pending', 'lost')", (request_id, peer_id))
                else:
                    cur = self._db.execute(
                        "UPDATE credits SET verify = 'failed', state = 'withheld', reason = ?, settled_at = ?"
                        " WHERE request_id = ? AND node = ? AND state = 'held' AND verify IN ('pending', 'lost', 'none')",
                        (reason[:200], now, request_id, peer_id))
                changed += cur.rowcount
                self._checkpoint("verify.row")
        self._checkpoint("verify.committed")
        return changed

    def abandon(self, request_id: str) -> int:
        """A verification that will not happen after all (the verifier could not run it):
        the request's rows stop waiting and vest on schedule."""
        with self._tx():
            cur = self._db.execute("UPDATE credits SET verify = 'lost' WHERE request_id = ? AND verify = 'pending'",
                                   (request_id,))
        return cur.rowcount

    def mark_unchecked(self, request_id: str, why: str) -> int:
        """The check queued for this request did not run after all: its rows awaiting a verdict
        stay held and expire unvested (see the module doc)."""
        with self._tx():
            cur = self._db.execute("UPDATE credits SET reason = ? WHERE request_id = ? AND verify = 'pending'",
                                   (_unchecked_reason(why), request_id))
        return cur.rowcount

    def expire_unchecked(self, now: float | None = None) -> int:
        """Withhold every unchecked row whose vesting time has come."""
        now = time.time() if now is None else now
        with self._tx():
            cur = self._db.execute(
                "UPDATE credits SET state = 'withheld', verify = 'failed', settled_at = ? WHERE state = 'held'"
                " AND verify = 'pending' AND reason LIKE ? AND vest_at <= ?", (now, UNCHECKED + "%", now))
        return cur.rowcount

    def vest_due(self, now: float | None = None) -> int:
        """Vest every held row whose time has come and that awaits no verdict."""
        now = time.time() if now is None else now
        with self._tx():
            cur = self._db.execute(
                "UPDATE credits SET state = 'vested', settled_at = ? WHERE state = 'held'"
                " AND verify IN ('none', 'passed', 'lost') AND vest_at <= ?", (now, now))
            self._checkpoint("vest.updated")
        self._checkpoint("vest.committed")
        return cur.rowcount

    def _vesting_delay(self, peer_id: str, now: float) -> float:
        p = self.policy
        good, recent_bad = self._db.execute(
            "SELECT COALESCE(SUM(state = 'vested' OR (state = 'held' AND verify = 'passed')), 0),"
            " COALESCE(SUM(state = 'withheld' AND settled_at >= ? AND COALESCE(reason, '') NOT LIKE ?), 0) FROM credits WHERE node = ?",
            (now - p.failure_memory_s, UNCHECKED + "%", peer_id)).fetchone()
        return p.trusted_delay_s if good >= p.trusted_after and not recent_bad else p.new_delay_s

    # -- reading ----------------------------------------------------------------------------

    def node_totals(self, peer_id: str) -> dict[str, Totals]:
        """{state: Totals} for one node (every state present, zeros included)."""
        out = {s: Totals(0, 0.0, 0) for s in ("held", "vested", "withheld")}
        for state, tokens, credits, n in self._db.execute(
                "SELECT state, SUM(tokens), SUM(credits), COUNT(*) FROM credits WHERE node = ? GROUP BY state", (peer_id,)):
            out[state] = Totals(int(tokens), float(credits), int(n))
        return out

    def node_requests(self, peer_id: str, limit: int = 1000) -> list[dict]:
        """The node's latest booked requests, newest first."""
        rows = self._db.execute(
            "SELECT request_id, model_sha256, tokens, credits, state, verify, reason, source FROM credits"
            " WHERE node = ? ORDER BY id DESC LIMIT ?", (peer_id, limit))
        return [{"request_id": r, "model_sha256": m, "tokens": t, "credits": round(c, 6), "state": s, "verify": v,
                 "reason": reason, "source": src} for r, m, t, c, s, v, reason, src in rows]

    def summary(self, by: str) -> list[dict]:
        """Totals grouped by 'node' or 'model' (plus 'all'), per state."""
        col = {"node": "node", "model": "model_sha256", "all": "'all'"}[by]
        out: dict[str, dict] = {}
        for key, state, tokens, credits, n in self._db.execute(
                f"SELECT {col}, state, SUM(tokens), SUM(credits), COUNT(*) FROM credits GROUP BY {col}, state ORDER BY {col}"):
            d = out.setdefault(key, {"key": key, "requests": 0, "tokens": 0,
                                     **{f"{s}_credits": 0.0 for s in ("held", "vested", "withheld")}})
            d["requests"] += n
            d["tokens"] += tokens
            d[f"{state}_credits"] = round(float(credits), 6)
        return list(out.values())

    def rows(self) -> list[tuple]:
        """Every row (tests and audits)."""
        return self._db.execute(
            "SELECT node, request_id, model_sha256, part, tokens, weight, credits, source, state, verify, reason,"
            " booked_at, vest_at, settled_at FROM credits ORDER BY node, request_id").fetchall()

    def check_invariants(self) -> list[str]:
        """Problems with the stored state (empty = consistent): used after crashes."""
        problems = []
        bad = self._db.execute(
            "SELECT COUNT(*) FROM credits WHERE abs(credits - tokens * weight) > 1e-9"
            " OR (state = 'withheld') != (verify = 'failed')"
            " OR (state = 'vested' AND verify NOT IN ('none', 'passed', 'lost'))"
            " OR (state != 'held') != (settled_at IS NOT NULL)").fetchone()[0]
        if bad:
            problems.append(f"{bad} row(s) with inconsistent fields")
        dup = self._db.execute("SELECT COUNT(*) FROM (SELECT node, request_id FROM credits GROUP BY node, request_id"
                               " HAVING COUNT(*) > 1)").fetchone()[0]
        if dup:
            problems.append(f"{dup} duplicated (node, request) pair(s)")
        return problems


def _unchecked_reason(why: str) -> str | None:
    return f"{UNCHECKED}: {why}"[:200] if why else None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception: sqlite3's implicit
    transactions are off (isolation_level=None) so nothing commits half an operation."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
