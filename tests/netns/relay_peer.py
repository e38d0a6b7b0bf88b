"""A bare mesh peer for the relay tests, run inside a lab namespace:

    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR listen
        reserves a relay slot at the entry, serves an echo protocol, prints {"peer_id", "addr"};
        then one line {"upgrade": {...}} per direct-upgrade outcome (transport/dcutr.py) of a
        relayed connection that came in
    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR dial PEER=CIRCUIT_ADDR [PEER=ADDR ...]
        opens a stream to each peer through its relayed address, one round trip each, then
        closes the first circuit and checks the others still answer; prints {"ok", ...}
    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR call --model SHA256 PEER=ADDR [PEER=ADDR ...]
        generations from node daemons (/mesh/infer/1, transport/node_client.py), each reached at
        the address given (a circuit address goes through the relay); with --runs N, N+1 rounds
        over the targets in turn (the first a warm-up); prints {"ok", "results": {peer: {"tokens",
        "conn": how the connection runs, "ttft_s", "decode_s", "n": per run}}}
    ... --wait-direct S dial PEER=CIRCUIT_ADDR
        one peer: after the relayed round trip, waits up to S seconds for a direct connection,
        reports it ("kind", "remote": the far end's ip:port) and which kind of connection
        carried a new stream, then waits up to S more for the relayed one to be closed
        ("relayed_closed") and makes one more round trip

--listen-host (default 0.0.0.0): a public host passes its address, so it advertises one;
--grace S: how long a relayed connection outlives its direct upgrade; --no-upgrade: start no
upgrade (still answer a peer's).
A listener exits when its stdin closes, so an aborted test leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.framing import FrameReader, FrameWriter  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from tests.support.echo import ECHO, echo  # noqa: E402
from transport.dcutr import RELAYED, DirectUpgrade, conn_kind, conn_remote  # noqa: E402
from transport.host import open_mesh_host  # noqa: E402
from transport.relay import MeshRelay  # noqa: E402


async def round_trip(host, peer: str, addrs=None) -> float:
    t0 = time.monotonic()
    s = await host.open_stream(peer, ECHO, addrs, timeout=15)
    await FrameWriter(s).write_frame({"x": peer})
    reply = await FrameReader(s).read_frame()
    await s.close()
    assert reply and reply["echo"] == {"x": peer}, reply
    return time.monotonic() - t0


def connection_facts(host, peer: str) -> list[dict]:
    """How each open connection to `peer` runs: its type as py-libp2p labels it, the
    addresses it was made over, and the IP/port at the far end of the socket under it (for a
    circuit, the relay's: the bytes go to the relay, not to the peer)."""
    from libp2p.peer.id import ID

    out = []
    for conn in host._swarm.get_connections(ID.from_base58(peer)):
        muxed = conn.muxed_conn
        secured = getattr(muxed, "secured_conn", None)
        raw = getattr(secured, "conn", None)
        try:
            remote = raw.get_remote_address() if raw is not None else None
        except Exception:
            remote = None
        out.append({"type": str(muxed.get_connection_type().value) if hasattr(muxed, "get_connection_type") else "?",
                    "addrs": [str(a) for a in conn.get_transport_addresses()],
                    "remote": list(remote) if remote else None})
    return out


async def generate(host, peer: str, addr: str, sha: str, tokens: int, rid: str) -> tuple[float, float, int]:
    """One generation on a new stream: (seconds to the first token, seconds after it, tokens)."""
    from protocol.messages import InferRequest, SamplingParams
    from transport.node_client import timed_generation

    req = InferRequest(rid, sha, "completion", SamplingParams(max_tokens=tokens), prompt="hello")
    return await timed_generation(host, peer, [addr], req, timeout=15)


async def generations(host, targets: list[list[str]], sha: str, runs: int, tokens: int) -> dict:
    results: dict = {peer: {"ttft_s": [], "decode_s": [], "n": []} for peer, _ in targets}
    for i in range(runs + 1):
        for peer, addr in targets if i % 2 == 0 else targets[::-1]:
            ttft, decode, n = await generate(host, peer, addr, sha, tokens, f"relay-peer-{i:04d}-{peer[-8:]}")
            if i or not runs:
                r = results[peer]
                r["ttft_s"].append(ttft)
                r["decode_s"].append(decode)
                r["n"].append(n)
    for peer, _ in targets:
        results[peer]["tokens"] = results[peer]["n"][-1]
        results[peer]["conn"] = connection_facts(host, peer)
    return {"ok": True, "results": results}


async def carrier_kind(host, peer: str) -> str:
    """The kind of connection a new stream to `peer` went over."""
    s = await host.open_stream(peer, ECHO, timeout=15)
    kinds = [conn_kind(c) for c in host.connections(peer) if s._raw in c.get_streams()]
    await FrameWriter(s).write_frame({"x": peer})
    assert (await FrameReader(s).read_frame())["echo"] == {"x": peer}
    await s.close()
    return kinds[0] if kinds else "?"


async def wait_for(cond, limit: float) -> bool:
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(0.1)
        return True
    return False


async def upgrade_report(host, peer: str, addr: str, wait: float) -> dict:
    out: dict = {"rtt_ms": {peer: round(1000 * await round_trip(host, peer, [addr]), 2)}}
    out["kind_first"] = host.connection_kind(peer)
    t0 = time.monotonic()
    direct = await wait_for(lambda: host.connection_kind(peer) == "direct", wait)
    out["kind"] = host.connection_kind(peer)
    out["remote"] = next((conn_remote(c) for c in host.connections(peer) if conn_kind(c) == "direct"), None)
    if direct:
        out["direct_after_s"] = round(time.monotonic() - t0, 2)
    out["carrier"] = await carrier_kind(host, peer)
    if direct:
        out["relayed_closed"] = await wait_for(
            lambda: not any(conn_kind(c) == RELAYED for c in host.connections(peer)), wait)
    out["rtt_ms_after"] = round(1000 * min([await round_trip(host, peer) for _ in range(5)]), 2)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--listen-host", default="0.0.0.0")
    ap.add_argument("--grace", type=float, default=None)
    ap.add_argument("--no-upgrade", action="store_true")
    ap.add_argument("--wait-direct", type=float, default=None)
    ap.add_argument("role", choices=["listen", "dial", "call"])
    ap.add_argument("targets", nargs="*")
    ap.add_argument("--model", help="call: the nodes' model sha256")
    ap.add_argument("--runs", type=int, default=0, help="call: timed rounds after a warm-up (0: one untimed round)")
    ap.add_argument("--tokens", type=int, default=8, help="call: tokens per generation")
    args = ap.parse_intermixed_args()
    # Our structured logs (and py-libp2p's, forwarded under mesh.libp2p) on stderr, for a
    # failing test's message; MESH_DEBUG=1 for everything.
    logging.basicConfig(level=logging.DEBUG if os.environ.get("MESH_DEBUG") else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    entry = args.bootstrap.split("/p2p/")[-1]
    async with trio.open_nursery() as nursery:
        async def stdin_watch() -> None:
            stdin = trio.lowlevel.FdStream(0)
            while await stdin.receive_some(1024):
                pass
            nursery.cancel_scope.cancel()

        if args.role == "listen":  # the dialer ends by itself (and its stdin is closed at once)
            nursery.start_soon(stdin_watch)
        async with open_mesh_host(Identity.generate(), listen_host=args.listen_host,
                                  bootstrap=[args.bootstrap]) as host:
            def outcome(peer: str, result: dict) -> None:
                print(json.dumps({"upgrade": {"peer": peer, **result}}), flush=True)

            kw = {} if args.grace is None else {"grace": args.grace}
            relay = MeshRelay(host, hop=False, upgrade=DirectUpgrade(host, on_outcome=outcome, **kw),
                              direct_upgrade=not args.no_upgrade)
            host.relay = relay
            await nursery.start(relay.run)
            if args.role == "listen":
                host.set_stream_handler(ECHO, echo)
                addr = await relay.reserve(entry)
                print(json.dumps({"peer_id": host.peer_id, "addr": addr}), flush=True)
                await trio.sleep_forever()
            if args.role == "call":
                targets = [t.split("=", 1) for t in args.targets]
                print(json.dumps(await generations(host, targets, args.model, args.runs, args.tokens)), flush=True)
                nursery.cancel_scope.cancel()
                return
            targets = [t.split("=", 1) for t in args.targets]
            out: dict = {"rtt_ms": {}}
            if args.wait_direct is not None:
                out = await upgrade_report(host, *targets[0], args.wait_direct)
            else:
                for peer, addr in targets:
                    await round_trip(host, peer, [addr])  # opens the circuit
                    out["rtt_ms"][peer] = round(1000 * min([await round_trip(host, peer) for _ in range(5)]), 2)
            if len(targets) > 1:
                await host.disconnect(targets[0][0])
                await trio.sleep(1.0)
                out["others_after_close"] = [round(1000 * await round_trip(host, p), 2) for p, _ in targets[1:]]
            out["ok"] = True
            print(json.dumps(out), flush=True)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
