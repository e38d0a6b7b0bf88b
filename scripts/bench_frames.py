"""Frame throughput between two processes over libp2p (TCP + Noise + Yamux) on loopback.

    .venv/bin/python scripts/bench_frames.py [--frames N] [--batches 1,4,16,64]

Starts a sink peer in a child process, then from this process streams ~100-byte frames
to it, `batch` frames per stream write, and prints frames/s per batch size (the time runs
from the first write to the sink's reply confirming it decoded every frame). Also prints
the request/reply round trip of one small frame. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.framing import FrameReader, FrameWriter, encode_frame  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from transport.host import open_mesh_host  # noqa: E402

BENCH = "/mesh/bench/1"


def token_frame(i: int) -> dict:
    return {"t": "tok", "i": i, "text": "x" * 78}  # ~100 bytes encoded


async def sink(stream, remote: str) -> None:
    reader, writer = FrameReader(stream), FrameWriter(stream)
    count = 0
    while (frame := await reader.read_frame()) is not None:
        if frame.get("t") == "end":
            await writer.write_frame({"count": count})
            count = 0
        elif frame.get("t") == "ping":
            await writer.write_frame({"t": "pong"})
        else:
            count += 1


async def serve() -> None:
    async with open_mesh_host(Identity.generate()) as host:
        host.set_stream_handler(BENCH, sink)
        print(json.dumps({"peer_id": host.peer_id, "addrs": host.listen_addrs}), flush=True)
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some(1024):  # until the parent goes away
            pass


async def run_client(args) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        buf = b""
        with trio.fail_after(30):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise SystemExit("sink process exited early")
                buf += chunk
        info = json.loads(buf.split(b"\n", 1)[0])
        print(f"frame size: {len(encode_frame(token_frame(0)))} bytes; libp2p TCP+Noise+Yamux over 127.0.0.1, 2 processes")
        async with open_mesh_host(Identity.generate()) as host:
            stream = await host.open_stream(info["peer_id"], BENCH, info["addrs"])
            reader, writer = FrameReader(stream), FrameWriter(stream)

            rtts = []
            for _ in range(args.pings):
                t = time.perf_counter()
                await writer.write_frame({"t": "ping"})
                await reader.read_frame()
                rtts.append(time.perf_counter() - t)
            print(f"round trip of one frame: median {statistics.median(rtts) * 1e3:.2f} ms, "
                  f"p90 {sorted(rtts)[int(len(rtts) * 0.9)] * 1e3:.2f} ms over {args.pings}")

            for batch in args.batches:
                n = args.frames if batch > 1 else max(batch, args.frames // 8)
                n -= n % batch
                frames = [token_frame(i) for i in range(n)]
                t = time.perf_counter()
                for i in range(0, n, batch):
                    await writer.write_frames(frames[i:i + batch])
                await writer.write_frame({"t": "end"})
                reply = await reader.read_frame()
                dt = time.perf_counter() - t
                assert reply == {"count": n}, reply
                print(f"{batch:>3} frames/write: {n / dt:>9,.0f} frames/s  ({n} frames in {dt:.2f} s, "
                      f"{n * len(encode_frame(frames[0])) / dt / 1e6:.2f} MB/s)")
            await stream.close()
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=128000)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--pings", type=int, default=200)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    trio.run(serve if args.serve else run_client, *([] if args.serve else [args]))


if __name__ == "__main__":
    main()
