"""What a node learns about a user: only what generation needs.

Real parts in one process: an entry (HTTP API + mesh backend on a libp2p host) and a node
(NodeService on real llama.cpp, tiny model, on its own libp2p host) whose stream handler
records every byte it receives. A user sends identifying data every way HTTP allows; none of
it may reach the node, and the request ids the node sees must not link two requests."""

import time

import trio

from entry.api.apikeys import ApiKeyStore
from entry.api.app import create_app, serve_api
from entry.api.metrics import Metrics
from entry.api.ratelimit import RateLimits
from entry.mesh.relay import open_mesh_backend
from protocol import INFER_PROTOCOL_ID
from protocol.framing import FrameReader
from protocol.identity import Identity
from protocol.records import CapacityAdvert
from tests.support.node_harness import make_service
from transport.discovery import publish_advert
from transport.host import open_mesh_host

SECRETS = ("alice@example.com", "203.0.113.9", "hunter2-header", "Mozilla/5.0 (AliceBook)", "alice-session-cookie")
ALLOWED_REQUEST_KEYS = {"t", "v", "id", "model", "kind", "params", "cont", "logprobs", "top_logprobs", "messages", "prompt"}


class RecordingStream:
    """Passes a node's stream through, keeping a copy of every byte the node reads."""

    def __init__(self, inner, sink: bytearray):
        self.inner, self.sink = inner, sink

    async def read(self, n: int) -> bytes:
        data = await self.inner.read(n)
        self.sink += data
        return data

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def close(self) -> None:
        await self.inner.close()


async def decode_all(raw: bytes) -> list[dict]:
    class Buf:
        def __init__(self, b):
            self.b = b

        async def read(self, n):
            out, self.b = self.b[:n], self.b[n:]
            return out

    reader, frames = FrameReader(Buf(bytes(raw))), []
    while (f := await reader.read_frame()) is not None:
        frames.append(f)
    return frames


async def test_node_receives_only_what_generation_needs(tiny_gguf, tmp_path):
    service = make_service(tiny_gguf)
    node_id = service.identity
    received = bytearray()

    async def recording_handler(stream, remote):
        await service.handle_stream(RecordingStream(stream, received), remote)

    store = ApiKeyStore(tmp_path / "keys.db")
    _, api_key = store.create("alice")
    with trio.fail_after(90):
        async with open_mesh_host(Identity.generate()) as entry_host, \
                open_mesh_host(node_id, bootstrap=[entry_host.listen_addrs[0]]) as node_host:
            node_host.set_stream_handler(INFER_PROTOCOL_ID, recording_handler)
            now = time.time()
            advert = CapacityAdvert(node_id.peer_id, service.model_sha256, "tiny", "F32", 512, 0.0, 0.0, 1, 1,
                                    int(now * 1000), now, now + 60, list(node_host.listen_addrs))
            await publish_advert(node_host, node_id, advert)
            async with open_mesh_backend(entry_host) as backend, trio.open_nursery() as nursery:
                app = create_app(backend, keys=store, open_mode=False, limits=RateLimits(), metrics=Metrics())
                port = await nursery.start(serve_api, app, "127.0.0.1", 0)
                while not backend.models():
                    await trio.sleep(0.1)
                import httpx

                headers = {"Authorization": f"Bearer {api_key}", "X-Forwarded-For": SECRETS[1], "X-Secret": SECRETS[2],
                           "User-Agent": SECRETS[3], "Cookie": f"session={SECRETS[4]}"}
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                    for _ in range(2):
                        r = await client.post("/v1/chat/completions", headers=headers, json={
                            "model": "tiny", "user": SECRETS[0], "max_tokens": 5, "temperature": 0,
                            "messages": [{"role": "user", "content": "hello", "name": "alice"}]})
                        assert r.status_code == 200, r.text
                        body = r.text
                        assert node_id.peer_id not in body and "/ip4/" not in body
                nursery.cancel_scope.cancel()

    raw = bytes(received)
    for secret in (*SECRETS, api_key, api_key[:12], "alice"):
        assert secret.encode() not in raw, f"{secret!r} reached the node"
    requests = [f for f in await decode_all(raw) if f.get("t") == "req"]
    assert len(requests) == 2
    for f in requests:
        assert set(f) <= ALLOWED_REQUEST_KEYS, set(f) - ALLOWED_REQUEST_KEYS
        assert all(set(m) == {"role", "content"} for m in f["messages"])
        assert f["messages"] == [{"role": "user", "content": "hello"}]
    assert requests[0]["id"] != requests[1]["id"]  # nothing stable links two requests of one user
    store.close()
