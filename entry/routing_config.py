"""External providers and routing policies from the entry's TOML config.

    [[entry.providers]]
    name = "openai"                          # [A-Za-z0-9._-], unique; targets are "openai/<model id>"
    base_url = "https://api.openai.com/v1"   # {base_url}/chat/completions and /completions
    api_key_env = "OPENAI_API_KEY"           # absent: a keyless (local) server
    timeout = 30                             # seconds: connect, first byte, between chunks
    input_per_mtok = 0.15                    # USD per 1M prompt tokens, for every model below...
    output_per_mtok = 0.60                   # ...and per 1M completion tokens
    models = ["gpt-4o-mini", { id = "gpt-4o", input_per_mtok = 2.5, output_per_mtok = 10.0 }]

    [entry.routing]
    mesh_price_per_credit = 0.0              # USD per 1M tokens one credit per token is worth

    [entry.routing.policies.cheap]
    quality = 0.9                            # accept models predicted >= 0.9 x the best one
    max_cost = 1.0                           # USD per 1M completion tokens, at most
    allow = ["openai/*", "SmolLM2*"]         # target ids or shell-style patterns; default: all
    deny = ["openai/gpt-4o"]

A model's prices are its own, else the provider's; a model left with neither is an error.
Everything is checked when the entry starts, and a bad value stops it with one line naming the
provider (or policy) and the field. An `api_key_env` naming a variable that is unset or empty
is a start-up error too: the operator said the provider needs a key. Pure: no network I/O;
the environment is read only by `check_keys()` / `ProviderConfig.api_key()`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
DEFAULT_QUALITY = 0.95
DEFAULT_POLICY = "default"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_ID = re.compile(r"^\S{1,256}$")
_PROVIDER_KEYS = {"name", "base_url", "api_key_env", "models", "input_per_mtok", "output_per_mtok", "timeout"}
_MODEL_KEYS = {"id", "input_per_mtok", "output_per_mtok"}
_ROUTING_KEYS = {"mesh_price_per_credit", "policies"}
_POLICY_KEYS = {"quality", "max_cost", "allow", "deny"}


class ProviderConfigError(ValueError):
    """A bad [[entry.providers]] or [entry.routing] setting; str() is one line."""


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one request."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class ProviderModel:
    id: str  # the provider's own model id, sent as `model`
    prices: Prices


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str  # without a trailing slash
    models: tuple[ProviderModel, ...]
    api_key_env: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def target_id(self, model: str) -> str:
        return f"{self.name}/{model}"

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The operator's key for this provider (None: keyless)."""
        if self.api_key_env is None:
            return None
        value = (os.environ if environ is None else environ).get(self.api_key_env, "").strip()
        if not value:
            raise ProviderConfigError(f"provider {self.name!r}: environment variable {self.api_key_env} "
                                      "(its api_key_env) is not set or empty")
        return value


@dataclass(frozen=True)
class RoutingPolicy:
    name: str
    quality: float = DEFAULT_QUALITY  # tolerance: a target predicted >= quality x the best qualifies
    max_cost: float | None = None  # USD per 1M completion tokens; None = no limit
    allow: tuple[str, ...] = ()  # target ids or fnmatch patterns; empty = everything
    deny: tuple[str, ...] = ()

    def permits(self, target_id: str) -> bool:
        """allow/deny only; quality and cost are the router's business."""
        if self.allow and not any(fnmatchcase(target_id, p) for p in self.allow):
            return False
        return not any(fnmatchcase(target_id, p) for p in self.deny)


@dataclass(frozen=True)
class RoutingConfig:
    # USD per 1M tokens that one credit per token is worth: a mesh model of credit weight w
    # (entry/credits/ledger.py model_weight) costs w x this per 1M completion tokens.
    mesh_price_per_credit: float = 0.0
    policies: dict[str, RoutingPolicy] = field(default_factory=dict)

    def mesh_prices(self, weight: float) -> Prices:
        # Credits are booked on completion tokens only, so prompt tokens cost nothing.
        return Prices(0.0, weight * self.mesh_price_per_credit)

    def policy(self, name: str = DEFAULT_POLICY) -> RoutingPolicy | None:
        """A named policy; "default" exists even when the config does not define it."""
        if name in self.policies:
            return self.policies[name]
        return RoutingPolicy(DEFAULT_POLICY) if name == DEFAULT_POLICY else None


# --- parsing -------------------------------------------------------------------------------


