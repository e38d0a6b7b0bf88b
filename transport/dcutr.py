"""Direct connection upgrade through a relay (DCUtR, py-libp2p 0.8.1 `relay.circuit_v2.dcutr`).

A relayed connection costs the relay bandwidth and every round trip two extra hops. When peer
A reaches peer B through a relay, B (the side the relayed connection came in on, as the spec
says) tries once to replace it by a direct one:
1. connection reversal: A advertised a public address (identify over the relayed connection):
   B dials it directly, an ordinary dial;
2. otherwise hole punching: B and A exchange CONNECT messages over the relay (each names its
   external IP, as peers observed it, with a fresh local port it will dial from), B sends SYNC,
   both dial each other at once from those ports; with endpoint-independent, port-preserving
   NATs on both sides the two SYNs meet as a TCP simultaneous open.
At most ATTEMPTS attempts, BACKOFF_S apart (doubling), then the relayed connection stays and
carries the traffic; the outcome is logged once, and a reconnect within RETRY_AFTER_FAILURE_S
tries nothing. New streams prefer the direct connection (the swarm ranks direct above
relayed); the relayed one is closed GRACE_S later, once the streams on it have ended.
A hole punch needs NATs that keep the local port (most home routers do, when it is free): the
port is predicted, not observed. One that maps to another port, the same for every
destination, could be punched with the port a peer observed; not done here.

What py-libp2p 0.8.1's DCUtRProtocol gets wrong for us, and what this subclass does instead:
- its auto-drive loop polls every connection every 2 s and both ends initiate, so two sessions
  run against each other (each end dials in both handshake roles), and its attempt budget is
  reset whenever any connection to the peer closes, so a peer that reconnects is punched anew. Here only the receiving side initiates, once per
  relayed connection, from the relay's STOP handler (MeshRelay wraps handle_incoming_connection);
- it predicts our external address as "observed IP + a listen port" and dials from the listen
  port, which needs SO_REUSEPORT on the listener (transport/patches.py removes it: two hosts
  could share a port) and reads the listen port from host.get_addrs(), which in a public mesh
  lists advertised addresses only (a NAT'd host's are relayed), so nothing was sent. Here each
  attempt reserves a fresh port, advertises "observed IP + that port" and dials from it
  (SO_REUSEADDR suffices for several non-listening sockets on one port);
- the observed IP came from ObservedAddrManager, which drops observations that match no listen
  address (every outbound connection's), so a NAT'd host had none: MeshHost records identify's
  observed IPs itself (observed_ips), and Reachability's dial-back observations count too;
- its relay-address filter reads the relayed connection's address as
  /p2p/<relay>/p2p-circuit/p2p/<peer> and drops <peer>'s own addresses (the inbound side even
  tags the circuit with our own id as the relay), then re-adds everything in the peerstore,
  stale and private addresses included; here the peer's CONNECT addresses are dialled, public
  only in a public mesh, at most MAX_PUNCH_ADDRS;
- its unilateral (reversal) dial reads the peer's addresses from the peerstore at once; started
  as the relayed connection opens (as here), identify over it has not answered yet and there is
  nothing to dial: _reversal waits for identify first (at most IDENTIFY_WAIT_S);
- a successful reversal never closed the relayed connection (only a hole punch did); both do.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import time
from collections.abc import Callable

import trio
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from transport.addrs import addr_ip, is_private, is_relayed

log = logging.getLogger("mesh.dcutr")

ATTEMPTS = 3  # the spec's "retry twice"
BACKOFF_S = 2.0  # before the 2nd attempt; doubled before the 3rd
ROUND_S = 5.0  # one attempt's dials
DIAL_TIMEOUT_S = 5
IDENTIFY_WAIT_S = 5.0  # a bound: identify over the new relayed connection usually answers in ms
GRACE_S = 30.0  # before the relayed connection is closed (once its streams ended)
DRAIN_MAX_S = 600.0  # after the grace, streams still on it are cut
MAX_PUNCH_ADDRS = 4  # what we dial, and at most what we announce
# After a failed upgrade, a new relayed connection from the same peer (a reconnect) starts no
# new one for this long: what failed (a symmetric NAT) rarely changes in minutes.
RETRY_AFTER_FAILURE_S = 600.0

MAX_OUTCOMES = 256  # peers whose last upgrade is remembered (newest)

DIRECT = "direct"
RELAYED = "relayed"

# The port this task's attempt dials from (reserved for the attempt's duration).
_PUNCH_PORT: contextvars.ContextVar[int | None] = contextvars.ContextVar("mesh_punch_port", default=None)


def conn_kind(conn) -> str:
    """DIRECT or RELAYED for one swarm connection. Circuits are tagged RELAYED by py-libp2p on
    both ends (the dialling end through its raw connection, the receiving end once upgraded);
    an address with /p2p-circuit in it says the same while the tag is not set yet."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return RELAYED
    except Exception:
        pass
    try:
        if any(is_relayed(a) for a in conn.get_transport_addresses()):
            return RELAYED
    except Exception:
        pass
    try:
        raw = conn.muxed_conn.secured_conn.conn
        if raw.get_connection_type() == ConnectionType.RELAYED:
            return RELAYED
    except Exception:
        pass
    return DIRECT


