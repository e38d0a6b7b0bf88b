"""`mesh node credits --entry URL`: ask an entry for this node's credit statement and check it
against the receipts the node kept (node/receipt_log.py).

Discrepancies printed:
- a receipt for that entry with no booking (the entry did not credit work it received), or a
  booking with fewer tokens than the receipt says;
- a booking with no receipt of ours: normal for a part the entry relayed before failing over
  to another node (source "relayed"), or for requests served before receipts were kept;
  otherwise worth a look;
- withheld credits, with the entry's reason (failed verification).
The query is signed with the node's key (protocol/credit_query.py): only the node can read
its own statement. Exit status 0 when everything matches, 2 when something does not.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request


def add_credits_parser(subparsers) -> None:
    p = subparsers.add_parser("credits", help="ask an entry for this node's credits and check them against its receipts",
                              description="Fetch this node's credit statement from an entry (GET /v1/mesh/credits/PEER_ID, "
                              "signed with the node's key) and compare it with the receipts the node kept in its state "
                              "directory. Prints totals and every discrepancy; exit status 2 if there is one.")
    p.add_argument("--entry", required=True, help="the entry's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--state-dir", help="state directory of the node (default: ~/.mesh/node)")
    p.add_argument("--identity", help="identity key file (default: STATE_DIR/node.key)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_credits)


def fetch_statement(entry_url: str, identity, timeout: float = 30.0) -> dict:
    from protocol.credit_query import HEADER, sign_query

    url = f"{entry_url.rstrip('/')}/v1/mesh/credits/{identity.peer_id}"
    req = urllib.request.Request(url, headers={HEADER: sign_query(identity), "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def compare(statement: dict, receipts: list, entry_peer: str | None = None) -> dict:
    """Receipts (WorkReceipt) vs the entry's booked requests. entry_peer: only receipts made
    for this entry count (None: all, when the entry's peer id is unknown)."""
    booked = {r["request_id"]: r for r in statement.get("requests", [])}
    mine = {r.request_id: r for r in receipts if entry_peer is None or r.entry == entry_peer}
    problems = []
    for rid, rec in mine.items():
        b = booked.get(rid)
        if b is None:
            problems.append({"request_id": rid, "problem": "not_credited", "receipt_tokens": rec.completion_tokens})
        elif b["tokens"] < rec.completion_tokens:
            problems.append({"request_id": rid, "problem": "fewer_tokens", "receipt_tokens": rec.completion_tokens,
                             "credited_tokens": b["tokens"]})
    for rid, b in booked.items():
        if rid not in mine and b.get("source") != "relayed":
            problems.append({"request_id": rid, "problem": "no_receipt_kept", "credited_tokens": b["tokens"]})
        if b.get("state") == "withheld":
            problems.append({"request_id": rid, "problem": "withheld", "reason": b.get("reason"), "credited_tokens": b["tokens"]})
    return {"totals": statement.get("totals", {}), "receipts": len(mine), "booked": len(booked), "problems": problems}


def cmd_credits(args: argparse.Namespace) -> int:
    from node.config import NodeConfig
    from node.receipt_log import FILE_NAME, ReceiptLog
    from runtime.errors import CliError

    cfg = NodeConfig(state_dir=args.state_dir, identity=args.identity)
    from protocol.identity import Identity

    try:
        identity = Identity.load(cfg.identity_path())
    except FileNotFoundError:
        raise CliError(f"no node identity at {cfg.identity_path()} (has this node ever started?)") from None
    try:
        statement = fetch_statement(args.entry, identity)
    except urllib.error.HTTPError as e:
        raise CliError(f"the entry answered {e.code}: {e.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CliError(f"cannot reach the entry at {args.entry}: {e}") from None
    receipts = ReceiptLog(cfg.state_path() / FILE_NAME).receipts()
    entry_peer = statement.get("entry") or _entry_peer(statement, receipts)
    result = compare(statement, receipts, entry_peer)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(identity.peer_id, result)
    return 2 if result["problems"] else 0


def _entry_peer(statement: dict, receipts: list) -> str | None:
    """Which entry this statement is from, as our receipts name it: the entry whose receipts'
    request ids the statement books (a node may serve several entries)."""
    booked = {r["request_id"] for r in statement.get("requests", [])}
    counts: dict[str, int] = {}
    for r in receipts:
        if r.request_id in booked:
            counts[r.entry] = counts.get(r.entry, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _print(peer: str, result: dict) -> None:
    print(f"node {peer}: {result['booked']} request(s) booked by the entry, {result['receipts']} receipt(s) of ours for it")
    for state in ("held", "vested", "withheld"):
        t = result["totals"].get(state, {})
        print(f"  {state:<9} {t.get('requests', 0):>6} req {t.get('tokens', 0):>9} tok {t.get('credits', 0.0):>12.3f} credits")
    if not result["problems"]:
        print("everything matches")
        return
    print(f"{len(result['problems'])} discrepancy(ies):")
    for p in result["problems"]:
        detail = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("request_id", "problem"))
        print(f"  {p['request_id']:<26} {p['problem']:<16} {detail}")
