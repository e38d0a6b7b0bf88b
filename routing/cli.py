"""``mesh route ...``: evaluate, fit and try out the task-level router from the shell.

``add_parser(subparsers)`` registers ``route`` on the ``mesh`` command line; each
subcommand sets ``func(args) -> int``. Failures raise :class:`RouteCliError` with a
one-line message. ``python -m routing eval ...`` runs the same subcommands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tables import ModelPrice, TableError, load_prices, load_table

if TYPE_CHECKING:
    from .evaluate import EvalResult

# .evaluate and .router import scikit-learn: loaded in the commands that use them, not when
# `mesh` builds its argument parser.

__all__ = ["RouteCliError", "add_parser", "add_route_commands", "format_eval"]


class RouteCliError(Exception):
    """A ``mesh route`` command failed; the message is one line for the user."""


def _prices_for(args: argparse.Namespace, table: Path) -> dict[str, ModelPrice]:
    """Prices from --prices, else ``prices.json`` beside the table, else an error."""
    path = Path(args.prices) if args.prices else table.parent / "prices.json"
    if not args.prices and not path.is_file():
        raise RouteCliError(
            f"no prices: pass --prices FILE (no prices.json beside {table}); every model needs an output price"
        )
    return load_prices(path)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "never"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_eval(result: EvalResult, train_name: str, test_name: str, sweep: str = "tolerance") -> str:
    """The human-readable report of ``mesh route eval``: a small aligned table."""
    j = result.to_json(with_curve=False)
    two = len(result.models) == 2
    head = [
        f"train {train_name} -> test {test_name} ({result.n_test} prompts, {len(result.models)} models)",
        f"best single model on train: {result.best_single}: quality Q*={result.best_quality:.3f}, "
        f"cost C*={result.best_cost:g} per 1M output tokens",
    ]
    if result.left_out:
        head.append(f"left out (not scored on every test prompt): {', '.join(result.left_out)}")
    cols = ["method", "cost_at_95", "quality_at_best_cost"] + (["apgr"] if two else [])
    rows = []
    for name in ("router", "random", "oracle", "best_single"):
        m = j[name]
        rows.append([name, _fmt(m["cost_at_95"]), _fmt(m["quality_at_best_cost"])]
                    + ([_fmt(m.get("apgr"))] if two else []))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = head + [""]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append(f"router swept over its {sweep} setting; cost_at_95: lowest mean cost (fraction of C*) "
                 "reaching 0.95*Q*; quality_at_best_cost: best mean quality at cost <= C*")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalError, evaluate_router
    from .router import RoutingError

    train_path, test_path = Path(args.train), Path(args.test)
    try:
        train = load_table(train_path)
        test = load_table(test_path)
        prices = _prices_for(args, train_path)
        result = evaluate_router(train, test, prices, sweeps=(args.sweep,))
    except (TableError, EvalError, RoutingError) as e:
        raise RouteCliError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json(with_curve=not args.no_curves)))
    else:
        print(format_eval(result, train_path.name, test_path.name, args.sweep))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from .router import RoutingError, fit_router

    table = Path(args.table)
    try:
        prices = _prices_for(args, table)
        router = fit_router(table, prices)
        router.save(args.out)
    except (TableError, RoutingError) as e:
        raise RouteCliError(str(e)) from None
    except OSError as e:
        raise RouteCliError(f"{args.out}: cannot write: {e.strerror or e}") from None
    print(f"fitted on {router.n_train} prompts, {len(router.models)} models -> {args.out}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .router import Policy, RoutingError, load_router

    try:
        router = load_router(args.router)
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(router.models)
        if args.weight is not None:
            policy = Policy.trade_off(args.weight, max_price=args.max_price)
        elif args.max_price is not None and args.tolerance is None:
            policy = Policy.best_under_cap(args.max_price)
        else:
            policy = Policy.cheapest_within(0.95 if args.tolerance is None else args.tolerance,
                                            max_price=args.max_price)
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        decision = router.route(text, models, policy)
    except RoutingError as e:
        raise RouteCliError(str(e)) from None
    print(json.dumps(decision.to_json()) if args.json else decision.explain())
    return 0


def add_route_commands(sub: Any) -> None:
    """Add ``eval``, ``fit`` and ``explain`` to an argparse subparsers object."""
    ev = sub.add_parser(
        "eval",
        help="fit the router on one score table and judge it on another",
        description=(
            "Fit the router on --train, route every prompt of --test over a sweep of the "
            "cost/quality trade-off, and compare with random routing, the per-prompt oracle and "
            "the best single model: cost_at_95 (lowest cost, as a fraction of the best single "
            "model's, reaching 95 percent of its quality), quality_at_best_cost, and APGR for "
            "two-model tables. The cost of a call is the model's output price per 1M tokens."
        ),
    )
    ev.add_argument("--train", required=True, metavar="T.jsonl", help="score table to fit on")
    ev.add_argument("--test", required=True, metavar="U.jsonl", help="score table to route and score")
    ev.add_argument("--prices", metavar="P.json",
                    help="model prices (default: prices.json beside --train; every model needs one)")
    ev.add_argument("--sweep", choices=("tolerance", "tradeoff"), default="tolerance",
                    help="the router's knob to sweep: the tolerance of 'cheapest model within a fraction "
                         "of the best' (default) or the weight of 'quality minus weight * relative price'")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--no-curves", action="store_true", help="leave the cost/quality curves out of --json")
    ev.set_defaults(func=_cmd_eval)

    fit = sub.add_parser("fit", help="fit a router on a score table and save it",
                         description="Fit the router on a score table and save it for the entry to load. "
                                     "The file is a pickle: load only files you trust.")
    fit.add_argument("--table", required=True, metavar="T.jsonl", help="score table to fit on")
    fit.add_argument("--prices", metavar="P.json", help="model prices (default: prices.json beside --table)")
    fit.add_argument("--out", required=True, metavar="ROUTER.pkl", help="where to write the fitted router")
    fit.set_defaults(func=_cmd_fit)

    ex = sub.add_parser("explain", help="route one prompt with a saved router and explain the choice",
                        description="Route one prompt with a saved router (a trusted file) and print why.")
    ex.add_argument("--router", required=True, metavar="ROUTER.pkl", help="a router saved by 'route fit'")
    ex.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    ex.add_argument("--models", help="comma-separated available models (default: all the router knows)")
    ex.add_argument("--tolerance", type=float, help="cheapest model within this fraction of the best (default 0.95)")
    ex.add_argument("--weight", type=float, help="trade-off policy: quality minus WEIGHT * relative price")
    ex.add_argument("--max-price", type=float, help="cost cap: output price per 1M tokens")
    ex.add_argument("--json", action="store_true", help="print the decision as JSON")
    ex.set_defaults(func=_cmd_explain)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``route`` (with ``eval``, ``fit``, ``explain``) on the ``mesh`` command line."""
    route = subparsers.add_parser(
        "route", help="task-level routing: evaluate and fit the router",
        description="Task-level routing: learn which model to send a prompt to from score tables.",
    )
    sub = route.add_subparsers(dest="route_command", metavar="{eval,fit,explain}", required=True)
    add_route_commands(sub)
    return route  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """``python -m routing``: the ``route`` subcommands as a standalone program."""
    parser = argparse.ArgumentParser(prog="python -m routing", description="Task-level routing tools.")
    sub = parser.add_subparsers(dest="route_command", metavar="{eval,fit,explain}", required=True)
    add_route_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except RouteCliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
