"""The benchmark phase: POST /v1/mesh/benchmark scores every model on a suite through the
entry's own API, stores the table in the state dir and refits the router, which then routes
`auto` and shows in GET /v1/mesh/routing; `mesh entry benchmark` drives it from the shell."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import trio

from entry.backend import MeshUnavailable
from entry.routing_config import parse_routing
from entry.targets import ROUTER_FILE, STATS_FILE, TABLE_FILE, AutoRouting
from tests.support.fake_backend import MODEL, FakeBackend, running_api

SMALL = dataclasses.replace(MODEL, id="small", sha256="11" * 32)
BIG = dataclasses.replace(MODEL, id="big", sha256="22" * 32)
# The fake models answer "Hello, I am a fake model. Nice to meet you!" (greedy): the suite
# is built so that "big" (allowed 13 tokens) gets right what "small" (cut at 2) cannot.
SUITE = [
    {"id": "s1", "task": "greet", "prompt": "Greet me.", "scorer": "contains", "reference": "hello", "max_tokens": 16},
    {"id": "s2", "task": "greet", "prompt": "Say hi.", "scorer": "contains", "reference": "hello", "max_tokens": 16},
    {"id": "s3", "task": "greet", "prompt": "Hello?", "scorer": "contains", "reference": "hello", "max_tokens": 16},
    {"id": "s4", "task": "meet", "prompt": "Nice to meet?", "scorer": "contains", "reference": "meet", "max_tokens": 16},
    {"id": "s5", "task": "meet", "prompt": "Meet whom?", "scorer": "contains", "reference": "meet", "max_tokens": 16},
    {"id": "s6", "task": "meet", "prompt": "Who to meet?", "scorer": "regex", "reference": "(?i)meet", "max_tokens": 16},
]


class TwoModels(FakeBackend):
    """"small" stops after two tokens: it never reaches "meet". "big" is busy at first."""

    busy = 2

    def select_model(self, model: str):
        if model == "big" and self.busy:
            self.busy -= 1
            raise MeshUnavailable("all nodes for this model are busy", retry_after=0.1)
        return super().select_model(model)

    def generate(self, spec, model=None):
        if model is not None and model.id == "small":
            spec = dataclasses.replace(spec, params=dataclasses.replace(spec.params, max_tokens=2))
        return super().generate(spec, model)


def suite_text() -> str:
    return "\n".join(json.dumps(r) for r in SUITE)


async def poll(api, run_id: str) -> dict:
    while True:  # bounded by the caller's fail_after
        run = (await api.client.get(f"/v1/mesh/benchmark/{run_id}")).json()
        if run["status"] != "running":
            return run
        await trio.sleep(0.05)


async def test_benchmark_route_writes_a_table_the_router_then_uses(tmp_path):
    auto = AutoRouting(parse_routing({"mesh_price_per_credit": 1.0}), {}, tmp_path / "routing",
                       weight_of=lambda m: {"small": 0.1, "big": 1.0}[m.id])
    with trio.fail_after(60):
        async with running_api(TwoModels(models_list=[SMALL, BIG]), auto=auto) as api:
            before = (await api.client.get("/v1/mesh/routing")).json()
            r = await api.client.post("/v1/mesh/benchmark", json={"suite": suite_text()})
            assert r.status_code == 202, r.text
            run = await poll(api, r.json()["id"])
            view = (await api.client.get("/v1/mesh/routing")).json()
            routed = (await api.client.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": "Nice to meet?"}]})).json()
            metrics = (await api.client.get("/metrics")).text
    assert before["router"]["fitted"] is False and before["tasks"] == []
    assert run["status"] == "done", run
    assert run["done"] == run["total"] == 12
    s = run["summary"]
    assert s["tasks"] == {"greet": {"small": 1.0, "big": 1.0}, "meet": {"small": 0.0, "big": 1.0}}
    assert s["models"]["big"]["calls"] == 6 and s["error_count"] == 0
    assert s["router"]["rows"] == 6 and s["router"]["models"] == ["big", "small"]
    for name in (ROUTER_FILE, TABLE_FILE, STATS_FILE):
        assert (tmp_path / "routing" / name).is_file()
    assert len((tmp_path / "routing" / TABLE_FILE).read_text().splitlines()) == 6
    tasks = {t["task"]: t for t in view["tasks"]}
    assert view["router"]["fitted"] and view["router"]["source"] == "benchmark"
    assert tasks["meet"]["models"]["big"]["quality"] == 1.0 and tasks["meet"]["models"]["small"]["quality"] == 0.0
    assert tasks["meet"]["models"]["big"]["latency_p50_s"] is not None
    assert routed["mesh"]["route"]["task"] == "meet" and routed["mesh"]["route"]["predicted_quality"] is not None
    # The benchmark's calls went through the normal path: counted like any request.
    assert 'mesh_entry_completion_tokens_total{model="big"}' in metrics

    # A new entry on the same state dir loads the saved router.
    again = AutoRouting(parse_routing({}), {}, tmp_path / "routing")
    again.load()
    assert again.status.source == "state router" and again.status.rows == 6


async def test_benchmark_route_refuses_bad_input():
    with trio.fail_after(30):
        async with running_api(TwoModels(models_list=[SMALL, BIG])) as api:
            bad_line = await api.client.post("/v1/mesh/benchmark", json={
                "suite": suite_text() + '\n{"id": "x", "task": "t", "prompt": "p", "scorer": "nope", "reference": 1}'})
            bad_model = await api.client.post("/v1/mesh/benchmark", json={"models": ["huge"]})
            bad_field = await api.client.post("/v1/mesh/benchmark", json={"suites": "x"})
            missing = await api.client.get("/v1/mesh/benchmark/nope")
    assert bad_line.status_code == 400 and bad_line.json()["error"]["message"].startswith("suite:7: row 'x'")
    assert bad_model.status_code == 400 and bad_model.json()["error"]["param"] == "models"
    assert bad_field.status_code == 400
    assert missing.status_code == 404


def test_cli_reports_a_malformed_suite_with_its_line(tmp_path):
    suite = tmp_path / "s.jsonl"
    suite.write_text(suite_text() + "\n\n{not json}\n")
    p = subprocess.run([sys.executable, "-m", "mesh_cli", "entry", "benchmark", "--suite", str(suite),
                        "--entry", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert f"{suite}:8: bad JSON" in p.stderr


async def test_cli_runs_a_benchmark_against_a_running_entry(tmp_path):
    suite = tmp_path / "s.jsonl"
    suite.write_text(suite_text())
    auto = AutoRouting(parse_routing({}), {}, tmp_path / "routing")
    with trio.fail_after(90):
        async with running_api(TwoModels(models_list=[SMALL, BIG]), auto=auto) as api:
            p = await trio.run_process([sys.executable, "-m", "mesh_cli", "entry", "benchmark", "--suite", str(suite),
                                        "--entry", api.base_url, "--json", "--models", "big,small"],
                                       capture_stdout=True, capture_stderr=True, check=False)
    assert p.returncode == 0, p.stderr.decode()
    run = json.loads(p.stdout)
    assert run["status"] == "done" and run["summary"]["tasks"]["meet"] == {"big": 1.0, "small": 0.0}
    assert "12/12" in p.stderr.decode()
    assert auto.status.rows == 6


async def test_only_an_operator_key_starts_or_reads_a_benchmark(tmp_path):
    from entry.api.apikeys import ApiKeyStore

    keys = ApiKeyStore(tmp_path / "keys.db")
    _, plain = keys.create("user")
    _, operator = keys.create("ops", operator=True)
    auto = AutoRouting(parse_routing({}), {}, tmp_path / "routing")
    with trio.fail_after(60):
        async with running_api(TwoModels(models_list=[SMALL, BIG]), open_mode=False, keys=keys, auto=auto) as api:
            def auth(key: str) -> dict:
                return {"Authorization": f"Bearer {key}"}

            refused = await api.client.post("/v1/mesh/benchmark", json={"suite": suite_text()}, headers=auth(plain))
            started = await api.client.post("/v1/mesh/benchmark", json={"suite": suite_text()}, headers=auth(operator))
            run_id = started.json()["id"]
            peek = await api.client.get(f"/v1/mesh/benchmark/{run_id}", headers=auth(plain))
            while (await api.client.get(f"/v1/mesh/benchmark/{run_id}", headers=auth(operator))).json()["status"] == "running":
                await trio.sleep(0.05)  # bounded by fail_after
    keys.close()
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert refused.json()["error"]["code"] == "operator_key_required"
    assert started.status_code == 202 and peek.status_code == 403
    assert auto.status.rows == 6
