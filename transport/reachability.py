"""Is this host publicly reachable? Decided from a dial-back over a NEW connection.

py-libp2p's AutoNAT v1 answers "reachable" when the asker is reachable over the connection it
already opened to the answerer (the dial-back reuses it), so a node behind NAT is told it is
public. Our own small protocol instead:

    node  -> peer : {"ports": [our TCP listen ports], "addrs": [addresses we'd like to claim]}
    peer  -> node : {"observed": "/ip4/<our address as the peer sees it>", "reachable": [...]}

The peer dials each candidate with a fresh TCP connection and a full Noise handshake (which
proves the listener holds our key), then closes that connection. Candidates are the claimed
addresses plus "observed IP + each listen port" (a port forward or a public listener); the
peer dials only addresses at the IP the request came from, so nobody can use it to probe third
parties, and at most MAX_CANDIDATES per request, one request per peer per RATE_WINDOW_S.

A node counts as directly reachable once DIRECT_CONFIRMATIONS peers confirmed an address;
only confirmed addresses are advertised to a public mesh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from protocol.framing import FrameReader, FrameWriter
from transport.addrs import addr_ip, is_private, is_relayed
from transport.host import DialError, MeshHost, StreamClosed

log = logging.getLogger("mesh.reach")

DIALBACK_PROTOCOL_ID = "/mesh/dialback/1"
MAX_CANDIDATES = 4
DIAL_TIMEOUT_S = 5.0
RATE_WINDOW_S = 30.0
MAX_FRAME = 4096
DIRECT_CONFIRMATIONS = 1

DIRECT = "direct"
RELAYED = "relayed"
UNREACHABLE = "unreachable-direct"
PRIVATE = "private-mesh"  # loopback/LAN mesh: everyone dials everyone


def _tcp_port(addr: str) -> int | None:
    try:
        return int(Multiaddr(addr).value_for_protocol("tcp"))
    except Exception:
        return None


def candidates(observed_ip: str, ports: Iterable[int], addrs: Iterable[str]) -> list[str]:
    """What a dial-back tries: claimed addresses at the requester's own IP, and that IP with
    each of its listen ports. Never a private or relayed address, never another IP."""
    out: list[str] = []
    family = "ip6" if ":" in observed_ip else "ip4"
    for a in addrs:
        if isinstance(a, str) and not is_relayed(a) and not is_private(a) and str(addr_ip(a)) == observed_ip:
            out.append(a.split("/p2p/")[0])  # the transport address; the peer id is checked anyway
    for p in ports:
        if isinstance(p, int) and 0 < p < 65536:
            out.append(f"/{family}/{observed_ip}/tcp/{p}")
    seen: list[str] = []
    for a in out:
        if a not in seen and not is_private(a):
            seen.append(a)
    return seen[:MAX_CANDIDATES]


class DialbackService:
    """The answering side (entries and any public host)."""

    def __init__(self, host: MeshHost, *, dial_timeout: float = DIAL_TIMEOUT_S, rate_window: float = RATE_WINDOW_S):
        self.host = host
        self.dial_timeout = dial_timeout
        self.rate_window = rate_window
        self._last: dict[str, float] = {}

    def register(self) -> None:
        self.host.set_stream_handler(DIALBACK_PROTOCOL_ID, self.handle)

    async def handle(self, stream, remote: str) -> None:
        reader, writer = FrameReader(stream, max_frame=MAX_FRAME), FrameWriter(stream, max_frame=MAX_FRAME)
        req = await reader.read_frame()
        if not isinstance(req, dict):
            return
        now = time.monotonic()
        if now - self._last.get(remote, -1e9) < self.rate_window:
            await writer.write_frame({"error": "rate_limited", "retry_after": self.rate_window})
            return
        self._last[remote] = now
        if len(self._last) > 10000:  # bounded: forget the oldest half
            for k in sorted(self._last, key=self._last.__getitem__)[:5000]:
                del self._last[k]
        observed = stream_remote_ip(stream)
        if observed is None:
            await writer.write_frame({"error": "no_observed_address"})
            return
        ports = [p for p in req.get("ports", []) if isinstance(p, int)][:MAX_CANDIDATES]
        addrs = [a for a in req.get("addrs", []) if isinstance(a, str)][:MAX_CANDIDATES]
        family = "ip6" if ":" in observed else "ip4"
        reply = {"observed": f"/{family}/{observed}", "reachable": []}
        for cand in candidates(observed, ports, addrs):
            if await self.dial_back(remote, cand):
                reply["reachable"].append(cand)
        await writer.write_frame(reply)

    async def dial_back(self, peer_id: str, addr: str) -> bool:
        """A new connection to `addr` that authenticates as `peer_id`, closed again at once.
        swarm.dial_addr always makes a fresh connection, whatever is already open."""
        swarm = self.host._swarm
        with trio.move_on_after(self.dial_timeout):
            try:
                conn = await swarm.dial_addr(Multiaddr(addr), ID.from_base58(peer_id))
            except Exception as e:
                log.debug("dial-back to %s failed: %s", addr, e)
                return False
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await conn.close()
                except Exception:
                    pass
            return True
        return False


def stream_remote_ip(stream) -> str | None:
    raw = getattr(stream, "_raw", stream)
    try:
        remote = raw.get_remote_address()
    except Exception:
        remote = None
    if not remote:
        return None
    return str(remote[0])


async def ask_dialback(host: MeshHost, peer_id: str, *, timeout: float = 20.0) -> dict:
    """Ask `peer_id` to dial us back; its reply ({"observed", "reachable"} or {"error"})."""
    ports = sorted({p for a in host.listen_addrs if (p := _tcp_port(a))})
    claimed = [a for a in host.listen_addrs if not is_private(a)]
    with trio.move_on_after(timeout):
        stream = await host.open_stream(peer_id, DIALBACK_PROTOCOL_ID, timeout=min(timeout, 5.0))
        try:
            await FrameWriter(stream, max_frame=MAX_FRAME).write_frame({"ports": ports, "addrs": claimed})
            reply = await FrameReader(stream, max_frame=MAX_FRAME).read_frame()
        except StreamClosed as e:
            raise DialError(f"dial-back request to {peer_id} broke: {e}") from None
        finally:
            await stream.close()
        if not isinstance(reply, dict):
            raise DialError(f"{peer_id} answered no dial-back result")
        return reply
    raise DialError(f"dial-back request to {peer_id} timed out")


class Reachability:
    """The node's verdict, from dial-back replies (and, later, relay reservations)."""

    def __init__(self, host: MeshHost):
        self.host = host
        self.confirmed: dict[str, set[str]] = {}  # address -> peers that dialled it back
        self.observed: set[str] = set()
        self.asked: set[str] = set()
        self.relayed: list[str] = []

    @property
    def state(self) -> str:
        if self.host.private_mesh:
            return PRIVATE
        if self.direct_addrs():
            return DIRECT
        if self.relayed:
            return RELAYED
        return UNREACHABLE

    def direct_addrs(self) -> list[str]:
        return [a for a, peers in self.confirmed.items() if len(peers) >= DIRECT_CONFIRMATIONS]

    def advertised(self) -> list[str]:
        """What a public mesh may dial: confirmed direct addresses, then relayed ones."""
        if self.host.private_mesh:
            return self.host.listen_addrs
        return self.direct_addrs() + self.relayed

    async def probe(self, peers: Iterable[str]) -> None:
        for peer in peers:
            try:
                reply = await ask_dialback(self.host, peer)
            except DialError as e:
                log.debug("dial-back via %s failed: %s", peer, e)
                continue
            if "error" in reply:
                continue
            self.asked.add(peer)
            if isinstance(reply.get("observed"), str):
                self.observed.add(reply["observed"])
            ok = {a for a in reply.get("reachable", []) if isinstance(a, str)}
            for a in ok:
                self.confirmed.setdefault(a, set()).add(peer)
            for a in list(self.confirmed):
                if a not in ok:
                    self.confirmed[a].discard(peer)  # this peer could not dial it (any more)
                    if not self.confirmed[a]:
                        del self.confirmed[a]

    def summary(self) -> dict:
        return {"state": self.state, "direct_addrs": self.direct_addrs(), "relayed_addrs": list(self.relayed),
                "observed": sorted(self.observed), "checked_by": len(self.asked)}
