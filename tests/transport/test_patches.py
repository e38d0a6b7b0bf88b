"""One test per py-libp2p sharp edge that transport/patches.py and transport/host.py work around (docs/ARCHITECTURE.md, "py-libp2p").

All hosts run in this process on 127.0.0.1; every wait is bounded. Where it helps show the
test exercises the real edge, a control runs the unpatched py-libp2p path next to ours.
"""

from __future__ import annotations

import logging
import socket
import time

import libp2p.network.swarm as swarm_mod
import libp2p.transport.tcp.tcp as tcp_mod
import pytest
import trio
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.abc import INotifee
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader
from multiaddr import Multiaddr

from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from protocol.records import CapacityAdvert
from tests.support.echo import ECHO, echo
from transport import host as p2p
from transport import patches
from transport.dht_keys import advert_key, model_key
from transport.host import DialError, PortInUse, StreamClosed, open_mesh_host


def port_of(addr: str) -> int:
    return int(Multiaddr(addr).value_for_protocol("tcp"))


async def round_trip(host, peer_id: str, addrs=None) -> dict:
    stream = await host.open_stream(peer_id, ECHO, addrs)
    try:
        await FrameWriter(stream).write_frame({"x": 1})
        return await FrameReader(stream).read_frame()
    finally:
        await stream.close()


def make_advert(identity: Identity, host, seq: int, ttl: float = 30.0) -> bytes:
    now = time.time()
    return CapacityAdvert(
        node=identity.peer_id, model_sha256="ab" * 32, model_name="m", quantization="Q4_0",
        context_size=2048, prefill_tps=1.0, decode_tps=1.0, total_slots=1, free_slots=1,
        seq=seq, issued_at=now, expires_at=now + ttl, addrs=host.listen_addrs,
    ).sign(identity)


async def poll(predicate, timeout: float, interval: float = 0.05):
    with trio.fail_after(timeout):
        while not (result := await predicate()):
            await trio.sleep(interval)
    return result


# -- security -----------------------------------------------------------------------------

async def test_noise_only_plaintext_peer_refused():
    async with open_mesh_host(Identity.generate()) as server:
        assert list(server._swarm.upgrader.security_multistream.transports) == ["/noise"]
        assert list(server._swarm.upgrader.muxer_multistream.transports) == ["/yamux/1.0.0"]
        target = PeerInfo(ID.from_base58(server.peer_id), [Multiaddr(server.listen_addrs[0])])

        kp = generate_new_ed25519_identity()
        plain = new_host(key_pair=kp, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)})
        async with plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(20):
                with pytest.raises(Exception):
                    await plain.connect(target)
            assert ID.from_base58(server.peer_id) not in plain.get_connected_peers()
        await plain.close()

        # Control: a stock py-libp2p host (which offers Noise among others) gets in.
        stock = new_host()
        async with stock.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(20):
                await stock.connect(target)
            assert ID.from_base58(server.peer_id) in stock.get_connected_peers()
        await stock.close()


# -- listener lifetime and ports ----------------------------------------------------------

async def test_listener_closed_after_exit():
    async with open_mesh_host(Identity.generate()) as host:
        port = port_of(host.listen_addrs[0])
        with trio.fail_after(5):
            s = await trio.open_tcp_stream("127.0.0.1", port)  # listening now
            await s.aclose()
    with trio.fail_after(5):
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    with socket.socket() as probe:  # and the port can be bound again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


async def test_fixed_port_already_bound_is_refused():
    async with open_mesh_host(Identity.generate()) as first:
        assert tcp_mod._set_reuse_flags is patches._set_reuseaddr_only  # no SO_REUSEPORT
        port = port_of(first.listen_addrs[0])
        with trio.fail_after(10):
            with pytest.raises(PortInUse):
                async with open_mesh_host(Identity.generate(), listen_port=port):
                    pass
        # The first host is unaffected and still serves.
        first.set_stream_handler(ECHO, echo)
        async with open_mesh_host(Identity.generate()) as client:
            with trio.fail_after(10):
                assert await round_trip(client, first.peer_id, first.listen_addrs) == {"echo": {"x": 1}}

    with socket.socket() as other:  # a port held by any other program
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        with trio.fail_after(10):
            with pytest.raises(PortInUse):
                async with open_mesh_host(Identity.generate(), listen_port=other.getsockname()[1]):
                    pass


