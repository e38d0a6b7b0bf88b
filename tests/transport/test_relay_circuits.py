"""Circuit relay v2 through transport/relay.py, all hosts in this process on 127.0.0.1: a
peer reachable only through a relay gets a stream from a peer with no direct address for it;
two circuits through one relay to two peers live independently; our limits are in force."""

from __future__ import annotations

import trio

from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from transport.host import open_mesh_host
from transport.relay import RELAY_LIMITS, MeshRelay

ECHO = "/mesh/test-echo/1"


async def echo(stream, remote: str) -> None:
    reader, writer = FrameReader(stream), FrameWriter(stream)
    while (frame := await reader.read_frame()) is not None:
        await writer.write_frame({"echo": frame, "from": remote})


async def test_stream_through_a_relay_and_two_circuits_one_relay():
    with trio.fail_after(60):
        async with open_mesh_host(Identity.generate()) as relay_host, \
                open_mesh_host(Identity.generate()) as b, open_mesh_host(Identity.generate()) as c, \
                open_mesh_host(Identity.generate()) as a, trio.open_nursery() as nursery:
            relays = {}
            for name, h in (("relay", relay_host), ("a", a), ("b", b), ("c", c)):
                relays[name] = MeshRelay(h, hop=name == "relay")
                await nursery.start(relays[name].run)
            assert relays["relay"].protocol.limits.max_reservations == RELAY_LIMITS.max_reservations > 4
            circuit = {}
            for name, h in (("b", b), ("c", c)):
                h.set_stream_handler(ECHO, echo)
                await h.connect(relay_host.peer_id, relay_host.listen_addrs)
                circuit[name] = await relays[name].reserve(relay_host.peer_id)
                assert circuit[name] and circuit[name].endswith(f"/p2p/{relay_host.peer_id}/p2p-circuit")
            await a.connect(relay_host.peer_id, relay_host.listen_addrs)
            a.relay = relays["a"]
            for name, h in (("b", b), ("c", c)):
                # Only the relayed address: the host dials it through the relay itself.
                s = await a.open_stream(h.peer_id, ECHO, [circuit[name]])
                await FrameWriter(s).write_frame({"x": name})
                assert (await FrameReader(s).read_frame())["echo"] == {"x": name}
                await s.close()
            # Closing the circuit to b must leave the one to c (same relay) working.
            await a.disconnect(b.peer_id)
            await trio.sleep(1.0)  # let the relay tear the first circuit down completely
            assert not a.is_connected(b.peer_id) and a.is_connected(c.peer_id)
            s = await a.open_stream(c.peer_id, ECHO)
            await FrameWriter(s).write_frame({"x": "still"})
            assert (await FrameReader(s).read_frame())["echo"] == {"x": "still"}
            nursery.cancel_scope.cancel()


async def test_relay_enforces_reservations_per_ip():
    """py-libp2p declares a per-IP reservation limit but never checks it: ours refuses the
    second reservation from 127.0.0.1 when the limit is 1, and still renews the first."""
    with trio.fail_after(60):
        async with open_mesh_host(Identity.generate()) as relay_host, open_mesh_host(Identity.generate()) as b, \
                open_mesh_host(Identity.generate()) as c, trio.open_nursery() as nursery:
            relay = MeshRelay(relay_host, hop=True, per_ip=1)
            await nursery.start(relay.run)
            clients = {}
            for name, h in (("b", b), ("c", c)):
                clients[name] = MeshRelay(h, hop=False)
                await nursery.start(clients[name].run)
                await h.connect(relay_host.peer_id, relay_host.listen_addrs)
            assert await clients["b"].reserve(relay_host.peer_id)
            assert await clients["c"].reserve(relay_host.peer_id) is None  # same IP, over the limit
            assert await clients["b"].reserve(relay_host.peer_id)  # a renewal is not a new reservation
            nursery.cancel_scope.cancel()
