"""py-libp2p 0.8.1 workarounds: each removes one measured sharp edge.

Process-wide patches. py-libp2p reads these module globals at call time, so patching the
module attribute is enough; applying twice is harmless. Each one is checked to be in effect by
tests/transport/test_patches.py; docs/ARCHITECTURE.md lists the sharp edges they remove.
"""

from __future__ import annotations

import contextvars
import logging
import socket
from collections import OrderedDict

import libp2p.io.trio as _trio_io_mod
import libp2p.kad_dht.provider_store as _provider_store_mod
import libp2p.kad_dht.utils as _kad_utils_mod
import libp2p.network.swarm as _swarm_mod
import libp2p.stream_muxer.yamux.yamux as _yamux_mod
import libp2p.transport.tcp.tcp as _tcp_mod
import trio
from libp2p.abc import IMuxedConn, INotifee
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamEOF

log = logging.getLogger("mesh.p2p")

# Provider records are kept this long by storers (py-libp2p: 48 h, a module constant that
# applies to every record a process stores). Storers also take at most 20 providers per key
# and ignore newcomers while full, so 48 h of dead providers would hide new nodes. Our nodes
# re-provide well within this (discovery.REPROVIDE_INTERVAL_S).
PROVIDER_RECORD_TTL_S = 10 * 60
MAX_PROVIDERS_PER_KEY = 200
# Process-wide patches. py-libp2p reads these module globals at call time, so patching the
# module attribute is enough; applying twice is harmless.

def _set_reuseaddr_only(sock) -> None:
    # py-libp2p sets SO_REUSEPORT on listeners (for TCP hole punching, which we don't use):
    # two hosts could then bind the same port and split its connections between them.
    # SO_REUSEADDR alone still allows a quick restart over TIME_WAIT sockets.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        pass


