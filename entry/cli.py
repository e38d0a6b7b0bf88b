"""`mesh entry start|keys`: the gateway users talk to."""

from __future__ import annotations

import argparse

from entry.api.keys_cli import add_keys_parser
from entry.config import load_entry_config
from entry.credits.cli import add_credits_parser
from runtime.logs import add_logging_args

_START_KEYS = ("http_host", "http_port", "listen_host", "p2p_port", "bootstrap", "identity", "state_dir", "keys_db",
               "open", "rpm", "tpm", "max_body_bytes", "first_token_timeout", "token_timeout", "sse_write_timeout",
               "queue_wait", "queue_max", "log_format", "log_level", "ledger", "verify_model", "verify_rate", "canary_interval", "routing_table")
_NAT_KEYS = ("relay", "private_mesh")  # NAT traversal (transport/relay.py, transport/addrs.py)


def add_parser(sub) -> None:
    p = sub.add_parser("entry", help="run the entry node (OpenAI-compatible API + web chat) or manage its API keys",
                       description="The entry node: an OpenAI-compatible API and a web chat that route each request to a mesh node.")
    es = p.add_subparsers(dest="entry_cmd", required=True, metavar="COMMAND")
    s = es.add_parser("start", help="serve the API and web chat until Ctrl-C",
                      description="Join the mesh, keep a live view of its nodes, and serve /v1/chat/completions, "
                      "/v1/completions, /v1/responses (model \"auto\": the router picks a model per request), /v1/models, /v1/mesh/nodes, "
                      "/v1/mesh/routing, /v1/mesh/benchmark, /health, /metrics and the web chat at /. "
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
    s.add_argument("--queue-wait", type=float, help="seconds a request may wait in the entry's queue when every node "
                   "of its model is busy, before it gets 503 + Retry-After (default 300; the queue is fair across API "
                   "keys: round robin between keys, first come first served within one)")
    s.add_argument("--queue-max", type=int, help="most requests waiting in the queue, all models together; past it a "
                   "request gets 503 + Retry-After at once, unless another API key holds more places: that key's newest "
                   "waiter gets the 503 instead (default 256; 0 = no queue)")
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
    s.add_argument("--no-relay", dest="relay", action="store_false", default=None,
                   help="don't relay circuits for nodes nobody can dial (default: relay, within per-peer, per-IP, "
                   "byte and duration limits)")
    s.add_argument("--private-mesh", action="store_true", default=None,
                   help="the whole mesh is on loopback/LAN addresses: dial and advertise private addresses (default: "
                   "decided from --listen-host and --bootstrap)")
    add_logging_args(s)
    s.set_defaults(func=cmd_start, log_format=None, log_level=None)
    add_keys_parser(es)
    add_credits_parser(es)
    b = es.add_parser("benchmark", help="score every model on a prompt suite and refit the router for model \"auto\"",
                      description="Send every prompt of a suite to every target model (mesh models and providers) "
                      "through a running entry's API (POST /v1/mesh/benchmark: routed, rate-limited and booked like "
                      "any request), score the answers, store the score table and per-model latency/tokens in the "
                      "entry's state (STATE_DIR/routing) and refit its router. Progress goes to stderr.")
    b.add_argument("--suite", metavar="S.jsonl", help="suite file (default: the shipped routing/suites/basic.jsonl)")
    b.add_argument("--models", help="comma-separated model ids (default: every model the entry can route to)")
    b.add_argument("--entry", default=None, help="the entry's URL (default http://127.0.0.1:8000)")
    b.add_argument("--key", help="API key (default: $MESH_API_KEY; none for an open entry)")
    b.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    b.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default 3600)")
    b.add_argument("--json", action="store_true", help="print the final report as JSON")
    b.set_defaults(func=cmd_benchmark)


