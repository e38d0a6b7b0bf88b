"""A real entry (HTTP API + mesh backend on a libp2p host) and a real node (NodeService on
llama.cpp with the bundled SmolLM2, on its own libp2p host) in this test's trio run, on
127.0.0.1, for the official `openai` client to talk to.

The node runs in-process with one llama.cpp thread: one model load, no extra processes."""

from __future__ import annotations

import functools
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from entry.api.app import create_app, serve_api
from entry.api.metrics import Metrics
from entry.api.ratelimit import RateLimits
from entry.mesh.relay import open_mesh_backend
from protocol import INFER_PROTOCOL_ID
from protocol.identity import Identity
from protocol.records import CapacityAdvert
from tests.support.node_harness import make_service
from transport.discovery import publish_advert
from transport.host import open_mesh_host

MODEL = "smollm2"


@dataclass
class RealApi:
    base_url: str
    model: str
    tokenizer: object  # the node's Engine: token_bytes(id) is what the node's tokenizer says

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", timeout=120, max_retries=0, **kw)


async def in_thread(fn, *args, **kwargs):
    """The openai client is synchronous; the servers run in this trio loop."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@asynccontextmanager
async def real_api(model_path, *, limit: float = 60.0):
    """Yields a RealApi once the entry routes to the node (within `limit` seconds)."""
    service = make_service(model_path, max_tokens=512)
    tokenizer = service.admission._idle[0]  # its only engine, idle before the first request
    node_id = service.identity
    async with open_mesh_host(Identity.generate()) as entry_host, \
            open_mesh_host(node_id, bootstrap=[entry_host.listen_addrs[0]]) as node_host:
        node_host.set_stream_handler(INFER_PROTOCOL_ID, service.handle_stream)
        now = time.time()
        advert = CapacityAdvert(node_id.peer_id, service.model_sha256, MODEL, "Q8_0", 512, 0.0, 0.0, 1, 1,
                                int(now * 1000), now, now + 600, list(node_host.listen_addrs))
        await publish_advert(node_host, node_id, advert)
        async with open_mesh_backend(entry_host) as backend, trio.open_nursery() as nursery:
            app = create_app(backend, keys=None, open_mode=True, limits=RateLimits(), metrics=Metrics())
            port = await nursery.start(serve_api, app, "127.0.0.1", 0)
            with trio.fail_after(limit):
                while not any(m.id == MODEL for m in backend.models()):
                    await trio.sleep(0.1)
            yield RealApi(f"http://127.0.0.1:{port}", MODEL, tokenizer)
            nursery.cancel_scope.cancel()
