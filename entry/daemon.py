"""The entry daemon: libp2p host + live mesh view + HTTP API in one trio loop."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio

from entry.api.apikeys import ApiKeyStore
from entry.api.app import create_app, serve_api
from entry.api.metrics import Metrics
from entry.api.ratelimit import RateLimits
from entry.api.seeds import SeedMixer
from entry.config import EntryConfig
from entry.credits.ledger import Ledger
from entry.mesh.relay import MeshBackendConfig, open_mesh_backend
from entry.providers import open_providers
from entry.targets import AutoRouting
from entry.verify.canary import CanaryConfig, CanaryCorpusMissing, CanaryProber, canary_pool
from entry.verify.verifier import Verifier, VerifierConfig
from protocol.identity import Identity
from runtime import ready_file
from runtime.errors import CliError
from runtime.heap import freeze_startup_heap
from transport.discovery import announce_entry_loop
from transport.host import open_mesh_host
from transport.reachability import DialbackService

log = logging.getLogger("mesh.entry")


class EntryDaemon:
    def __init__(self, cfg: EntryConfig):
        self.cfg = cfg
        self.ready_path = ready_file.path_in(cfg.state_path())

    async def run(self) -> int:
        cfg = self.cfg
        identity = Identity.load_or_create(cfg.identity_path())
        seeds = SeedMixer.load_or_create(cfg.seed_secret_path())
        keys = None if cfg.open else ApiKeyStore(cfg.keys_path())
        if keys is not None and not keys.list():
            log.warning("no API keys exist yet: create one with `mesh entry keys create --name NAME`, or start with --open")
        backend_cfg = MeshBackendConfig(first_token_timeout=cfg.first_token_timeout, token_timeout=cfg.token_timeout,
                                        admission_wait=cfg.queue_wait, queue_max=cfg.queue_max)
        metrics = Metrics()
        ledger = Ledger(cfg.ledger_path())
        verifier = Verifier(ledger=ledger, metrics=metrics, config=VerifierConfig(rate=cfg.verify_rate))
        try:
            for path in cfg.verify_model:
                await trio.to_thread.run_sync(verifier.load_model, path)
            if verifier.models and cfg.canary_interval > 0:
                try:
                    canary_pool()
                except CanaryCorpusMissing as e:
                    raise CliError(str(e)) from None
            await self._serve(identity, keys, backend_cfg, metrics, ledger, verifier, seeds)
        finally:
            verifier.close()
            ledger.close()
        self._clear_ready()
        return 0

    async def _serve(self, identity, keys, backend_cfg, metrics, ledger, verifier, seeds) -> None:
        cfg = self.cfg
        async with open_mesh_host(identity, listen_host=cfg.listen_host, listen_port=cfg.p2p_port,
                                  bootstrap=cfg.bootstrap, private=cfg.private_mesh) as host:
            async with open_mesh_backend(host, config=backend_cfg, on_generation_done=verifier.on_generation_done,
                                         metrics=metrics) as backend, \
                    open_providers(cfg.providers) as providers:
                auto = AutoRouting(cfg.routing, providers, cfg.routing_dir(),
                                   None if cfg.routing_table is None else Path(cfg.routing_table),
                                   lambda m: verifier.weight(m.sha256))
                await trio.to_thread.run_sync(auto.load)
                verifier.view = backend.view
                backend.model_pins = verifier.pins()
                backend.admit = verifier.admits
                app = create_app(backend, keys=keys, open_mode=cfg.open, limits=RateLimits(rpm=cfg.rpm, tpm=cfg.tpm),
                                 metrics=metrics, max_body_bytes=cfg.max_body_bytes, ledger=ledger, seeds=seeds,
                                 sse_write_timeout=cfg.sse_write_timeout, auto=auto)
                async with trio.open_nursery() as nursery:
                    # Entries are public: nodes behind NAT find us here and keep a connection
                    # open to us, the only way we can reach them (transport/links.py).
                    nursery.start_soon(announce_entry_loop, host)
                    DialbackService(host).register()
                    if cfg.relay:
                        from transport.relay import MeshRelay

                        await nursery.start(MeshRelay(host, hop=True).run)
                    await nursery.start(verifier.run)
                    if verifier.models:
                        await nursery.start(CanaryProber(backend, verifier, CanaryConfig(interval=cfg.canary_interval)).run)
                    port = await nursery.start(serve_api, app, cfg.http_host, cfg.http_port)
                    url = f"http://{cfg.http_host}:{port}"
                    freeze_startup_heap()
                    self._write_ready(url, identity.peer_id, host.listen_addrs)
                    log.info("entry ready", extra={"url": url, "p2p": ",".join(host.listen_addrs),
                                                   "mode": "open" if cfg.open else "api keys"})
                    await self._wait_for_signal()
                    log.info("stopping")
                    nursery.cancel_scope.cancel()

    async def _wait_for_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    def _write_ready(self, url: str, peer_id: str, addrs: list[str]) -> None:
        ready_file.write(self.ready_path, {"url": url, "peer_id": peer_id, "p2p_addrs": list(addrs)})

    def _clear_ready(self) -> None:
        ready_file.clear(self.ready_path)
