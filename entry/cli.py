"""`mesh entry start|keys`: the gateway users talk to."""

from __future__ import annotations

import argparse

from entry.api.keys_cli import add_keys_parser
from entry.config import load_entry_config
from entry.credits.cli import add_credits_parser
from runtime.logs import add_logging_args

_START_KEYS = ("http_host", "http_port", "listen_host", "p2p_port", "bootstrap", "identity", "state_dir", "keys_db",
               "open", "rpm", "tpm", "max_body_bytes", "first_token_timeout", "token_timeout", "sse_write_timeout",
               "log_format", "log_level", "ledger", "verify_model", "verify_rate", "canary_interval", "routing_table")


def add_parser(sub) -> None:
    p = sub.add_parser("entry", help="run the entry node (OpenAI-compatible API + web chat) or manage its API keys",
                       description="The entry node: an OpenAI-compatible API and a web chat that route each request to a mesh node.")
    es = p.add_subparsers(dest="entry_cmd", required=True, metavar="COMMAND")
    s = es.add_parser("start", help="serve the API and web chat until Ctrl-C",
                      description="Join the mesh, keep a live view of its nodes, and serve /v1/chat/completions, "
                      "/v1/completions, /v1/models, /v1/mesh/nodes, /health, /metrics and the web chat at /. "
                      "Flags override the --config file's [entry] table (same names in snake_case). External "
                      "OpenAI-compatible providers ([[entry.providers]]) and routing policies ([entry.routing]) "
                      "are set in the --config file only; a provider's api_key_env must be set in the environment.")
    s.add_argument("--config", help="TOML config file")
    s.add_argument("--http-host", help="HTTP address (default 127.0.0.1)")
    s.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0 = any free port)")
    s.add_argument("--listen-host", help="libp2p address (default 127.0.0.1)")
    s.add_argument("--p2p-port", type=int, help="libp2p TCP port (default: any free port)")
    s.add_argument("--bootstrap", action="append", help="multiaddr of a mesh peer to join through (repeatable)")
    s.add_argument("--identity", help="identity key file (default: STATE_DIR/entry.key, created if missing)")
    s.add_argument("--state-dir", help="directory for the identity key, seed secret and ready file (default: ~/.mesh/entry)")
    s.add_argument("--keys-db", help="API key database (default: ~/.mesh/entry/keys.db, where `mesh entry keys` writes)")
    s.add_argument("--open", action="store_true", default=None, help="no API keys needed (for a local mesh)")
    s.add_argument("--rpm", type=int, help="default requests per minute per key (open mode: for all callers together)")
    s.add_argument("--tpm", type=int, help="default tokens per minute per key (prompt + completion; a request reserves "
                   "its prompt estimate + max_tokens per choice up front)")
    s.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 1000000)")
    s.add_argument("--first-token-timeout", type=float, help="seconds to wait for a node's first token before failing over (default 60; "
                   "10 for a node that has not yet finished a few requests for this entry)")
    s.add_argument("--token-timeout", type=float, help="longest silence between tokens before failing over (default 10)")
    s.add_argument("--sse-write-timeout", type=float, help="seconds a streaming client may read nothing before its "
                   "generation is cancelled (default 10)")
    s.add_argument("--ledger", help="credits database (SQLite; default: STATE_DIR/credits.db)")
    s.add_argument("--verify-model", action="append", metavar="PATH",
                   help="GGUF file to verify nodes serving the same file (same sha256) against (repeatable); "
                   "its name (the file name without .gguf) stays bound to it in /v1/models")
    s.add_argument("--verify-rate", type=float, help="fraction of an established node's requests re-scored (default 0.15; "
                   "new and suspicious nodes: all)")
    s.add_argument("--canary-interval", type=float, help="mean seconds between canary probes to nodes of verified models "
                   "(default 60; 0 = none)")
    s.add_argument("--routing-table", metavar="T.jsonl",
                   help="score table to fit the router for model \"auto\" on at start-up when STATE_DIR/routing has "
                   "no router or table of its own (written by `mesh entry benchmark`)")
    add_logging_args(s)
    s.set_defaults(func=cmd_start, log_format=None, log_level=None)
    add_keys_parser(es)
    add_credits_parser(es)


def cmd_start(args: argparse.Namespace) -> int:
    from engine.model_file import ModelFileError
    from entry.daemon import EntryDaemon
    from protocol.errors import IdentityError
    from runtime.daemon_start import run_daemon

    return run_daemon(lambda: load_entry_config(args.config, {k: getattr(args, k) for k in _START_KEYS}), EntryDaemon,
                      (IdentityError, OSError, ModelFileError), "mesh.entry")
