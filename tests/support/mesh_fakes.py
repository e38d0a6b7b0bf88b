"""In-process mesh for backend tests: real NodeServices (real llama.cpp, tiny model) behind a
fake host, with fault injection between entry and node. Fast and deterministic: no processes,
no DHT, and a fault happens exactly at the token it is told to."""

from __future__ import annotations

import time

import trio
import trio.testing

from entry.mesh.view import MeshView, NodeState
from node.service import NodeService
from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from protocol.messages import Error, StatusReply, TokenChunk, parse_message, to_wire
from protocol.records import CapacityAdvert
from tests.support.node_harness import MemStream
from transport.host import DialError


class FakeStream(MemStream):
    async def reset(self) -> None:
        await self.close()


class FakeHost:
    """The part of MeshHost the backend uses: open_stream to a peer's handler."""

    def __init__(self, nursery: trio.Nursery):
        self.nursery = nursery
        self.peer_id = Identity.generate().peer_id
        self.handlers: dict = {}
        self.opened: list[str] = []

    async def open_stream(self, peer_id: str, protocol: str, addrs=None, *, timeout: float = 5.0) -> FakeStream:
        handler = self.handlers.get(peer_id)
        if handler is None:
            raise DialError(f"cannot reach {peer_id}")
        self.opened.append(peer_id)
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(_serve, handler, FakeStream(server), self.peer_id)
        return FakeStream(client)


async def _serve(handler, stream: FakeStream, remote: str) -> None:
    # Like a real node: the entry hanging up on a stream is not the node's crash.
    try:
        await handler(stream, remote)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def add_node(host: FakeHost, view: MeshView, service: NodeService, handler=None, *, peer_id: str | None = None,
             name: str = "tiny") -> NodeState:
    """Register a node with the view as if discovery and a status reply had come in."""
    peer_id = peer_id or service.identity.peer_id
    now = time.time()
    adv = CapacityAdvert(node=peer_id, model_sha256=service.model_sha256, model_name=name, quantization="F32",
                         context_size=service.context_size, prefill_tps=0.0, decode_tps=0.0,
                         total_slots=service.admission.total, free_slots=service.admission.free, seq=1,
                         issued_at=now, expires_at=now + 3600)
    node = NodeState(peer_id, view.pseudonym(peer_id), adv, latency=0.001)
    node.update_status(service.status(), rtt=0.001)
    host.handlers[peer_id] = handler or service.handle_stream
    return view.track(node)


def faulty(service: NodeService, nursery: trio.Nursery, mode: str, after: int = 0, seen: list | None = None):
    """A node that misbehaves: it answers through `service` but
    - "busy" / "leaving" / "too_long" / "internal": refuses with that error at once;
    - "die": relays `after` tokens, then the stream ends (a killed process);
    - "silent": relays `after` tokens, then says nothing more (hung, SIGSTOPped);
    - "error": relays `after` tokens, then answers `internal`;
    - "extra": relays everything, then pushes tokens beyond max_tokens.
    Request frames it receives are appended to `seen`."""
    refusals = {"busy": "busy", "leaving": "leaving", "too_long": "context_length_exceeded", "internal": "internal"}

    async def handler(stream, remote: str) -> None:
        reader, writer = FrameReader(stream), FrameWriter(stream)
        frame = await reader.read_frame()
        rid = frame.get("id")
        if seen is not None:
            seen.append(frame)
        if mode in refusals:
            await writer.write_frame(to_wire(Error(refusals[mode], "scripted refusal", rid, retry_after=1.0)))
            return
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(service.handle_stream, FakeStream(server), remote)
        inner = FakeStream(client)
        await FrameWriter(inner).write_frame(frame)
        inner_reader = FrameReader(inner)
        sent = 0
        try:
            while (f := await inner_reader.read_frame()) is not None:
                msg = parse_message(f)
                if isinstance(msg, TokenChunk) and mode in ("die", "silent", "error"):
                    keep = msg.ids[: max(0, after - sent)]
                    if keep:
                        truncated = keep != msg.ids
                        await writer.write_frame(to_wire(TokenChunk(rid, keep, "" if truncated else msg.text)))
                        sent += len(keep)
                    if sent >= after:
                        if mode == "silent":
                            await trio.sleep_forever()
                        if mode == "error":
                            await writer.write_frame(to_wire(Error("internal", "scripted failure", rid)))
                        return
                    continue
                if mode == "extra" and not isinstance(msg, (TokenChunk, StatusReply)):
                    await writer.write_frame(to_wire(TokenChunk(rid, [1] * 4096, "")))
                await writer.write_frame(f)
        finally:
            await inner.close()
            await stream.close()

    return handler