async def test_callers_exception_is_not_wrapped_in_exception_groups():
    with pytest.raises(ValueError, match="mine"):
        async with open_mesh_host(Identity.generate()):
            raise ValueError("mine")


# -- inbound connection slots -------------------------------------------------------------

class ConnectedPeers(INotifee):
    """Every peer a host has had a connection with: tells "not yet registered" apart from
    "already dropped" when a test waits for a connection to be gone."""

    def __init__(self):
        self.peers: set[ID] = set()

    async def connected(self, network, conn) -> None:
        self.peers.add(conn.muxed_conn.peer_id)

    async def disconnected(self, network, conn) -> None: ...
    async def opened_stream(self, network, stream) -> None: ...
    async def closed_stream(self, network, stream) -> None: ...
    async def listen(self, network, multiaddr) -> None: ...
    async def listen_close(self, network, multiaddr) -> None: ...


def watch_connections(host) -> ConnectedPeers:
    seen = ConnectedPeers()
    host._swarm.register_notifee(seen)
    return seen


async def connect_and_close(server, seen: ConnectedPeers, backlog: int = 0) -> None:
    """One inbound connection as a real peer makes it (fresh identity, Noise, Yamux), closed
    as soon as it is up. Returns once the server has registered it and holds at most
    `backlog` connections that it has yet to drop (dropping one takes py-libp2p ~0.1 s: a
    sleep in Yamux.close). Raises if the server refused the connection."""
    kp = generate_new_ed25519_identity()
    upgrader = TransportUpgrader({TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(kp, noise_privkey=_new_x25519_key_pair().private_key)},
                                 {TProtocol(YAMUX_PROTOCOL_ID): Yamux})
    server_id = ID.from_base58(server.peer_id)
    raw = await TCP().dial(Multiaddr(server.listen_addrs[0]).decapsulate(Multiaddr(f"/p2p/{server.peer_id}")))
    try:
        secured = await upgrader.upgrade_security(raw, True, server_id)
        await upgrader.upgrade_connection(secured, server_id)
    finally:
        await raw.close()
    client_id = ID.from_pubkey(kp.public_key)
    while client_id not in seen.peers or len(server._swarm.get_connections()) > backlog:
        await trio.sleep(0.002)


async def test_inbound_connection_slot_is_returned_when_the_connection_closes():
    async with open_mesh_host(Identity.generate()) as server:
        server.set_stream_handler(ECHO, echo)
        seen = watch_connections(server)
        limiter = server._swarm._inbound_limiter
        slots = int(limiter.total_tokens)  # py-libp2p 0.8.1 default: 250
        with trio.fail_after(150):
            for i in range(slots + 50):
                try:
                    await connect_and_close(server, seen, backlog=16)
                except Exception as e:
                    pytest.fail(f"connection {i + 1} refused with {limiter.borrowed_tokens} of {slots} slots "
                                f"held and {len(server._swarm.get_connections())} connections open: {e!r}")
            while limiter.borrowed_tokens:  # the last close may still be in its handler
                await trio.sleep(0.01)
        async with open_mesh_host(Identity.generate()) as client:
            with trio.fail_after(10):
                assert await round_trip(client, server.peer_id, server.listen_addrs) == {"echo": {"x": 1}}


