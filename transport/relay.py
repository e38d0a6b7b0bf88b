"""Circuit relay v2 (py-libp2p 0.8.1 `libp2p.relay.circuit_v2`) with our own limits.

Entries (and public nodes that opt in) run a relay hop; a node nobody can dial reserves a slot
at an entry it is connected to and advertises the relayed address
(`<relay addr>/p2p/<relay>/p2p-circuit`) in its signed advert. A peer that wants to reach it and
has no connection dials that address through the relay (MeshHost.dial_relayed): the circuit
carries an ordinary Noise + Yamux connection end to end, so the relay forwards ciphertext only.

What py-libp2p 0.8.1 lacks, and what stands in for it here:
- the swarm never dials /p2p-circuit addresses itself: MeshHost.connect/open_stream dial them
  through this module when no direct address answers;
- get_addrs() never lists relayed addresses: they go into our advert (Reachability.relayed);
- a reservation is never renewed: the relay keeps it by peer id for its TTL (so it survives a
  lost connection, but not a restarted relay or the TTL's end), and a reservation asked for
  before a restarted relay's hop is up is refused: the node re-reserves after every re-join,
  retries a refused one within seconds, and renews it on every full check (node/daemon.py);
- closing one circuit through a relay closed another circuit from the same source through the
  same relay (its bookkeeping is keyed by peer): patches.fix_circuit_bookkeeping;
- the default limits allow 4 reservations per relay, and the per-IP limits in RelayConfig are
  never enforced: RELAY_LIMITS replaces the former, _PerIpReservations enforces the latter;
- the receiving end tags an inbound circuit /p2p/<itself>/p2p-circuit/p2p/<source> (it puts
  its own id where the relay's belongs), and its DCUtR service (relay/circuit_v2/dcutr.py)
  drives upgrades from both ends at once and, for a NAT'd host in a public mesh, announces no
  address at all: transport/dcutr.py lists each gap and its replacement. Upgrades
  start from handle_incoming_connection (wrapped below), on the side the circuit came in on.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from transport.addrs import addr_ip
from transport.dcutr import DirectUpgrade
from transport.patches import apply_relay_workarounds, fix_circuit_bookkeeping

log = logging.getLogger("mesh.relay")

# A circuit carries one requester's generations (or, later, a model file): long enough for
# those, short enough that a relay's capacity comes back.
RELAY_LIMITS = RelayLimits(
    duration=30 * 60,  # seconds per circuit
    data=512 * 1024 * 1024,  # bytes per circuit, both directions together
    max_circuit_conns=16,  # circuits at once per reserving peer
    max_reservations=256,  # py-libp2p's default is 4: a relay for 4 volunteers
    reservation_ttl=3600,
)
MAX_RESERVATIONS_PER_IP = 8  # one household's machines, not a botnet's


class _PerIpReservations:
    """Wraps CircuitV2Protocol._handle_reserve: a new reservation from an IP that already
    holds MAX_RESERVATIONS_PER_IP is refused (RESOURCE_LIMIT_EXCEEDED). py-libp2p declares
    max_reservations_per_ip in RelayConfig but nothing reads it."""

    def __init__(self, protocol: CircuitV2Protocol, per_ip: int):
        self.protocol = protocol
        self.per_ip = per_ip
        self.ip_of: dict[ID, str] = {}
        self._inner = protocol._handle_reserve
        protocol._handle_reserve = self.handle  # type: ignore[method-assign]

    def counts(self) -> Counter:
        live = self.protocol.resource_manager
        for peer in [p for p in self.ip_of if not live.has_reservation(p)]:
            del self.ip_of[peer]
        return Counter(self.ip_of.values())

    async def handle(self, stream, msg) -> None:
        from libp2p.relay.circuit_v2.protocol_buffer import to_proto_status
        from libp2p.relay.circuit_v2.utils import write_delimited_msg  # type: ignore[attr-defined]

        peer = stream.muxed_conn.peer_id
        remote = None
        try:
            remote = stream.get_remote_address()
        except Exception:
            pass
        ip = str(remote[0]) if remote else "?"
        if not self.protocol.resource_manager.has_reservation(peer) and self.counts()[ip] >= self.per_ip:
            log.info("relay reservation refused: per-IP limit", extra={"ip": ip})
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS,
                                                         status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)))
            return
        # Counted before the answer goes out (upstream lingers 0.1 s after sending it): a
        # second peer from the same IP right behind must already see this one.
        self.ip_of[peer] = ip
        await self._inner(stream, msg)
        if not self.protocol.resource_manager.has_reservation(peer):
            self.ip_of.pop(peer, None)


class MeshRelay:
    """Relay client (reserve, dial, accept circuits) and, with hop=True, a relay for others."""

    def __init__(self, host, *, hop: bool, limits: RelayLimits = RELAY_LIMITS, per_ip: int = MAX_RESERVATIONS_PER_IP,
                 upgrade: DirectUpgrade | None = None, direct_upgrade: bool = True):
        self.host = host  # a MeshHost
        raw = host._host
        self.hop = hop
        apply_relay_workarounds()
        self.protocol = CircuitV2Protocol(raw, limits=limits, allow_hop=hop)
        fix_circuit_bookkeeping(self.protocol)
        self.per_ip = _PerIpReservations(self.protocol, per_ip) if hop else None
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
        self.config = RelayConfig(roles=roles, limits=limits)
        self.transport = CircuitV2Transport(raw, self.protocol, self.config)
        self.reservations: dict[str, str] = {}  # relay peer id -> our relayed address there
        # Direct connection upgrade (transport/dcutr.py) of every relayed connection that
        # comes in; the side that dialled through the relay answers. direct_upgrade=False:
        # answer peers' attempts, start none.
        self.upgrade = upgrade if upgrade is not None else DirectUpgrade(host)
        if direct_upgrade:
            self._upgrade_incoming()

    def _upgrade_incoming(self) -> None:
        inner = self.protocol.handle_incoming_connection

        async def handle_incoming_connection(stream, remote_peer_id: bytes) -> None:
            await inner(stream, remote_peer_id)  # returns once the connection is registered
            try:
                self.upgrade.relayed_inbound(ID(remote_peer_id))
            except Exception:
                log.debug("scheduling a direct upgrade failed", exc_info=True)

        self.protocol.handle_incoming_connection = handle_incoming_connection  # type: ignore[method-assign]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol), background_trio_service(self.upgrade):
            await self.protocol.event_started.wait()
            await self.upgrade.event_started.wait()
            task_status.started()
            await trio.sleep_forever()

    async def reserve(self, relay_peer: str, *, timeout: float = 10.0) -> str | None:
        """Reserve a slot at `relay_peer` (connected already); our relayed address, or None."""
        raw = self.host._host
        pid = ID.from_base58(relay_peer)
        with trio.move_on_after(timeout):
            try:
                stream = await raw.new_stream(pid, [HOP_PROTOCOL_ID])
            except Exception as e:
                log.info("relay reservation failed", extra={"relay": relay_peer[-8:], "error": str(e)})
                return None
            try:
                ok = await self.transport._make_reservation(stream, pid)
            finally:
                try:
                    await stream.close()
                except Exception:
                    pass
            if not ok:
                return None
            base = next((a for a in self.host.known_addrs(relay_peer) if addr_ip(a) is not None), None)
            if base is None:
                return None
            addr = f"{base.split('/p2p/')[0]}/p2p/{relay_peer}/p2p-circuit"
            self.reservations[relay_peer] = addr
            log.info("relay slot reserved", extra={"relay": relay_peer[-8:], "addr": addr})
            return addr
        return None

    async def dial(self, peer_id: str, circuit_addr: str) -> None:
        """A connection to `peer_id` through the relay the address names; once open it is a
        connection like any other (streams, pings) until the relay's limits end it."""
        ma = Multiaddr(circuit_addr)
        if not circuit_addr.endswith(f"/p2p/{peer_id}"):
            ma = ma.encapsulate(Multiaddr(f"/p2p/{peer_id}"))
        await self.transport.dial(ma)
