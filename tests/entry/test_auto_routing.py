"""`model: "auto"`: the entry routes each request to a target (a mesh model or a provider
model) with the learned router, falls back when the first choice cannot start, and says what
it did (`model`, `mesh.route`, x-mesh-model). Driven with the official `openai` client; the
mesh is the deterministic FakeBackend with two models, the provider a real llama_cpp.server."""

from __future__ import annotations

import dataclasses
import functools

import openai
import pytest
import trio

from entry.backend import MeshUnavailable
from entry.providers import ProviderClient
from entry.routing_config import parse_providers, parse_routing
from entry.targets import AutoRouting
from routing import ScoreRow, fit_router
from tests.support import provider_server as support
from tests.support.fake_backend import MODEL, FakeBackend, parse_sse, running_api
from tests.support.provider_server import API_KEY, MODEL_ALIAS

provider_server = support.provider_server  # module-scoped fixture

SMALL = dataclasses.replace(MODEL, id="small", sha256="11" * 32)
BIG = dataclasses.replace(MODEL, id="big", sha256="22" * 32)
WEIGHTS = {SMALL.sha256: 0.1, BIG.sha256: 1.0}  # credits per token -> prices 0.1 and 1.0 USD per 1M
HARD = "Prove that there are infinitely many prime numbers congruent to 3 modulo 4, rigorously."
EASY = "Say hello to Alice."


@functools.lru_cache(maxsize=1)
def table() -> tuple[ScoreRow, ...]:
    """Big is needed for proofs, small is as good at greetings."""
    rows = []
    for i in range(100):
        rows.append(ScoreRow(f"g{i}", {"small": 1.0, "big": 1.0}, prompt=f"Say hello to person number {i}.",
                             task="greeting"))
        rows.append(ScoreRow(f"p{i}", {"small": 0.0, "big": 1.0}, task="proof",
                             prompt=f"Prove that there are infinitely many prime numbers congruent to {i % 7 + 1} "
                                    f"modulo {i % 11 + 4}, rigorously."))
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def fitted_router():
    return fit_router(list(table()))


def auto_routing(providers: dict | None = None, *, router=True, policies: dict | None = None) -> AutoRouting:
    cfg = parse_routing({"mesh_price_per_credit": 1.0, "policies": policies or {"cheap": {"max_cost": 0.5}}})
    auto = AutoRouting(cfg, providers or {}, weight_of=lambda m: WEIGHTS[m.sha256])
    if router:
        rows = list(table())
        auto._install(fitted_router(), rows, dataclasses.replace(auto.status, source="test", rows=len(rows)))
    return auto


def backend() -> FakeBackend:
    return FakeBackend(models_list=[SMALL, BIG])


def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key="unused", timeout=20, max_retries=0)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def chat(c, prompt: str, **kw):
    return c.chat.completions.create(model=kw.pop("model", "auto"), messages=[{"role": "user", "content": prompt}], **kw)


def provider_targets(base_url: str, price: float = 0.0, timeout: float = 30) -> tuple[ProviderClient, dict]:
    (cfg,) = parse_providers([{"name": "local", "base_url": base_url, "api_key_env": "TEST_PROVIDER_KEY",
                               "timeout": timeout, "input_per_mtok": 0.0, "output_per_mtok": price,
                               "models": [MODEL_ALIAS]}])
    pc = ProviderClient(cfg, API_KEY)
    return pc, {t.id: t for t in pc.targets}


async def test_auto_routes_by_prompt_streamed_and_not():
    with trio.fail_after(30):
        async with running_api(backend(), auto=auto_routing()) as api:
            c = client(api)
            hard = await in_thread(chat, c, HARD)
            easy = await in_thread(chat, c, EASY)
            chunks = await in_thread(lambda: list(chat(c, HARD, stream=True, stream_options={"include_usage": True})))
            raw = await api.client.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": EASY}], "stream": True})
    assert hard.model == "big" and easy.model == "small"
    route = hard.model_extra["mesh"]["route"]
    assert route["model"] == "big" and route["policy"] == "default" and route["task"] == "proof"
    assert route["predicted_quality"] > 0.5 and route["fallbacks"] == []
    assert easy.model_extra["mesh"]["route"]["cost_vs_best_single"] == pytest.approx(0.1)
    assert {ch.model for ch in chunks} == {"big"}
    assert chunks[-1].model_extra["mesh"]["route"]["model"] == "big"
    assert raw.headers["x-mesh-model"] == "small"
    assert {e["model"] for e in parse_sse(raw.text) if e != "[DONE]"} == {"small"}


async def test_auto_on_completions_and_without_a_router_picks_the_cheapest():
    with trio.fail_after(30):
        async with running_api(backend(), auto=auto_routing(router=False)) as api:
            c = client(api)
            done = await in_thread(c.completions.create, model="auto", prompt=HARD, max_tokens=4)
            r = await api.client.post("/v1/completions", json={"model": "auto", "prompt": HARD, "max_tokens": 4})
    assert done.model == "small"
    assert "no router" in done.model_extra["mesh"]["route"]["reason"]
    assert r.status_code == 200 and r.headers["x-mesh-model"] == "small"