async def test_stock_inbound_handler_keeps_the_slot_after_the_connection_closed(monkeypatch):
    # Control: py-libp2p's own handler, with 3 slots to make it quick.
    async with open_mesh_host(Identity.generate()) as server:
        # After open_mesh_host, which applies the workarounds.
        monkeypatch.setattr(swarm_mod.Swarm, "_do_handle_inbound_connection", patches.UPSTREAM_DO_HANDLE_INBOUND)
        seen = watch_connections(server)
        server._swarm._inbound_limiter = trio.CapacityLimiter(3)
        with trio.fail_after(30):
            for _ in range(3):
                await connect_and_close(server, seen)
            assert server._swarm._inbound_limiter.borrowed_tokens == 3 and not server._swarm.get_connections()
            with pytest.raises(Exception):
                await connect_and_close(server, seen)  # refused: no slot left, with no connection open


# -- dialling -----------------------------------------------------------------------------

async def test_happy_eyeballs_delay_removed():
    async with open_mesh_host(Identity.generate()):
        assert swarm_mod._HAPPY_EYEBALLS_DELAY == 0


async def test_auto_dialer_disabled():
    async with open_mesh_host(Identity.generate()) as a, open_mesh_host(Identity.generate()) as b:
        a.learn_addrs(b.peer_id, b.listen_addrs)  # a knows b but has no reason to dial it
        connector = a._swarm.auto_connector
        with trio.fail_after(10):
            await connector.maybe_connect()
        assert b.peer_id not in a.connected_peers()

        # Control: the stock auto-connector would have dialled b on its own.
        with trio.fail_after(10):
            await AutoConnector.maybe_connect(connector)
        await poll(lambda: _async(b.peer_id in a.connected_peers()), 10)


async def _async(value):
    return value


async def test_restarted_peer_on_new_port_is_reachable_at_once():
    ident = Identity.generate()
    async with open_mesh_host(Identity.generate()) as client:
        async with open_mesh_host(ident) as server:
            server.set_stream_handler(ECHO, echo)
            old_addrs = server.listen_addrs
            with trio.fail_after(10):
                assert await round_trip(client, server.peer_id, old_addrs)
        # The peer is gone: the dial fails fast and py-libp2p negative-caches it.
        with trio.fail_after(10):
            with pytest.raises(DialError):
                await client.open_stream(ident.peer_id, ECHO)
        assert client._swarm._negative_peer_cache.is_blocked(ident.peer_id)

        async with open_mesh_host(ident) as restarted:  # same identity, new port
            restarted.set_stream_handler(ECHO, echo)
            assert port_of(restarted.listen_addrs[0]) != port_of(old_addrs[0])
            with trio.fail_after(10):
                assert await round_trip(client, ident.peer_id, restarted.listen_addrs) == {"echo": {"x": 1}}
            assert client.known_addrs(ident.peer_id) == [str(Multiaddr(restarted.listen_addrs[0]).decapsulate(Multiaddr(f"/p2p/{ident.peer_id}")))]


async def test_restarted_peer_on_same_port_is_reachable_at_once():
    ident = Identity.generate()
    async with open_mesh_host(Identity.generate()) as client:
        async with open_mesh_host(ident) as server:
            server.set_stream_handler(ECHO, echo)
            addrs = server.listen_addrs
            with trio.fail_after(10):
                assert await round_trip(client, server.peer_id, addrs)
        with trio.fail_after(10):
            with pytest.raises(DialError):
                await client.open_stream(ident.peer_id, ECHO)
        assert client._swarm._negative_peer_cache.is_blocked(ident.peer_id)
        async with open_mesh_host(ident, listen_port=port_of(addrs[0])) as restarted:
            restarted.set_stream_handler(ECHO, echo)
            with trio.fail_after(10):  # same addresses, fresh evidence: the cache entry goes
                assert await round_trip(client, ident.peer_id, addrs) == {"echo": {"x": 1}}


# -- DHT freshness ------------------------------------------------------------------------

