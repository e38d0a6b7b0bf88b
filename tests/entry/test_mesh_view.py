"""The entry's mesh view under load (issue 6): no phantom busy slots from status races, no
live node dropped because its DHT advert refresh came late, and adverts stored at the entry
seen at once. Pure bookkeeping with a stand-in host; no network."""

from __future__ import annotations

import time

from entry.mesh.view import ADVERT_GRACE_S, MeshView, NodeState
from protocol.identity import Identity
from protocol.messages import StatusReply
from protocol.records import CapacityAdvert
from transport.dht_keys import advert_key

SHA = "ab" * 32


class FakeHost:
    peer_id = "entry-peer"

    def __init__(self):
        self.listeners = []
        self.learnt = {}

    def on_value_stored(self, fn):
        self.listeners.append(fn)

    def learn_addrs(self, peer, addrs):
        self.learnt[peer] = list(addrs)


def status(total: int, free: int) -> StatusReply:
    return StatusReply(SHA, "m", total, free, 0, 8, 0.0, 0.0, 0, False, 2048)


def advert(identity: Identity, *, ttl: float = 20.0, seq: int | None = None) -> bytes:
    now = time.time()
    return CapacityAdvert(node=identity.peer_id, model_sha256=SHA, model_name="m", quantization="Q4_0",
                          context_size=2048, prefill_tps=1.0, decode_tps=1.0, total_slots=2, free_slots=2,
                          seq=seq or int(now * 1e6), issued_at=now, expires_at=now + ttl,
                          addrs=["/ip4/127.0.0.1/tcp/4001"]).sign(identity)


def test_a_request_finished_while_the_status_was_in_flight_is_no_phantom_busy_slot():
    view = MeshView(FakeHost())
    adv = CapacityAdvert.verify(advert(Identity.generate()))
    n = NodeState(adv.node, "node-x", adv)
    n.update_status(status(2, 2), 0.001)
    view.acquire(n)
    view.acquire(n)
    n.in_flight_peak = n.in_flight  # a status query leaves now, with 2 of ours running
    view.release(n)  # one of ours ends before the node answers...
    n.update_status(status(2, 0), 0.001)  # ...and the node had not freed its slot yet
    assert n.busy_slots() == 1 and n.free_slots() == 1  # only ours: nobody else's request
    view.release(n)
    assert n.free_slots() == 2


def test_value_stored_at_the_entry_makes_a_node_known_at_once():
    host = FakeHost()
    view = MeshView(host)
    view.host.on_value_stored(view._value_stored)
    ident = Identity.generate()
    blob = advert(ident)
    view._value_stored(advert_key(ident.peer_id), blob)
    node = view.node(ident.peer_id)
    assert node is not None and node.model_sha256 == SHA
    # Its advert's addresses are the signer's claim: never handed to libp2p to dial.
    assert ident.peer_id not in host.learnt
    # Another peer's advert under this key, a replay and foreign keys are ignored.
    other = Identity.generate()
    view._value_stored(advert_key(ident.peer_id), advert(other))
    view._value_stored("/other-namespace/x", blob)
    assert view.node(other.peer_id) is None
    old = advert(ident, seq=1)
    view._value_stored(advert_key(ident.peer_id), old)
    assert view.node(ident.peer_id).advert.seq > 1


def test_a_node_still_answering_status_outlives_its_advert_for_a_grace_period():
    view = MeshView(FakeHost(), status_timeout=3.0)
    ident = Identity.generate()
    view._value_stored(advert_key(ident.peer_id), advert(ident, ttl=0.2))
    node = view.node(ident.peer_id)
    node.update_status(status(2, 2), 0.001)
    time.sleep(0.3)  # the advert has expired and no refresh came
    view._expire(time.monotonic())
    assert view.node(ident.peer_id) is not None  # its status stream answers: kept
    node.status_at -= 10  # ... but not once it stopped answering
    view._expire(time.monotonic())
    assert view.node(ident.peer_id) is None


def test_the_grace_period_is_bounded():
    view = MeshView(FakeHost(), status_timeout=3.0)
    ident = Identity.generate()
    view._value_stored(advert_key(ident.peer_id), advert(ident, ttl=0.2))
    node = view.node(ident.peer_id)
    node.update_status(status(2, 2), 0.001)
    time.sleep(0.3)
    node.advert.expires_at -= ADVERT_GRACE_S  # its advert ran out longer ago than the grace
    view._expire(time.monotonic())
    assert view.node(ident.peer_id) is None
