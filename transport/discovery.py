"""Finding nodes that serve a model, and announcing that we do.

Provider records only say "this peer once served model M": storers keep them for
minutes (p2p.PROVIDER_RECORD_TTL_S) whether or not the peer is alive. Liveness comes
from the signed CapacityAdvert, which expires after seconds and is refreshed by a running
node: a killed node drops out of discovery once its last advert expires, i.e. within
ADVERT_TTL_S plus one lookup.

Every serving node also provides the directory key (dht_keys.directory_key), so an entry can
find all live nodes, and with their adverts all models, without knowing any model digest.
"""

from __future__ import annotations

import logging
import time

import trio

from protocol.errors import RecordError
from protocol.identity import Identity
from protocol.records import AdvertBook, CapacityAdvert
from transport.dht_keys import advert_key, directory_key, entry_key, model_key
from transport.host import MeshHost, PeerAddrs

log = logging.getLogger("mesh.discovery")

# What a node should use (node/ builds the adverts). Refresh at least twice per lifetime so
# one lost put does not make a live node disappear.
ADVERT_TTL_S = 15.0
ADVERT_REFRESH_S = 5.0
# Re-announce provider records this often: cheap, and keeps new storers (and storers that
# restarted) informed well within PROVIDER_RECORD_TTL_S. The provide rate limiter in p2p
# holds it under the storers' ADD_PROVIDER limit whatever the caller asks.
REPROVIDE_INTERVAL_S = 30.0


def next_advert_seq() -> int:
    """A sequence number that keeps growing across restarts. Storers keep the advert with
    the highest seq until it expires, so a node that restarted with seq=1 would be shadowed
    by its own previous advert; microseconds since the epoch avoid that."""
    return time.time_ns() // 1000


async def publish_advert(
    host: MeshHost,
    identity: Identity,
    advert: CapacityAdvert,
    *,
    reprovide_interval: float = REPROVIDE_INTERVAL_S,
    timeout: float = 10.0,
    replicate: bool = True,
) -> int:
    """Store our signed advert and (if due) re-provide the model key and the directory key.

    replicate=False refreshes only our own copy: readers ask the owner first, so the copies
    at the storers need refreshing only before they expire, not on every refresh.
    Returns how many remote peers accepted the advert: 0 means nobody else can see us yet
    (alone in the mesh, or every storer refused it), and always 0 without replicate."""
    blob = advert.sign(identity)
    if replicate:
        stored = await host.put_value(advert_key(identity.peer_id), blob, timeout=timeout)
    else:
        host.store_local(advert_key(identity.peer_id), blob)
        stored = 0
    # Two provides per reprovide_interval; host.provide() paces them under the storers'
    # ADD_PROVIDER limit, and skips each until it is due again.
    await host.provide(model_key(advert.model_sha256), min_interval=reprovide_interval)
    await host.provide(directory_key(), min_interval=reprovide_interval)
    return stored


async def discover_model(
    host: MeshHost,
    model_sha256: str,
    *,
    now: float | None = None,
    timeout: float = 10.0,
    max_providers: int = 100,
) -> list[CapacityAdvert]:
    """Live nodes serving the model, each with a verified advert (signed by that node, for
    this model, unexpired). The adverts' addresses are informational only: streams go where
    libp2p itself learnt the node to be (see entry/mesh/view.py)."""
    deadline = trio.current_time() + timeout
    providers = await host.find_providers(model_key(model_sha256), count=max_providers, timeout=timeout / 2)
    return await _verified_adverts(host, providers, deadline, now=now, model_sha256=model_sha256)


async def discover_all(
    host: MeshHost,
    *,
    now: float | None = None,
    timeout: float = 10.0,
    max_providers: int = 200,
    book: AdvertBook | None = None,
    reuse_for: float = 0.0,
) -> list[CapacityAdvert]:
    """Every live node in the mesh, whatever its model, each with a verified advert.

    With `book`, adverts also pass its replay check; a node whose fetched advert is older
    than one already seen (a lagging storer answered this time) keeps its newer advert from
    the book while that is unexpired, rather than vanishing for a round. An advert in the
    book still valid `reuse_for` seconds from now is reused without a lookup: a caller that
    polls often (an entry) then fetches each advert about once per lifetime, not per round."""
    deadline = trio.current_time() + timeout
    providers = await host.find_providers(directory_key(), count=max_providers, timeout=timeout / 2)
    return await _verified_adverts(host, providers, deadline, now=now, book=book, reuse_for=reuse_for)


async def _verified_adverts(
    host: MeshHost,
    providers: list[PeerAddrs],
    deadline: float,
    *,
    now: float | None = None,
    model_sha256: str | None = None,
    book: AdvertBook | None = None,
    reuse_for: float = 0.0,
) -> list[CapacityAdvert]:
    found: dict[str, CapacityAdvert] = {}
    limiter = trio.CapacityLimiter(8)
    t_now = time.time() if now is None else now

    async def check(p: PeerAddrs) -> None:
        if book is not None and reuse_for > 0:
            kept = book.current(p.peer_id, now=t_now + reuse_for)
            if kept is not None:
                found[p.peer_id] = kept
                return
        async with limiter:
            blob = await host.get_value(advert_key(p.peer_id), timeout=max(0.5, deadline - trio.current_time()))
        if blob is None:
            return
        try:
            adv = CapacityAdvert.verify(blob, now=now, node=p.peer_id, model_sha256=model_sha256)
            if book is not None:
                adv = book.accept(blob, now=now)
        except RecordError as e:
            kept = book.current(p.peer_id, now=now) if book is not None else None
            if kept is None:
                log.debug("advert of %s rejected: %s", p.peer_id, e)
                return
            adv = kept
        # adv.addrs are not fed to the host: they are the signer's claim, and dialling them
        # would let any identity point us at any host:port (entry/mesh/view.py).
        found[p.peer_id] = adv

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for p in providers:
                nursery.start_soon(check, p)
    order = {p.peer_id: i for i, p in enumerate(providers)}
    return sorted(found.values(), key=lambda a: order.get(a.node, 0))


async def announce_entry_loop(host: MeshHost, *, interval: float = REPROVIDE_INTERVAL_S) -> None:
    """An entry's standing announcement (runs until cancelled): entries are public by
    definition, and nodes keep connections to the ones they find here (transport/links.py)."""
    while True:
        try:
            await host.provide(entry_key(), min_interval=interval)
        except Exception as e:  # a failed provide is retried next time round
            log.debug("entry announcement failed: %s", e)
        await trio.sleep(interval)


async def find_entries(host: MeshHost, *, timeout: float = 10.0, count: int = 50) -> list[PeerAddrs]:
    """Entries announced in the DHT, with the addresses their provider records name."""
    return await host.find_providers(entry_key(), count=count, timeout=timeout)
