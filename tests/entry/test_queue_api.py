"""The entry's queue through its HTTP API: real API, backend and node services (synthetic
engine, in-process, tests/support/queue_mesh.py). "Every slot is busy" is a held generation
the test releases; what the tests wait on is the queue's length (observable state), bounded."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from entry.mesh.relay import MeshBackendConfig
from tests.support.queue_mesh import HOLD, MODEL, chat, queue_mesh, wait_until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def metric(mesh, name: str, **labels) -> float:
    async with mesh.client() as c:
        return samples((await c.get("/metrics")).text).get((name, tuple(sorted(labels.items()))), 0.0)


async def hold_the_slot(mesh, nursery, results: dict, key: str = "a") -> None:
    """Start a request that occupies the node's slot until its engine is released."""
    async def run() -> None:
        async with mesh.client(key) as c:
            results[HOLD] = await c.post("/v1/chat/completions", json=chat(HOLD))

    nursery.start_soon(run)
    await wait_until(lambda: HOLD in mesh.engines[0].started, what="the held generation to start")


async def post(mesh, results: dict, key: str, content: str, max_tokens: int = 4) -> None:
    async with mesh.client(key) as c:
        results[content] = await c.post("/v1/chat/completions", json=chat(content, max_tokens))


async def test_more_concurrent_requests_than_slots_all_complete(tmp_path):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=30)) as mesh:
        engines = [mesh.add_node(slots=2), mesh.add_node(slots=1)]
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(24):
                    nursery.start_soon(post, mesh, results, "ab"[i % 2], f"r{i}", 16)
        assert sorted(r.status_code for r in results.values()) == [200] * 24
        assert all(r.json()["usage"]["completion_tokens"] == 16 for r in results.values())
        assert sum(len(e.started) for e in engines) == 24
        assert await metric(mesh, "mesh_queue_wait_seconds_count", model=MODEL) > 0  # some had to wait
        assert await metric(mesh, "mesh_queue_length", model=MODEL) == 0


async def test_a_second_key_is_served_before_the_first_keys_backlog(tmp_path):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=30)) as mesh:
        eng = mesh.add_node(slots=1)
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await hold_the_slot(mesh, nursery, results)
                for i in range(10):
                    nursery.start_soon(post, mesh, results, "a", f"A{i}")
                    await wait_until(lambda: mesh.backend.queue.waiting() == i + 1, what=f"A{i} queued")
                nursery.start_soon(post, mesh, results, "b", "B0")
                await wait_until(lambda: mesh.backend.queue.waiting() == 11, what="B0 queued")
                assert await metric(mesh, "mesh_queue_length", model=MODEL) == 11
                eng.release.set()
        assert all(r.status_code == 200 for r in results.values())
        assert eng.started == [HOLD, "A0", "B0"] + [f"A{i}" for i in range(1, 10)]


async def test_a_full_queue_answers_503_with_retry_after_in_openais_shape(tmp_path):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=30, queue_max=2, retry_after=4)) as mesh:
        eng = mesh.add_node(slots=1)
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await hold_the_slot(mesh, nursery, results)
                for i, key in enumerate("ab"):  # one waiting per key: the queue is full and fairly shared
                    nursery.start_soon(post, mesh, results, key, f"{key}0")
                    await wait_until(lambda: mesh.backend.queue.waiting() == i + 1, what=f"{key}0 queued")
                for stream in (False, True):
                    async with mesh.client("a") as c:
                        r = await c.post("/v1/chat/completions", json=chat("a1", stream=stream))
                    assert r.status_code == 503 and r.headers["retry-after"] == "4"
                    assert r.headers["content-type"] == "application/json"
                    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "server_error",
                                                  "param": None, "code": "queue_full"}}
                    assert "queue is full" in r.json()["error"]["message"]
                assert await metric(mesh, "mesh_queue_rejected_total", model=MODEL, reason="full") == 2
                eng.release.set()
        assert [results[k].status_code for k in (HOLD, "a0", "b0")] == [200, 200, 200]
        assert "a1" not in eng.started


async def test_a_request_that_waited_past_queue_wait_gets_503(tmp_path):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=0.5)) as mesh:
        eng = mesh.add_node(slots=1)
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await hold_the_slot(mesh, nursery, results)
                t0 = trio.current_time()
                async with mesh.client("b") as c:
                    r = await c.post("/v1/chat/completions", json=chat("late"))
                assert trio.current_time() - t0 >= 0.5
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_timeout" and r.json()["error"]["type"] == "server_error"
                assert await metric(mesh, "mesh_queue_rejected_total", model=MODEL, reason="expired") == 1
                eng.release.set()
        assert results[HOLD].status_code == 200 and "late" not in eng.started


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_leaves_the_queue_and_never_takes_a_slot(tmp_path, stream):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=30)) as mesh:
        eng = mesh.add_node(slots=1)
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await hold_the_slot(mesh, nursery, results)
                gone = trio.CancelScope()

                async def leaver() -> None:
                    with gone:
                        async with mesh.client("a") as c:
                            await c.post("/v1/chat/completions", json=chat("gone", stream=stream))

                nursery.start_soon(leaver)
                await wait_until(lambda: mesh.backend.queue.waiting() == 1, what="the leaver queued")
                nursery.start_soon(post, mesh, results, "b", "stays")
                await wait_until(lambda: mesh.backend.queue.waiting() == 2, what="the second queued")
                assert await metric(mesh, "mesh_queue_length", model=MODEL) == 2
                gone.cancel()  # the client closes its connection
                await wait_until(lambda: mesh.backend.queue.waiting() == 1, what="the leaver out of the queue")
                assert await metric(mesh, "mesh_queue_length", model=MODEL) == 1
                eng.release.set()
        assert results["stays"].status_code == 200
        assert eng.started == [HOLD, "stays"]
        assert await metric(mesh, "mesh_entry_client_disconnects_total") == 1


async def test_nodes_view_and_metrics_show_the_queue(tmp_path):
    async with queue_mesh(tmp_path, MeshBackendConfig(admission_wait=30)) as mesh:
        eng = mesh.add_node(slots=1)
        results: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await hold_the_slot(mesh, nursery, results)
                nursery.start_soon(post, mesh, results, "b", "waits")
                await wait_until(lambda: mesh.backend.queue.waiting() == 1, what="queued")
                async with mesh.client("a") as c:
                    q = (await c.get("/v1/mesh/queue")).json()
                assert q["waiting"] == 1 and q["max"] == 256 and q["wait_s"] == 30
                [m] = q["models"]
                assert m["model"] == MODEL and m["waiting"] == 1 and m["oldest_wait_s"] >= 0
                eng.release.set()
        assert await metric(mesh, "mesh_queue_wait_seconds_count", model=MODEL) == 1
        async with httpx.AsyncClient(base_url=mesh.url) as c:
            assert (await c.get("/v1/mesh/queue")).status_code == 401  # like /v1/mesh/nodes: a key's business