class _ForwardToMeshLogging(logging.Handler):
    """py-libp2p's 'libp2p' logger has no handler and propagate=False, so its warnings go to
    Python's last-resort handler: bare lines on stderr, interleaved with ours. Re-emit them
    through our own logger hierarchy instead."""

    _target = logging.getLogger("mesh.libp2p")

    # A DHT lookup contacts peers that other peers still list after they died; py-libp2p
    # logs each failed contact as a WARNING. That is normal churn: keep it, at DEBUG.
    _CHURN_PREFIXES = (
        "Failed to open stream to ", "Failed to store value at peer ", "Failed to get value from peer ",
        "Error getting providers from ", "Failed to get providers from ", "Error sending ADD_PROVIDER to ",
        "Failed to send ADD_PROVIDER to ", "Failed to open TCP stream", "MultiselectClient handshake:",
        "Error in handle_incoming for peer ",  # logged at ERROR whenever a peer dies
        # DCUtR, per attempt: transport/dcutr.py logs each upgrade's outcome once.
        "Failed to establish direct connection with ", "Timeout in DCUtR protocol with peer ",
        "Error in DCUtR protocol with peer ", "No addresses to try for hole punch ", "Error handling DCUtR stream",
        "Error initiating hole punch with peer ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        # The DHT server logs a WARNING for every request stream that ends normally (it
        # gets StreamEOF where it expects b""): one per lookup, pure noise.
        if record.msg == "Failed to read DHT message from stream: %s" and record.args:
            if isinstance(record.args[0], StreamEOF):
                return False
        if isinstance(record.msg, str) and record.msg.startswith(self._CHURN_PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self._target.isEnabledFor(logging.DEBUG)
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._target.handle(record)
        except Exception:  # a logging failure must never break networking
            pass


def apply_global_workarounds() -> None:
    # A fixed 250 ms "happy eyeballs" wait after starting each address's dial, even when the
    # dial succeeded (it only cancels early at max_connections_per_peer=3): every new
    # connection cost 250 ms. With 0 the addresses are dialled in parallel at once.
    _swarm_mod._HAPPY_EYEBALLS_DELAY = 0.0
    _tcp_mod._set_reuse_flags = _set_reuseaddr_only
    _provider_store_mod.PROVIDER_RECORD_EXPIRATION_INTERVAL = PROVIDER_RECORD_TTL_S
    _provider_store_mod.BUCKET_SIZE = MAX_PROVIDERS_PER_KEY
    # Yamux receive windows: py-libp2p credits the sender on nearly every read (its "partial
    # slack" and "release on read" rules), an encrypted write back per received frame batch
    # (~10% of a busy entry's CPU), and its read is not cancel-safe: YamuxStream.read takes the
    # bytes out of the stream's buffer, then awaits that update, so a cancel landing there (a
    # read timeout, an interrupted read) loses the bytes and the frame stream behind them is
    # garbage (seen as receipts over tokens that disagree with what was relayed). Credit the
    # go-yamux way instead: once half the window is consumed, and shielded.
    if hasattr(_yamux_mod.YamuxStream, "_grow_to_delta") and hasattr(_yamux_mod.YamuxStream, "_grow_threshold"):
        _yamux_mod.YamuxStream._auto_tune_and_send_window_update = _window_update_half_window
    # TCP reads are unbuffered in py-libp2p: every Noise message costs two receive calls
    # (its 2-byte length, then its body), each a trio wait + recv syscall. Read up to 64 KiB
    # at once and serve the small reads from that: one syscall for all the messages that
    # arrived together.
    if not getattr(_trio_io_mod.TrioTCPStream.read, "_mesh_buffered", False):
        _trio_io_mod.TrioTCPStream.read = _buffered_tcp_read(_trio_io_mod.TrioTCPStream.read)
    # Yamux takes its streams lock for every frame it receives and every read of a stream,
    # and py-libp2p's TCP stream takes a lock for every read and write: an uncontended
    # trio.Lock still yields to the scheduler, and on a busy entry each yield queues the
    # connection's one reader task (every stream of that node waits on it) behind all other
    # runnable tasks. Those locks now yield only when contended; a stream read that finds
    # bytes already buffered returns them without the lock round trip.
    if not getattr(_yamux_mod.Yamux.__init__, "_mesh_fast_locks", False):
        _yamux_mod.Yamux.__init__ = _with_fast_locks(_yamux_mod.Yamux.__init__, ("streams_lock",))
        _yamux_mod.Yamux.read_stream = _buffered_read_stream(_yamux_mod.Yamux.read_stream)
    if not getattr(_trio_io_mod.TrioTCPStream.__init__, "_mesh_fast_locks", False):
        _trio_io_mod.TrioTCPStream.__init__ = _with_fast_locks(_trio_io_mod.TrioTCPStream.__init__, ("read_lock", "write_lock"))
    # Every DHT answer carries a signed peer record per peer it names, and py-libp2p checks
    # each signature anew: in a 30-node mesh that was ~13% of an idle entry's CPU (a discovery
    # round every 1.5 s sees the same few dozen records again and again). The same bytes
    # verify the same way, so verified envelopes are remembered; a bad one is never cached.
    if not getattr(_kad_utils_mod.consume_envelope, "_mesh_memoized", False):
        _kad_utils_mod.consume_envelope = _memoized_consume_envelope(_kad_utils_mod.consume_envelope)
    # Every upgraded inbound connection kept one of the swarm's inbound slots (250 by
    # default) until the swarm stopped, not until the connection closed: 250 connect-and-close
    # cycles, under a minute from one process, and a node or entry refused every new peer
    # until restarted. See _handle_inbound_until_closed.
    if not getattr(_swarm_mod.Swarm._do_handle_inbound_connection, "_mesh_releases_slot", False):
        _swarm_mod.Swarm._do_handle_inbound_connection = _handle_inbound_until_closed
    lg = logging.getLogger("libp2p")
    if not any(isinstance(h, _ForwardToMeshLogging) for h in lg.handlers):
        h = _ForwardToMeshLogging(level=logging.WARNING)
        lg.addHandler(h)


# py-libp2p's own handler, kept for tests that show the edge it has.
UPSTREAM_DO_HANDLE_INBOUND = getattr(_swarm_mod.Swarm._do_handle_inbound_connection, "_mesh_upstream",
                                     _swarm_mod.Swarm._do_handle_inbound_connection)


async def _handle_inbound_until_closed(self, read_write_closer, maddr, failure_event) -> None:
    """Replaces Swarm._do_handle_inbound_connection (py-libp2p 0.8.1), which
    _handle_inbound_connection runs while holding one token of self._inbound_limiter and
    releases it when this returns.

    Upstream keeps this handler alive until ``self.manager.wait_finished()``, i.e. until the
    whole swarm stops (the listener closes the socket when its handler returns, so the handler
    has to outlive the connection). The token therefore outlives the connection too: each
    inbound connection that completed its upgrade, however short-lived, consumed one of the
    ``max_connections - min_connections`` tokens for good, and once they were gone every new
    inbound connection was closed on accept although none was open.

    Here the handler waits for the connection's muxer to close (or the swarm to stop,
    whichever comes first), so the token is held exactly as long as the connection lives and
    the limiter bounds concurrent inbound connections, as its comment in Swarm says it should.
    Everything else is upstream's code path unchanged: connection gate, pre-multiplexed
    transports (QUIC), security and muxer upgrade, cleanup and metrics on failure.
    """
    remote_maddr = self._build_remote_multiaddr(read_write_closer)
    gate = self.connection_gate
    # DialPublicOnly filters what we dial, not who may connect to us.
    allowed = getattr(gate, "is_allowed_inbound", gate.is_allowed)
    if remote_maddr is not None and not await allowed(remote_maddr):
        try:
            await read_write_closer.close()
            failure_event.conn_incoming_error = True
            if self.metric_send_channel is not None:
                await self.metric_send_channel.send(failure_event)
        except Exception:
            pass
        return

    if isinstance(read_write_closer, IMuxedConn):
        try:
            await self.add_conn(read_write_closer, direction="inbound")
            await _until_connection_closed(self, read_write_closer)
        except Exception:
            await read_write_closer.close()
            failure_event.conn_incoming_error = True
            if self.metric_send_channel is not None:
                await self.metric_send_channel.send(failure_event)
        return

    raw_conn = None
    try:
        raw_conn = RawConnection(read_write_closer, False)
        muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        await _until_connection_closed(self, muxed_conn)
    except Exception as e:
        log.debug("error handling an incoming connection: %s", e)
        try:
            if raw_conn is not None:
                await raw_conn.close()
            else:
                await read_write_closer.close()
                failure_event.conn_incoming_error = True
                if self.metric_send_channel is not None:
                    await self.metric_send_channel.send(failure_event)
        except Exception:
            pass


_handle_inbound_until_closed._mesh_releases_slot = True
_handle_inbound_until_closed._mesh_upstream = UPSTREAM_DO_HANDLE_INBOUND


async def _until_connection_closed(swarm, muxed_conn) -> None:
    # Yamux (our only muxer) and QUIC set event_closed once the connection is gone, whoever
    # closed it: the peer (EOF, GO_AWAY), a read error, the pruner or the swarm. A muxer
    # without one gets upstream's behaviour.
    closed = getattr(muxed_conn, "event_closed", None)
    if not isinstance(closed, trio.Event):
        await swarm.manager.wait_finished()
        return
    async with trio.open_nursery() as nursery:

        async def swarm_finished() -> None:
            await swarm.manager.wait_finished()
            nursery.cancel_scope.cancel()

        nursery.start_soon(swarm_finished)
        await closed.wait()
        nursery.cancel_scope.cancel()


class NoYieldLock:
    """A trio.Lock (mutual exclusion, FIFO hand-over when contended) whose uncontended
    acquire does not yield to the scheduler. For locks py-libp2p takes around short,
    non-blocking sections on every frame: the yield, not the exclusion, was the cost."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self):
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()


def _with_fast_locks(init, names: tuple[str, ...]):
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name in names:
            setattr(self, name, NoYieldLock())

    __init__._mesh_fast_locks = True
    return __init__


def _buffered_read_stream(original):
    """Yamux.read_stream (py-libp2p 0.8.1) with a fast path: bytes already in the stream's
    buffer are returned at once, as the original's own "data in buffer" branch would
    return them, without its lock and its debug-message formatting. Anything else (no
    data yet, reset, closed, shutting down) takes the original path."""

    async def read_stream(self, stream_id: int, n: int = -1) -> bytes:
        if not self.streams_lock.locked() and not self.event_shutting_down.is_set():
            stream = self.streams.get(stream_id)
            buffer = self.stream_buffers.get(stream_id)
            if stream is not None and buffer and not stream.reset_received and not stream.closed:
                if n is None or n < 0 or n >= len(buffer):
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    data = bytes(buffer[:n])
                    del buffer[:n]
                return data
        return await original(self, stream_id, n)

    read_stream._mesh_buffered = True
    return read_stream


ENVELOPE_CACHE_SIZE = 4096  # verified signed peer records kept (~300 bytes each)


def _memoized_consume_envelope(original):
    cache: OrderedDict[tuple[bytes, str], tuple] = OrderedDict()

    def consume_envelope(data: bytes, domain: str):
        key = (bytes(data), domain)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        result = original(data, domain)  # raises on a bad signature: nothing is cached
        cache[key] = result
        while len(cache) > ENVELOPE_CACHE_SIZE:
            cache.popitem(last=False)
        return result

    consume_envelope._mesh_memoized = True
    consume_envelope._mesh_cache = cache
    return consume_envelope


# Bound on a shielded window update: one small write on the connection, which fails fast on
# a dead connection; this only covers a peer that stops reading its socket.
_WINDOW_UPDATE_TIMEOUT_S = 5.0


async def _window_update_half_window(self, *, bytes_read: int = 0) -> None:
    """Replaces YamuxStream._auto_tune_and_send_window_update (py-libp2p 0.8.1): credit the
    sender once it has used half its window (go-yamux), never awaiting otherwise, so a read
    costs no write and no checkpoint after it took its bytes. Nothing else holds window_lock
    across an await, and this touches only receive-side counters without awaiting, so the
    lock is not needed."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    delta = self.target_recv_window - (self.recv_window + buffered)
    if delta <= 0 or delta < self._grow_threshold():
        return
    total = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    self._pending_recv_release = 0
    if total > 0:
        # The caller's bytes are already out of the buffer: finish, then let a pending
        # cancel land at the caller's next checkpoint, once it holds the data.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _WINDOW_UPDATE_TIMEOUT_S):
            await self.send_window_update(total, skip_lock=True)


_TCP_READ_SIZE = 65536


def _buffered_tcp_read(original):
    def take(self, buf: bytearray, n: int | None) -> bytes:
        if n is None or n < 0 or n >= len(buf):
            self._mesh_rbuf = None
            return bytes(buf)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def read(self, n: int | None = None) -> bytes:
        if n is not None and n == 0:
            return b""
        lock = self.__dict__.get("_mesh_read_lock")
        if lock is None:
            # Held across the buffer and the socket: a second reader must queue behind the
            # first, or bytes it received could overtake bytes the first left in the buffer.
            # Uncontended it does not yield, so a read served from the buffer costs no trip
            # through the scheduler: a Noise message is two such reads and a Yamux frame two
            # more, and on a busy loop every yield queues the reader behind all other tasks.
            lock = self._mesh_read_lock = NoYieldLock()
        async with lock:
            buf = self.__dict__.get("_mesh_rbuf")
            if buf:
                return take(self, buf, n)
            want = _TCP_READ_SIZE if n is None or n < 0 else max(n, _TCP_READ_SIZE)
            data = await original(self, want)
            if n is None or n < 0 or len(data) <= n:
                return data
            self._mesh_rbuf = bytearray(data[n:])
            return data[:n]

    read._mesh_buffered = True
    return read


async def no_republish(*args, **kwargs) -> None:
    # py-libp2p republishes every stored value and provided key on its 10-minute tick: values
    # under their raw key (which other servers refuse to look up, see _value_lookup_key),
    # including other nodes' adverts long expired; provider records outside our rate
    # limiter. Our nodes re-publish their own adverts and keys on their own schedule.
    return None


class _Notifee(INotifee):
    """INotifee with every event ignored: subclasses override the ones they need."""

    async def connected(self, network, conn) -> None:
        return None

    async def disconnected(self, network, conn) -> None:
        return None

    async def opened_stream(self, network, stream) -> None:
        return None

    async def closed_stream(self, network, stream) -> None:
        return None

    async def listen(self, network, multiaddr) -> None:
        return None

    async def listen_close(self, network, multiaddr) -> None:
        return None


class ForgetDisconnectedPeers(_Notifee):
    """Drop a peer from the DHT routing table when its last connection closes.

    py-libp2p keeps a dead peer in routing tables for an hour (stale-peer pings run every
    5 min, 5 peers at a time) and hands it out in every lookup answer, so each lookup dials
    it again. A live peer is re-added the next time it talks to us, which our nodes do every
    few seconds when they refresh their adverts."""

    def __init__(self, dht: KadDHT):
        self._dht = dht

    async def disconnected(self, network, conn) -> None:
        try:
            peer = conn.muxed_conn.peer_id
            if not network.get_connections(peer):
                self._dht.routing_table.remove_peer(peer)
        except Exception:
            log.debug("routing table cleanup failed", exc_info=True)



class DialPublicOnly:
    """A connection gate for a host in a public mesh (transport/addrs.py): py-libp2p dials
    every address it learnt for a peer (identify, DHT peer records, provider records), and a
    NAT'd peer's 0.0.0.0 / 192.168.x.y addresses cost a dial timeout each, or reach the wrong
    host on our own LAN. Swarm.dial_peer asks the gate about every address before dialling;
    private ones are refused here, so a peer that has nothing else fails at once ("blocked by
    connection gate") and is reached over the connection it opened to us. Inbound connections
    are judged by the wrapped gate alone (our _handle_inbound_until_closed asks
    is_allowed_inbound)."""

    def __init__(self, inner):
        self._inner = inner

    async def is_allowed(self, remote_addr) -> bool:
        from transport.addrs import is_private

        if is_private(remote_addr):
            return False
        return await self._inner.is_allowed(remote_addr)

    async def is_allowed_inbound(self, remote_addr) -> bool:
        return await self._inner.is_allowed(remote_addr)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class PeerEvents(_Notifee):
    """Calls on_connected(peer ID) for every new connection, whoever dialled."""

    def __init__(self, on_connected):
        self._on_connected = on_connected

    async def connected(self, network, conn) -> None:
        try:
            self._on_connected(conn.muxed_conn.peer_id)
        except Exception:
            log.debug("connect listener failed", exc_info=True)


async def no_auto_connect() -> None:
    # The auto-connector dials peerstore entries until it holds ~200 connections. Our mesh
    # connects on purpose (bootstrap, DHT lookups, chosen nodes); background dials to every
    # peer a lookup ever mentioned only burn CPU and sockets.
    return None


# -- circuit relay v2 ---------------------------------------------------------------------------

_CIRCUIT = contextvars.ContextVar("mesh_relay_circuit", default=None)


class _CircuitStreams(dict):
    """CircuitV2Protocol._active_relays, keyed the way upstream keys it (by peer) but with
    the lookup its _relay_data cleanup does answered from the circuit that task relays.

    Upstream (py-libp2p 0.8.1) stores `_active_relays[source peer] = (stream, None)` and
    `_active_relays[destination peer] = (stream, dst)`, and when either direction of a circuit
    ends it closes the streams found under its own peer key. Two circuits from one source
    through one relay share that key, so ending one closed the other's source stream: a
    requester's circuit to node B died when its circuit to node C ended. Inside a relay task
    (see _relay_data_own_circuit) the cleanup now sees exactly its own two streams; the
    relay's shutdown still closes everything stored."""

    def __contains__(self, key) -> bool:
        return _CIRCUIT.get() is not None or super().__contains__(key)

    def __getitem__(self, key):
        own = _CIRCUIT.get()
        return own if own is not None else super().__getitem__(key)

    def __delitem__(self, key) -> None:
        if _CIRCUIT.get() is None:
            super().__delitem__(key)


def _relay_data_own_circuit(original):
    async def _relay_data(self, src_stream, dst_stream, peer_id, *args, **kwargs):
        # Each direction runs in its own task: the context variable is that task's alone.
        _CIRCUIT.set((src_stream, dst_stream))
        return await original(self, src_stream, dst_stream, peer_id, *args, **kwargs)

    _relay_data._mesh_own_circuit = True
    return _relay_data


def apply_relay_workarounds() -> None:
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    if not getattr(CircuitV2Protocol._relay_data, "_mesh_own_circuit", False):
        CircuitV2Protocol._relay_data = _relay_data_own_circuit(CircuitV2Protocol._relay_data)


def fix_circuit_bookkeeping(protocol) -> None:
    """Per relay instance (its dict is made in __init__)."""
    if not isinstance(protocol._active_relays, _CircuitStreams):
        protocol._active_relays = _CircuitStreams(protocol._active_relays)
