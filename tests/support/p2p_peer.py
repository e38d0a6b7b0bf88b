"""A mesh peer in its own process, for the multi-process tests.

    python tests/support/p2p_peer.py bootstrap
    python tests/support/p2p_peer.py provider --bootstrap ADDR --model SHA256 [--ttl S --refresh S]

Prints one JSON line {"peer_id", "addrs"} on stdout once it listens (and, for a provider,
once its first advert is stored), then serves until killed or until stdin closes, so a
crashed test run does not leave peers behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.framing import FrameReader, FrameWriter  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.records import CapacityAdvert  # noqa: E402
from transport.discovery import next_advert_seq, publish_advert  # noqa: E402
from transport.host import open_mesh_host  # noqa: E402

TEST_PROTOCOL = "/mesh/test-echo/1"


async def echo_handler(stream, remote_peer_id: str, me: str) -> None:
    """Answer each request frame with one reply naming us and the caller."""
    reader, writer = FrameReader(stream), FrameWriter(stream)
    while (frame := await reader.read_frame()) is not None:
        await writer.write_frame({"reply_to": frame.get("req"), "server": me, "client": remote_peer_id})


async def exit_when_stdin_closes(scope: trio.CancelScope) -> None:
    stdin = trio.lowlevel.FdStream(0)
    while await stdin.receive_some(1024):
        pass
    scope.cancel()


def announce(host) -> None:
    print(json.dumps({"peer_id": host.peer_id, "addrs": host.listen_addrs}), flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["bootstrap", "provider"])
    ap.add_argument("--bootstrap", action="append", default=[])
    ap.add_argument("--model", default="")
    ap.add_argument("--ttl", type=float, default=15.0)
    ap.add_argument("--refresh", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    identity = Identity.generate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_when_stdin_closes, nursery.cancel_scope)
        async with open_mesh_host(identity, listen_port=args.port, bootstrap=args.bootstrap) as host:
            host.set_stream_handler(TEST_PROTOCOL, lambda s, r: echo_handler(s, r, host.peer_id))
            if args.role == "bootstrap":
                announce(host)
                await trio.sleep_forever()
            announced = False
            while True:
                now = time.time()
                advert = CapacityAdvert(
                    node=identity.peer_id, model_sha256=args.model, model_name="test-model",
                    quantization="Q4_0", context_size=2048, prefill_tps=100.0, decode_tps=50.0,
                    total_slots=2, free_slots=2, seq=next_advert_seq(), issued_at=now,
                    expires_at=now + args.ttl, addrs=host.listen_addrs,
                )
                stored = await publish_advert(host, identity, advert)
                if stored and not announced:
                    announce(host)
                    announced = True
                await trio.sleep(args.refresh)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