async def test_find_providers_sees_new_provider_and_has_no_duplicates():
    key = model_key("12" * 32)
    async with open_mesh_host(Identity.generate()) as boot:
        boot_addrs = boot.listen_addrs
        async with (
            open_mesh_host(Identity.generate(), bootstrap=boot_addrs) as p1,
            # DHT clients: nobody stores records at them, so whatever they find came from
            # the network (or, for the stock lookup, from its own cache).
            open_mesh_host(Identity.generate(), bootstrap=boot_addrs, dht_server=False) as finder,
            open_mesh_host(Identity.generate(), bootstrap=boot_addrs, dht_server=False) as stock_finder,
        ):
            with trio.fail_after(10):
                assert await p1.provide(key)
                first = await finder.find_providers(key, timeout=5)
                assert [p.peer_id for p in first] == [p1.peer_id]
                stock_first = await stock_finder._dht.find_providers(key)
                # (the stock lookup may list p1 more than once: one entry per storer)
                assert {p.peer_id.to_base58() for p in stock_first} == {p1.peer_id}

            async with open_mesh_host(Identity.generate(), bootstrap=boot_addrs) as p2:
                with trio.fail_after(10):
                    assert await p2.provide(key)
                    second = await finder.find_providers(key, timeout=5)
                    stock_second = await stock_finder._dht.find_providers(key)
                ids = [p.peer_id for p in second]
                assert sorted(ids) == sorted([p1.peer_id, p2.peer_id])
                assert len(ids) == len(set(ids))
                assert all(p.addrs for p in second)
                # Control: the stock lookup answers from its cache and misses p2.
                assert {p.peer_id.to_base58() for p in stock_second} == {p1.peer_id}


async def test_get_value_sees_newer_value_not_a_cached_one():
    ident = Identity.generate()
    async with open_mesh_host(Identity.generate()) as boot:
        async with (
            open_mesh_host(ident, bootstrap=boot.listen_addrs) as node,
            open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs, dht_server=False) as reader,
            open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs, dht_server=False) as stock_reader,
        ):
            key = advert_key(ident.peer_id)
            v1, v2 = make_advert(ident, node, seq=1), make_advert(ident, node, seq=2)
            with trio.fail_after(20):
                assert await node.put_value(key, v1) >= 1
                assert await reader.get_value(key, timeout=5) == v1
                assert await stock_reader._dht.get_value(key) == v1
                assert await node.put_value(key, v2) >= 1
                assert await reader.get_value(key, timeout=5) == v2
                # Control: the stock get_value answers from its local copy.
                assert await stock_reader._dht.get_value(key) == v1


async def test_dead_peer_leaves_routing_tables():
    async with open_mesh_host(Identity.generate()) as boot:
        async with open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs) as peer:
            pid = ID.from_base58(peer.peer_id)
            await poll(lambda: _async(boot._dht.routing_table.peer_in_table(pid)), 10)
        await poll(lambda: _async(not boot._dht.routing_table.peer_in_table(pid)), 10)


async def test_provide_rate_limited_below_storers_limit(autojump_clock):
    async with open_mesh_host(Identity.generate()) as host:
        dht = host._dht
        assert p2p.PROVIDE_MAX_PER_WINDOW < dht._provider_rate_max
        assert p2p.PROVIDE_WINDOW_S >= dht._provider_rate_window

    # The limiter keeps any PROVIDE_WINDOW_S span at or under the maximum (virtual time).
    limiter = p2p._SlidingWindowLimiter(p2p.PROVIDE_MAX_PER_WINDOW, p2p.PROVIDE_WINDOW_S, clock=trio.current_time)
    times = []
    for _ in range(30):
        await limiter.acquire()
        times.append(trio.current_time())
    for t in times:
        in_window = [u for u in times if t <= u < t + p2p.PROVIDE_WINDOW_S]
        assert len(in_window) <= p2p.PROVIDE_MAX_PER_WINDOW
    assert times[-1] - times[0] < 4 * p2p.PROVIDE_WINDOW_S  # it waits, it doesn't stall