def conn_remote(conn) -> str | None:
    """"ip:port" of a direct connection's other end, None for a relayed one."""
    if conn_kind(conn) == RELAYED:
        return None
    try:
        for a in conn.get_transport_addresses():
            ip, port = addr_ip(a), Multiaddr(str(a)).value_for_protocol("tcp")
            if ip is not None and port:
                return f"{ip}:{port}"
    except Exception:
        pass
    try:
        host, port = conn.muxed_conn.secured_conn.conn.get_remote_address()
        return f"{host}:{port}"
    except Exception:
        return None


def _user_streams(conn) -> list:
    """The connection's open streams, less DCUtR's own (the session that upgraded it may
    still be closing)."""
    out = []
    try:
        for st in conn.get_streams():
            if st.get_protocol() != DCUTR_PROTOCOL_ID:
                out.append(st)
    except Exception:
        pass
    return out


def _reserve_port() -> socket.socket:
    # Bound, never listening: it only keeps the port ours while the attempt dials from it
    # (py-libp2p's dial sockets bind the same port with SO_REUSEADDR, as does this one).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    return s


class DirectUpgrade(DCUtRProtocol):
    """One MeshHost's DCUtR: answers peers' attempts, and attempts on relayed connections that
    came in (MeshRelay calls relayed_inbound())."""

    def __init__(self, mesh, *, attempts: int = ATTEMPTS, backoff: float = BACKOFF_S, round_s: float = ROUND_S,
                 grace: float = GRACE_S, identify_wait: float = IDENTIFY_WAIT_S,
                 retry_after_failure: float = RETRY_AFTER_FAILURE_S, drain_max: float = DRAIN_MAX_S,
                 on_outcome: Callable[[str, dict], None] | None = None):
        super().__init__(mesh._host, dial_timeout=DIAL_TIMEOUT_S)
        self.mesh = mesh
        self.attempts = attempts
        self.backoff = backoff
        self.round_s = round_s
        self.grace = grace
        self.identify_wait = identify_wait
        self.on_outcome = on_outcome
        self.retry_after_failure = retry_after_failure
        self.drain_max = drain_max
        self._failed_at: dict[ID, float] = {}
        self.outcomes: dict[str, dict] = {}  # peer id -> the last upgrade's result, for status
        self._running: set[ID] = set()

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Upstream's run() without its auto-drive loop (see the module docstring).
        self.host.set_stream_handler(DCUTR_PROTOCOL_ID, self._handle_dcutr_stream)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.event_started.set()
                task_status.started()
                await self.manager.wait_finished()
        finally:
            self._nursery = None
            try:
                self.host.remove_stream_handler(DCUTR_PROTOCOL_ID)
            except Exception:
                pass

    def relayed_inbound(self, peer: ID) -> None:
        """A relayed connection from `peer` came in: try to replace it (in the background)."""
        if self._nursery is None or peer in self._running or self.mesh.connection_kind(peer.to_base58()) == DIRECT:
            return
        failed = self._failed_at.get(peer)
        if failed is not None and time.monotonic() - failed < self.retry_after_failure:
            return
        self._running.add(peer)
        self._nursery.start_soon(self._upgrade, peer)

    async def _upgrade(self, peer: ID) -> None:
        # Runs in the service's nursery: an unexpected error must end this upgrade only, not
        # the service (and with it the host's relay).
        try:
            await self._upgrade_once(peer)
        except Exception:
            log.exception("direct connection upgrade crashed")
        finally:
            self._running.discard(peer)

    async def _upgrade_once(self, peer: ID) -> None:
        pid = peer.to_base58()
        tried = 0
        how = None
        how = await self._reversal(peer)
        while how is None and tried < self.attempts and self.mesh.connection_kind(pid) == RELAYED:
            if tried:
                await trio.sleep(self.backoff * 2 ** (tried - 1))
            tried += 1
            if await self._attempt(peer):
                how = "hole-punch"
        result = {"result": DIRECT if how else RELAYED, "via": how, "attempts": tried}
        direct = [conn_remote(c) for c in self.mesh.connections(pid) if conn_kind(c) == DIRECT]
        if how:
            result["remote"] = direct[0] if direct else None
            log.info("direct connection upgrade", extra={"peer": pid[-8:], **result})
            if self._nursery is not None:
                self._nursery.start_soon(self._close_relayed_after_grace, peer)
        else:
            # Once per relayed connection: a symmetric NAT (a random port per destination)
            # can't be punched, and trying again would only cost the relay more traffic.
            log.info("direct connection upgrade failed: staying relayed", extra={"peer": pid[-8:], **result})
            self._failed_at[peer] = time.monotonic()
            for p in [p for p, t in self._failed_at.items() if time.monotonic() - t >= self.retry_after_failure]:
                del self._failed_at[p]
        self.outcomes.pop(pid, None)
        self.outcomes[pid] = result
        while len(self.outcomes) > MAX_OUTCOMES:
            del self.outcomes[next(iter(self.outcomes))]
        if self.on_outcome is not None:
            self.on_outcome(pid, result)

    async def _attempt(self, peer: ID) -> bool:
        sock = _reserve_port()
        token = _PUNCH_PORT.set(sock.getsockname()[1])
        known = self._peerstore_addrs(peer)
        try:
            # Upstream's session: CONNECT/CONNECT/SYNC over the relayed connection, then
            # _perform_hole_punch (below) with the peer's addresses. Its own attempt budget
            # is not ours: keep it from refusing.
            self._hole_punch_attempts.pop(peer, None)
            return await self._initiate_hole_punch_locked(peer)
        finally:
            _PUNCH_PORT.reset(token)
            sock.close()
            self._restore_addrs(peer, known)

    async def _handle_dcutr_stream(self, stream) -> None:
        # The answering side dials from a reserved port too, announced in its CONNECT reply.
        try:
            sock = _reserve_port()
        except OSError as e:  # no free port: answer nothing, the peer's attempt times out
            log.debug("no port for a hole punch: %s", e)
            await stream.close()
            return
        _PUNCH_PORT.set(sock.getsockname()[1])  # this handler's own task
        peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
        known = self._peerstore_addrs(peer) if peer is not None else []
        try:
            await super()._handle_dcutr_stream(stream)
        finally:
            sock.close()
            if peer is not None:
                self._restore_addrs(peer, known)

    def _restore_addrs(self, peer: ID, known: list) -> None:
        # Upstream stores the peer's CONNECT addresses in the peerstore for 10 minutes: a
        # NAT mapping made for one attempt, which later dials (the swarm's dial_peer) would
        # try and time out on. Put back what we knew before the session.
        if {str(a) for a in self._peerstore_addrs(peer)} == {str(a) for a in known}:
            return
        try:
            ps = self.host.get_peerstore()
            ps.clear_addrs(peer)
            if known:
                ps.add_addrs(peer, known, 0)
        except Exception:
            log.debug("restoring addresses of %s failed", peer, exc_info=True)

    def _schedule_relay_close(self, peer_id: ID) -> None:
        return None  # _upgrade closes it, after either kind of upgrade, on the initiating side

    async def _close_relayed_after_grace(self, peer: ID) -> None:
        # New streams already take the direct connection. The relayed one goes once the
        # streams still on it have ended (a generation in flight would otherwise fail over),
        # or DRAIN_MAX_S after the grace at the latest (a stream that never ends by itself).
        await trio.sleep(self.grace)
        pid = peer.to_base58()
        deadline = trio.current_time() + self.drain_max
        while True:
            if self.mesh.connection_kind(pid) != DIRECT:
                return  # the direct connection died meanwhile: the relayed one is all there is
            relayed = [c for c in self.mesh.connections(pid) if conn_kind(c) == RELAYED]
            busy = [c for c in relayed if _user_streams(c)]
            if not busy or trio.current_time() >= deadline:
                break
            await trio.sleep(0.5)
        for conn in relayed:
            log.info("relayed connection closed after direct upgrade",
                     extra={"peer": pid[-8:], "streams_cut": len(_user_streams(conn))})
            try:
                await conn.close()
            except Exception:
                log.debug("closing a relayed connection failed", exc_info=True)

    # -- connection reversal ---------------------------------------------------------------

    async def _reversal(self, peer: ID) -> str | None:
        with trio.move_on_after(self.identify_wait):
            while peer not in getattr(self.host, "_identified_peers", {peer: None}):
                await trio.sleep(0.05)
        addrs = self._dialable([str(a) for a in self._peerstore_addrs(peer)])
        if not addrs:
            return None
        with trio.move_on_after(self.dial_timeout):
            async with trio.open_nursery() as nursery:
                for a in addrs:
                    nursery.start_soon(self._dial_peer, peer, Multiaddr(a))
        return "reversal" if self.mesh.connection_kind(peer.to_base58()) == DIRECT else None

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False  # done once, before the attempts, by _reversal

    def _peerstore_addrs(self, peer: ID) -> list:
        try:
            return list(self.host.get_peerstore().addrs(peer))
        except Exception:
            return []

    # -- addresses -------------------------------------------------------------------------

    def _dialable(self, addrs) -> list[str]:
        out: list[str] = []
        for a in addrs:
            a = str(a).split("/p2p/")[0]
            ip = addr_ip(a)
            if not a or is_relayed(a) or ip is None or ip.version != 4 or "/tcp/" not in a or a in out:
                continue
            if ip.is_unspecified or (is_private(a) and not self.mesh.private_mesh):
                continue
            out.append(a)
        return out[:MAX_PUNCH_ADDRS]

    def external_ips(self) -> list[str]:
        ips: list[str] = []
        reach = getattr(self.mesh, "reach", None)
        for a in sorted(getattr(reach, "observed", ()) or ()):
            ip = addr_ip(a)
            if ip is not None:
                ips.append(str(ip))
        ips += self.mesh.observed_ips
        if self.mesh.private_mesh:  # a LAN mesh: our own addresses are what peers dial
            ips += [str(addr_ip(a)) for a in self.mesh.listen_addrs if addr_ip(a) is not None]
        return list(dict.fromkeys(ips))

    async def _get_observed_addrs(self) -> list[bytes]:
        port = _PUNCH_PORT.get()
        if port is None:
            return []
        cands = self._dialable(f"/ip4/{ip}/tcp/{port}" for ip in self.external_ips() if "." in ip)
        return [Multiaddr(a).to_bytes() for a in cands]

    # -- hole punch ------------------------------------------------------------------------

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Multiaddr], as_responder: bool = False) -> bool:
        targets = self._dialable(addrs)
        port = _PUNCH_PORT.get()
        pid = peer_id.to_base58()
        if not targets or port is None:
            log.debug("nothing to punch to %s (addresses %s)", pid, [str(a) for a in addrs])
            return False
        source = ("0.0.0.0", port)
        async with trio.open_nursery() as nursery:
            for a in targets:
                nursery.start_soon(self._dial_peer, peer_id, Multiaddr(a), source, as_responder)
            with trio.move_on_after(self.round_s):
                while self.mesh.connection_kind(pid) != DIRECT:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        return self.mesh.connection_kind(pid) == DIRECT

    async def _verify_direct_connection(self, peer_id: ID) -> bool:
        return self.mesh.connection_kind(peer_id.to_base58()) == DIRECT
