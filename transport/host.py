"""libp2p host for the mesh: one wrapper used by the node daemon and the entry node.

py-libp2p 0.8.1 works, but its defaults are wrong for us in ways that were measured (see
docs/ARCHITECTURE.md, "py-libp2p"). Each workaround below says which sharp edge it removes; the
tests in tests/transport/test_patches.py check each one is in effect. The patches live in
transport/patches.py.

Everything here runs under trio, like py-libp2p itself.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from protocol.errors import ProtocolError
from protocol.identity import Identity
from transport.addrs import addr_ip, is_private, private_mesh
from transport.dcutr import DIRECT, RELAYED, conn_kind
from transport.dht_keys import ADVERT_NAMESPACE, AdvertValidator
from transport.patches import (
    DialPublicOnly,
    ForgetDisconnectedPeers,
    PeerEvents,
    apply_global_workarounds,
    no_auto_connect,
    no_republish,
)

log = logging.getLogger("mesh.p2p")

# ADD_PROVIDER is accepted at most 10 times per 10 s per sending peer, counted across all
# keys; beyond that storers drop it while our provide() still reports success. 8 leaves a
# margin: the storer counts in fixed windows that start at its own first receipt.
PROVIDE_WINDOW_S = 10.0
PROVIDE_MAX_PER_WINDOW = 8
NEGATIVE_CACHE_TTL_S = 5.0  # py-libp2p: 60 s, during which a restarted peer is unreachable
DIAL_TIMEOUT_S = 5.0
OWNER_FETCH_TIMEOUT_S = 2.0  # asking a node for its own advert before the DHT lookup
# How long put_value reuses the peers its lookup found for a key. Readers ask a node for its
# own advert first (get_value), so a closer peer that joined meanwhile delays nothing.
STORERS_REUSE_S = 60.0


class P2PError(Exception):
    """Base of the errors this wrapper raises."""


class PortInUse(P2PError):
    pass


class DialError(P2PError):
    """No stream could be opened to the peer (unreachable, refused, protocol unsupported)."""


class StreamClosed(P2PError):
    """The stream was reset by the peer or broke under us (connection lost, closed)."""


# Everything py-libp2p raises for a stream that died under us: a killed peer shows up as
# StreamReset, MuxedStream*, trio resource errors or OSError depending on timing.
_STREAM_ERRORS = (BaseLibp2pError, MuxedStreamError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True)
class PeerAddrs:
    peer_id: str
    addrs: list[str] = field(default_factory=list)




class _SlidingWindowLimiter:
    """At most `max_events` in any `window` seconds; acquire() waits for a free slot."""

    def __init__(self, max_events: int, window: float, clock: Callable[[], float] = time.monotonic):
        self.max_events = max_events
        self.window = window
        self._clock = clock
        self._events: deque[float] = deque()
        self._lock = trio.Lock()

    def delay(self) -> float:
        now = self._clock()
        while self._events and now - self._events[0] >= self.window:
            self._events.popleft()
        if len(self._events) < self.max_events:
            return 0.0
        return self._events[0] + self.window - now

    async def acquire(self) -> None:
        async with self._lock:
            while (d := self.delay()) > 0:
                await trio.sleep(d)
            self._events.append(self._clock())


class MeshStream:
    """A libp2p stream with the error surface our framing expects: read() returns b"" at a
    clean end of stream and raises StreamClosed when the stream was reset or broke."""

    def __init__(self, raw, remote_peer_id: str, protocol: str):
        self._raw = raw
        self.remote_peer_id = remote_peer_id
        self.protocol = protocol

    def _reset_by_peer(self) -> bool:
        # Yamux reports a reset stream as a plain end of stream once its buffer is gone;
        # the flag tells an abort apart from a clean close.
        return bool(getattr(getattr(self._raw, "muxed_stream", None), "reset_received", False))

    async def read(self, n: int = 65536) -> bytes:
        try:
            data = await self._raw.read(n)
        except StreamEOF:
            data = b""
        except _STREAM_ERRORS as e:
            raise StreamClosed(f"read failed: {type(e).__name__}") from None
        if not data and self._reset_by_peer():
            raise StreamClosed("stream reset by peer")
        return data or b""

    async def write(self, data: bytes) -> None:
        try:
            await self._raw.write(data)
        except _STREAM_ERRORS as e:
            raise StreamClosed(f"write failed: {type(e).__name__}") from None

    async def close_write(self) -> None:
        """Half-close: tell the peer we are done sending; we may still read its reply."""
        try:
            await self._raw.close_write()
        except _STREAM_ERRORS:
            pass

    async def close(self) -> None:
        try:
            await self._raw.close()
        except _STREAM_ERRORS:
            pass

    async def reset(self) -> None:
        try:
            await self._raw.reset()
        except _STREAM_ERRORS:
            pass


StreamHandler = Callable[[MeshStream, str], Awaitable[None]]


def _protocol_refused(e: BaseException | None) -> bool:
    """The peer answered but doesn't speak the protocol (as opposed to a broken connection)."""
    while e is not None:
        if "protocols not supported" in str(e):
            return True
        e = e.__cause__
    return False


