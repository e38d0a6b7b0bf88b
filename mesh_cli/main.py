"""`mesh`: run a node, an entry, a local demo mesh, or manage keys."""

from __future__ import annotations

import argparse
import sys

from protocol.errors import IdentityError
from runtime.errors import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="Peer-to-peer LLM inference mesh: volunteers serve GGUF models with llama.cpp "
        "over libp2p; an entry node offers an OpenAI-compatible API and a web chat.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from entry import cli as entry_cli
    from mesh_cli import demo, keys
    from node import cli as node_cli
    from routing import cli as route_cli

    demo.add_parser(sub)
    node_cli.add_parser(sub)
    entry_cli.add_parser(sub)
    keys.add_parser(sub)
    route_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from routing.cli import RouteCliError

    try:
        return args.func(args) or 0
    except (CliError, IdentityError, RouteCliError) as e:
        print(f"mesh: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
