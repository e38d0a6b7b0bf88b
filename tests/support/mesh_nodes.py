"""Helpers for the entry mesh tests: real node processes around an in-process entry."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import trio

from entry.backend import DoneEvent, GenerationSpec, TokenEvent
from entry.mesh.relay import MeshBackendConfig, open_mesh_backend
from protocol.identity import Identity
from protocol.messages import InferRequest, SamplingParams
from tests.support.node_procs import NodeProc, mesh_cmd, start_node
from transport.host import open_mesh_host
from transport.node_client import open_call

# --threads 1: two llama.cpp processes on two cores, never more (spin-waiting threads make an
# oversubscribed machine ~100x slower).
FAST = ("--skip-benchmark", "--threads", "1", "--advert-interval", "1")
# The view polls faster than production so tests wait less; the logic is the same.
VIEW_OPTIONS = dict(discovery_interval=0.5, status_interval=0.5, status_timeout=2.0, discovery_timeout=3.0)


async def wait_for(cond: Callable[[], bool], limit: float, what: str, step: float = 0.05) -> float:
    """Poll until cond() holds; returns the seconds it took. Fails the test after `limit`."""
    t0 = time.monotonic()
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(step)
        return time.monotonic() - t0
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


@asynccontextmanager
async def entry_with_nodes(tmp_path: Path, model: Path, names: tuple[str, ...] = ("n1", "n2"), *,
                           node_args: tuple[str, ...] = (), config: MeshBackendConfig | None = None, **view_options):
    """An entry (host + backend) and real nodes bootstrapped to it, all stopped on exit."""
    assert len(names) <= 2, "at most two llama.cpp processes at a time on this machine"
    nodes: list[NodeProc] = []
    async with open_mesh_host(Identity.generate()) as host:
        async with open_mesh_backend(host, config=config, **{**VIEW_OPTIONS, **view_options}) as backend:
            try:
                async with trio.open_nursery() as nursery:
                    for name in names:
                        async def start(name=name) -> None:
                            nodes.append(await start_node(tmp_path, name, "--model", str(model), "--bootstrap",
                                                          host.listen_addrs[0], *FAST, *node_args))
                        nursery.start_soon(start)
                nodes.sort(key=lambda n: names.index(n.state_dir.name))
                yield host, backend, nodes
            finally:
                with trio.CancelScope(shield=True):
                    await stop_nodes(nodes)


async def stop_nodes(nodes: list[NodeProc], limit: float = 15.0) -> None:
    """SIGTERM all, wait without blocking the event loop (the entry keeps answering them while
    they drain), then SIGKILL whatever is left. Only processes these tests started."""
    for n in nodes:
        n.signal(signal.SIGCONT)  # a test may have frozen one
        n.signal(signal.SIGTERM)
    with trio.move_on_after(limit):
        while any(n.proc.poll() is None for n in nodes):
            await trio.sleep(0.05)
    for n in nodes:
        n.stop()  # kills and reaps a straggler; a no-op for the exited


def routable(backend, node: NodeProc) -> bool:
    st = backend.view.node(node.peer_id)
    return st is not None and st.routable(time.monotonic())


def known(backend, node: NodeProc) -> bool:
    return backend.view.node(node.peer_id) is not None


def completion_spec(model: str, prompt: str, max_tokens: int, **params) -> GenerationSpec:
    return GenerationSpec(model=model, kind="completion", params=SamplingParams(max_tokens=max_tokens, **params), prompt=prompt)


async def collect(backend, spec: GenerationSpec, on_token: Callable[[TokenEvent, list[int]], Awaitable[None]] | None = None):
    """Run a generation to its end: (token ids, text, DoneEvent)."""
    ids: list[int] = []
    text = ""
    done = None
    async with aclosing(backend.generate(spec)) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                ids += ev.ids
                text += ev.text
                if on_token is not None:
                    await on_token(ev, ids)
            else:
                assert isinstance(ev, DoneEvent) and done is None
                done = ev
    assert done is not None
    return ids, text, done


async def direct(host, node: NodeProc, sha: str, prompt: str, max_tokens: int, rid: str = "direct-0000001") -> list[int]:
    """The node's own greedy output, asked over a plain stream (no entry logic)."""
    call = await open_call(host, node.peer_id, node.addrs,
                           InferRequest(rid, sha, "completion", SamplingParams(max_tokens=max_tokens), prompt=prompt))
    ids: list[int] = []
    async for chunk in call.chunks():
        ids += chunk.ids
    await call.close()
    return ids


def serving_node(backend, nodes: list[NodeProc]) -> NodeProc:
    """The node our one in-flight request runs on (the backend's own bookkeeping)."""
    busy = [n for n in nodes if (st := backend.view.node(n.peer_id)) is not None and st.in_flight]
    assert len(busy) == 1, "expected exactly one node with our request in flight"
    return busy[0]


def node_status(node: NodeProc) -> dict:
    out = subprocess.run(mesh_cmd("node", "status", "--json", "--state-dir", str(node.state_dir)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def node_stop(node: NodeProc) -> None:
    out = subprocess.run(mesh_cmd("node", "stop", "--state-dir", str(node.state_dir)), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
