"""Direct connection upgrade (transport/dcutr.py) on 127.0.0.1, all hosts in this process. The
hole punch itself needs two NATs: tests/netns/test_nat_mesh.py. Here: connection reversal (the
peer that received a relayed connection dials the other directly), new streams over the direct
connection, the relayed circuit closed after the grace period, and a failed upgrade that is
tried a bounded number of times, logged once, and leaves the relayed connection working."""

from __future__ import annotations

import logging

import trio
from multiaddr import Multiaddr

from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from tests.support.echo import ECHO, echo
from transport.dcutr import DIRECT, RELAYED, DirectUpgrade, conn_kind, conn_remote
from transport.host import open_mesh_host
from transport.relay import MeshRelay


async def round_trip(host, peer: str, addrs=None) -> None:
    s = await host.open_stream(peer, ECHO, addrs)
    await FrameWriter(s).write_frame({"x": 1})
    assert (await FrameReader(s).read_frame())["echo"] == {"x": 1}
    await s.close()


async def wait_for(cond, limit: float, what: str) -> None:
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(0.05)


async def _relayed_pair(nursery, relay_host, a, b, *, b_upgrade=None):
    hop = MeshRelay(relay_host, hop=True)
    await nursery.start(hop.run)
    ra, rb = MeshRelay(a, hop=False), MeshRelay(b, hop=False, upgrade=b_upgrade)
    for r in (ra, rb):
        await nursery.start(r.run)
    a.relay = ra
    b.set_stream_handler(ECHO, echo)
    for h in (a, b):
        await h.connect(relay_host.peer_id, relay_host.listen_addrs)
    circuit = await rb.reserve(relay_host.peer_id)
    assert circuit
    return ra, rb, circuit


async def test_relayed_connection_is_reversed_to_direct_and_the_circuit_closed():
    with trio.fail_after(60):
        async with open_mesh_host(Identity.generate()) as relay_host, open_mesh_host(Identity.generate()) as a, \
                open_mesh_host(Identity.generate()) as b, trio.open_nursery() as nursery:
            up = DirectUpgrade(b, grace=0.5)
            _, rb, circuit = await _relayed_pair(nursery, relay_host, a, b, b_upgrade=up)
            # A stream through the relay (b has no other address here), kept open across the upgrade.
            held = await a.open_stream(b.peer_id, ECHO, [circuit])
            await FrameWriter(held).write_frame({"x": 1})
            assert (await FrameReader(held).read_frame())["echo"] == {"x": 1}
            await wait_for(lambda: a.peer_id in up.outcomes, 15, "the upgrade's outcome")
            assert up.outcomes[a.peer_id]["result"] == DIRECT and up.outcomes[a.peer_id]["via"] == "reversal"
            assert a.connection_kind(b.peer_id) == DIRECT
            # b dialled a's listen address: the direct connection's far end is a's listener.
            a_port = Multiaddr(a.listen_addrs[0]).value_for_protocol("tcp")
            assert [conn_remote(c) for c in b.connections(a.peer_id) if conn_kind(c) == DIRECT] == [f"127.0.0.1:{a_port}"]
            # New streams take the direct connection while the circuit is still open.
            assert len(a.connections(b.peer_id)) == 2
            s = await a.open_stream(b.peer_id, ECHO)
            carrier = [c for c in a.connections(b.peer_id) if s._raw in c.get_streams()]
            assert [conn_kind(c) for c in carrier] == [DIRECT]
            await s.close()
            # Past the grace period the circuit stays while a stream on it is open, and still works.
            await trio.sleep(1.5)
            assert sorted(conn_kind(c) for c in a.connections(b.peer_id)) == [DIRECT, RELAYED]
            await FrameWriter(held).write_frame({"x": 2})
            assert (await FrameReader(held).read_frame())["echo"] == {"x": 2}
            await held.close()
            # Once it ended only the direct connection is left, on both ends.
            await wait_for(lambda: all(conn_kind(c) == DIRECT for c in a.connections(b.peer_id))
                           and all(conn_kind(c) == DIRECT for c in b.connections(a.peer_id)), 10, "the circuit closed")
            await round_trip(a, b.peer_id)
            assert b.connection_summary()[DIRECT] >= 2 and b.connection_summary()["relayed_peers"] == []
            nursery.cancel_scope.cancel()


