"""The view and a node it can't dial (behind NAT): it waits for the node's own connection and
watches the node the moment that connection arrives, not after its dial cooldown."""

from __future__ import annotations

import time

import trio

from entry.mesh.view import MeshView
from protocol.records import CapacityAdvert
from tests.support.mesh_fakes import FakeHost
from tests.support.node_harness import make_service


class NatFakeHost(FakeHost):
    def __init__(self, nursery):
        super().__init__(nursery)
        self.listeners = []
        self.private_mesh = False

    def on_peer_connected(self, fn) -> None:
        self.listeners.append(fn)

    def peer_connects(self, peer_id: str, handler) -> None:
        self.handlers[peer_id] = handler
        for fn in self.listeners:
            fn(peer_id)


async def test_unreachable_node_watched_as_soon_as_it_connects(tiny_gguf):
    service = make_service(tiny_gguf)
    peer = service.identity.peer_id
    async with trio.open_nursery() as nursery:
        host = NatFakeHost(nursery)
        view = MeshView(host, discovery_interval=3600, status_interval=0.2, status_timeout=2.0)
        view.refresh = lambda: trio.sleep(0)  # no DHT here: the advert arrives below
        await nursery.start(view.run)
        now = time.time()
        adv = CapacityAdvert(node=peer, model_sha256=service.model_sha256, model_name="tiny", quantization="F32",
                             context_size=service.context_size, prefill_tps=0.0, decode_tps=0.0, total_slots=1,
                             free_slots=1, seq=1, issued_at=now, expires_at=now + 3600)
        view._saw(adv, time.monotonic())  # discovered; the dial fails: nothing to dial
        with trio.fail_after(5):
            while not view._nodes[peer].unreachable:
                await trio.sleep(0.01)
        node = view._nodes[peer]
        assert not node.connected and node.cooldown_until > time.monotonic()
        assert node.reachability() == "unreachable-direct"
        t0 = time.monotonic()
        host.peer_connects(peer, service.handle_stream)
        with trio.fail_after(5):
            while not node.connected:
                await trio.sleep(0.01)
        assert time.monotonic() - t0 < 1.0 and not node.unreachable
        nursery.cancel_scope.cancel()
