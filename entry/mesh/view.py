"""The entry's live view of the mesh: which nodes exist, what they serve, how loaded they are.

Discovery (the DHT) only says who exists: provider records outlive their nodes by minutes and
an advert by up to its TTL. Liveness and load come from the nodes themselves: the view keeps
one status stream open per node, asks for status every second, and reads the `leaving` frame
a node pushes when it starts draining. So a node leaves routing
- at once when it says it is leaving,
- at once when its status stream breaks (killed: the OS closes its sockets),
- after `status_timeout` when it stops answering (hung, SIGSTOP, network black hole),
- when its last advert expires (it stopped refreshing, whatever the stream says).

Nodes behind a home NAT can't be dialled at all: they keep a connection open to each entry
(transport/links.py), and the view starts a node's status stream the moment its connection
arrives (`_peer_connected`) instead of waiting out a dial cooldown. A status stream that stops
answering, followed by a failed ping, closes the node's connections: they are dead (a router
forgot its NAT mapping), and the node's next connection must not share the peer with a dead one.

Addresses: a node's advert names addresses, but the entry never dials them: a signed advert
proves who signed it, not that the addresses are the signer's, and dialling them would let
any identity make the entry connect to any host:port (a port scan or a reflection through the
entry). Streams to a node go over the connection it opened to us, or to the addresses libp2p
itself learnt for the peer (its signed peer record from the DHT or identify, or a connection
we made that authenticated as it).

Everything user-facing names nodes by pseudonym (a keyed hash of the peer id with a key
that lives only in this process), never by peer id or address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol import INFER_PROTOCOL_ID
from protocol.errors import ProtocolError
from protocol.framing import FrameReader, FrameWriter
from protocol.messages import StatusQuery, StatusReply, to_wire
from protocol.records import AdvertBook, CapacityAdvert, RecordError
from transport.dht_keys import ADVERT_NAMESPACE, verify_advert_for_key
from transport.discovery import discover_all
from transport.host import DialError, MeshHost, StreamClosed
from transport.node_client import NodeError, StreamBroken, read_status

log = logging.getLogger("mesh.entry.view")

REPUTATION_NEUTRAL = 0.5
ADVERT_KEY_PREFIX = f"/{ADVERT_NAMESPACE}/"
COOLDOWN_BASE_S = 1.0
COOLDOWN_MAX_S = 30.0
# A node that said goodbye is not dialled again for this long: it is exiting, and its last
# advert stays valid for a while after it is gone.
LEFT_COOLDOWN_S = 10.0
FORGET_AFTER_S = 600.0  # reputation of a vanished node is kept this long, for when it returns
# A node whose advert ran out while its status stream still answers stays routable this long
# past the advert's expiry: a late DHT refresh (a busy entry or node, a slow lookup) must not
# take a serving node out of routing. Seen under load: every node's advert lapsing at once.
ADVERT_GRACE_S = 60.0
_SPEED_EWMA = 0.3
_LATENCY_EWMA = 0.3

# How much one incident costs in reputation (a fraction of what is left). Losing the link
# is cheap (volunteers go offline); breaking a generation costs more; a bad receipt most.
PENALTY_DISCONNECT = 0.05
PENALTY_FAILED = 0.15
PENALTY_BAD_RECEIPT = 0.3
# Output verification (issue 5): a failed check is evidence of cheating, not bad luck, so it
# costs most; a passed one earns a little back. After DEMOTE_AFTER failed checks without a
# pass in between the node is demoted for its model: no user traffic, only canary probes,
# until REINSTATE_AFTER of those pass in a row.
PENALTY_VERIFY_FAILED = 0.5
REWARD_VERIFIED = 0.02
DEMOTE_AFTER = 2
REINSTATE_AFTER = 2
# Canary probes alone never reinstate a demoted node (a node that answers probes honestly and
# users with garbage would come back each time): REINSTATE_AFTER passed probes put it on
# probation, routed like an unproven node (entry/mesh/router.py) with every request checked,
# and PROBATION_PASSES passed checks of user requests reinstate it. A failure on probation
# demotes it again.
PROBATION_PASSES = 3


class Pseudonyms:
    """Stable names for nodes within one entry process, unlinkable to peer ids outside it:
    HMAC with a random per-process key, so no table of peer id -> name can be precomputed."""

    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(32)

    def __call__(self, peer_id: str) -> str:
        return "node-" + hmac.new(self._key, peer_id.encode(), hashlib.sha256).hexdigest()[:6]


@dataclass
class NodeState:
    """What the entry knows of one node. Pure state plus bookkeeping, no I/O, so the router
    and its tests can build these directly. Times are monotonic seconds."""

    peer_id: str
    pseudonym: str
    advert: CapacityAdvert
    status: StatusReply | None = None
    ours_at_status: int = 0  # our in-flight count when `status` was taken
    # The most of our requests in flight since the pending status query was sent: the node
    # counted ours at some moment in between, and taking the peak keeps a request we had
    # just finished (its slot not yet freed when the node answered) from counting as someone
    # else's until the next status: a phantom busy slot that made requests wait ~1 s.
    in_flight_peak: int = 0
    status_at: float = 0.0  # monotonic time of the last status reply
    latency: float | None = None  # status round trip, smoothed (s)
    observed_tps: float | None = None  # decode speed we measured on our own requests
    in_flight: int = 0  # our requests running there now
    connected: bool = False  # status stream open and answering
    unreachable: bool = False  # our last dial failed: we wait for its connection to us
    leaving: bool = False
    present: bool = True  # holds an unexpired advert
    failures: int = 0  # consecutive; drives the cooldown
    total_failures: int = 0
    served: int = 0
    cooldown_until: float = 0.0
    reputation: float = REPUTATION_NEUTRAL
    last_seen: float = 0.0
    # Verification (entry/verify/verifier.py): counts, the latest verdict, and the models (sha256)
    # this node is demoted for.
    verified: int = 0
    verify_failed: int = 0
    verify_streak: int = 0  # > 0: passes in a row; < 0: failures in a row
    last_verdict: str | None = None
    demoted: set = field(default_factory=set, repr=False, compare=False)
    probation: set = field(default_factory=set, repr=False, compare=False)  # models (sha256) on probation
    probation_passes: int = 0  # passed checks of user requests since probation began
    # Cancel scopes of our generations' reads on this node, interrupted when its status
    # stream is lost, so a hung node is abandoned after status_timeout rather than after the
    # (much longer) token timeouts.
    interrupts: set = field(default_factory=set, repr=False, compare=False)

    @property
    def model_sha256(self) -> str:
        return self.advert.model_sha256

    @property
    def total_slots(self) -> int:
        return self.status.total_slots if self.status else self.advert.total_slots

    def busy_slots(self) -> int:
        """Our requests there plus everyone else's. The node's own count includes ours as of
        when it answered, so ours at that moment is taken out to avoid counting them twice."""
        if self.status is None:
            return self.in_flight
        theirs = self.status.total_slots - self.status.free_slots + self.status.queued - self.ours_at_status
        return self.in_flight + max(0, theirs)

    def free_slots(self) -> int:
        return max(0, self.total_slots - self.busy_slots())

    def decode_tps(self) -> float:
        """Our own measurement beats the node's claim; 0 = unknown."""
        if self.observed_tps:
            return self.observed_tps
        if self.status and self.status.decode_tps:
            return self.status.decode_tps
        return self.advert.decode_tps

    def reachability(self, private_mesh: bool = False) -> str:
        """How peers can reach this node, by its signed advert: "direct" (an address a
        dial-back confirmed; any address in a private mesh), "relayed" (only through a circuit
        relay), "unreachable-direct" (no address at all: only over its own connections)."""
        from transport.addrs import is_private, is_relayed

        addrs = self.advert.addrs
        if any(not is_relayed(a) and (private_mesh or not is_private(a)) for a in addrs):
            return "direct"
        if any(is_relayed(a) for a in addrs):
            return "relayed"
        return "unreachable-direct"

    def live(self) -> bool:
        """Serving, as far as we can tell (counted in /v1/models)."""
        return self.present and self.connected and not self.leaving and not (self.status and self.status.draining)

    def routable(self, now: float) -> bool:
        return (
            self.live()
            and self.status is not None
            and self.status.model_sha256 == self.advert.model_sha256
            and now >= self.cooldown_until
            and self.advert.model_sha256 not in self.demoted
        )

    def state(self, now: float) -> str:
        if not self.present:
            return "gone"
        if self.leaving or (self.status and self.status.draining):
            return "leaving"
        if not self.connected:
            return "cooldown" if now < self.cooldown_until else "connecting"
        if now < self.cooldown_until:
            return "cooldown"
        return "ready" if self.free_slots() > 0 else "busy"

    # -- bookkeeping --------------------------------------------------------------------

    def penalize(self, now: float, weight: float) -> None:
        """A failure: lower reputation and keep the node out for an exponentially growing
        cooldown, so a flapping node costs a few requests, not every one."""
        self.failures += 1
        self.total_failures += 1
        self.reputation *= 1.0 - weight
        self.cooldown_until = max(self.cooldown_until, now + min(COOLDOWN_MAX_S, COOLDOWN_BASE_S * 2 ** (self.failures - 1)))

    def hold(self, now: float, seconds: float) -> None:
        """Out of routing for a while without blame (it said busy)."""
        self.cooldown_until = max(self.cooldown_until, now + seconds)

    def succeeded(self) -> None:
        self.failures = 0
        self.served += 1
        self.reputation += 0.05 * (1.0 - self.reputation)

    def adjust_reputation(self, delta: float) -> None:
        """For verification (issue 5): positive rewards, negative punishes; kept in [0, 1]."""
        self.reputation = min(1.0, max(0.0, self.reputation + delta))

    def verdict(self, now: float, model_sha256: str, passed: bool, reason: str = "", canary: bool = False) -> None:
        """A verification outcome for work this node did on `model_sha256`."""
        if passed:
            self.verified += 1
            self.verify_streak = max(1, self.verify_streak + 1)
            self.last_verdict = "passed"
            self.adjust_reputation(REWARD_VERIFIED * (1.0 - self.reputation))
            self._passed_on_probation(model_sha256, canary)
        else:
            on_probation = model_sha256 in self.probation
            self.probation.discard(model_sha256)
            self.verify_failed += 1
            self.verify_streak = min(-1, self.verify_streak - 1)
            self.last_verdict = f"failed: {reason}" if reason else "failed"
            self.penalize(now, PENALTY_VERIFY_FAILED)
            if -self.verify_streak >= DEMOTE_AFTER or on_probation:
                self.demoted.add(model_sha256)

    def _passed_on_probation(self, model_sha256: str, canary: bool) -> None:
        """Demoted -> (REINSTATE_AFTER passes in a row) probation -> (PROBATION_PASSES passed
        user requests) reinstated; see PROBATION_PASSES."""
        if model_sha256 in self.demoted and self.verify_streak >= REINSTATE_AFTER:
            self.demoted.discard(model_sha256)
            self.probation.add(model_sha256)
            self.probation_passes = 0
        elif model_sha256 in self.probation and not canary:
            self.probation_passes += 1
            if self.probation_passes >= PROBATION_PASSES:
                self.probation.discard(model_sha256)

    def observe_speed(self, tps: float) -> None:
        self.observed_tps = tps if self.observed_tps is None else (1 - _SPEED_EWMA) * self.observed_tps + _SPEED_EWMA * tps

    def update_status(self, reply: StatusReply, rtt: float | None) -> None:
        self.status = reply
        self.ours_at_status = max(self.in_flight, self.in_flight_peak)
        self.in_flight_peak = self.in_flight
        self.status_at = time.monotonic()
        self.connected = True
        if rtt is not None:
            self.latency = rtt if self.latency is None else (1 - _LATENCY_EWMA) * self.latency + _LATENCY_EWMA * rtt