async def test_max_cost_policy_and_request_options():
    with trio.fail_after(30):
        async with running_api(backend(), auto=auto_routing()) as api:
            c = client(api)
            capped = await in_thread(chat, c, HARD, extra_body={"mesh": {"route": {"max_cost": 0.5}}})
            policy = await in_thread(chat, c, HARD, model="auto:cheap")
            allow = await in_thread(chat, c, EASY, extra_body={"mesh": {"route": {"allow": ["big"]}}})
            deny = await in_thread(chat, c, HARD, extra_body={"mesh": {"route": {"deny": ["b*"]}}})
            lax = await in_thread(chat, c, HARD, extra_body={"mesh": {"route": {"quality": 0.01}}})
    assert capped.model == "small" and policy.model == "small"
    assert capped.model_extra["mesh"]["route"]["excluded"] == {"big": "price 1 over max_cost 0.5"}
    assert allow.model == "big" and deny.model == "small"
    assert lax.model == "small"  # anything predicted >= 1% of the best qualifies: the cheapest


async def test_bad_routing_requests_are_400():
    bad_bodies = [
        ({"model": "auto:nope"}, "model"),
        ({"model": "auto", "mesh": {"route": {"quality": "high"}}}, "mesh.route.quality"),
        ({"model": "auto", "mesh": {"route": {"quality": 1.5}}}, "mesh.route.quality"),
        ({"model": "auto", "mesh": {"route": {"max_cost": -1}}}, "mesh.route.max_cost"),
        ({"model": "auto", "mesh": {"route": {"allow": "big"}}}, "mesh.route.allow"),
        ({"model": "auto", "mesh": {"route": {"deny": [1]}}}, "mesh.route.deny"),
        ({"model": "auto", "mesh": {"route": {"qualty": 0.9}}}, "mesh.route"),
        ({"model": "auto", "mesh": {"route": 3}}, "mesh.route"),
        ({"model": "auto", "mesh": []}, "mesh"),
        ({"model": "auto", "mesh": {"route": {"allow": ["nothing-like-this"]}}}, "mesh.route"),
    ]
    with trio.fail_after(30):
        async with running_api(backend(), auto=auto_routing()) as api:
            c = client(api)
            with pytest.raises(openai.BadRequestError) as ei:
                await in_thread(chat, c, EASY, model="auto:nope")
            answers = [await api.client.post("/v1/chat/completions", json={
                **b, "messages": [{"role": "user", "content": EASY}]}) for b, _ in bad_bodies]
    assert ei.value.body["param"] == "model"
    for (body, param), r in zip(bad_bodies, answers):
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)


class _FirstLeaves(FakeBackend):
    """Lists both models, but the one asked for first has just lost its nodes."""

    def select_model(self, model: str):
        if model == "small":
            raise MeshUnavailable("no free node for small")
        return super().select_model(model)


async def test_a_model_without_a_free_node_falls_back_to_the_next_choice():
    with trio.fail_after(30):
        async with running_api(_FirstLeaves(models_list=[SMALL, BIG]), auto=auto_routing()) as api:
            done = await in_thread(chat, client(api), EASY)
    assert done.model == "big"
    assert done.model_extra["mesh"]["route"]["fallbacks"] == [{"model": "small", "error": "no free node for small"}]


async def test_provider_down_falls_back_and_everything_down_is_an_error():
    # A closed port: connection refused before any text.
    pc, targets = provider_targets("http://127.0.0.1:9/v1", price=0.0, timeout=5)
    async with pc:
        auto = auto_routing(targets, router=False)
        with trio.fail_after(30):
            async with running_api(backend(), auto=auto) as api:
                c = client(api)
                done = await in_thread(chat, c, EASY)
                streamed = await api.client.post("/v1/chat/completions", json={
                    "model": "auto", "stream": True, "messages": [{"role": "user", "content": EASY}]})
                only = await api.client.post("/v1/chat/completions", json={
                    "model": "local/" + MODEL_ALIAS, "messages": [{"role": "user", "content": EASY}]})
    assert done.model == "small"  # the provider was cheapest (price 0) but could not start
    (fb,) = done.model_extra["mesh"]["route"]["fallbacks"]
    assert fb["model"] == "local/" + MODEL_ALIAS and "cannot connect" in fb["error"]
    assert streamed.headers["x-mesh-model"] == "small"
    assert only.status_code == 502 and only.json()["error"]["code"] == "provider_error"


