"""The node daemon: load the model, measure it, join the mesh, serve, and leave cleanly.

Lifecycle: fetch the model from the mesh if --model names one (node/model_fetch.py) ->
inspect + load (progress logged) -> self-benchmark -> libp2p host + DHT ->
advertise on a period -> serve /mesh/infer/1 -> on SIGINT/SIGTERM/`mesh node stop`: refuse new
work, tell entries, let in-flight work finish within the grace period, cancel the rest, exit 0.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import trio

from engine.model_file import ModelFileError, ModelInfo, bundled_model_path, file_manifest, inspect_model
from node.admission import Admission
from node.config import NodeConfig
from node.control import serve_control
from node.model_fetch import parse_model_spec
from node.model_share import ModelShare
from node.receipt_log import FILE_NAME as RECEIPTS_FILE
from node.receipt_log import ReceiptLog
from node.service import NodeService, NodeStats, buffer_budget
from protocol import INFER_PROTOCOL_ID
from protocol.identity import Identity
from protocol.model_transfer import MODEL_PROTOCOL_ID
from protocol.records import CapacityAdvert
from runtime import ready_file
from runtime.heap import freeze_startup_heap

log = logging.getLogger("mesh.node")
# How long a stopping node waits for requesters to take the last frames of finished
# generations (they close the stream after the final frame).
FLUSH_WAIT_S = 5.0
# How often a node re-checks that it is directly reachable (a dial-back from entries).
REACH_INTERVAL_S = 600.0
# A node nobody can dial that holds no relay slot asks for one again after this, doubling up to
# the maximum (see _reach_loop).
RELAY_RETRY_MIN_S = 2.0
RELAY_RETRY_MAX_S = 60.0


class NodeStartError(Exception):
    """A reason the node cannot start, shown as one line."""


def resolve_model(cfg: NodeConfig) -> ModelInfo:
    if cfg.synthetic:
        from engine.synthetic import synthetic_info

        return synthetic_info(cfg.synthetic, cfg.ctx)
    path = Path(cfg.model) if cfg.model else bundled_model_path()
    log.debug("checking model file", extra={"path": str(path)})
    return inspect_model(path)


def load_engines(cfg: NodeConfig, info: ModelInfo) -> list:
    """The node's admission workers, one per slot. A real model is loaded once (weights, and
    with --gpu-layers their VRAM copy, whatever --slots is): the slots are sequences of one
    batched llama.cpp context (engine/batched.py)."""
    if cfg.synthetic:
        from engine.synthetic import SyntheticEngine

        log.info("synthetic engine: no model is loaded", extra={"model": cfg.synthetic, "rate": cfg.synthetic_rate})
        return [SyntheticEngine(cfg.synthetic, rate=cfg.synthetic_rate, n_ctx=cfg.ctx) for _ in range(cfg.slots)]
    from engine.batched import BatchedEngine

    t0 = time.perf_counter()
    threads, threads_batch = cfg.llama_threads()
    log.info("loading model", extra={"model": info.name, "threads": threads, "threads_batch": threads_batch,
                                     "gpu_layers": cfg.gpu_layers,
                                     "slots": cfg.slots, "prefix_cache_tokens": cfg.prefix_cache_size()})
    engine = BatchedEngine(info.path, slots=cfg.slots, n_ctx=cfg.ctx, n_threads=threads, n_threads_batch=threads_batch,
                           n_gpu_layers=cfg.gpu_layers, prefix_cache_tokens=cfg.prefix_cache_size())
    log.info(f"model loaded in {time.perf_counter() - t0:.2f}s: {cfg.slots} slot(s) as sequences of one context")
    if cfg.gpu_layers and not engine.gpu_offload:
        log.warning("--gpu-layers was given but this llama.cpp build has no GPU support; running on the CPU")
    return engine.slot_handles()


def _import_p2p() -> None:
    import transport.host  # noqa: F401


class NodeDaemon:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.stats = NodeStats()
        self.identity: Identity | None = None
        self.info: ModelInfo | None = None
        self.service: NodeService | None = None
        self.host = None
        self._seq = int(time.time() * 1000)
        self._replicated_at: float | None = None  # monotonic time the storers last got our advert
        self._stop = trio.Event()
        self._stopping = False
        self.share: ModelShare | None = None
        self.console = None  # node/console.py NodeConsole, with --console-port
        self.links = None  # transport.links.EntryLinks once the host is up
        self.reach = None  # transport.reachability.Reachability, likewise
        self._reach_due = trio.Event()

    # ---- start-up ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        self.identity = Identity.load_or_create(cfg.identity_path())
        if not cfg.synthetic and (spec := parse_model_spec(cfg.model)) is not None:
            from node.model_fetch import fetch_for_node

            path, name = await fetch_for_node(cfg, self.identity, spec)
            cfg.model, cfg.model_name = str(path), cfg.model_name or name
        self.info = info = resolve_model(cfg)
        log.info("model ok", extra={"model": info.name, "arch": info.architecture, "quant": info.quantization,
                                    "sha256": info.sha256[:16], "ctx_trained": info.context_length})
        async with trio.open_nursery() as nursery:
            # libp2p's import costs ~1 s of CPU: paid while the model loads, not after it, so
            # a loaded node joins the mesh at once.
            nursery.start_soon(trio.to_thread.run_sync, _import_p2p)
            if cfg.share_model and not cfg.synthetic:
                nursery.start_soon(self._prepare_share)
            engines = await trio.to_thread.run_sync(load_engines, cfg, info)
        if not cfg.skip_benchmark:
            def progress(frac: float, msg: str) -> None:
                log.info(f"benchmark {frac * 100:3.0f}%: {msg}")

            prefill, decode = await trio.to_thread.run_sync(lambda: engines[0].measure_speed(progress=progress))
            self.stats.prefill_tps, self.stats.decode_tps = prefill, decode
            # Capacity with every slot decoding at once: what a batched engine measured, or
            # (separate engines, e.g. synthetic) the single rate times the slots.
            self.stats.aggregate_tps = float(getattr(engines[0], "aggregate_tps", 0.0) or decode * len(engines))
            log.info("benchmark done", extra={"prefill_tps": round(prefill, 1), "decode_tps": round(decode, 1),
                                              "aggregate_tps": round(self.stats.aggregate_tps, 1)})
        self.stats.engine_mode = str(getattr(engines[0], "mode", "separate"))
        ctx = min(cfg.ctx, info.context_length or cfg.ctx)
        self.model_id = cfg.model_name or cfg.synthetic or info.path.name.removesuffix(".gguf")
        self.service = NodeService(self.identity, Admission(engines, cfg.queue), model_sha256=info.sha256,
                                   model_name=self.model_id, context_size=ctx, max_tokens=cfg.max_tokens, stats=self.stats,
                                   on_receipt=ReceiptLog(cfg.state_path() / RECEIPTS_FILE).append,
                                   buffers=buffer_budget(cfg.buffer_mb * 1024 * 1024))

        from transport.host import open_mesh_host

        async with open_mesh_host(self.identity, listen_host=cfg.listen_host, listen_port=cfg.port,
                                  bootstrap=cfg.bootstrap, private=cfg.private_mesh,
                                  announce_addrs=cfg.public_addr or None) as host:
            self.host = host
            host.set_stream_handler(INFER_PROTOCOL_ID, self.service.handle_stream)
            if self.share is not None:
                host.set_stream_handler(MODEL_PROTOCOL_ID, self.share.handle_stream)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, cfg.control_socket(), self._control)
                if cfg.console_port is not None:
                    from node.console import NodeConsole

                    self.console = NodeConsole(self, cfg.console_entries)
                    await nursery.start(self.console.serve, cfg.console_port)
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await self._publish()
                nursery.start_soon(self._advertise_loop)
                await self._start_links(nursery)
                freeze_startup_heap()
                self._write_ready(host)
                log.info("node ready", extra={"peer": self.identity.peer_id, "addrs": ",".join(host.listen_addrs),
                                              "slots": cfg.slots, "model": self.model_id})
                await self._stop.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        self._clear_ready()
        if self.share is not None:
            self.share.close()
        log.info("node stopped", extra={"requests": self.stats.requests_served, "tokens": self.stats.tokens_served})
        return 0

    async def _prepare_share(self) -> None:
        # The manifest is cached next to the sha256 (engine/model_file.py): hashing chunks of
        # a new file costs a pass over it, paid while the model loads.
        info = self.info
        try:
            manifest = await trio.to_thread.run_sync(file_manifest, info.path)
        except (ModelFileError, OSError) as e:  # serving matters more than sharing
            log.warning(f"not sharing the model file: {e}")
            return
        if manifest.sha256 != info.sha256:
            log.warning("model file changed while starting: not sharing it")
            return
        self.share = ModelShare(info.path, manifest, rate_mb=self.cfg.share_rate,
                                busy=lambda: self.service is not None and self.service.admission.active > 0)
        log.info("sharing the model file", extra={"chunks": manifest.chunks, "rate_mbps": self.cfg.share_rate})

    # ---- staying reachable --------------------------------------------------------------------
    async def _start_links(self, nursery: trio.Nursery) -> None:
        """Keep connections to entries open, pinged and re-dialled (transport/links.py): behind
        a home NAT they are the only way in."""
        from transport.links import EntryLinks
        from transport.reachability import Reachability

        async def rejoined() -> None:
            # Back after an outage: storers' copies of our advert may have lapsed meanwhile,
            # and the new network may differ (another NAT, a port forward gone).
            self._replicated_at = None
            self._reach_due.set()
            await self._publish()

        from transport.relay import MeshRelay

        self.links = EntryLinks(self.host, self.cfg.bootstrap, on_rejoined=rejoined)
        self.reach = Reachability(self.host)
        self.relay = MeshRelay(self.host, hop=self.cfg.relay, direct_upgrade=self.cfg.direct_upgrade)
        self.host.relay = self.relay
        await nursery.start(self.relay.run)
        if not self.host.private_mesh:
            self.host.reach = self.reach
            # Nobody can dial us until a dial-back says otherwise: no DHT server role.
            await self.host.set_dht_server(False)
            nursery.start_soon(self._reach_loop)
        await nursery.start(self.links.run)

    async def _reach_loop(self) -> None:
        """Ask connected entries to dial us back over a new connection (transport/
        reachability.py) at start, after every re-join, and every REACH_INTERVAL_S. A node
        that is not directly reachable and holds no relay slot is reachable by nobody without
        a connection of its own: it asks for a slot again after RELAY_RETRY_MIN_S, backing off
        to RELAY_RETRY_MAX_S, not at the next full check. A re-join right after an entry
        restarted finds the entry listening before its relay hop is up, and the one
        reservation that re-join triggered was refused."""
        from transport.reachability import DIRECT

        first = True
        next_full = trio.current_time() + 5.0
        slot_retry = RELAY_RETRY_MIN_S
        while not self._stopping:
            need_slot = not first and self.reach.state != DIRECT and not self.reach.relayed
            with trio.move_on_at(min(next_full, trio.current_time() + slot_retry) if need_slot else next_full):
                await self._reach_due.wait()
            full = self._reach_due.is_set() or trio.current_time() >= next_full
            self._reach_due = trio.Event()
            peers = [lk.peer_id for lk in self.links.connected()][:3] if self.links else []
            if not peers:
                if full:
                    next_full = trio.current_time() + 5.0
                continue
            before = (self.reach.state, self.reach.advertised())
            if full:
                first = False
                next_full = trio.current_time() + REACH_INTERVAL_S
                slot_retry = RELAY_RETRY_MIN_S
                await self.reach.probe(peers)
                await self.host.set_dht_server(self.reach.state == DIRECT)
            elif self.reach.state != DIRECT and not self.reach.relayed:
                log.info("asking for a relay slot again", extra={"after_s": slot_retry})
            await self._keep_relay_slot(peers)
            if not full and not self.reach.relayed:
                slot_retry = min(RELAY_RETRY_MAX_S, slot_retry * 2)
            if (self.reach.state, self.reach.advertised()) != before:
                log.info("reachability", extra={"state": self.reach.state, "addrs": ",".join(self.reach.advertised())})
                self._replicated_at = None
                await self._publish()

    async def _keep_relay_slot(self, peers: list[str]) -> None:
        """Not directly reachable: hold a relay slot at a connected entry and advertise it.
        Re-reserved on every check (after a re-join too): nothing else renews it before its
        TTL (RELAY_LIMITS.reservation_ttl) ends, and a relay that restarted has forgotten it.
        (A lost connection alone does not end it: py-libp2p's relay keys reservations by peer
        id, so after a router reset the old one reaches the node's new connection.)"""
        from transport.reachability import DIRECT

        if self.reach.state == DIRECT:
            self.reach.relayed = []
            return
        for peer in peers:
            addr = await self.relay.reserve(peer)
            if addr:
                self.reach.relayed = [addr]
                return
        self.reach.relayed = []

    # ---- advertising ------------------------------------------------------------------------
    def _advert(self, draining: bool = False) -> CapacityAdvert:
        self._seq += 1
        now = time.time()
        svc = self.service
        ttl = 4 * self.cfg.advert_interval
        return CapacityAdvert(
            node=self.identity.peer_id, model_sha256=self.info.sha256, model_name=self.model_id,
            quantization=self.info.quantization, context_size=svc.context_size,
            prefill_tps=float(self.stats.prefill_tps), decode_tps=float(self.stats.decode_tps),
            total_slots=svc.admission.total, free_slots=0 if draining else svc.admission.free,
            seq=self._seq, issued_at=now, expires_at=now + ttl, addrs=list(self.host.advertised_addrs)[:16],
            manifest_root=self.share.manifest.root if self.share is not None else "",
        )

    async def _publish(self, draining: bool = False) -> None:
        from transport.discovery import publish_advert

        # Storers' copies live 4 intervals; refreshing them every 2nd interval keeps them
        # valid with one refresh to spare and halves the DHT traffic a node causes (in a
        # 30-node mesh that traffic was most of an idle node's CPU). Our own copy, which
        # readers ask first, is refreshed every time; a draining advert goes out at once.
        now = time.monotonic()
        replicate = draining or self._replicated_at is None or now - self._replicated_at >= 2 * self.cfg.advert_interval - 0.5
        try:
            with trio.move_on_after(max(2.0, self.cfg.advert_interval)):
                stored = await publish_advert(self.host, self.identity, self._advert(draining), replicate=replicate)
                if replicate and stored > 0:
                    self._replicated_at = now
        except Exception as e:
            log.warning(f"advert publish failed: {e}")

    async def _advertise_loop(self) -> None:
        while not self._stopping:
            await trio.sleep(self.cfg.advert_interval)
            if not self._stopping:
                await self._publish()

    # ---- stopping ---------------------------------------------------------------------------
    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                if self._stopping:
                    log.warning("second signal: exiting now")
                    self._clear_ready()
                    os._exit(130)
                log.info(f"received {signal.Signals(sig).name}: draining (a second Ctrl-C exits at once)")
                self.request_stop()

    def request_stop(self) -> None:
        self._stopping = True
        self._stop.set()

    async def _drain(self) -> None:
        grace = self.cfg.drain_seconds
        svc = self.service
        active = svc.admission.active
        log.info("leaving the mesh", extra={"in_flight": active, "grace_s": grace})
        await svc.announce_leaving(grace)
        await self._publish(draining=True)
        with trio.move_on_after(grace) as cs:
            await svc.admission.wait_idle()
        if cs.cancelled_caught:
            log.warning("grace period over: cancelling unfinished generations", extra={"in_flight": svc.admission.active})
            svc.cancel_all()
            with trio.move_on_after(5):
                await svc.admission.wait_idle()
        # The last frames were handed to the muxer before the slots freed, but a requester that
        # reads slowly may not have received them yet: wait (bounded) until it closed each
        # generation stream, which it does after the final frame. Status streams never end by
        # themselves, so only streams that carried a generation are waited for.
        with trio.move_on_after(FLUSH_WAIT_S):
            await svc.wait_generation_streams_closed()

    # ---- control socket and state files -------------------------------------------------------
    def status_dict(self) -> dict:
        svc, info = self.service, self.info
        a = svc.admission
        return {
            "ok": True,
            "peer_id": self.identity.peer_id,
            "addrs": list(self.host.listen_addrs) if self.host else [],
            "advertised_addrs": list(self.host.advertised_addrs) if self.host else [],
            "entry_links": self.links.summary() if self.links else None,
            "reachability": self.reach.summary() if self.reach else None,
            # Our open connections, direct or through a relay (transport/dcutr.py upgrades
            # relayed ones where it can).
            "connections": self.host.connection_summary() if self.host else None,
            "dht_server": self.host.dht_server if self.host else None,
            "model": {"name": self.model_id, "sha256": info.sha256, "quantization": info.quantization,
                      "architecture": info.architecture, "path": str(info.path), "context_size": svc.context_size},
            "slots": a.total, "active": a.active, "queued": a.queued, "queue_limit": a.queue_limit,
            "draining": a.draining,
            "buffered_bytes": svc.buffers.used, "buffer_limit": svc.buffers.limit,
            "prefill_tps": self.stats.prefill_tps, "decode_tps": self.stats.decode_tps,
            "engine_mode": self.stats.engine_mode, "aggregate_tps": self.stats.aggregate_tps,
            "requests_served": self.stats.requests_served, "requests_failed": self.stats.requests_failed,
            "tokens_served": self.stats.tokens_served,
            "share": None if self.share is None else {"rate_mbps": self.cfg.share_rate, "bytes_sent": self.share.stats.bytes_sent,
                                                      "chunks_sent": self.share.stats.chunks_sent},
            "uptime_s": round(time.time() - self.stats.started_at, 1), "pid": os.getpid(),
        }

    async def _control(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "status":
            return self.status_dict()
        if cmd == "stop":
            self.request_stop()
            return {"ok": True, "stopping": True, "in_flight": self.service.admission.active, "grace_s": self.cfg.drain_seconds}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _ready_path(self) -> Path:
        return ready_file.path_in(self.cfg.state_path())

    def _write_ready(self, host) -> None:
        ready_file.write(self._ready_path(), {"peer_id": self.identity.peer_id, "addrs": list(host.listen_addrs),
                                              "model_sha256": self.info.sha256,
                                              "console_url": self.console.url if self.console else None})

    def _clear_ready(self) -> None:
        ready_file.clear(self._ready_path())
