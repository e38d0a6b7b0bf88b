"""The node on one batched engine: the model loaded once whatever --slots is, slots as
admission workers, prefix reuse scoped by requesting peer, status reporting the mode."""

from __future__ import annotations

import pytest
import trio

from node import daemon
from node.config import NodeConfig
from protocol.messages import StatusReply, parse_message, to_wire
from tests.support.node_harness import collect, connect, make_service, request


def test_model_and_gpu_layers_are_loaded_once_whatever_the_slots(monkeypatch, tiny_gguf):
    made = []

    class FakeEngine:
        gpu_offload = True

        def __init__(self, path, **kw):
            made.append(kw)

        def slot_handles(self):
            return [("slot", i) for i in range(made[-1]["slots"])]

    import engine.batched

    monkeypatch.setattr(engine.batched, "BatchedEngine", FakeEngine)
    cfg = NodeConfig(model=str(tiny_gguf), slots=8, gpu_layers=-1, threads=3, prefix_cache_tokens=100)
    workers = daemon.load_engines(cfg, daemon.resolve_model(cfg))
    assert len(made) == 1 and len(workers) == 8
    assert made[0]["n_gpu_layers"] == -1 and made[0]["slots"] == 8 and made[0]["n_threads"] == 3
    assert made[0]["n_threads_batch"] == 3  # --threads alone sets both
    assert made[0]["prefix_cache_tokens"] == 100


def test_config_defaults_and_limits():
    from engine.threads import default_threads

    cfg = NodeConfig()
    assert cfg.prefix_cache_size() == cfg.ctx and cfg.llama_threads() == default_threads()
    assert NodeConfig(threads=3).llama_threads() == (3, 3)
    assert NodeConfig(threads_batch=5).llama_threads() == (default_threads()[0], 5)
    assert NodeConfig(threads=1, threads_batch=2).llama_threads() == (1, 2)
    assert NodeConfig(prefix_cache_tokens=0).prefix_cache_size() == 0
    for bad in (NodeConfig(slots=129), NodeConfig(prefix_cache_tokens=-1), NodeConfig(threads=-1),
                NodeConfig(threads_batch=-2)):
        with pytest.raises(ValueError):
            bad.validate()


def test_status_reply_carries_mode_and_aggregate_and_old_replies_parse():
    reply = StatusReply("a" * 64, "m", 4, 4, 0, 8, 100.0, 20.0, 0, False, 2048, "batched", 55.5)
    back = parse_message(to_wire(reply))
    assert back.engine_mode == "batched" and back.aggregate_tps == 55.5
    old = to_wire(reply)
    del old["mode"], old["agg_tps"]  # what a node of the previous release sends
    legacy = parse_message(old)
    assert legacy.engine_mode == "" and legacy.aggregate_tps == 0.0


async def test_service_runs_slots_on_one_engine_and_scopes_prefix_reuse_by_peer(tiny_gguf):
    svc = make_service(tiny_gguf, slots=2, prefix_cache_tokens=256)
    workers = svc.admission._idle
    engine = workers[0].engine
    assert all(w.engine is engine for w in workers)
    try:
        prompt = "a long enough prompt that a second request shares " * 3
        async with trio.open_nursery() as nursery:
            a1 = connect(nursery, svc, remote="entry-A")
            ids1, _, _ = await collect(a1, request(svc, prompt=prompt, max_tokens=4))
            hits = engine.counters.prefix_hits
            a2 = connect(nursery, svc, remote="entry-A")
            await collect(a2, request(svc, prompt=prompt + "again", max_tokens=4))
            assert engine.counters.prefix_hits == hits + 1  # same peer: its own prefix reused
            b = connect(nursery, svc, remote="entry-B")
            await collect(b, request(svc, prompt=prompt + "again", max_tokens=4))
            assert engine.counters.prefix_hits == hits + 1  # another peer: never
            nursery.cancel_scope.cancel()
        assert len(ids1) == 4
    finally:
        engine.close()
