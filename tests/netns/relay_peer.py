"""A bare mesh peer for the relay tests, run inside a lab namespace:

    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR listen
        reserves a relay slot at the entry, serves an echo protocol, prints {"peer_id", "addr"}
    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR dial PEER:CIRCUIT_ADDR [PEER:ADDR ...]
        opens a stream to each peer through its relayed address, one round trip each, then
        closes the first circuit and checks the others still answer; prints {"ok", ...}
    python tests/netns/relay_peer.py --bootstrap ENTRY_ADDR call --model SHA256 PEER=ADDR [PEER=ADDR ...]
        generations from node daemons (/mesh/infer/1, transport/node_client.py), each reached at
        the address given (a circuit address goes through the relay); with --runs N, N+1 rounds
        over the targets in turn (the first a warm-up); prints {"ok", "results": {peer: {"tokens",
        "conn": how the connection runs, "ttft_s", "decode_s", "n": per run}}}

A listener exits when its stdin closes, so an aborted test leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.framing import FrameReader, FrameWriter  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from transport.host import open_mesh_host  # noqa: E402
from transport.relay import MeshRelay  # noqa: E402

ECHO = "/mesh/test-echo/1"


async def echo(stream, remote: str) -> None:
    reader, writer = FrameReader(stream), FrameWriter(stream)
    while (frame := await reader.read_frame()) is not None:
        await writer.write_frame({"echo": frame})


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
    from transport.node_client import open_call

    req = InferRequest(rid, sha, "completion", SamplingParams(max_tokens=tokens), prompt="hello")
    t0 = time.perf_counter()
    call = await open_call(host, peer, [addr], req, timeout=15)
    first, n = None, 0
    async for chunk in call.chunks():
        if first is None and chunk.ids:
            first = time.perf_counter()
        n += len(chunk.ids)
    end = time.perf_counter()
    await call.close()
    if call.final is None or first is None:
        raise RuntimeError(f"{rid}: no final frame or no token")
    return first - t0, end - first, n


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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("role", choices=["listen", "dial", "call"])
    ap.add_argument("targets", nargs="*")
    ap.add_argument("--model", help="call: the nodes' model sha256")
    ap.add_argument("--runs", type=int, default=0, help="call: timed rounds after a warm-up (0: one untimed round)")
    ap.add_argument("--tokens", type=int, default=8, help="call: tokens per generation")
    args = ap.parse_intermixed_args()
    entry = args.bootstrap.split("/p2p/")[-1]
    async with trio.open_nursery() as nursery:
        async def stdin_watch() -> None:
            stdin = trio.lowlevel.FdStream(0)
            while await stdin.receive_some(1024):
                pass
            nursery.cancel_scope.cancel()

        if args.role == "listen":  # the dialer ends by itself (and its stdin is closed at once)
            nursery.start_soon(stdin_watch)
        async with open_mesh_host(Identity.generate(), listen_host="0.0.0.0", bootstrap=[args.bootstrap]) as host:
            relay = MeshRelay(host, hop=False)
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