async def test_provider_serves_by_name_and_when_the_mesh_is_denied(provider_server):
    pc, targets = provider_targets(provider_server.base_url, price=5.0)
    async with pc:
        with trio.fail_after(120):
            async with running_api(backend(), auto=auto_routing(targets)) as api:
                c = client(api)
                models = await in_thread(lambda: [m.id for m in c.models.list()])
                denied = await in_thread(chat, c, EASY, max_tokens=8, temperature=0,
                                         extra_body={"mesh": {"route": {"deny": ["small", "big"]}}})
                by_name = await in_thread(chat, c, EASY, model="local/" + MODEL_ALIAS, max_tokens=8)
                chunks = await in_thread(lambda: list(chat(c, EASY, max_tokens=8, stream=True,
                                                           extra_body={"mesh": {"route": {"allow": ["local/*"]}}})))
    assert models == ["small", "big", "auto", "auto:cheap", "local/" + MODEL_ALIAS]
    assert denied.model == "local/" + MODEL_ALIAS and denied.choices[0].message.content
    # The router was not trained on the provider model: it is still a candidate, after the known ones.
    assert denied.model_extra["mesh"]["route"]["candidates"] == ["local/" + MODEL_ALIAS]
    assert by_name.model == "local/" + MODEL_ALIAS and by_name.choices[0].message.content
    assert {ch.model for ch in chunks} == {"local/" + MODEL_ALIAS}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


async def test_routing_view_and_metrics():
    with trio.fail_after(30):
        async with running_api(backend(), auto=auto_routing()) as api:
            c = client(api)
            await in_thread(chat, c, HARD)
            await in_thread(chat, c, "Say hello to person number 7.")
            view = (await api.client.get("/v1/mesh/routing")).json()
            metrics = (await api.client.get("/metrics")).text
    assert view["router"]["fitted"] and view["router"]["rows"] == 200
    tasks = {t["task"]: t for t in view["tasks"]}
    assert tasks["proof"]["models"]["big"]["quality"] == 1.0 and tasks["proof"]["models"]["small"]["quality"] == 0.0
    assert tasks["proof"]["models"]["big"]["price"] == 1.0
    assert tasks["proof"]["choice"] == {"auto": "big", "auto:cheap": "small"}
    assert tasks["greeting"]["choice"]["auto"] == "small"
    assert 'mesh_routed_requests_total{model="big",task="proof"} 1' in metrics
    assert 'mesh_routed_requests_total{model="small",task="greeting"} 1' in metrics
    # Easy went to small instead of the best single model (big): 0.9 USD per 1M tokens saved.
    saved = next(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("mesh_routing_cost_saved_total"))
    assert saved == pytest.approx(0.9 * 13 / 1e6)


def test_start_up_loads_the_state_router_else_fits_the_state_or_shipped_table(tmp_path):
    from routing import write_table

    shipped = tmp_path / "shipped.jsonl"
    write_table(list(table()), shipped, append=False)
    state = tmp_path / "routing"
    auto = AutoRouting(parse_routing({}), {}, state, shipped)
    auto.load()
    assert auto.status.source == "shipped table shipped.jsonl" and auto.status.rows == 200
    assert auto.task_of(HARD.replace("3 modulo 4", "1 modulo 4")) == "proof"

    auto.refit(list(table())[:100], {"big": {"latency_p50_s": 0.5}}, merge=False)  # what a benchmark does
    again = AutoRouting(parse_routing({}), {}, state, shipped)
    again.load()
    assert again.status.source == "state router" and again.status.rows == 100
    assert again.stats["big"]["latency_p50_s"] == 0.5

    broken = AutoRouting(parse_routing({}), {}, tmp_path / "nothing")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "router.pkl").write_bytes(b"not a pickle")
    broken.load()  # a bad file is logged; auto falls back to the cheapest model
    assert broken.router is None and "not a router file" in broken.status.error


async def test_structured_output_is_never_sent_to_a_provider(provider_server):
    """A provider would be asked for free text: response_format and tools stay on the mesh,
    whose nodes enforce them with a grammar."""
    pc, targets = provider_targets(provider_server.base_url, price=0.0)  # the cheapest: auto would pick it
    fmt = {"type": "json_object"}
    async with pc:
        with trio.fail_after(120):
            async with running_api(backend(), auto=auto_routing(targets)) as api:
                c = client(api)
                routed = await in_thread(chat, c, EASY, max_tokens=8, response_format=fmt)
                with pytest.raises(openai.BadRequestError) as only_provider:
                    await in_thread(chat, c, EASY, max_tokens=8, response_format=fmt,
                                    extra_body={"mesh": {"route": {"allow": ["local/*"]}}})
                with pytest.raises(openai.BadRequestError) as by_name:
                    await in_thread(chat, c, EASY, model="local/" + MODEL_ALIAS, max_tokens=8, response_format=fmt)
                plain = await in_thread(chat, c, EASY, max_tokens=8, extra_body={"mesh": {"route": {"allow": ["local/*"]}}})
    assert routed.model in ("small", "big")
    assert "external providers are no candidates" in only_provider.value.body["message"]
    assert by_name.value.body["code"] == "unsupported_parameter"
    assert plain.model == "local/" + MODEL_ALIAS
