"""discover_model / publish_advert with real libp2p hosts in this process (127.0.0.1)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID

from protocol.errors import RecordError
from protocol.identity import Identity
from protocol.records import AdvertBook, CapacityAdvert
from transport.dht_keys import advert_key, directory_key, model_key
from transport.discovery import discover_all, discover_model, next_advert_seq, publish_advert
from transport.host import open_mesh_host

MODEL = "aa" * 32
OTHER_MODEL = "bb" * 32


@asynccontextmanager
async def node_and_entry(ident: Identity):
    """A bootstrap peer, a DHT server with `ident` (the node) and a client-only host (the entry)."""
    async with open_mesh_host(Identity.generate()) as boot:
        async with (
            open_mesh_host(ident, bootstrap=boot.listen_addrs) as node,
            open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs, dht_server=False) as entry,
        ):
            yield node, entry


def make_advert(identity: Identity, host, *, model: str = MODEL, ttl: float = 15.0, seq: int | None = None) -> CapacityAdvert:
    now = time.time()
    return CapacityAdvert(
        node=identity.peer_id, model_sha256=model, model_name="m", quantization="Q4_0",
        context_size=2048, prefill_tps=1.0, decode_tps=1.0, total_slots=2, free_slots=1,
        seq=next_advert_seq() if seq is None else seq, issued_at=now, expires_at=now + ttl, addrs=host.listen_addrs,
    )


async def test_publish_then_discover_and_addresses_learned():
    ident = Identity.generate()
    async with node_and_entry(ident) as (node, entry):
        with trio.fail_after(20):
            assert await publish_advert(node, ident, make_advert(ident, node)) >= 1
            found = await discover_model(entry, MODEL, timeout=5)
        assert [a.node for a in found] == [ident.peer_id]
        assert found[0].free_slots == 1 and found[0].addrs == node.listen_addrs
        assert entry.known_addrs(ident.peer_id)  # ready to dial
        with trio.fail_after(10):
            assert await discover_model(entry, OTHER_MODEL, timeout=3) == []


async def test_advert_for_another_model_is_not_returned():
    ident = Identity.generate()
    async with node_and_entry(ident) as (node, entry):
        with trio.fail_after(20):
            # Claims MODEL in the provider records but signs an advert for OTHER_MODEL.
            await node.put_value(advert_key(ident.peer_id), make_advert(ident, node, model=OTHER_MODEL).sign(ident))
            assert await node.provide(model_key(MODEL))
            assert [p.peer_id for p in await entry.find_providers(model_key(MODEL), timeout=5)] == [ident.peer_id]
            assert await discover_model(entry, MODEL, timeout=5) == []


async def test_forged_advert_refused_by_us_and_by_storers():
    victim, evil = Identity.generate(), Identity.generate()
    async with open_mesh_host(Identity.generate()) as boot:
        async with open_mesh_host(evil, bootstrap=boot.listen_addrs) as bad:
            key = advert_key(victim.peer_id)
            forged = make_advert(evil, bad).sign(evil)  # evil's advert under victim's key
            with trio.fail_after(10):
                with pytest.raises(RecordError):
                    await bad.put_value(key, forged)
                # Bypassing our own check: the storer runs the same validator and refuses.
                stored = await bad._dht.value_store._store_at_peer(ID.from_base58(boot.peer_id), key.encode(), forged)
            assert not stored
            assert boot._dht.value_store.get(key.encode()) is None


async def test_expired_advert_is_dropped():
    ident = Identity.generate()
    async with node_and_entry(ident) as (node, entry):
        with trio.fail_after(20):
            await publish_advert(node, ident, make_advert(ident, node, ttl=15))
            assert len(await discover_model(entry, MODEL, timeout=5)) == 1
            # As seen from 16 s later: the advert has expired.
            assert await discover_model(entry, MODEL, now=time.time() + 16, timeout=5) == []


async def test_node_that_stops_refreshing_drops_out():
    ident = Identity.generate()
    ttl = 1.5
    async with open_mesh_host(Identity.generate()) as boot:
        async with open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs, dht_server=False) as entry:
            async with open_mesh_host(ident, bootstrap=boot.listen_addrs) as node:
                with trio.fail_after(20):
                    await publish_advert(node, ident, make_advert(ident, node, ttl=ttl))
                    assert [a.node for a in await discover_model(entry, MODEL, timeout=5)] == [ident.peer_id]
            # The node is gone (its provider record stays behind at the storers).
            with trio.fail_after(ttl + 15):
                while await discover_model(entry, MODEL, timeout=3):
                    await trio.sleep(0.2)


async def test_discover_all_lists_every_model_and_only_directory_providers():
    a, b, hidden = Identity.generate(), Identity.generate(), Identity.generate()
    async with open_mesh_host(Identity.generate()) as boot:
        async with (
            open_mesh_host(a, bootstrap=boot.listen_addrs) as node_a,
            open_mesh_host(b, bootstrap=boot.listen_addrs) as node_b,
            open_mesh_host(hidden, bootstrap=boot.listen_addrs) as node_h,
            open_mesh_host(Identity.generate(), bootstrap=boot.listen_addrs, dht_server=False) as entry,
        ):
            with trio.fail_after(30):
                await publish_advert(node_a, a, make_advert(a, node_a, model=MODEL))
                await publish_advert(node_b, b, make_advert(b, node_b, model=OTHER_MODEL))
                # An advert and a model key but no directory record (an older node): not listed.
                await node_h.put_value(advert_key(hidden.peer_id), make_advert(hidden, node_h).sign(hidden))
                assert await node_h.provide(model_key(MODEL))
                found = await discover_all(entry, timeout=5)
                assert {(x.node, x.model_sha256) for x in found} == {(a.peer_id, MODEL), (b.peer_id, OTHER_MODEL)}
                assert entry.known_addrs(a.peer_id) and entry.known_addrs(b.peer_id)
                # The per-model lookup is unchanged.
                assert {x.node for x in await discover_model(entry, MODEL, timeout=5)} == {a.peer_id, hidden.peer_id}
                # Seen from after the adverts expired: nobody.
                assert await discover_all(entry, now=time.time() + 16, timeout=5) == []


async def test_discover_all_with_a_book_keeps_the_newer_advert_over_a_replayed_one():
    a = Identity.generate()
    async with node_and_entry(a) as (node, entry):
        book = AdvertBook()
        newer = make_advert(a, node, seq=200)
        book.accept(newer.sign(a))  # seen in an earlier round
        with trio.fail_after(30):
            # The network only holds an older (lower seq) advert: a replay, or a lagging storer.
            await publish_advert(node, a, make_advert(a, node, seq=100, ttl=60))
            assert await node.find_providers(directory_key(), timeout=5)
            found = await discover_all(entry, timeout=5, book=book)
            assert [x.seq for x in found] == [200]
            # Once the newer one has expired, the older (still unexpired) one is refused
            # as a replay rather than resurrected.
            assert await discover_all(entry, now=newer.expires_at + 1, timeout=5, book=book) == []


async def test_discover_all_reuses_fresh_adverts_from_the_book_without_a_lookup():
    a = Identity.generate()
    async with node_and_entry(a) as (node, entry):
        book = AdvertBook()
        with trio.fail_after(30):
            await publish_advert(node, a, make_advert(a, node, seq=100, ttl=15))
            assert [x.seq for x in await discover_all(entry, timeout=5, book=book)] == [100]
            await publish_advert(node, a, make_advert(a, node, seq=101, ttl=15))
            # Still valid 5 s from now: the book's copy is used, the network is not asked.
            assert [x.seq for x in await discover_all(entry, timeout=5, book=book, reuse_for=5)] == [100]
            # Not valid 20 s from now: fetched again, and the newer advert is found.
            assert [x.seq for x in await discover_all(entry, timeout=5, book=book, reuse_for=20)] == [101]
