"""`model: "auto"` end to end on real parts: an entry process routing with the shipped demo
table, two real nodes serving two different real models (the bundled SmolLM2-135M-Instruct and
Gemma 3 270M, over real libp2p), and a real third-party OpenAI-compatible provider
(`python -m llama_cpp.server`), driven with the official `openai` client.

The prompts are picked so the router fitted on the demo table separates them (see
routing/tables/demo_basic.jsonl: Gemma did better on extraction, SmolLM2 on capitals); the
test asserts where each went from what the entry answered, never from a hard-coded choice."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from mesh_cli.demo import DEMO_TABLE
from routing import fit_router, load_table
from tests.support import provider_server as support
from tests.support.node_procs import NodeProc, spawn_entry, spawn_node, wait_ready_sync
from tests.support.provider_server import API_KEY, MODEL_ALIAS

pytestmark = pytest.mark.slow

provider_server = support.provider_server  # module-scoped fixture

PROVIDER = "local"
PROVIDER_MODEL = f"{PROVIDER}/{MODEL_ALIAS}"
NODE_ARGS = ("--threads", "1", "--skip-benchmark", "--advert-interval", "1")
# One of each kind the demo table scores; which model each goes to is read off the fitted
# router below, so the test holds for another table too as long as the two differ.
PROMPTS = ("What is the capital of France?",
           "Extract the email address from: contact bob@example.com today.")


@pytest.fixture(scope="module")
def models():
    from engine.model_file import ModelFileError, bundled_models

    try:
        return bundled_models()
    except ModelFileError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def expected_routes() -> dict[str, str]:
    """prompt -> the mesh model the demo router predicts best for it (equal prices, so the
    tolerance policy takes the best)."""
    router = fit_router(load_table(DEMO_TABLE))
    out = {p: max(router.predict_one(p).items(), key=lambda kv: kv[1])[0] for p in PROMPTS}
    assert len(set(out.values())) == 2, f"the demo table no longer separates the test prompts: {out}"
    return out


class AutoMesh:
    def __init__(self, tmp, provider_url: str, models):
        cfg = tmp / "entry.toml"
        # Mesh models at 1 USD per credit (both weigh the same without a verifier model
        # loaded); the provider dearer, so it serves only when asked for or when the mesh can't.
        cfg.write_text(f"""
[entry]
open = true

[[entry.providers]]
name = "{PROVIDER}"
base_url = "{provider_url}"
api_key_env = "TEST_PROVIDER_KEY"
input_per_mtok = 0.0
output_per_mtok = 50.0
models = ["{MODEL_ALIAS}"]

[entry.routing]
mesh_price_per_credit = 1.0
""")
        self.procs: list[NodeProc] = []
        self.entry = self._keep(spawn_entry(tmp, "entry", "--config", str(cfg), "--routing-table", str(DEMO_TABLE)))
        info = wait_ready_sync(self.entry, 60)
        self.url, bootstrap = info["url"], info["p2p_addrs"][0]
        self.nodes: dict[str, NodeProc] = {}
        for path in models:
            node = self._keep(spawn_node(tmp, path.stem, "--bootstrap", bootstrap, "--model", str(path), *NODE_ARGS))
            wait_ready_sync(node, 180)
            self.nodes[path.stem] = node
        self.wait_models(lambda served: all(served.get(name, 0) >= 1 for name in self.nodes), "both models served")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=60, max_retries=0)

    def _keep(self, proc: NodeProc) -> NodeProc:
        self.procs.append(proc)
        return proc

    def served(self) -> dict[str, int]:
        data = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]
        return {m["id"]: m.get("nodes", 0) for m in data}

    def wait_models(self, cond, what: str, limit: float = 90.0) -> dict[str, int]:
        deadline = time.monotonic() + limit
        served: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                served = self.served()
                if cond(served):
                    return served
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"not reached within {limit} s: {what}; /v1/models says {served}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, provider_server, models):
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_PROVIDER_KEY", API_KEY)  # the entry reads the provider key from its environment
    m = None
    try:
        m = AutoMesh(tmp_path_factory.mktemp("auto-e2e"), provider_server.base_url, models)
        yield m
    finally:
        if m is not None:
            m.stop()
        mp.undo()


def ask(mesh: AutoMesh, prompt: str, **kw):
    return mesh.client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, **kw)


def test_auto_routes_each_prompt_to_the_model_predicted_best(mesh, expected_routes):
    assert {"auto", PROVIDER_MODEL} <= set(mesh.served())
    for prompt, want in expected_routes.items():
        raw = ask(mesh, prompt)
        body = raw.parse()
        assert body.model == want, (prompt, body.model)
        assert raw.headers["x-mesh-model"] == want
        route = body.model_extra["mesh"]["route"]
        assert route["model"] == want and route["candidates"][0] == want, route
        assert body.usage.completion_tokens >= 1 and body.choices[0].message.content

        # Streamed: the same choice, named on every chunk, text arriving in pieces.
        chunks = list(mesh.client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True))
        assert {c.model for c in chunks} == {want}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_auto_uses_the_provider_when_the_mesh_models_are_denied(mesh, expected_routes):
    deny = sorted(set(expected_routes.values()))
    raw = ask(mesh, PROMPTS[0], extra_body={"mesh": {"route": {"deny": deny}}})
    body = raw.parse()
    assert body.model == PROVIDER_MODEL and raw.headers["x-mesh-model"] == PROVIDER_MODEL
    assert body.model_extra["mesh"]["route"]["model"] == PROVIDER_MODEL
    assert body.choices[0].message.content


def test_routing_view_lists_every_target(mesh, expected_routes):
    view = httpx.get(f"{mesh.url}/v1/mesh/routing", timeout=10).json()
    ids = {t["id"] for t in view["targets"]}
    assert set(expected_routes.values()) | {PROVIDER_MODEL} <= ids, view["targets"]


def test_when_the_chosen_model_leaves_the_next_choice_serves(mesh, expected_routes):
    # Last in the module: it stops a node.
    prompt = PROMPTS[1]
    gone = expected_routes[prompt]
    other = next(m for m in expected_routes.values() if m != gone)
    node = mesh.nodes[gone]
    node.signal(signal.SIGTERM)
    node.proc.wait(30)
    mesh.wait_models(lambda served: served.get(gone, 0) == 0, f"{gone} gone")
    body = ask(mesh, prompt).parse()
    assert body.model == other, json.dumps(body.model_extra.get("mesh"))
    assert body.choices[0].message.content