class _Lost(Exception):
    """The status stream to a node ended; `blame` says whether that counts against it."""

    def __init__(self, reason: str, blame: bool = True, dead_link: bool = False):
        super().__init__(reason)
        self.blame = blame
        self.dead_link = dead_link  # no answer at all: the connection is presumed dead


class MeshView:
    """Discovery loop + one status watcher per node. Start it with `await nursery.start(view.run)`:
    that returns after the first discovery round. Everything else is synchronous reads of
    the current state, safe from any task of the same trio run."""

    def __init__(
        self,
        host: MeshHost,
        *,
        discovery_interval: float = 1.5,
        discovery_timeout: float = 5.0,
        status_interval: float = 1.0,
        status_timeout: float = 3.0,
        dial_timeout: float = 5.0,
        advert_reuse_for: float = 5.0,
        pseudonyms: Pseudonyms | None = None,
    ):
        self.host = host
        self.discovery_interval = discovery_interval
        self.discovery_timeout = discovery_timeout
        self.status_interval = status_interval
        self.status_timeout = status_timeout
        self.dial_timeout = dial_timeout
        # Liveness comes from the status streams; adverts are re-fetched only when they near
        # expiry, which saves one DHT lookup per node per round.
        self.advert_reuse_for = advert_reuse_for
        self.pseudonym = pseudonyms or Pseudonyms()
        self._book = AdvertBook()
        self._nodes: dict[str, NodeState] = {}
        self._watchers: dict[str, trio.CancelScope] = {}
        self._left_at: dict[str, float] = {}
        self.model_first_seen: dict[str, float] = {}  # sha256 -> unix time
        self._changed = trio.Event()
        # Called synchronously on every notify: the admission queue (entry/mesh/queue.py)
        # hands a freed slot to its next waiter in the same instant.
        self.listeners: list[Callable[[], None]] = []
        self._nursery: trio.Nursery | None = None
        self.rounds = 0
        self.last_round_s = 0.0  # how long the latest discovery round took

    # -- reading the view ------------------------------------------------------------------

    def nodes(self) -> list[NodeState]:
        return [n for n in self._nodes.values() if n.present]

    def all_nodes(self) -> list[NodeState]:
        """Including nodes gone recently (their reputation is remembered for a while)."""
        return list(self._nodes.values())

    def node(self, peer_id: str) -> NodeState | None:
        n = self._nodes.get(peer_id)
        return n if n is not None and n.present else None

    def track(self, node: NodeState) -> NodeState:
        """Add a node learnt by other means than discovery (tests, a static node list); its
        state is then the caller's to keep current."""
        self._nodes[node.peer_id] = node
        self.notify()
        return node

    def by_pseudonym(self, pseudonym: str) -> NodeState | None:
        return next((n for n in self.nodes() if n.pseudonym == pseudonym), None)

    async def wait_changed(self, timeout: float) -> None:
        """Until a node's state changes (new status, slot freed, node added/lost) or timeout."""
        with trio.move_on_after(max(0.0, timeout)):
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not take down the status watcher that notified
                log.exception("view listener failed")

    # -- what the backend reports -----------------------------------------------------------

    def acquire(self, node: NodeState) -> None:
        node.in_flight += 1
        node.in_flight_peak = max(node.in_flight_peak, node.in_flight)

    def release(self, node: NodeState) -> None:
        node.in_flight = max(0, node.in_flight - 1)
        self.notify()

    def mark_leaving(self, node: NodeState) -> None:
        if not node.leaving:
            node.leaving = True
            log.info("node leaving", extra={"node": node.pseudonym})
            self.notify()

    def drop(self, node: NodeState, weight: float, reason: str) -> None:
        """A node failed us (died mid-stream, went silent, broke the protocol): out of
        routing now, and its status stream is restarted after the cooldown."""
        node.penalize(time.monotonic(), weight)
        node.connected = False
        scope = self._watchers.get(node.peer_id)
        if scope is not None:
            scope.cancel()
        log.info("node dropped", extra={"node": node.pseudonym, "reason": reason,
                                        "cooldown_s": round(node.cooldown_until - time.monotonic(), 1)})
        self.notify()

    def record_verdict(self, peer_id: str, model_sha256: str, passed: bool, reason: str = "",
                       canary: bool = False) -> NodeState | None:
        """Apply a verification outcome (the node may have left since: its state is kept a
        while, so the verdict still counts when it comes back)."""
        node = self._nodes.get(peer_id)
        if node is None:
            return None
        was_demoted = model_sha256 in node.demoted
        node.verdict(time.monotonic(), model_sha256, passed, reason, canary)
        if was_demoted != (model_sha256 in node.demoted):
            log.warning("node demoted" if not was_demoted else "node on probation",
                        extra={"node": node.pseudonym, "model": model_sha256[:12]})
        self.notify()
        return node

    def interrupt(self, node: NodeState) -> None:
        """Its status stream was lost: wake our generations waiting on it to check on theirs."""
        node.connected = False
        for scope in list(node.interrupts):
            scope.cancel()

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Adverts other peers store at us (we are one of the DHT servers closest to their
            # key) are seen at once: a new node is routable well before the next round.
            if hasattr(self.host, "on_value_stored"):
                self.host.on_value_stored(self._value_stored)
            if hasattr(self.host, "on_peer_connected"):
                self.host.on_peer_connected(self._peer_connected)
            await self.refresh()
            task_status.started()
            while True:
                await trio.sleep(self.discovery_interval)
                await self.refresh()

    async def refresh(self) -> None:
        """One discovery round: fetch adverts, start watchers for new nodes, drop expired ones."""
        t0 = time.monotonic()
        try:
            adverts = await discover_all(self.host, timeout=self.discovery_timeout, book=self._book,
                                         reuse_for=self.advert_reuse_for)
        except Exception:  # a failed lookup must not stop the loop; last round's adverts stand
            log.warning("discovery round failed", exc_info=True)
            adverts = []
        now = time.monotonic()
        self.last_round_s = now - t0
        log.debug("discovery round", extra={"seconds": round(self.last_round_s, 3), "adverts": len(adverts)})
        for adv in adverts:
            if adv.node != self.host.peer_id:
                self._saw(adv, now)
        self._expire(now)
        self.rounds += 1
        self.notify()

    def _value_stored(self, key: str, value: bytes) -> None:
        if not key.startswith(ADVERT_KEY_PREFIX):
            return
        try:
            verify_advert_for_key(key, value)  # the key names the signer
            adv = self._book.accept(value)
        except RecordError:
            return  # older than what we hold (a replay or a lagging copy), or not valid now
        if adv.node == self.host.peer_id:
            return
        self._saw(adv, time.monotonic())
        self.notify()

    def _saw(self, adv: CapacityAdvert, now: float) -> None:
        node = self._nodes.get(adv.node)
        if node is None:
            node = NodeState(adv.node, self.pseudonym(adv.node), adv)
            self._nodes[adv.node] = node
            log.info("node discovered", extra={"node": node.pseudonym, "model": adv.model_name})
        elif node.advert.model_sha256 != adv.model_sha256:
            # Same peer, another model (it restarted): what we knew of it no longer holds.
            node.status, node.observed_tps = None, None
        node.advert, node.present, node.last_seen = adv, True, now
        self.model_first_seen.setdefault(adv.model_sha256, time.time())
        left = self._left_at.get(adv.node)
        if left is not None and now - left < LEFT_COOLDOWN_S:
            return
        if adv.node not in self._watchers and now >= node.cooldown_until and self._nursery is not None:
            self._left_at.pop(adv.node, None)
            scope = trio.CancelScope()
            self._watchers[adv.node] = scope
            self._nursery.start_soon(self._watch, node, scope)

    def _peer_connected(self, peer_id: str) -> None:
        """A connection to `peer_id` opened. A node we could not dial (NAT) has just reached
        us: watch it now over that connection, not after its dial cooldown."""
        node = self._nodes.get(peer_id)
        if node is None or not node.present or peer_id in self._watchers or self._nursery is None:
            return
        left = self._left_at.get(peer_id)
        if left is not None and time.monotonic() - left < LEFT_COOLDOWN_S:
            return
        if node.unreachable:
            node.cooldown_until = 0.0
        if time.monotonic() >= node.cooldown_until:
            scope = trio.CancelScope()
            self._watchers[peer_id] = scope
            self._nursery.start_soon(self._watch, node, scope)

    async def _check_link(self, peer_id: str) -> None:
        """Status went unanswered: if a ping over the same connection fails too, the link is
        dead (a slow or hung node still answers pings, and its generations keep running)."""
        try:
            await self.host.ping(peer_id, timeout=self.status_timeout + 2.0)
        except DialError:
            log.info("connection to node dead: closing it", extra={"node": self.pseudonym(peer_id)})
            await self.host.disconnect(peer_id)

    def _still_answering(self, node: NodeState, now: float) -> bool:
        """Its advert ran out but its status stream answered lately: it is alive (see
        ADVERT_GRACE_S)."""
        return (node.connected and now - node.status_at <= self.status_timeout
                and time.time() <= node.advert.expires_at + ADVERT_GRACE_S)

    def _expire(self, now: float) -> None:
        for peer, node in list(self._nodes.items()):
            if node.present and self._book.current(peer) is None and not self._still_answering(node, now):
                node.present = node.connected = False
                scope = self._watchers.get(peer)
                if scope is not None:
                    scope.cancel()
                log.info("node gone: advert expired", extra={"node": node.pseudonym})
            elif not node.present and now - node.last_seen > FORGET_AFTER_S:
                del self._nodes[peer]
                self._book.forget(peer)

    # -- one node's status stream ------------------------------------------------------------

    async def _watch(self, node: NodeState, scope: trio.CancelScope) -> None:
        lost: _Lost | None = None
        try:
            with scope:
                try:
                    # No advert addresses (module doc).
                    stream = await self.host.open_stream(node.peer_id, INFER_PROTOCOL_ID, timeout=self.dial_timeout)
                except DialError:
                    node.unreachable = True
                    raise _Lost("unreachable") from None
                node.unreachable = False
                node.leaving = False  # a fresh stream: whatever it says now is what counts
                try:
                    await self._converse(node, stream)
                finally:
                    with trio.move_on_after(1.0) as cs:
                        cs.shield = True
                        await stream.reset()
        except _Lost as e:
            lost = e
        except Exception as e:  # a bug here must cost one node's view, not the entry
            log.exception("status watcher failed", extra={"node": node.pseudonym})
            lost = _Lost(f"watcher failed: {type(e).__name__}")
        finally:
            if self._watchers.get(node.peer_id) is scope:
                del self._watchers[node.peer_id]
            was_connected, node.connected = node.connected, False
            if lost is not None and not scope.cancel_called:
                if node.leaving or not lost.blame:
                    self._left_at[node.peer_id] = time.monotonic()
                    log.info("node left", extra={"node": node.pseudonym})
                else:
                    if lost.dead_link and hasattr(self.host, "ping") and self._nursery is not None:
                        self._nursery.start_soon(self._check_link, node.peer_id)
                    node.penalize(time.monotonic(), PENALTY_DISCONNECT)
                    # Fetch its advert afresh next round: it may have restarted elsewhere.
                    self._book.forget(node.peer_id)
                    self.interrupt(node)
                    log.info("node lost", extra={"node": node.pseudonym, "reason": str(lost), "was_connected": was_connected})
            self.notify()

    async def _converse(self, node: NodeState, stream) -> None:
        reader, writer = FrameReader(stream), FrameWriter(stream)
        sent: deque[float] = deque()  # send times of unanswered queries, oldest first

        async def ask() -> None:
            while True:
                if sent and time.monotonic() - sent[0] > self.status_timeout:
                    raise _Lost(f"no status answer in {self.status_timeout:.1f}s", dead_link=True)
                if not sent:
                    node.in_flight_peak = node.in_flight  # a new window for the answer
                sent.append(time.monotonic())
                try:
                    await writer.write_frame(to_wire(StatusQuery()))
                except StreamClosed:
                    raise _Lost("status stream broke") from None
                await trio.sleep(min(self.status_interval, self.status_timeout / 2))

        async def listen() -> None:
            while True:
                try:
                    msg = await read_status(reader, on_leaving=lambda _: self.mark_leaving(node))
                except StreamBroken as e:
                    if e.clean:
                        raise _Lost("status stream closed", blame=not node.leaving) from None
                    raise _Lost("status stream reset") from None
                except ProtocolError as e:
                    raise _Lost(f"protocol violation: {e}") from None
                except NodeError as e:
                    raise _Lost(f"node answered {e.code}") from None
                rtt = time.monotonic() - sent.popleft() if sent else None
                first = not node.connected
                node.update_status(msg, rtt)
                if msg.draining:
                    self.mark_leaving(node)
                if first:
                    log.info("node routable", extra={"node": node.pseudonym, "slots": msg.total_slots})
                self.notify()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                nursery.start_soon(listen)
        except BaseExceptionGroup as group:
            # trio wraps a task's exception in a group; the first _Lost is the reason.
            lost = group.subgroup(_Lost)
            if lost is None:
                raise
            while isinstance(lost, BaseExceptionGroup):
                lost = lost.exceptions[0]
            raise lost from None
