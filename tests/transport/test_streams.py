"""Yamux flow control as transport/host.py sets it up (credit once half the window is used, no
write per read) and the cancel-safety of reads that the entry's timeouts rely on; and the
stored-value hook an entry uses to see a node's advert at once. Hosts in this process on
127.0.0.1; every wait is bounded."""

from __future__ import annotations

import time

import trio

from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from protocol.records import CapacityAdvert
from transport.dht_keys import advert_key
from transport.host import open_mesh_host

SINK = "/mesh/test-sink/1"
SOURCE = "/mesh/test-source/1"


async def test_bulk_transfer_far_beyond_the_window_completes():
    """8 MiB one way, through a 256 KiB initial window: credit must keep coming."""
    total = 8 << 20
    got = trio.Event()
    received = 0

    async def sink(stream, remote: str) -> None:
        nonlocal received
        while received < total:
            data = await stream.read(65536)
            if not data:
                break
            received += len(data)
        await stream.write(b"ok")
        got.set()

    async with open_mesh_host(Identity.generate()) as a, open_mesh_host(Identity.generate()) as b:
        b.set_stream_handler(SINK, sink)
        with trio.fail_after(60):
            stream = await a.open_stream(b.peer_id, SINK, b.listen_addrs)
            chunk = b"x" * 60000
            sent = 0
            while sent < total:
                n = min(len(chunk), total - sent)
                await stream.write(chunk[:n])
                sent += n
            await got.wait()
            assert await stream.read(16) == b"ok"
            await stream.close()
    assert received == total


async def test_a_cancelled_read_loses_no_bytes():
    """Frames read under short deadlines that keep expiring (as the entry's token timeouts
    and interrupts do) arrive complete and in order."""
    n_frames = 3000

    async def source(stream, remote: str) -> None:
        writer = FrameWriter(stream)
        for i in range(n_frames):
            await writer.write_frame({"i": i, "pad": "y" * (i % 300)})
            if i % 50 == 0:
                await trio.sleep(0.001)
        await stream.close()

    async with open_mesh_host(Identity.generate()) as a, open_mesh_host(Identity.generate()) as b:
        b.set_stream_handler(SOURCE, source)
        with trio.fail_after(60):
            stream = await a.open_stream(b.peer_id, SOURCE, b.listen_addrs)
            reader = FrameReader(stream)
            seen = []
            timeouts = 0
            while True:
                with trio.move_on_after(0.0005) as scope:
                    frame = await reader.read_frame()
                if scope.cancelled_caught:
                    timeouts += 1
                    continue
                if frame is None:
                    break
                seen.append(frame["i"])
    assert seen == list(range(n_frames))
    assert timeouts > 0  # the deadlines did cut reads short


async def test_value_stored_hook_reports_adverts_stored_at_us():
    ident = Identity.generate()
    seen: list[tuple[str, bytes]] = []
    async with open_mesh_host(Identity.generate()) as server:
        server.on_value_stored(lambda k, v: seen.append((k, v)))
        boot = f"{server.listen_addrs[0]}/p2p/{server.peer_id}"
        async with open_mesh_host(ident, bootstrap=[boot]) as node:
            now = time.time()
            blob = CapacityAdvert(
                node=ident.peer_id, model_sha256="cd" * 32, model_name="m", quantization="Q4_0", context_size=2048,
                prefill_tps=1.0, decode_tps=1.0, total_slots=1, free_slots=1, seq=int(now * 1e6), issued_at=now,
                expires_at=now + 30, addrs=node.listen_addrs).sign(ident)
            with trio.fail_after(20):
                stored = await node.put_value(advert_key(ident.peer_id), blob, timeout=10)
                while not seen:
                    await trio.sleep(0.01)
    assert stored >= 1
    assert seen[0] == (advert_key(ident.peer_id), blob)
