"""`mesh node start|stop|status`: what a volunteer runs on their own hardware."""

from __future__ import annotations

import argparse

from node.config import load_config
from node.credits_cli import add_credits_parser
from runtime.logs import add_logging_args


def add_parser(sub) -> None:
    p = sub.add_parser("node", help="serve a GGUF model to the mesh (start, stop, status)",
                       description="Run a volunteer node: load a GGUF model with llama.cpp, advertise it on the mesh's DHT and serve generations.")
    ns = p.add_subparsers(dest="node_cmd", required=True, metavar="COMMAND")

    s = ns.add_parser("start", help="load a model and serve it until stopped",
                      description="Load a GGUF model, measure its speed, join the mesh and serve /mesh/infer/1. "
                      "Ctrl-C (or SIGTERM, or `mesh node stop`) stops taking work, lets in-flight generations "
                      "finish within --drain-seconds, then exits; a second Ctrl-C exits at once. "
                      "Flags override the --config file; the file's [node] table takes the same names with underscores.")
    s.add_argument("--config", help="TOML config file with the same settings (e.g. slots = 2)")
    s.add_argument("--model", help="path to a GGUF file (default: the bundled SmolLM2-135M-Instruct), or a model the mesh "
                   "serves, fetched from its nodes into STATE_DIR/models/ before serving: sha256:<hex>, or the model's "
                   "name as adverts give it (needs --bootstrap); a file already there is checked and reused")
    s.add_argument("--model-name", help="model id users ask for in the API (default: the file name without .gguf)")
    s.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU if llama.cpp was built with GPU support; -1 = all (default 0)")
    s.add_argument("--threads", type=int, help="llama.cpp threads for decoding, all slots together (default: the "
                   "physical cores, less one on a machine of 2-4 cores so the node's own threads have one)")
    s.add_argument("--threads-batch", type=int, help="llama.cpp threads for reading prompts (default: --threads if "
                   "given, else the physical cores)")
    s.add_argument("--ctx", type=int, help="context size in tokens of each generation (default 2048)")
    s.add_argument("--slots", type=int, help="concurrent generations (default 1, at most 128): the model is loaded once and "
                   "the slots' sequences are decoded together, one llama.cpp batch per step; each slot adds only its "
                   "KV cache (ctx tokens) to memory")
    s.add_argument("--prefix-cache-tokens", type=int, help="KV cache tokens kept from finished generations so a request "
                   "starting with the same tokens (a chat's next turn) skips re-reading them; reuse stays within one "
                   "requesting peer (default: --ctx; 0 = off, see SECURITY.md)")
    s.add_argument("--queue", type=int, help="requests that may wait for a slot before the node answers busy (default 8)")
    s.add_argument("--max-tokens", type=int, help="longest generation accepted (default 1024)")
    s.add_argument("--buffer-mb", type=int, help="MiB that requesters' unfinished frames may hold in memory, all "
                   "streams together (default 64); a stream that would exceed it is answered busy")
    s.add_argument("--listen-host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="TCP port to listen on (default: any free port)")
    s.add_argument("--bootstrap", action="append", help="multiaddr of a mesh peer to join through (repeatable)")
    s.add_argument("--identity", help="identity key file (default: STATE_DIR/node.key, created if missing)")
    s.add_argument("--state-dir", help="directory for the key, control socket and ready file (default: ~/.mesh/node)")
    s.add_argument("--drain-seconds", type=float, help="grace period for in-flight work when stopping (default 30)")
    s.add_argument("--advert-interval", type=float,
                   help="seconds between capacity advert refreshes (default 5); the DHT storers get every 2nd, adverts live 4 intervals")
    s.add_argument("--skip-benchmark", action="store_true", default=None, help="don't measure speed at start (advertise 0 tok/s)")
    s.add_argument("--synthetic", metavar="NAME", help="benchmarks only: serve a synthetic engine (no model; "
                   "deterministic tokens at --synthetic-rate) under this model name instead of a GGUF file")
    s.add_argument("--synthetic-rate", type=float, help="tokens/s per generation of the --synthetic engine (default 500)")
    s.add_argument("--no-share-model", dest="share_model", action="store_false", default=None,
                   help="don't hand our model file to nodes fetching it (shared by default over /mesh/model/1)")
    s.add_argument("--share-rate", type=float, metavar="MB/S", help="upload limit for sharing the model file, "
                   "all downloaders together (default 50 MB/s)")
    s.add_argument("--console-port", type=int, metavar="N",
                   help="serve the node console (what this node served, its credits, a stop button) on "
                   "http://127.0.0.1:N/ only; 0 = any free port (logged); off by default")
    s.add_argument("--console-entry", dest="console_entries", action="append", metavar="URL",
                   help="an entry's base URL whose signed credit statement the console shows next to this node's "
                   "receipts (repeatable), e.g. http://127.0.0.1:8000")
    s.add_argument("--public-addr", action="append", metavar="MULTIADDR",
                   help="an address peers can dial us at (a port forward; repeatable); advertised once an entry "
                   "dialled it back over a new connection")
    s.add_argument("--relay", action="store_true", default=None,
                   help="relay circuits for peers nobody can dial (only useful on a public address)")
    s.add_argument("--no-direct-upgrade", dest="direct_upgrade", action="store_false", default=None,
                   help="start no direct upgrade (hole punch or reversed dial) of connections that came in through "
                   "a relay: they stay relayed (a peer's own attempt is still answered)")
    s.add_argument("--private-mesh", action="store_true", default=None,
                   help="the whole mesh is on loopback/LAN addresses: dial and advertise private addresses (default: "
                   "decided from --listen-host and --bootstrap)")
    add_logging_args(s)
    s.set_defaults(func=cmd_start, log_format=None, log_level=None)

    for name, help_text in (("stop", "ask the running node to drain and exit"), ("status", "show what the running node serves, its load and tokens served")):
        sp = ns.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--state-dir", help="state directory of the node (default: ~/.mesh/node)")
        sp.add_argument("--json", action="store_true", help="print the raw JSON answer")
        sp.set_defaults(func=cmd_stop if name == "stop" else cmd_status)
    add_credits_parser(ns)  # `mesh node credits`


_START_KEYS = ("model", "model_name", "gpu_layers", "threads", "threads_batch", "ctx", "slots", "queue", "buffer_mb", "max_tokens", "listen_host", "port",
               "bootstrap", "identity", "state_dir", "drain_seconds", "advert_interval", "skip_benchmark", "prefix_cache_tokens",
               "log_format", "log_level", "synthetic", "synthetic_rate", "share_model", "share_rate", "console_port",
               "console_entries", "public_addr", "relay", "direct_upgrade", "private_mesh")


def cmd_start(args: argparse.Namespace) -> int:
    from engine.model_file import ModelFileError
    from node.control import ControlError
    from node.daemon import NodeDaemon
    from protocol.errors import IdentityError
    from runtime.daemon_start import run_daemon

    return run_daemon(lambda: load_config(args.config, {k: getattr(args, k) for k in _START_KEYS}), NodeDaemon,
                      (ModelFileError, ControlError, IdentityError, OSError), "mesh.node")


def _control(args, request: dict) -> dict:
    from node.config import NodeConfig
    from node.control import ControlError, call
    from runtime.errors import CliError

    try:
        return call(NodeConfig(state_dir=args.state_dir).control_socket(), request)
    except ControlError as e:
        raise CliError(str(e)) from None


def cmd_stop(args: argparse.Namespace) -> int:
    answer = _control(args, {"cmd": "stop"})
    if args.json:
        print(__import__("json").dumps(answer))
    else:
        print(f"node is draining: {answer.get('in_flight', 0)} generation(s) in flight, grace {answer.get('grace_s')} s")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = _control(args, {"cmd": "status"})
    if args.json:
        print(__import__("json").dumps(s, indent=2))
        return 0
    m = s["model"]
    state = "draining" if s["draining"] else "serving"
    lines = [
        f"node {s['peer_id']} ({state}, up {s['uptime_s']:.0f} s, pid {s['pid']})",
        f"model    {m['name']} {m['quantization']} ({m['architecture']}), ctx {m['context_size']}, sha256 {m['sha256'][:16]}…",
        f"speed    prefill {s['prefill_tps']:.0f} tok/s, decode {s['decode_tps']:.0f} tok/s "
        f"({s.get('engine_mode') or 'separate'}: {s.get('aggregate_tps', 0):.0f} tok/s with all {s['slots']} slots busy)",
        f"load     {s['active']}/{s['slots']} slots busy, {s['queued']}/{s['queue_limit']} queued",
        f"served   {s['requests_served']} requests, {s['tokens_served']} tokens ({s['requests_failed']} failed or cancelled)",
        f"listen   {', '.join(s['addrs'])}",
    ]
    if "advertised_addrs" in s:
        lines.append(f"advertise {', '.join(s['advertised_addrs']) or 'no address (not publicly reachable: entries use our connections)'}")
    reach = s.get("reachability")
    if reach:
        lines.append(f"reach    {reach['state']} (checked by {reach['checked_by']} peers; seen as {', '.join(reach['observed']) or '?'})")
    links = s.get("entry_links")
    if links:
        lines.append(f"entries  {links['connected']}/{links['entries']} connected (re-joined the mesh {links['rejoins']} times)")
    conns = s.get("connections")
    if conns:
        relayed = f" ({', '.join(conns['relayed_peers'])})" if conns["relayed_peers"] else ""
        lines.append(f"peers    {conns['direct']} direct, {conns['relayed']} through a relay{relayed}")
    print("\n".join(lines))
    return 0