def parse_providers(raw: Any) -> list[ProviderConfig]:
    """The [[entry.providers]] array -> checked ProviderConfigs (already parsed ones pass)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ProviderConfigError("providers must be an array of tables ([[entry.providers]])")
    out: list[ProviderConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw, 1):
        p = item if isinstance(item, ProviderConfig) else _parse_provider(item, i)
        if p.name in names:
            raise ProviderConfigError(f"provider {p.name!r} is defined twice")
        names.add(p.name)
        out.append(p)
    return out


def _parse_provider(item: Any, i: int) -> ProviderConfig:
    if not isinstance(item, dict):
        raise ProviderConfigError(f"provider #{i}: must be a table")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProviderConfigError(f"provider #{i}: 'name' must be 1-64 characters of A-Z a-z 0-9 . _ - "
                                  f"(starting with a letter or digit), got {name!r}")
    where = f"provider {name!r}"
    unknown = sorted(set(item) - _PROVIDER_KEYS)
    if unknown:
        raise ProviderConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    key_env = item.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not _ENV.match(key_env)):
        raise ProviderConfigError(f"{where}: 'api_key_env' must name an environment variable, got {key_env!r}")
    base_url = _base_url(item.get("base_url"), where, needs_key=key_env is not None)
    timeout = item.get("timeout", DEFAULT_TIMEOUT)
    if not _number(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise ProviderConfigError(f"{where}: 'timeout' must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")
    default_in = _price(item, "input_per_mtok", where)
    default_out = _price(item, "output_per_mtok", where)
    models = item.get("models")
    if not isinstance(models, list) or not models:
        raise ProviderConfigError(f"{where}: 'models' must be a non-empty list of model ids or "
                                  "{ id = ..., input_per_mtok = ..., output_per_mtok = ... } tables")
    parsed: list[ProviderModel] = []
    seen: set[str] = set()
    for m in models:
        pm = _parse_model(m, where, default_in, default_out)
        if pm.id in seen:
            raise ProviderConfigError(f"{where}: model {pm.id!r} is listed twice")
        seen.add(pm.id)
        parsed.append(pm)
    return ProviderConfig(name=name, base_url=base_url, models=tuple(parsed), api_key_env=key_env, timeout=float(timeout))


def _parse_model(m: Any, where: str, default_in: float | None, default_out: float | None) -> ProviderModel:
    if isinstance(m, str):
        m = {"id": m}
    if not isinstance(m, dict):
        raise ProviderConfigError(f"{where}: each entry of 'models' must be a model id or a table with 'id', got {m!r}")
    mid = m.get("id")
    if not isinstance(mid, str) or not _MODEL_ID.match(mid):
        raise ProviderConfigError(f"{where}: a model 'id' must be 1-256 characters without spaces, got {mid!r}")
    unknown = sorted(set(m) - _MODEL_KEYS)
    if unknown:
        raise ProviderConfigError(f"{where}, model {mid!r}: unknown setting(s) {', '.join(unknown)}")
    prices = []
    for key, default in (("input_per_mtok", default_in), ("output_per_mtok", default_out)):
        own = _price(m, key, f"{where}, model {mid!r}")
        value = own if own is not None else default
        if value is None:
            raise ProviderConfigError(f"{where}, model {mid!r}: no '{key}' (set it on the model or on the provider)")
        prices.append(value)
    return ProviderModel(mid, Prices(*prices))


def _base_url(url: Any, where: str, needs_key: bool) -> str:
    if not isinstance(url, str) or not url:
        raise ProviderConfigError(f"{where}: 'base_url' is required (e.g. \"https://api.openai.com/v1\")")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderConfigError(f"{where}: 'base_url' must be an http:// or https:// URL, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ProviderConfigError(f"{where}: 'base_url' must not carry a query, fragment or credentials (use api_key_env)")
    # The key would cross the network in clear text; a server on this machine is fine.
    if needs_key and parts.scheme == "http" and not _loopback(parts.hostname):
        raise ProviderConfigError(f"{where}: 'base_url' must be https:// when an API key is sent to another machine")
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _price(table: dict, key: str, where: str) -> float | None:
    if key not in table:
        return None
    v = table[key]
    if not _number(v) or v < 0:
        raise ProviderConfigError(f"{where}: '{key}' must be a number >= 0 (USD per 1M tokens), got {v!r}")
    return float(v)


def parse_routing(raw: Any) -> RoutingConfig:
    """The [entry.routing] table -> RoutingConfig (an already parsed one passes)."""
    if isinstance(raw, RoutingConfig):
        return raw
    if raw is None:
        return RoutingConfig()
    if not isinstance(raw, dict):
        raise ProviderConfigError("routing must be a table ([entry.routing])")
    unknown = sorted(set(raw) - _ROUTING_KEYS)
    if unknown:
        raise ProviderConfigError(f"routing: unknown setting(s) {', '.join(unknown)}")
    price = raw.get("mesh_price_per_credit", 0.0)
    if not _number(price) or price < 0:
        raise ProviderConfigError(f"routing: 'mesh_price_per_credit' must be a number >= 0 (USD per 1M tokens), got {price!r}")
    policies = raw.get("policies", {})
    if not isinstance(policies, dict):
        raise ProviderConfigError("routing: 'policies' must be a table of [entry.routing.policies.NAME] tables")
    return RoutingConfig(float(price), {name: _parse_policy(name, p) for name, p in policies.items()})


def _parse_policy(name: str, p: Any) -> RoutingPolicy:
    if not _NAME.match(name):
        raise ProviderConfigError(f"routing policy {name!r}: a name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    where = f"routing policy {name!r}"
    if not isinstance(p, dict):
        raise ProviderConfigError(f"{where}: must be a table")
    unknown = sorted(set(p) - _POLICY_KEYS)
    if unknown:
        raise ProviderConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    quality = p.get("quality", DEFAULT_QUALITY)
    if not _number(quality) or not 0 < quality <= 1:
        raise ProviderConfigError(f"{where}: 'quality' must be a number in (0, 1] (e.g. 0.95), got {quality!r}")
    max_cost = p.get("max_cost")
    if max_cost is not None and (not _number(max_cost) or max_cost < 0):
        raise ProviderConfigError(f"{where}: 'max_cost' must be a number >= 0 (USD per 1M completion tokens), got {max_cost!r}")
    lists = {}
    for key in ("allow", "deny"):
        v = p.get(key, [])
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise ProviderConfigError(f"{where}: '{key}' must be a list of target ids or patterns, got {v!r}")
        lists[key] = tuple(v)
    return RoutingPolicy(name, float(quality), None if max_cost is None else float(max_cost), lists["allow"], lists["deny"])


def check_keys(providers: list[ProviderConfig], environ: Mapping[str, str] | None = None) -> None:
    """Start-up check: every provider that names an api_key_env finds it set."""
    for p in providers:
        p.api_key(environ)
