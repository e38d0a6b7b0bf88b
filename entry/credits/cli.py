"""`mesh entry credits`: the operator's view of the credits ledger (totals, per node, per model).

Reads the SQLite file directly (read-only; WAL lets it run beside a live entry)."""

from __future__ import annotations

import argparse
import json


def add_credits_parser(subparsers) -> None:
    p = subparsers.add_parser("credits", help="show the credits ledger: totals, per node, per model",
                              description="Credits booked to nodes for the completion tokens they served: held "
                              "(escrow: awaiting verification or vesting), vested, withheld (failed verification).")
    p.add_argument("--ledger", help="credits database (default: STATE_DIR/credits.db)")
    p.add_argument("--state-dir", help="the entry's state directory (default: ~/.mesh/entry)")
    p.add_argument("--node", help="one node's statement: its peer id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_credits)


def _ledger_path(args):
    from entry.config import EntryConfig

    return EntryConfig(ledger=args.ledger, state_dir=args.state_dir).ledger_path()


def cmd_credits(args: argparse.Namespace) -> int:
    from entry.credits.ledger import Ledger
    from runtime.errors import CliError

    path = _ledger_path(args)
    if not path.exists():
        raise CliError(f"no credits ledger at {path} (start the entry first, or pass --ledger)")
    led = Ledger(path, readonly=True)
    try:
        if args.node:
            totals = {k: vars(v) for k, v in led.node_totals(args.node).items()}
            reqs = led.node_requests(args.node)
            if args.json:
                print(json.dumps({"node": args.node, "totals": totals, "requests": reqs}, indent=2))
            else:
                _print_node(args.node, totals, reqs)
            return 0
        report = {by: led.summary(by) for by in ("all", "node", "model")}
    finally:
        led.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for by, title in (("all", "total"), ("node", "per node"), ("model", "per model")):
        print(f"{title}:")
        rows = report[by]
        if not rows:
            print("  (nothing booked yet)")
        for r in rows:
            key = "" if by == "all" else (r["key"] if by == "node" else r["key"][:16] + "…")
            print(f"  {key:<54} {r['requests']:>6} req {r['tokens']:>9} tok   held {r['held_credits']:>10.3f}"
                  f"   vested {r['vested_credits']:>10.3f}   withheld {r['withheld_credits']:>10.3f}")
    return 0


def _print_node(node: str, totals: dict, reqs: list[dict]) -> None:
    print(f"node {node}")
    for state in ("held", "vested", "withheld"):
        t = totals[state]
        print(f"  {state:<9} {t['requests']:>6} req {t['tokens']:>9} tok {t['credits']:>12.3f} credits")
    for r in reqs[:50]:
        extra = f" ({r['reason']})" if r["reason"] else ""
        print(f"  {r['request_id']:<26} {r['tokens']:>6} tok  {r['state']}/{r['verify']}{extra}")
