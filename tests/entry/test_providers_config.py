"""[[entry.providers]] and [entry.routing] in the entry's TOML config (entry/routing_config.py,
entry/config.py): what is accepted, and one clear line for each thing that is not."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from entry.config import EntryConfig, load_entry_config
from entry.routing_config import Prices, ProviderConfigError, parse_providers, parse_routing
from tests.support.node_procs import mesh_cmd

FULL = """
[entry]
http_port = 8123

[[entry.providers]]
name = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "TEST_OPENAI_KEY"
input_per_mtok = 0.15
output_per_mtok = 0.6
models = ["gpt-4o-mini", { id = "gpt-4o", input_per_mtok = 2.5, output_per_mtok = 10 }]

[[entry.providers]]
name = "local"
base_url = "http://127.0.0.1:8080/v1"
timeout = 5
models = [{ id = "qwen", input_per_mtok = 0, output_per_mtok = 0 }]

[entry.routing]
mesh_price_per_credit = 0.5

[entry.routing.policies.cheap]
quality = 0.9
max_cost = 1.0
allow = ["openai/*", "SmolLM2*"]
deny = ["openai/gpt-4o"]
"""


def write(tmp_path, text: str):
    p = tmp_path / "entry.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def provider(**over) -> dict:
    p = {"name": "p", "base_url": "https://p.example/v1", "input_per_mtok": 1, "output_per_mtok": 2, "models": ["m"]}
    p.update(over)
    return {k: v for k, v in p.items() if v is not None}


def test_full_config_parses(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test")
    cfg = load_entry_config(write(tmp_path, FULL), {})
    openai, local = cfg.providers
    assert openai.base_url == "https://api.openai.com/v1" and openai.timeout == 30 and openai.api_key() == "sk-test"
    assert [(m.id, m.prices) for m in openai.models] == [("gpt-4o-mini", Prices(0.15, 0.6)), ("gpt-4o", Prices(2.5, 10.0))]
    assert local.api_key() is None and local.timeout == 5 and local.target_id("qwen") == "local/qwen"
    r = cfg.routing
    assert r.mesh_prices(0.1345) == Prices(0.0, pytest.approx(0.06725))
    cheap = r.policy("cheap")
    assert (cheap.quality, cheap.max_cost) == (0.9, 1.0)
    assert cheap.permits("openai/gpt-4o-mini") and cheap.permits("SmolLM2-135M-Instruct.Q4_1")
    assert not cheap.permits("openai/gpt-4o") and not cheap.permits("local/qwen")
    assert r.policy("default").quality == 0.95 and r.policy("default").permits("anything") and r.policy("nope") is None
    assert cfg.http_port == 8123


def test_no_providers_is_the_default():
    cfg = EntryConfig()
    cfg.validate()
    assert cfg.providers == [] and cfg.routing.mesh_price_per_credit == 0.0 and cfg.routing.policies == {}


def test_missing_key_variable_is_a_startup_error_only_for_providers_that_name_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_OPENAI_KEY", raising=False)
    with pytest.raises(ValueError, match=r"^provider 'openai': environment variable TEST_OPENAI_KEY \(its api_key_env\) "
                                         r"is not set or empty$"):
        load_entry_config(write(tmp_path, FULL), {})
    monkeypatch.setenv("TEST_OPENAI_KEY", "  ")
    with pytest.raises(ValueError, match="is not set or empty"):
        load_entry_config(write(tmp_path, FULL), {})
    # The keyless local provider alone starts fine without any variable.
    local_only = FULL.split("[[entry.providers]]")[0] + "[[entry.providers]]" + FULL.split("[[entry.providers]]")[2]
    assert [p.name for p in load_entry_config(write(tmp_path, local_only), {}).providers] == ["local"]


@pytest.mark.parametrize("providers, message", [
    ({"name": "p"}, "providers must be an array of tables ([[entry.providers]])"),
    (["p"], "provider #1: must be a table"),
    ([provider(name=None)], "provider #1: 'name' must be"),
    ([provider(name="a/b")], "'name' must be 1-64 characters"),
    ([provider(base_url=None)], "provider 'p': 'base_url' is required"),
    ([provider(base_url="ftp://x/v1")], "provider 'p': 'base_url' must be an http:// or https:// URL, got 'ftp://x/v1'"),
    ([provider(base_url="https://u:pw@x/v1")], "must not carry a query, fragment or credentials"),
    ([provider(base_url="http://api.example/v1", api_key_env="K")], "must be https:// when an API key is sent"),
    ([provider(api_key_env="1BAD")], "'api_key_env' must name an environment variable"),
    ([provider(models=None)], "provider 'p': 'models' must be a non-empty list"),
    ([provider(models=[])], "provider 'p': 'models' must be a non-empty list"),
    ([provider(models=["a b"])], "a model 'id' must be 1-256 characters without spaces, got 'a b'"),
    ([provider(models=[3])], "each entry of 'models' must be a model id or a table"),
    ([provider(models=["m", {"id": "m", "input_per_mtok": 1}])], "provider 'p': model 'm' is listed twice"),
    ([provider(input_per_mtok="cheap")], "provider 'p': 'input_per_mtok' must be a number >= 0 (USD per 1M tokens), got 'cheap'"),
    ([provider(output_per_mtok=-1)], "'output_per_mtok' must be a number >= 0"),
    ([provider(output_per_mtok=float("nan"))], "'output_per_mtok' must be a number >= 0"),
    ([provider(input_per_mtok=True)], "'input_per_mtok' must be a number >= 0"),
    ([provider(models=[{"id": "m", "output_per_mtok": "x"}])], "provider 'p', model 'm': 'output_per_mtok' must be a number"),
    ([provider(input_per_mtok=None)], "provider 'p', model 'm': no 'input_per_mtok' (set it on the model or on the provider)"),
    ([provider(models=[{"id": "m", "price": 1}])], "provider 'p', model 'm': unknown setting(s) price"),
    ([provider(timeout=0)], "provider 'p': 'timeout' must be a number of seconds in (0, 600], got 0"),
    ([provider(timeout="5")], "'timeout' must be a number of seconds"),
    ([provider(modles=["m"])], "provider 'p': unknown setting(s) modles"),
    ([provider(), provider()], "provider 'p' is defined twice"),
])
def test_bad_provider_settings_are_one_clear_line(providers, message):
    with pytest.raises(ProviderConfigError) as ei:
        parse_providers(providers)
    assert message in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("routing, message", [
    ([], "routing must be a table"),
    ({"mesh_price": 1}, "routing: unknown setting(s) mesh_price"),
    ({"mesh_price_per_credit": -1}, "'mesh_price_per_credit' must be a number >= 0"),
    ({"policies": []}, "'policies' must be a table"),
    ({"policies": {"a b": {}}}, "routing policy 'a b': a name must be"),
    ({"policies": {"p": 1}}, "routing policy 'p': must be a table"),
    ({"policies": {"p": {"quality": 0}}}, "routing policy 'p': 'quality' must be a number in (0, 1]"),
    ({"policies": {"p": {"quality": 1.5}}}, "'quality' must be a number in (0, 1]"),
    ({"policies": {"p": {"max_cost": -0.1}}}, "routing policy 'p': 'max_cost' must be a number >= 0"),
    ({"policies": {"p": {"allow": "openai/*"}}}, "routing policy 'p': 'allow' must be a list"),
    ({"policies": {"p": {"deny": [""]}}}, "'deny' must be a list of target ids or patterns"),
    ({"policies": {"p": {"qualty": 0.9}}}, "routing policy 'p': unknown setting(s) qualty"),
])
def test_bad_routing_settings_are_one_clear_line(routing, message):
    with pytest.raises(ProviderConfigError) as ei:
        parse_routing(routing)
    assert message in str(ei.value)


def test_bad_config_stops_entry_start_with_one_line(tmp_path):
    path = write(tmp_path, """
        [[entry.providers]]
        name = "p"
        base_url = "https://p.example/v1"
        models = ["m"]
        input_per_mtok = 1
        output_per_mtok = "two"
    """)
    out = subprocess.run(mesh_cmd("entry", "start", "--config", path, "--state-dir", str(tmp_path / "state")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["mesh: error: provider 'p': 'output_per_mtok' must be a number >= 0 "
                                               "(USD per 1M tokens), got 'two'"]