def cmd_start(args: argparse.Namespace) -> int:
    from engine.model_file import ModelFileError
    from entry.daemon import EntryDaemon
    from protocol.errors import IdentityError
    from runtime.daemon_start import run_daemon

    return run_daemon(lambda: load_entry_config(args.config, {k: getattr(args, k) for k in _START_KEYS + _NAT_KEYS}), EntryDaemon,
                      (IdentityError, OSError, ModelFileError), "mesh.entry")


def cmd_benchmark(args: argparse.Namespace) -> int:
    import json
    import os
    import sys
    import time

    import httpx

    from routing.suite import SuiteError, load_suite
    from runtime.errors import CliError

    # Checked here first, so a bad line is reported with the file's own name and line number.
    try:
        rows = load_suite(args.suite)
    except SuiteError as e:
        raise CliError(str(e)) from None
    suite_text = "\n".join(json.dumps(_suite_obj(r)) for r in rows)
    url = (args.entry or "http://127.0.0.1:8000").rstrip("/")
    key = args.key or os.environ.get("MESH_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict = {"suite": suite_text, "concurrency": args.concurrency}
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            r = http.post("/v1/mesh/benchmark", json=body)
            if r.status_code != 202:
                raise CliError(f"{url}: HTTP {r.status_code}: {_error_text(r)}")
            run = r.json()
            deadline = time.monotonic() + args.timeout
            while run["status"] == "running":
                if time.monotonic() > deadline:
                    raise CliError(f"benchmark {run['id']} still running after {args.timeout:g} s (it goes on in the entry)")
                _progress(run)
                time.sleep(0.5)
                r = http.get(f"/v1/mesh/benchmark/{run['id']}")
                if r.status_code != 200:
                    raise CliError(f"{url}: HTTP {r.status_code}: {_error_text(r)}")
                run = r.json()
            _progress(run)
            print(file=sys.stderr)
    except httpx.HTTPError as e:
        raise CliError(f"cannot reach the entry at {url}: {e}") from None
    if run["status"] != "done":
        raise CliError(f"benchmark {run['id']} failed: {run['error']}")
    if args.json:
        print(json.dumps(run))
    else:
        print(_report(run))
    return 0


def _suite_obj(r) -> dict:
    obj = {"id": r.id, "task": r.task, "scorer": r.scorer, "reference": r.reference, "max_tokens": r.max_tokens}
    if r.prompt is not None:
        obj["prompt"] = r.prompt
    else:
        obj["messages"] = [{"role": m.role, "content": m.content} for m in r.messages]
    return obj


def _error_text(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def _progress(run: dict) -> None:
    import sys

    done, total = run["done"], max(1, run["total"])
    width = 30
    filled = int(width * done / total)
    eta = run.get("eta_s")
    eta_text = "" if eta is None else f" ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    sys.stderr.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{run['total']} "
                     f"{run['rate_per_s']:.2f}/s{eta_text}   ")
    sys.stderr.flush()


def _report(run: dict) -> str:
    s = run["summary"]
    models = list(s["models"])
    lines = [f"benchmark {run['id']}: {run['prompts']} prompts x {len(models)} models in {run['elapsed_s']:.0f} s"]
    w = max([len("task")] + [len(t) for t in s["tasks"]])
    lines.append("task".ljust(w) + "  " + "  ".join(m[:24].rjust(24) for m in models))
    for task, per in s["tasks"].items():
        lines.append(task.ljust(w) + "  " + "  ".join(f"{per.get(m, 0):24.2f}" for m in models))
    lines.append("mean".ljust(w) + "  " + "  ".join(f"{s['models'][m]['mean_score'] or 0:24.2f}" for m in models))
    lines.append("p50 s".ljust(w) + "  " + "  ".join(f"{s['models'][m]['latency_p50_s'] or 0:24.2f}" for m in models))
    if s["error_count"]:
        lines.append(f"{s['error_count']} calls failed (scored 0), e.g. {s['errors'][0]['model']}: {s['errors'][0]['error']}")
    r = s["router"]
    lines.append(f"router refitted on {r['rows']} prompts ({', '.join(r['models'])})")
    return "\n".join(lines)