async def test_provide_goes_through_limiter_and_skips_when_recent():
    key = model_key("34" * 32)
    async with open_mesh_host(Identity.generate()) as boot:
        async with open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs) as host:
            with trio.fail_after(10):
                assert await host.provide(key)
                assert len(host._provide_limiter._events) == 1
                assert await host.provide(key, min_interval=60)  # recent: not re-sent
                assert len(host._provide_limiter._events) == 1
                assert await host.provide(key)
                assert len(host._provide_limiter._events) == 2


# -- logging ------------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_libp2p_logger_forwarded_to_our_logging():
    patches.apply_global_workarounds()
    patches.apply_global_workarounds()  # idempotent
    handlers = [h for h in logging.getLogger("libp2p").handlers if isinstance(h, patches._ForwardToMeshLogging)]
    assert len(handlers) == 1 and handlers[0].level == logging.WARNING
    # Listen where the forwarder delivers (pytest itself also hooks the libp2p logger, so
    # its caplog can't tell forwarded records from raw ones).
    ours, sink = logging.getLogger("mesh.libp2p"), _ListHandler()
    old_level = ours.level
    ours.addHandler(sink)
    ours.setLevel(logging.DEBUG)
    try:
        logging.getLogger("libp2p.somewhere").warning("visible %d", 7)
        logging.getLogger("libp2p.somewhere").info("below the handler's level")
        logging.getLogger("libp2p.kad_dht.kad_dht").warning("Failed to read DHT message from stream: %s", StreamEOF())
        logging.getLogger("libp2p.kad_dht.peer_routing").warning("Failed to open stream to X: gone")
        # Per DCUtR attempt (transport/dcutr.py logs each upgrade's outcome once instead).
        logging.getLogger("libp2p.relay.circuit_v2.dcutr").warning("Failed to establish direct connection with %s", "P")
    finally:
        ours.removeHandler(sink)
        ours.setLevel(old_level)
    msgs = {(r.name, r.levelname, r.getMessage()) for r in sink.records}
    assert ("libp2p.somewhere", "WARNING", "visible 7") in msgs
    assert not any("below the handler" in m for _, _, m in msgs)
    assert not any("Failed to read DHT message" in m for _, _, m in msgs)  # per-request noise
    assert ("libp2p.kad_dht.peer_routing", "DEBUG", "Failed to open stream to X: gone") in msgs  # churn
    assert ("libp2p.relay.circuit_v2.dcutr", "DEBUG", "Failed to establish direct connection with P") in msgs


# -- streams ------------------------------------------------------------------------------

async def test_stream_errors_map_to_eof_or_stream_closed():
    async def reply_then_end(stream, remote):
        await FrameWriter(stream).write_frame({"bye": True})

    async def reset_after_first(stream, remote):
        await FrameReader(stream).read_frame()
        await stream.reset()

    async with open_mesh_host(Identity.generate()) as server, open_mesh_host(Identity.generate()) as client:
        server.set_stream_handler("/t/end", reply_then_end)
        server.set_stream_handler("/t/reset", reset_after_first)
        with trio.fail_after(10):
            s = await client.open_stream(server.peer_id, "/t/end", server.listen_addrs)
            reader = FrameReader(s)
            assert await reader.read_frame() == {"bye": True}
            assert await reader.read_frame() is None  # clean end: b"" from read()
            await s.close()

            s = await client.open_stream(server.peer_id, "/t/reset")
            await FrameWriter(s).write_frame({"hi": 1})
            with pytest.raises(StreamClosed):  # an abort, told apart from a clean end
                while await s.read(100):
                    pass
            with pytest.raises(StreamClosed):
                await s.write(b"more")
            await s.close()

            with pytest.raises(DialError):  # a protocol the peer doesn't speak
                await client.open_stream(server.peer_id, "/t/unknown")


