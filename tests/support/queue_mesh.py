"""In-process mesh for the entry's queue tests: the real API and backend, real NodeServices on
the synthetic engine behind a fake host (tests/support/mesh_fakes.py). A generation whose
prompt contains HOLD waits before its first token until the test releases it, so "every slot
is busy" is a state the test sets, not a race it hopes to win. Each engine records the prompts
it started, in order: the order the entry dispatched them in."""

from __future__ import annotations

import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from engine.synthetic import SyntheticEngine
from entry.api.apikeys import ApiKeyStore
from entry.api.app import create_app, serve_api
from entry.api.metrics import Metrics
from entry.api.ratelimit import RateLimits
from entry.mesh.relay import MeshBackend, MeshBackendConfig
from entry.mesh.view import MeshView
from node.admission import Admission
from node.service import NodeService
from protocol.identity import Identity
from tests.support.mesh_fakes import FakeHost, add_node

MODEL = "synth-queue"
HOLD = "HOLD"
_HOLD_LIMIT_S = 30.0  # a held generation gives up waiting for its release after this (a stuck test)


class HeldEngine(SyntheticEngine):
    def __init__(self, name: str = MODEL, **kw):
        super().__init__(name, **kw)
        self.release = threading.Event()
        self.started: list[str] = []  # user message (chat) or prompt of each generation begun

    def run(self, request, *, cancel=None):
        text = self.prompt_text(request)
        m = re.search(r"User: (.*?)\n", text)
        self.started.append(m.group(1) if m else text)
        gen = super().run(request, cancel=cancel)
        return _Held(gen, self.release, cancel) if HOLD in text else gen


class _Held:
    """A generation that waits for `release` (or its cancel) before its first step."""

    def __init__(self, gen, release: threading.Event, cancel: threading.Event | None):
        self._gen, self._release, self._cancel = gen, release, cancel
        self._waited = False

    def __getattr__(self, name):
        return getattr(self._gen, name)

    def __enter__(self):
        self._gen.__enter__()
        return self

    def __exit__(self, *exc):
        return self._gen.__exit__(*exc)

    def __iter__(self):
        return self

    def __next__(self):
        if not self._waited:
            self._waited = True
            deadline = time.monotonic() + _HOLD_LIMIT_S
            while not self._release.is_set() and not (self._cancel is not None and self._cancel.is_set()):
                if time.monotonic() > deadline:
                    break
                self._release.wait(0.05)
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def held_service(name: str = MODEL, *, slots: int = 1, rate: float = 2000.0) -> tuple[NodeService, HeldEngine]:
    """A node with `slots` engines (one per slot, like the node daemon) that share one release
    event and one record of started prompts; returns the first."""
    first = HeldEngine(name, rate=rate)
    engines = [first]
    for _ in range(slots - 1):
        e = HeldEngine(name, rate=rate)
        e.release, e.started = first.release, first.started
        engines.append(e)
    info = first.info
    svc = NodeService(Identity.generate(), Admission(engines, 0), model_sha256=info.sha256, model_name=info.name,
                      context_size=first.n_ctx, max_tokens=512)
    return svc, first


@dataclass
class QueueMesh:
    host: FakeHost
    view: MeshView
    backend: MeshBackend
    metrics: Metrics
    url: str
    keys: dict[str, str] = field(default_factory=dict)  # name -> API key
    engines: list[HeldEngine] = field(default_factory=list)

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    def add_node(self, name: str = MODEL, *, slots: int = 1) -> HeldEngine:
        svc, eng = held_service(name, slots=slots)
        node = add_node(self.host, self.view, svc, name=name)
        node.served = 10  # proven: every slot it claims is used (entry/mesh/router.py)
        self.engines.append(eng)
        return eng


@asynccontextmanager
async def queue_mesh(tmp_path, config: MeshBackendConfig, key_names: tuple[str, ...] = ("a", "b")):
    """The API (API keys `key_names`) over a backend with no nodes yet: add them with add_node."""
    store = ApiKeyStore(tmp_path / "keys.db")
    keys = {name: store.create(name)[1] for name in key_names}
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery)
        view = MeshView(host)
        backend = MeshBackend(host, view, config=config, metrics=metrics)
        app = create_app(backend, keys=store, open_mode=False, limits=RateLimits(), metrics=metrics)
        port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        mesh = QueueMesh(host, view, backend, metrics, f"http://127.0.0.1:{port}", keys)
        try:
            yield mesh
        finally:
            for eng in mesh.engines:
                eng.release.set()  # no held generation outlives the test in a worker thread
            nursery.cancel_scope.cancel()


def chat(content: str, max_tokens: int = 4, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def wait_until(cond, limit: float = 10.0, what: str = "condition") -> None:
    """Until cond() holds (re-checked every 10 ms), failing the test after `limit` seconds."""
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {limit}s waiting for {what}")