async def test_failed_upgrade_is_bounded_logged_once_and_stays_relayed(caplog):
    from libp2p.peer.id import ID

    caplog.set_level(logging.INFO, logger="mesh.dcutr")
    with trio.fail_after(60):
        async with open_mesh_host(Identity.generate()) as relay_host, open_mesh_host(Identity.generate()) as a, \
                open_mesh_host(Identity.generate()) as b, trio.open_nursery() as nursery:
            up = DirectUpgrade(b, backoff=0.05, round_s=0.5)
            sessions = []

            async def no_reversal(peer):
                return None  # as if a advertised nothing dialable (a NAT'd peer)

            original = up._initiate_hole_punch_locked

            async def counted(peer):
                sessions.append(peer)
                return await original(peer)

            up._reversal, up._initiate_hole_punch_locked = no_reversal, counted
            ra, rb, circuit = await _relayed_pair(nursery, relay_host, a, b, b_upgrade=up)
            a_sessions = []

            async def a_counted(peer):
                a_sessions.append(peer)
                return False

            # Upstream's auto-drive loop had both ends initiate; here only the receiving end does.
            ra.upgrade._initiate_hole_punch_locked = a_counted

            async def nothing_to_punch():
                return []  # as behind a symmetric NAT: no address the other side could reach

            ra.upgrade._get_observed_addrs = nothing_to_punch
            await round_trip(a, b.peer_id, [circuit])
            await wait_for(lambda: a.peer_id in up.outcomes, 20, "the upgrade's outcome")
            assert up.outcomes[a.peer_id] == {"result": RELAYED, "via": None, "attempts": 3}
            assert len(sessions) == 3
            await trio.sleep(2.5)  # nothing more is tried (upstream's loop went round every 2 s)
            assert len(sessions) == 3 and a_sessions == []
            up.relayed_inbound(ID.from_base58(a.peer_id))  # as if a reconnected through the relay
            await trio.sleep(0.5)
            assert len(sessions) == 3  # a recent failure: not tried again yet
            failed = [r for r in caplog.records if r.getMessage().startswith("direct connection upgrade failed")]
            assert len(failed) == 1 and failed[0].attempts == 3
            assert a.connection_kind(b.peer_id) == RELAYED and b.connection_summary()["relayed_peers"] == [a.peer_id[-8:]]
            await round_trip(a, b.peer_id)  # the relayed connection still carries streams
            # py-libp2p 0.8.1 tags the receiving end's circuit with its own id where the relay's
            # belongs, which upstream DCUtR's relay-address filter trips over (transport/dcutr.py).
            tags = [str(x) for c in b.connections(a.peer_id) for x in c.get_transport_addresses()]
            assert tags == [f"/p2p/{b.peer_id}/p2p-circuit/p2p/{a.peer_id}"], tags
            nursery.cancel_scope.cancel()


async def test_upstream_dcutr_announces_nothing_for_a_natted_host_ours_its_observed_ip():
    """py-libp2p 0.8.1: ObservedAddrManager keeps no observation from an outbound connection
    (its local port is no listen port), and DCUtRProtocol reads our listen port from
    get_addrs(), which in a public mesh lists advertised addresses only: its CONNECT message
    named no address at all. MeshHost records identify's observed IP itself; DirectUpgrade
    announces that IP with the attempt's own port."""
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    from transport import dcutr

    with trio.fail_after(30):
        async with open_mesh_host(Identity.generate(), listen_host="0.0.0.0", private=False) as b, \
                open_mesh_host(Identity.generate(), listen_host="0.0.0.0", private=False) as a:
            port = Multiaddr(b.listen_addrs[0]).value_for_protocol("tcp")
            # A public mesh dials no loopback address by itself: dial it underneath the gate.
            await a._swarm.dial_addr(Multiaddr(f"/ip4/127.0.0.1/tcp/{port}"), ID.from_base58(b.peer_id))
            await wait_for(lambda: a.observed_ips, 10, "identify's observed address")
            assert a.observed_ips == ["127.0.0.1"]
            assert a._host._observed_addr_manager.addrs(min_observers=1) == []  # upstream kept nothing
            assert await DCUtRProtocol(a._host)._get_observed_addrs() == []  # so it announced nothing

            a.observed_ips.insert(0, "198.51.100.11")  # as a NAT'd host's entry saw it
            ours = DirectUpgrade(a)
            token = dcutr._PUNCH_PORT.set(40123)
            try:
                announced = [str(Multiaddr(x)) for x in await ours._get_observed_addrs()]
            finally:
                dcutr._PUNCH_PORT.reset(token)
            assert announced == ["/ip4/198.51.100.11/tcp/40123"]  # loopback is no address for a public mesh