async def test_streams_from_one_peer_are_handled_concurrently():
    # Two requests on the same connection: the first handler waits for the second.
    second_arrived = trio.Event()

    async def first(stream, remote):
        with trio.fail_after(10):
            await second_arrived.wait()
        await FrameWriter(stream).write_frame({"first": "done"})

    async def second(stream, remote):
        second_arrived.set()
        await FrameWriter(stream).write_frame({"second": "done"})

    async with open_mesh_host(Identity.generate()) as server, open_mesh_host(Identity.generate()) as client:
        server.set_stream_handler("/t/first", first)
        server.set_stream_handler("/t/second", second)
        with trio.fail_after(15):
            s1 = await client.open_stream(server.peer_id, "/t/first", server.listen_addrs)
            s2 = await client.open_stream(server.peer_id, "/t/second")
            assert await FrameReader(s2).read_frame() == {"second": "done"}
            assert await FrameReader(s1).read_frame() == {"first": "done"}
            assert len(client._swarm.get_connections(ID.from_base58(server.peer_id))) == 1


async def test_announce_addrs_replace_advertised_addresses():
    announced = "/ip4/203.0.113.7/tcp/4001"
    async with open_mesh_host(Identity.generate(), announce_addrs=[announced]) as host:
        assert host.listen_addrs == [f"{announced}/p2p/{host.peer_id}"]


# -- signed peer records --------------------------------------------------------------------

async def test_verified_peer_records_are_remembered_and_bad_ones_refused():
    import libp2p.kad_dht.utils as kad_utils
    from libp2p.peer.peerstore import create_signed_peer_record

    async with open_mesh_host(Identity.generate()):
        consume = kad_utils.consume_envelope
        assert consume._mesh_memoized
        kp = generate_new_ed25519_identity()
        pid = ID.from_pubkey(kp.public_key)
        data = create_signed_peer_record(pid, [Multiaddr("/ip4/127.0.0.1/tcp/4001")], kp.private_key).marshal_envelope()
        first = consume(data, "libp2p-peer-record")
        assert first[1].peer_id == pid
        assert consume(data, "libp2p-peer-record") is first  # no second signature check
        # One flipped byte in the signed payload: verified from scratch, refused, not cached.
        bad = bytearray(data)
        bad[-70] ^= 1
        with pytest.raises(Exception):
            consume(bytes(bad), "libp2p-peer-record")
        assert (bytes(bad), "libp2p-peer-record") not in consume._mesh_cache
        # The same bytes under another domain are checked as what they are.
        with pytest.raises(Exception):
            consume(data, "another-domain")


async def test_remembered_peer_records_are_bounded(monkeypatch):
    import libp2p.kad_dht.utils as kad_utils
    from libp2p.peer.peerstore import create_signed_peer_record

    monkeypatch.setattr(patches, "ENVELOPE_CACHE_SIZE", 3)  # the cache reads it at call time
    async with open_mesh_host(Identity.generate()):
        consume = kad_utils.consume_envelope
        for _ in range(5):
            kp = generate_new_ed25519_identity()
            rec = create_signed_peer_record(ID.from_pubkey(kp.public_key), [Multiaddr("/ip4/127.0.0.1/tcp/4001")], kp.private_key)
            consume(rec.marshal_envelope(), "libp2p-peer-record")
        assert len(consume._mesh_cache) <= 3


# -- locks and reads on the hot path ----------------------------------------------------------

async def test_no_yield_lock_excludes_and_hands_over_in_order(autojump_clock):
    lock = patches.NoYieldLock()
    # Uncontended: taken without a trip through the scheduler (nothing else runs meanwhile).
    ran = []

    async def other():
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with lock:
            assert lock.locked() and ran == []
        assert not lock.locked()
    assert ran == ["other"]
    # Contended: mutual exclusion, first come first served.
    order, inside = [], []

    async def worker(i):
        await trio.sleep(i * 0.01)
        async with lock:
            inside.append(i)
            assert len(inside) == 1
            await trio.sleep(0.02)
            order.append(i)
            inside.pop()

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(worker, i)
    assert order == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        lock.release()  # not held


