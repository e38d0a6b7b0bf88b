"""Attacks on the entry's API that worked once, each kept as a test (real HTTP on 127.0.0.1):

1. a near-zero temperature that made the shared sampler raise, so the entry blamed nodes;
2. a tokens/minute limit checked only at admission (parallel requests, n=8);
3. an SSE client that stops reading and so holds node slots;
4. a user-chosen seed reaching nodes verbatim (it links that user's requests);
5. a credit-statement header accepted ~10 minutes long and replayable.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from engine.sampling import TokenSampler
from entry.api.apikeys import ApiKeyStore
from entry.api.app import create_app, serve_api
from entry.api.metrics import Metrics
from entry.api.ratelimit import RateLimits
from entry.api.seeds import SeedMixer
from entry.backend import DoneEvent, MeshUnavailable, ServedPart, TokenEvent
from entry.credits.ledger import Ledger
from protocol.credit_query import HEADER, sign_query
from protocol.identity import Identity
from tests.support.fake_backend import DESCRIPTION, FakeBackend

CHAT = "/v1/chat/completions"


def chat_body(**extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **extra}


class FrozenClock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def serve(backend, *, keys=None, limits=None, **app_kw):
    """The entry app on a free loopback port with settings running_api does not take."""
    metrics = Metrics()
    app = create_app(backend, keys=keys, open_mode=keys is None, limits=limits or RateLimits(), metrics=metrics, **app_kw)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client, port
        nursery.cancel_scope.cancel()


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll observable state (loopback HTTP round trips, not sleeps that hope)."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.01)


# --- 1. near-zero temperatures ----------------------------------------------------------------


class SamplingBackend(FakeBackend):
    """Picks tokens with the real shared sampler over a fixed logits row, as a node does. A
    sampler failure surfaces as what the relay makes of nodes failing: MeshUnavailable."""

    def generate(self, spec, model=None):
        self.specs.append(spec)
        return self._sample(spec)

    async def _sample(self, spec):
        sampler = TokenSampler(spec.params)
        row = np.linspace(-3.0, 3.0, 64, dtype=np.float32)
        ids: list[int] = []
        for _ in range(min(spec.params.max_tokens, 4)):
            try:
                token = sampler.choose(row, ids)
            except Exception as e:
                raise MeshUnavailable(f"every node failed: {e!r}") from e
            ids.append(token)
            yield TokenEvent(ids=[token], text=f" t{token}")
        yield DoneEvent("length", 1, len(ids), [ServedPart("amber-fox", DESCRIPTION, len(ids))])


@pytest.mark.parametrize("params", [
    dict(temperature=1e-320, top_p=0.5),
    dict(temperature=1e-320, min_p=1),
    dict(temperature=5e-324, top_k=1, top_p=0),
    dict(temperature=1e-5, top_p=1e-300, min_p=1),  # the smallest sampled temperature
    dict(temperature=5, top_p=1e-9, top_k=1_000_000, repeat_penalty=0, presence_penalty=2, frequency_penalty=-2),
])
async def test_extreme_sampling_params_are_served_never_5xx(params):
    backend = SamplingBackend()
    with trio.fail_after(10):
        async with serve(backend) as (client, _):
            r = await client.post(CHAT, json=chat_body(max_tokens=4, seed=9, **params))
            s = await client.post(CHAT, json=chat_body(max_tokens=4, seed=9, stream=True, **params))
    assert r.status_code == 200, r.text
    assert s.status_code == 200 and "error" not in s.text and s.text.endswith("data: [DONE]\n\n")
    if params["temperature"] < 1e-5:
        # Below vLLM's epsilon a temperature is greedy: the node gets 0, never a subnormal.
        assert all(spec.params.temperature == 0.0 for spec in backend.specs)
    else:
        assert all(spec.params.temperature == params["temperature"] for spec in backend.specs)


# --- 2. tokens per minute are reserved --------------------------------------------------------


class GatedBackend(FakeBackend):
    """Holds every generation until `gate` opens, so requests overlap for sure."""

    def __init__(self):
        super().__init__()
        self.gate = trio.Event()

    def generate(self, spec, model=None):
        self.specs.append(spec)
        return self._gated(spec, model)

    async def _gated(self, spec, model):
        await self.gate.wait()
        async for ev in self._run(spec, model):
            yield ev


async def test_parallel_requests_cannot_exceed_the_token_limit(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("mallory", tpm=60)
    auth = {"Authorization": f"Bearer {key}"}
    backend = GatedBackend()
    results: list[httpx.Response] = []
    with trio.fail_after(15):
        async with serve(backend, keys=store, limits=RateLimits(clock=FrozenClock())) as (client, _):
            async def one() -> None:
                # Reserves 25: 1 + 4 (prompt estimate) + 20 (max_tokens).
                results.append(await client.post(CHAT, json=chat_body(max_tokens=20), headers=auth))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)

                async def settled() -> bool:
                    return len(backend.specs) + sum(r.status_code == 429 for r in results) == 8

                await wait_until(settled, "every request admitted or refused")
                admitted = len(backend.specs)
                backend.gate.set()
            # Each used 1 + 13 of its 25: the unused 22 came back, so one more fits (32 left).
            after = await client.post(CHAT, json=chat_body(max_tokens=20), headers=auth)
            last = await client.post(CHAT, json=chat_body(max_tokens=20), headers=auth)
    assert admitted == 2  # 8 before the fix: the limit was only checked, never reserved
    assert sorted(r.status_code for r in results) == [200] * 2 + [429] * 6
    assert all(r.headers["retry-after"] for r in results if r.status_code == 429)
    assert after.status_code == 200 and last.status_code == 429
    store.close()


async def test_n_choices_reserve_max_tokens_each(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("mallory", tpm=60)
    auth = {"Authorization": f"Bearer {key}"}
    backend = FakeBackend()
    with trio.fail_after(10):
        async with serve(backend, keys=store, limits=RateLimits(clock=FrozenClock())) as (client, _):
            eight = await client.post(CHAT, json=chat_body(n=8, max_tokens=10), headers=auth)  # 5 + 80
            two = await client.post(CHAT, json=chat_body(n=2, max_tokens=10), headers=auth)  # 5 + 20
            prompts = await client.post("/v1/completions", headers=auth, json={
                "model": "fake-model", "prompt": ["a" * 40, "b" * 40], "n": 2, "max_tokens": 15})  # 10 + 10 + 60
    assert eight.status_code == 429 and "lower max_tokens or n" in eight.json()["error"]["message"]
    assert len(backend.specs) == 2  # only the n=2 request reached the mesh
    assert two.status_code == 200
    assert prompts.status_code == 429
    store.close()


async def test_a_client_that_leaves_gets_the_unused_reservation_back(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("mallory", tpm=60)
    auth = {"Authorization": f"Bearer {key}"}
    backend = FakeBackend(hang_after=2)
    with trio.fail_after(10):
        async with serve(backend, keys=store, limits=RateLimits(clock=FrozenClock())) as (client, _):
            # Reserves 45; leaving after 2 tokens is charged 2 + the prompt estimate (5).
            async with client.stream("POST", CHAT, json=chat_body(max_tokens=40, stream=True), headers=auth) as r:
                assert r.status_code == 200
                await backend.hanging.wait()
            await backend.closed_event.wait()

            async def idle() -> bool:
                return await metric(client, "mesh_entry_generations_in_flight") == 0

            await wait_until(idle, "the request ended")
            backend.hang_after = None
            again = await client.post(CHAT, json=chat_body(max_tokens=40), headers=auth)  # needs 45 of 53
    assert again.status_code == 200
    store.close()


# --- 3. a streaming client that stops reading -------------------------------------------------


class EndlessBackend(FakeBackend):
    """Large tokens until cancelled (bounded far beyond what socket buffers hold)."""

    def generate(self, spec, model=None):
        self.specs.append(spec)
        return self._endless()

    async def _endless(self):
        try:
            for _ in range(100_000):
                yield TokenEvent(ids=[100], text="x" * 4096)
            self.finished += 1
        finally:
            if not self.finished:
                self.closed += 1
                self.closed_event.set()


async def test_a_client_that_stops_reading_loses_its_generation():
    backend = EndlessBackend()
    timeout = 0.5
    with trio.fail_after(20):
        async with serve(backend, sse_write_timeout=timeout) as (client, port):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A tiny receive window that is never read: the entry's writes block for good.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            try:
                await sock.connect(("127.0.0.1", port))
                body = httpx.Request("POST", f"http://127.0.0.1:{port}{CHAT}", json=chat_body(stream=True))
                head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                payload = body.read()
                await sock.send(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                t0 = trio.current_time()
                with trio.fail_after(10):  # 60 s and more before the fix
                    await backend.closed_event.wait()
                took = trio.current_time() - t0
                assert await metric(client, "mesh_entry_stalled_clients_total") == 1
                assert await metric(client, "mesh_entry_generations_in_flight") == 0
            finally:
                sock.close()
    assert backend.closed == 1
    assert timeout <= took < timeout + 5


async def test_a_slow_but_reading_client_is_served_in_full():
    backend = FakeBackend(delay=0.05)
    with trio.fail_after(10):
        async with serve(backend, sse_write_timeout=0.2) as (client, _):
            r = await client.post(CHAT, json=chat_body(stream=True))
            stalled = await metric(client, "mesh_entry_stalled_clients_total")
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert backend.finished == 1 and stalled == 0


# --- 4. seeds ----------------------------------------------------------------------------------


async def test_a_users_seed_is_mixed_before_it_reaches_a_node(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, alice = store.create("alice")
    _, bob = store.create("bob")
    backend = FakeBackend()
    seeds = SeedMixer.load_or_create(tmp_path / "state" / "seed.key")
    body = chat_body(seed=31337, temperature=0.8, n=2)
    with trio.fail_after(10):
        async with serve(backend, keys=store, seeds=seeds) as (client, _):
            a1 = await client.post(CHAT, json=body, headers={"Authorization": f"Bearer {alice}"})
            a2 = await client.post(CHAT, json=body, headers={"Authorization": f"Bearer {alice}"})
            b1 = await client.post(CHAT, json=body, headers={"Authorization": f"Bearer {bob}"})
    assert a1.status_code == a2.status_code == b1.status_code == 200
    # Choices run concurrently: their specs arrive in either order.
    sa1, sa2, sb1 = (sorted(s.params.seed for s in backend.specs[i:i + 2]) for i in (0, 2, 4))
    assert sa1 == sa2  # the same user's seed stays deterministic for them...
    assert a1.json()["choices"] == a2.json()["choices"]
    assert not set(sa1) & set(sb1)  # ...and unlinkable across users
    assert not set(sa1 + sb1) & {31337, 31338}  # the node never sees the user's numbers
    assert len(set(sa1)) == 2 and all(0 <= s < 2**63 for s in sa1 + sb1)
    # A restart reads the same secret: seeded requests stay reproducible.
    again = SeedMixer.load_or_create(tmp_path / "state" / "seed.key")
    assert sorted(again.mix("key:1", 31337 + i) for i in range(2)) == sa1
    store.close()


def test_the_seed_secret_file_is_private_and_checked(tmp_path):
    path = tmp_path / "entry" / "seed.key"
    mixer = SeedMixer.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert SeedMixer.load_or_create(path).mix("open", 1) == mixer.mix("open", 1)
    assert SeedMixer.random().mix("open", 1) != mixer.mix("open", 1)
    assert [p.name for p in path.parent.iterdir()] == ["seed.key"]  # no temporary file left
    path.write_bytes(b"short")
    with pytest.raises(OSError, match="not a seed secret"):
        SeedMixer.load_or_create(path)


# --- 5. credit statement queries ----------------------------------------------------------------


async def test_statement_queries_are_fresh_and_single_use(tmp_path):
    node = Identity.generate()
    ledger = Ledger(tmp_path / "credits.db")
    url = f"/v1/mesh/credits/{node.peer_id}"
    try:
        with trio.fail_after(10):
            async with serve(FakeBackend(), ledger=ledger) as (client, _):
                ahead = await client.get(url, headers={HEADER: sign_query(node, now=time.time() + 299)})
                old = await client.get(url, headers={HEADER: sign_query(node, now=time.time() - 120)})
                header = sign_query(node)
                first = await client.get(url, headers={HEADER: header})
                ts, _, sig = header.partition(".")
                replays = [await client.get(url, headers={HEADER: h}) for h in (header, f"{ts}.{sig.upper()}",
                                                                                f"0{ts}.{sig}")]
    finally:
        ledger.close()
    assert ahead.status_code == 401 and ahead.json()["error"]["code"] == "invalid_node_signature"
    assert old.status_code == 401
    assert first.status_code == 200 and first.json()["node"] == node.peer_id
    assert [r.status_code for r in replays] == [401, 401, 401]
    assert replays[0].json()["error"]["code"] == "replayed_node_signature"
