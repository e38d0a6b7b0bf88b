"""In-process harness: a NodeService on real engines, reached over in-memory byte streams."""

from __future__ import annotations

import trio
import trio.testing

from engine.batched import BatchedEngine
from engine.llama import Engine
from node.admission import Admission
from node.service import NodeService
from protocol.identity import Identity
from protocol.messages import ChatMessage, InferRequest, SamplingParams
from transport.node_client import NodeCall

ENTRY_ID = "entry-under-test"


class MemStream:
    """Adapts a trio Stream to the read/write/close interface the protocol uses."""

    def __init__(self, stream: trio.abc.Stream):
        self._s = stream

    async def read(self, n: int) -> bytes:
        try:
            return await self._s.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def close(self) -> None:
        await self._s.aclose()


def make_service(model_path, *, slots: int = 1, queue: int = 4, max_tokens: int = 512, n_threads: int = 1,
                 prefix_cache_tokens: int = 512) -> NodeService:
    """A node's service as the daemon builds it: one batched engine, one admission worker per slot."""
    engine = BatchedEngine(model_path, slots=slots, n_ctx=512, n_threads=n_threads, prefix_cache_tokens=prefix_cache_tokens)
    engines = engine.slot_handles()
    info = engine.info
    return NodeService(Identity.generate(), Admission(engines, queue), model_sha256=info.sha256,
                       model_name=info.name, context_size=512, max_tokens=max_tokens)


def connect(nursery: trio.Nursery, service: NodeService, remote: str = ENTRY_ID) -> MemStream:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(service.handle_stream, MemStream(server), remote)
    return MemStream(client)


_counter = 0


def request(service: NodeService, *, prompt: str = "Hello", max_tokens: int = 16, chat: bool = False, **params) -> InferRequest:
    global _counter
    _counter += 1
    sp = SamplingParams(max_tokens=max_tokens, **params)
    if chat:
        return InferRequest(f"req-{_counter:08d}", service.model_sha256, "chat", sp, [ChatMessage("user", prompt)])
    return InferRequest(f"req-{_counter:08d}", service.model_sha256, "completion", sp, prompt=prompt)


async def collect(stream, req: InferRequest) -> tuple[list[int], str, NodeCall]:
    call = NodeCall(stream, req)
    await call.send()
    ids: list[int] = []
    text = ""
    async for chunk in call.chunks():
        ids += chunk.ids
        text += chunk.text
    return ids, text, call


class GatedEngine:
    """A real Engine whose generations pause after `pause_after` tokens until the test opens
    the gate (or the request is cancelled): lets tests act "mid-stream" without timing luck."""

    def __init__(self, engine, pause_after: int = 3):
        self._engine = engine
        self.pause_after = pause_after
        self.gate = __import__("threading").Event()
        self.paused = __import__("threading").Event()  # set when a generation reached the gate
        self.info = engine.info

    def run(self, request, *, cancel=None, **kw):
        return _GatedGeneration(self, self._engine.run(request, cancel=cancel, **kw), cancel)


class _GatedGeneration:
    def __init__(self, owner: GatedEngine, gen, cancel):
        self._owner, self._gen, self._cancel = owner, gen, cancel
        self.prompt_tokens, self.seed = gen.prompt_tokens, gen.seed
        self._n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._gen.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._n == self._owner.pause_after:
            self._owner.paused.set()
            for _ in range(300):  # at most 30 s
                if self._owner.gate.is_set() or (self._cancel is not None and self._cancel.is_set()):
                    break
                self._owner.gate.wait(0.1)
        self._n += 1
        return next(self._gen)


def gated_service(model_path, *, queue: int = 4, pause_after: int = 3) -> tuple[NodeService, GatedEngine]:
    eng = GatedEngine(Engine(model_path, n_ctx=512, n_threads=1), pause_after)
    info = eng.info
    svc = NodeService(Identity.generate(), Admission([eng], queue), model_sha256=info.sha256,
                      model_name=info.name, context_size=512, max_tokens=512)
    return svc, eng


async def wait_for(event, limit: float = 30.0) -> None:
    """Wait for a threading.Event from trio without blocking the loop."""
    with trio.fail_after(limit):
        while not event.is_set():
            await trio.sleep(0.005)