def _to_multiaddrs(peer_id: str, addrs: Iterable[str]) -> list[Multiaddr]:
    """Transport addresses without the /p2p part; addresses naming another peer are dropped."""
    out: list[Multiaddr] = []
    for a in addrs:
        try:
            ma = Multiaddr(a)
        except Exception:
            continue
        try:
            p2p = ma.value_for_protocol("p2p")
        except Exception:
            p2p = None
        if p2p:
            if p2p != peer_id:
                continue
            ma = ma.decapsulate(Multiaddr(f"/p2p/{p2p}"))
        if str(ma) and ma not in out:
            out.append(ma)
    return out


def _split_p2p_addr(addr: str) -> tuple[str, list[str]]:
    ma = Multiaddr(addr)
    peer_id = ma.value_for_protocol("p2p")
    if not peer_id:
        raise ValueError(f"bootstrap address {addr!r} has no /p2p/<peer id>")
    return peer_id, [addr]


class MeshHost:
    """What node and entry use; built by open_mesh_host()."""

    def __init__(self, host, dht: KadDHT, identity: Identity, *, private: bool = True):
        self._host = host
        self._dht = dht
        self._swarm = host.get_network()
        self._id = host.get_id()
        self.identity = identity
        # A mesh on loopback/LAN only (transport/addrs.py): private addresses are dialled and
        # advertised. In a public mesh they are neither.
        self.private_mesh = private
        # Set by whoever checks reachability (transport/reachability.py): in a public mesh,
        # only the addresses it confirmed are advertised.
        self.reach = None
        # transport.relay.MeshRelay, when this host runs one: /p2p-circuit addresses are
        # dialled through it (py-libp2p's swarm never dials them itself).
        self.relay = None
        self._connect_listeners: list[Callable[[str], None]] = []
        self._provide_limiter = _SlidingWindowLimiter(PROVIDE_MAX_PER_WINDOW, PROVIDE_WINDOW_S)
        self._last_provided: dict[bytes, float] = {}
        self._value_listeners: list[Callable[[str, bytes], None]] = []
        # put_value's closest peers per key, reused for a while: a node re-publishes its
        # advert every few seconds and a fresh lookup each time was half its idle DHT traffic.
        self._storers: dict[bytes, tuple[float, list[ID]]] = {}
        # Our IP as peers' identify answers over direct connections saw it, newest first:
        # what a hole punch tells the other side to dial (transport/dcutr.py).
        self.observed_ips: list[str] = []

    def on_value_stored(self, listener: Callable[[str, bytes], None]) -> None:
        """Call `listener(key, value)` whenever another peer stores a value at us (we are
        one of the DHT servers closest to its key) and our validator accepted it. Lets an
        entry see a node's advert the moment it is published instead of at its next lookup.
        Runs inside the DHT's request handler: keep it quick; its exceptions are logged."""
        self._value_listeners.append(listener)

    def _value_stored(self, key: bytes, value: bytes) -> None:
        try:
            k = key.decode("utf-8")
        except UnicodeDecodeError:
            return
        for fn in list(self._value_listeners):
            try:
                fn(k, value)
            except Exception:
                log.exception("value listener failed")

    # -- identity and addresses -----------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._id.to_base58()

    @property
    def listen_addrs(self) -> list[str]:
        """Where we listen (or what announce_addrs said), dialable or not; none once the
        listener closed. (py-libp2p's identify handler polls get_addrs for a while when a
        public-mesh host advertises nothing; if the host closes meanwhile, the closed
        listener's getsockname raised EBADF into the host's teardown.)"""
        try:
            return [str(a) for a in self._upstream_get_addrs()]
        except OSError:
            return []

    def _upstream_get_addrs(self):
        return getattr(self._host, "_mesh_all_addrs", self._host.get_addrs)()

    @property
    def advertised_addrs(self) -> list[str]:
        """What we tell others (adverts, identify, DHT peer records): in a public mesh, never
        a wildcard, loopback or private address (transport/addrs.py)."""
        addrs = self.listen_addrs
        if self.private_mesh:
            return addrs
        if self.reach is not None:
            return list(self.reach.advertised())
        return [a for a in addrs if not is_private(a)]

    async def set_dht_server(self, server: bool) -> None:
        """A host nobody can dial must not be a DHT server: peers would be handed its
        addresses in every lookup answer and time out on it (a DHT client stores nothing for
        others and is left out of their routing tables)."""
        mode = DHTMode.SERVER if server else DHTMode.CLIENT
        if self._dht.mode == mode:
            return
        # Not KadDHT.switch_mode(): switching to client it also empties the routing table
        # (cleanup_routing_table), and a client needs its table to find the peers it stores
        # at. The mode is only whether we answer the KAD protocol.
        from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL_ID

        if server:
            self._host.set_stream_handler(KAD_PROTOCOL_ID, self._dht.handle_stream)
        else:
            self._host.remove_stream_handler(KAD_PROTOCOL_ID)
        self._dht.mode = mode
        log.info("DHT mode", extra={"mode": mode.name.lower()})

    @property
    def dht_server(self) -> bool:
        return self._dht.mode == DHTMode.SERVER

    def on_peer_connected(self, listener: Callable[[str], None]) -> None:
        """Call `listener(peer_id)` whenever a connection to a peer opens (either side
        dialled). Lets an entry use a NAT'd node's connection the moment it arrives."""
        self._connect_listeners.append(listener)

    def _peer_connected(self, peer_id: str) -> None:
        try:
            # A dial that failed moments ago (a NAT'd peer: nothing to dial) must not keep
            # the peer in the negative cache now that it reached us.
            self._swarm.unblock_peer(ID.from_base58(peer_id))
        except Exception:
            pass
        for fn in list(self._connect_listeners):
            try:
                fn(peer_id)
            except Exception:
                log.exception("connect listener failed")

    def connections(self, peer_id: str) -> list:
        """The open swarm connections to a peer (py-libp2p SwarmConn objects)."""
        try:
            conns = self._swarm.get_connections(ID.from_base58(peer_id))
        except Exception:
            return []
        return [c for c in conns if not getattr(c, "is_closed", False)]

    def connection_kind(self, peer_id: str) -> str | None:
        """"direct" when any open connection to the peer is, "relayed" when all go through a
        relay (transport/dcutr.py tries to upgrade those), None when not connected."""
        conns = self.connections(peer_id)
        if not conns:
            return None
        return DIRECT if any(conn_kind(c) == DIRECT for c in conns) else RELAYED

    def connection_summary(self) -> dict:
        """For status: connected peers by kind, each relayed one named (shortened)."""
        out: dict = {DIRECT: 0, RELAYED: 0, "relayed_peers": []}
        for p in self.connected_peers():
            kind = self.connection_kind(p)
            if kind is not None:
                out[kind] += 1
                if kind == RELAYED:
                    out["relayed_peers"].append(p[-8:])
        return out

    def is_connected(self, peer_id: str) -> bool:
        try:
            conns = self._swarm.get_connections(ID.from_base58(peer_id))
        except Exception:
            return False
        return any(not getattr(c, "is_closed", False) for c in conns)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to the peer (one that stopped answering is dead: a router
        that forgot its NAT mapping drops its packets without telling either side)."""
        with trio.move_on_after(2.0):
            try:
                await self._swarm.close_peer(ID.from_base58(peer_id))
            except Exception:
                log.debug("closing connections to %s failed", peer_id, exc_info=True)

    async def ping(self, peer_id: str, *, timeout: float = 5.0) -> float:
        """One libp2p ping (/ipfs/ping/1.0.0) over the existing connection (a new one is
        dialled if there is none); the round trip in seconds. Raises DialError."""
        from libp2p.host.ping import ID as PING_ID
        from libp2p.host.ping import perform_ping_roundtrip

        t0 = time.monotonic()
        with trio.move_on_after(timeout):
            try:
                raw = await self._host.new_stream(ID.from_base58(peer_id), [PING_ID])
            except _STREAM_ERRORS as e:
                raise DialError(f"ping {peer_id}: {e}") from None
            try:
                await perform_ping_roundtrip(raw)
                return time.monotonic() - t0
            except (*_STREAM_ERRORS, ValueError, trio.TooSlowError) as e:
                raise DialError(f"ping {peer_id}: {type(e).__name__}") from None
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await raw.reset()
                    except Exception:
                        pass
        raise DialError(f"ping {peer_id}: no answer in {timeout}s")

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def learn_addrs(self, peer_id: str, addrs: Iterable[str]) -> None:
        """Record fresh addresses for a peer, replacing what we knew.

        py-libp2p dials at most one TCP address per peer (the first it knows), so a peer
        that restarted on a new port would keep being dialled at its old one: the newest
        knowledge replaces the old set. The peer also leaves the negative cache, so a
        restarted peer is reachable at once rather than after the cache expires."""
        mas = _to_multiaddrs(peer_id, addrs)
        if not mas:
            return
        pid = ID.from_base58(peer_id)
        if pid == self._id:
            return
        ps = self._host.get_peerstore()
        try:
            known = {str(a) for a in ps.addrs(pid)}
        except PeerStoreError:
            known = set()
        if known != {str(m) for m in mas}:
            ps.clear_addrs(pid)
            # TTL 0 = no expiry: host.connect() would store them with 120 s, after which
            # the peer silently loses all addresses.
            ps.add_addrs(pid, mas, 0)
        self._swarm.unblock_peer(pid)

    def known_addrs(self, peer_id: str) -> list[str]:
        try:
            return [str(a) for a in self._host.get_peerstore().addrs(ID.from_base58(peer_id))]
        except PeerStoreError:
            return []

    # -- streams --------------------------------------------------------------------------

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        async def _handle(net_stream) -> None:
            remote = net_stream.muxed_conn.peer_id.to_base58()
            stream = MeshStream(net_stream, remote, protocol_id)
            try:
                await handler(stream, remote)
            except StreamClosed:
                await stream.reset()
                return
            except ProtocolError as e:
                # A peer that breaks the protocol is the peer's problem, not a bug here.
                log.warning("peer %s broke %s: %s", remote, protocol_id, e)
                await stream.reset()
                return
            except Exception:
                # A handler bug must not take the swarm's task down with it.
                log.exception("stream handler for %s failed (peer %s)", protocol_id, remote)
                await stream.reset()
                return
            await stream.close()

        self._host.set_stream_handler(TProtocol(protocol_id), _handle)

    def remove_stream_handler(self, protocol_id: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol_id))

    async def _via_relay(self, peer_id: str, addrs: Iterable[str] | None, timeout: float) -> bool:
        """No connection yet and only relayed addresses (or direct ones that failed): a
        circuit through the first relay that takes us there. True once connected."""
        relayed = [a for a in (addrs or []) if "/p2p-circuit" in a]
        if self.relay is None or not relayed or self.is_connected(peer_id):
            return False
        for a in relayed:
            with trio.move_on_after(timeout):
                try:
                    await self.relay.dial(peer_id, a)
                    return True
                except Exception as e:
                    log.debug("relayed dial to %s via %s failed: %s", peer_id, a, e)
        return False

    async def connect(self, peer_id: str, addrs: Iterable[str] | None = None, *, timeout: float = DIAL_TIMEOUT_S) -> None:
        addrs = list(addrs or [])
        direct = [a for a in addrs if "/p2p-circuit" not in a]
        if direct:
            self.learn_addrs(peer_id, direct)
        elif addrs and not self.is_connected(peer_id):
            if await self._via_relay(peer_id, addrs, timeout):
                return
            raise DialError(f"cannot connect to {peer_id} through a relay")
        pid = ID.from_base58(peer_id)
        with trio.move_on_after(timeout) as scope:
            try:
                await self._swarm.dial_peer(pid)
            except _STREAM_ERRORS as e:
                if await self._via_relay(peer_id, addrs, timeout):
                    return
                raise DialError(f"cannot connect to {peer_id}: {e}") from None
        if scope.cancelled_caught:
            if await self._via_relay(peer_id, addrs, timeout):
                return
            raise DialError(f"connecting to {peer_id} timed out after {timeout}s")

    async def open_stream(
        self, peer_id: str, protocol_id: str, addrs: Iterable[str] | None = None, *, timeout: float = DIAL_TIMEOUT_S
    ) -> MeshStream:
        addrs = list(addrs or [])
        if any("/p2p-circuit" in a for a in addrs) and not self.is_connected(peer_id):
            await self.connect(peer_id, addrs, timeout=timeout)  # direct first, then the relay
        elif addrs:
            self.learn_addrs(peer_id, addrs)
        pid = ID.from_base58(peer_id)
        with trio.move_on_after(timeout):
            for attempt in (0, 1):
                reused = bool(self._swarm.get_connections(pid))
                try:
                    raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
                    return MeshStream(raw, peer_id, protocol_id)
                except _STREAM_ERRORS as e:
                    if attempt == 0 and reused and not _protocol_refused(e):
                        # The connection we reused is dead (the peer was killed or
                        # restarted) and py-libp2p has not noticed yet: drop it, dial anew.
                        await self._swarm.close_peer(pid)
                        continue
                    raise DialError(f"cannot open {protocol_id} to {peer_id}: {e}") from None
        raise DialError(f"opening {protocol_id} to {peer_id} timed out after {timeout}s")

    # -- DHT ------------------------------------------------------------------------------
    # py-libp2p's find_providers()/get_value() answer from the local store first, and every
    # lookup caches what it found there for 24-48 h, so they never notice a new or departed
    # peer. These versions always ask the network; the local store only contributes what
    # other peers stored at us (we are a DHT server too), never a cached lookup.

    async def _closest_peers(self, key: bytes, deadline: float) -> list[ID]:
        peers: list[ID] = []
        with trio.move_on_at(deadline):
            try:
                peers = await self._dht.peer_routing.find_closest_peers_network(key)
            except Exception:
                log.debug("closest-peer lookup failed", exc_info=True)
        if not peers:  # lookup timed out or failed: fall back to who we know directly
            peers = self._dht.routing_table.find_local_closest_peers(key, 20)
            peers += [p for p in self._host.get_connected_peers() if p not in peers]
        return [p for p in peers if p != self._id]

    @staticmethod
    def _value_lookup_key(kb: bytes) -> bytes:
        # Servers refuse a FIND_NODE key that is neither a multihash nor <= 50 bytes, and
        # "/mesh-advert/<peer id>" is 65: the iterative lookup would stop at the peers we
        # already know. Look up the key's sha256 multihash instead; the record itself is
        # still stored and fetched under its real key, and every mesh node does the same.
        return b"\x12\x20" + hashlib.sha256(kb).digest()

    async def provide(self, key: str, *, min_interval: float = 0.0) -> bool:
        """Announce that we provide `key`. Skipped if we did within `min_interval` seconds;
        waits when announcing faster than storers accept (then they would silently drop it)."""
        kb = _encode_key(key)
        last = self._last_provided.get(kb)
        if last is not None and time.monotonic() - last < min_interval:
            return True
        await self._provide_limiter.acquire()
        ok = await self._dht.provider_store.provide(kb)
        if ok:
            self._last_provided[kb] = time.monotonic()
        return ok

    async def find_providers(self, key: str, count: int = 20, timeout: float = 10.0) -> list[PeerAddrs]:
        kb = _encode_key(key)
        deadline = trio.current_time() + timeout
        found: dict[str, list[str]] = {}

        def add(infos) -> None:
            for info in infos:
                pid = info.peer_id.to_base58()
                addrs = found.setdefault(pid, [])
                for a in info.addrs:
                    if str(a) not in addrs:
                        addrs.append(str(a))

        add(self._dht.provider_store.get_providers(kb))
        lookup_deadline = trio.current_time() + timeout / 2
        to_query = await self._closest_peers(kb, lookup_deadline)
        queried: set[ID] = set()
        limiter = trio.CapacityLimiter(10)

        async def ask(peer: ID) -> None:
            async with limiter:
                try:
                    providers, closer = await self._dht.provider_store._get_providers_from_peer_with_closers(peer, kb)
                except Exception:  # one bad peer must not sink the whole lookup
                    log.debug("GET_PROVIDERS to %s failed", peer, exc_info=True)
                    return
            add(providers)
            # One more hop: peers closer to the key than the ones we knew.
            for c in closer:
                if c not in queried and c != self._id and len(queried) < 60:
                    queried.add(c)
                    nursery.start_soon(ask, c)

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for p in to_query:
                    queried.add(p)
                    nursery.start_soon(ask, p)
        # So that a provider can be asked directly (its advert, get_value) without a lookup
        # of its addresses; never replaces addresses we already have for it (a provider
        # record may name where a restarted node used to listen).
        for pid, addrs in found.items():
            if addrs and pid != self.peer_id and not self.known_addrs(pid):
                self.learn_addrs(pid, addrs)
        return [PeerAddrs(pid, addrs) for pid, addrs in list(found.items())[:count]]

    def store_local(self, key: str, value: bytes) -> None:
        """Store at this host only: peers asking us (the owner first) get it, no traffic."""
        self._dht.validator.validate(key, value)
        self._dht.value_store.put(key.encode(), value)

    async def put_value(self, key: str, value: bytes, timeout: float = 10.0) -> int:
        """Store at the closest peers; returns how many remote peers accepted it."""
        self._dht.validator.validate(key, value)  # refuse here what every storer would refuse
        kb = key.encode()
        self._dht.value_store.put(kb, value)  # we are a storer too
        deadline = trio.current_time() + timeout
        lookup_key = self._value_lookup_key(kb)
        cached = self._storers.get(lookup_key)
        stored = 0
        limiter = trio.CapacityLimiter(10)
        started: set[ID] = set()

        async def store(peer: ID) -> None:
            nonlocal stored
            async with limiter:
                try:
                    if await self._dht.value_store._store_at_peer(peer, kb, value):
                        stored += 1
                except Exception:
                    log.debug("PUT_VALUE to %s failed", peer, exc_info=True)

        def store_at(nursery: trio.Nursery, peers: Iterable[ID]) -> None:
            for p in peers:
                if p not in started and p != self._id:
                    started.add(p)
                    nursery.start_soon(store, p)

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                if cached is not None and time.monotonic() - cached[0] < STORERS_REUSE_S:
                    store_at(nursery, cached[1])
                else:
                    # The peers we know are stored at right away, while the lookup runs: one
                    # black-holed peer in the lookup (a frozen or unplugged host) used to hold
                    # every store back until the caller's deadline, so storers kept an advert
                    # that expired meanwhile and the node dropped out of discovery.
                    store_at(nursery, self._dht.routing_table.find_local_closest_peers(lookup_key, 20))
                    store_at(nursery, self._host.get_connected_peers())
                    peers = await self._closest_peers(lookup_key, trio.current_time() + timeout / 2)
                    self._storers[lookup_key] = (time.monotonic(), peers)
                    store_at(nursery, peers)
        if stored < (len(started) + 1) // 2:
            self._storers.pop(lookup_key, None)  # many are gone: look them up afresh next time
        return stored

    async def get_value(self, key: str, timeout: float = 10.0) -> bytes | None:
        """The best valid value held by the closest peers (validator's choice), or None.

        A node's advert is asked of the node itself first: it holds its own latest signed
        copy, one request instead of a lookup plus a request to each of the ~20 closest
        peers, which made discovering a mesh of 30 nodes outlast every round's deadline.
        The DHT is the fallback (an owner that is gone or unreachable)."""
        kb = key.encode()
        owner = _advert_owner(key)
        if owner is not None and owner != self.peer_id:
            value = await self._get_from_owner(owner, key, kb, min(timeout / 2, OWNER_FETCH_TIMEOUT_S))
            if value is not None:
                return value
        validator = self._dht.validator
        values: list[bytes] = []
        local = self._dht.value_store.get(kb)
        if local is not None:
            values.append(local.value)
        deadline = trio.current_time() + timeout
        peers = await self._closest_peers(self._value_lookup_key(kb), trio.current_time() + timeout / 2)
        limiter = trio.CapacityLimiter(10)

        async def fetch(peer: ID) -> None:
            async with limiter:
                try:
                    rec = await self._dht.value_store._get_from_peer(peer, kb, return_record=True)
                except Exception:
                    log.debug("GET_VALUE to %s failed", peer, exc_info=True)
                    return
            if rec is not None and getattr(rec, "value", None):
                values.append(rec.value)

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for p in peers:
                    nursery.start_soon(fetch, p)
        valid = []
        for v in dict.fromkeys(values):  # each storer holds a copy: check each value once
            try:
                validator.validate(key, v)
            except Exception:
                continue
            valid.append(v)
        if not valid:
            return None
        return valid[validator.select(key, valid)]

    async def _get_from_owner(self, owner: str, key: str, kb: bytes, timeout: float) -> bytes | None:
        try:
            pid = ID.from_base58(owner)
        except Exception:
            return None
        with trio.move_on_after(timeout):
            try:
                rec = await self._dht.value_store._get_from_peer(pid, kb, return_record=True)
            except Exception:
                log.debug("GET_VALUE to the owner %s failed", owner, exc_info=True)
                return None
            value = getattr(rec, "value", None) if rec is not None else None
            if value:
                try:
                    self._dht.validator.validate(key, value)
                except Exception:
                    return None
                return value
        return None

    async def bootstrap(self, addrs: Iterable[str], *, timeout: float = DIAL_TIMEOUT_S, lookup: bool = True) -> int:
        """Connect to bootstrap peers and join the DHT; returns how many answered.
        lookup=False skips the join lookup (the caller runs join_lookup() when it suits it)."""
        joined = 0
        for addr in addrs:
            try:
                peer_id, full = _split_p2p_addr(addr)
                if peer_id == self.peer_id:
                    continue
                await self.connect(peer_id, full, timeout=timeout)
                await self._dht.add_peer(ID.from_base58(peer_id), skip_server_mode_check=True)
                joined += 1
            except Exception as e:  # a bad or dead bootstrap entry must not stop the others
                log.warning("bootstrap peer %s unreachable: %s", addr, e)
        if joined and lookup:
            await self.join_lookup(timeout=timeout)
        return joined

    async def join_lookup(self, *, timeout: float = DIAL_TIMEOUT_S) -> None:
        """Kademlia join: a lookup of our own id introduces us to the peers near us and fills
        our routing table."""
        with trio.move_on_after(timeout):
            try:
                await self._dht.peer_routing.find_closest_peers_network(self._id.to_bytes())
            except Exception:
                log.debug("join lookup failed", exc_info=True)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                # py-libp2p closes connections one after another, each with a 0.1-0.2 s
                # pause inside: closing them side by side keeps shutdown short.
                async with trio.open_nursery() as nursery:
                    for conns in list(self._swarm.connections.values()):
                        for conn in list(conns):
                            nursery.start_soon(self._close_quietly, conn)
                await self._host.close()

    @staticmethod
    async def _close_quietly(conn) -> None:
        try:
            await conn.close()
        except Exception:
            log.debug("closing a connection failed", exc_info=True)


def _advert_owner(key: str) -> str | None:
    """The peer an advert key names ("/mesh-advert/<peer id>"), else None."""
    prefix = f"/{ADVERT_NAMESPACE}/"
    if key.startswith(prefix):
        peer = key[len(prefix):]
        if peer and "/" not in peer:
            return peer
    return None


def _tap_stored_values(dht: KadDHT, mesh: MeshHost) -> None:
    # The DHT server stores a validated PUT_VALUE from another peer with put_record().
    store = dht.value_store
    original = store.put_record

    def put_record(key: bytes, record) -> None:
        original(key, record)
        if mesh._value_listeners and getattr(record, "value", None):
            mesh._value_stored(key, record.value)

    store.put_record = put_record


def _tap_observed_addrs(host, mesh: MeshHost) -> None:
    # py-libp2p's ObservedAddrManager keeps an observation only when it matches a listen
    # address, which no outbound connection's does (they leave from ephemeral ports): a NAT'd
    # host never learnt its external IP. The IP alone is what we need; the port is our own.
    manager = getattr(host, "_observed_addr_manager", None)
    if manager is None:
        return
    original = manager.record_observation

    def record_observation(conn, observed, local_addrs) -> None:
        ip = addr_ip(observed)
        if ip is not None and conn_kind(conn) == DIRECT:  # upstream skips relayed ones too
            s = str(ip)
            if s in mesh.observed_ips:
                mesh.observed_ips.remove(s)
            mesh.observed_ips.insert(0, s)
            del mesh.observed_ips[8:]
        original(conn, observed, local_addrs)

    manager.record_observation = record_observation


def _listen_multiaddr(listen_host: str, listen_port: int) -> Multiaddr:
    family = "ip6" if ":" in listen_host else "ip4"
    return Multiaddr(f"/{family}/{listen_host}/tcp/{listen_port}")


def _port_busy(listen_host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((listen_host, port))
        except OSError:
            return True
    return False


@asynccontextmanager
async def open_mesh_host(
    identity: Identity,
    listen_host: str = "127.0.0.1",
    listen_port: int = 0,
    bootstrap: Iterable[str] = (),
    *,
    dht_server: bool = True,
    announce_addrs: Iterable[str] | None = None,
    private: bool | None = None,
) -> AsyncIterator[MeshHost]:
    """Start a libp2p host + Kademlia DHT; closes listener and connections on exit.

    listen_port=0 picks a free port; a fixed port already in use raises PortInUse.
    bootstrap: full multiaddrs (with /p2p/<id>) of peers to join through; unreachable ones
    are logged and skipped. dht_server=False (a DHT client: stores nothing for others) suits
    an entry node. announce_addrs replaces the advertised addresses (listening on 0.0.0.0,
    or behind a port forward), since a wildcard listen address is not dialable.
    private: is this a loopback/LAN-only mesh (transport/addrs.py)? None decides from the
    listen host and the bootstrap addresses; a public mesh neither dials nor advertises
    private addresses.
    Exceptions raised by the caller's block come out unwrapped, after the host has closed.
    """
    apply_global_workarounds()
    bootstrap = list(bootstrap)
    if private is None:
        private = private_mesh(listen_host, bootstrap)
    key_pair = identity.libp2p_keypair()
    maddr = _listen_multiaddr(listen_host, listen_port)
    # Noise only: a default new_host() also offers plaintext, TLS and secio, and accepts a
    # peer that picks plaintext. Noise's static key is a separate X25519 key; the identity
    # key signs it during the handshake, so a fresh one per process is fine.
    security = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=_new_x25519_key_pair().private_key)}
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=[maddr],
        connection_config=ConnectionConfig(dial_timeout=DIAL_TIMEOUT_S),
        announce_addrs=[Multiaddr(a) for a in announce_addrs] if announce_addrs else None,
    )
    swarm = host.get_network()
    swarm.auto_connector.maybe_connect = no_auto_connect
    swarm._negative_peer_cache._ttl = NEGATIVE_CACHE_TTL_S
    # Dial retries with backoff (3 by default) only delay noticing that a peer is gone.
    swarm.retry_config = RetryConfig(max_retries=1, initial_delay=0.05, max_delay=0.2)
    dht = KadDHT(host, DHTMode.SERVER if dht_server else DHTMode.CLIENT, enable_random_walk=False)
    dht.register_validator(ADVERT_NAMESPACE, AdvertValidator())
    dht.value_store._republish_records = no_republish
    dht.provider_store._republish_provider_records = no_republish
    swarm.register_notifee(ForgetDisconnectedPeers(dht))
    mesh = MeshHost(host, dht, identity, private=private)
    swarm.register_notifee(PeerEvents(on_connected=lambda pid: mesh._peer_connected(pid.to_base58())))
    if not private:
        swarm.connection_gate = DialPublicOnly(swarm.connection_gate)
        # identify and the DHT's signed peer records send host.get_addrs(): only the
        # dialable ones (the upstream method stays reachable for listen_addrs).
        host._mesh_all_addrs = host.get_addrs
        host.get_addrs = lambda: [Multiaddr(a) for a in mesh.advertised_addrs]
    _tap_stored_values(dht, mesh)
    _tap_observed_addrs(host, mesh)
    # Raised only after the host's nurseries have closed: raised inside them, trio would
    # hand the caller an ExceptionGroup nested three deep instead of the error itself.
    deferred: Exception | None = None
    try:
        async with host.run(listen_addrs=[maddr]):
            try:
                # A failed bind is only logged by py-libp2p, leaving a host that listens
                # nowhere.
                if not host.get_transport_addrs():
                    if listen_port and _port_busy(listen_host, listen_port):
                        deferred = PortInUse(f"cannot listen on {listen_host}:{listen_port}: address already in use")
                    else:
                        deferred = P2PError(f"cannot listen on {listen_host}:{listen_port}")
                else:
                    async with background_trio_service(dht):
                        if bootstrap:
                            await mesh.bootstrap(bootstrap)
                        try:
                            yield mesh
                        except Exception as e:  # the caller's error; Cancelled etc. pass through
                            deferred = e
            finally:
                # Close while host.run() is still up. Leaving host.run() leaves the
                # listening socket open, and its own teardown closes connections under
                # cancellation, which marks them closed but leaves the TCP sockets
                # established: peers would never learn that we left.
                await mesh.close()
    finally:
        await mesh.close()  # idempotent; covers a failure while starting
    if deferred is not None:
        raise deferred