async def test_stream_reads_served_from_buffer_keep_bytes_and_order():
    """Frames of all sizes through the buffered TCP read and Yamux's fast read path, with
    readers cancelled mid-read: every byte arrives once, in order."""
    import libp2p.stream_muxer.yamux.yamux as yamux_mod

    assert getattr(yamux_mod.Yamux.read_stream, "_mesh_buffered", False)
    payloads = [{"i": i, "pad": "x" * (i * 37 % 5000)} for i in range(300)]
    async with open_mesh_host(Identity.generate()) as a, open_mesh_host(Identity.generate()) as b:
        got = []

        async def handler(stream, remote):
            reader = FrameReader(stream)
            while True:
                with trio.move_on_after(0.0005) as cs:  # reads cut short at any point
                    frame = await reader.read_frame()
                if cs.cancelled_caught:
                    continue
                if frame is None:
                    break
                got.append(frame)

        b.set_stream_handler("/mesh/test-order/1", handler)
        stream = await a.open_stream(b.peer_id, "/mesh/test-order/1", b.listen_addrs)
        writer = FrameWriter(stream)
        for i in range(0, len(payloads), 7):
            await writer.write_frames(payloads[i:i + 7])
        await stream.close()
        with trio.fail_after(10):
            while len(got) < len(payloads):
                await trio.sleep(0.01)
        assert got == payloads


async def test_public_mesh_never_dials_private_addresses_but_serves_their_connections():
    """A public mesh's host (private=False) refuses to dial a private address (a NAT'd peer's
    192.168.x.y or 0.0.0.0: a timeout each, or the wrong host on our LAN), fails at once
    instead, and still opens streams over a connection such a peer made to us. Control: the
    same dial from a private-mesh host works."""
    async with open_mesh_host(Identity.generate(), private=False) as public, \
            open_mesh_host(Identity.generate()) as home:
        home.set_stream_handler(ECHO, echo)
        assert public.advertised_addrs == []  # 127.0.0.1 is nobody's to dial in a public mesh
        assert [str(a) for a in public._host.get_addrs()] == []  # nor in identify / peer records
        t0 = time.monotonic()
        with pytest.raises(DialError):
            await round_trip(public, home.peer_id, home.listen_addrs)
        assert time.monotonic() - t0 < 1.0
        connected: list[str] = []
        public.on_peer_connected(connected.append)
        await home.connect(public.peer_id, public.listen_addrs)  # inbound: allowed
        with trio.fail_after(5):
            while home.peer_id not in connected:
                await trio.sleep(0.01)
        assert (await round_trip(public, home.peer_id))["echo"] == {"x": 1}  # over home's connection
        assert await public.ping(home.peer_id) < 2.0
        await public.disconnect(home.peer_id)
        assert not public.is_connected(home.peer_id)
    async with open_mesh_host(Identity.generate()) as private, open_mesh_host(Identity.generate()) as home:
        home.set_stream_handler(ECHO, echo)
        assert (await round_trip(private, home.peer_id, home.listen_addrs))["echo"] == {"x": 1}


async def test_black_holed_dht_peer_does_not_hold_back_an_advert_put():
    """A DHT peer that accepts KAD streams and never answers (frozen, unplugged) must not keep
    an advert from the storer that does answer: the caller's short deadline (a node's advert
    refresh) used to expire inside the lookup, before any store was sent."""
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL_ID

    me = Identity.generate()
    async with open_mesh_host(Identity.generate()) as storer, open_mesh_host(Identity.generate()) as hole:
        async def never_answer(stream) -> None:
            await trio.sleep(60)

        hole._host.set_stream_handler(KAD_PROTOCOL_ID, never_answer)
        async with open_mesh_host(me, bootstrap=[f"{a}" for a in storer.listen_addrs]) as node:
            await node.bootstrap(hole.listen_addrs, timeout=1.0)
            got: list[str] = []
            storer.on_value_stored(lambda k, v: got.append(k))
            with trio.move_on_after(2.0):  # what a node's refresh allows; the put's own timeout is 10 s
                await node.put_value(advert_key(me.peer_id), make_advert(me, node, 1), timeout=10.0)
            assert got == [advert_key(me.peer_id)]
