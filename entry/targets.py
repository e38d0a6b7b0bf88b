"""Task-level routing glue: what `model: "auto"` (or a provider model id) runs on.

A *target* is anything that can answer a generation: a model the mesh serves now, or one
model of a configured external provider ([[entry.providers]]). Each has an output price in
USD per 1M completion tokens: a mesh model costs its credit weight (entry/credits/ledger.py
model_weight, as the verifier knows it) x `mesh_price_per_credit`; a provider model costs
what the config says.

`AutoRouting.decide` turns a request into an *ordered* list of targets: the learned
router's choice (routing/router.py, cheapest target predicted within `quality` of the best)
first, then the other candidates, so the API can fall back when the first has no free node
or its provider fails before any text. With no fitted router the cheapest permitted target
goes first, and `reason` says so.

The router comes from the entry's state dir: `routing/router.pkl` (written by the benchmark
phase or `mesh route fit`), else one fitted at start-up from `routing/table.jsonl`, else
from a shipped table (the demo's). Router files are pickles: only the entry itself writes
the one in its state dir.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from entry.backend import ModelEntry
from entry.routing_config import DEFAULT_POLICY, RoutingConfig, RoutingPolicy

log = logging.getLogger("mesh.entry.routing")

AUTO = "auto"
ROUTER_FILE = "router.pkl"
TABLE_FILE = "table.jsonl"
STATS_FILE = "stats.json"
_ROUTE_KEYS = {"quality", "max_cost", "allow", "deny"}


class RouteRequestError(ValueError):
    """A bad `mesh.route` object or `auto:<policy>` name; str() is one line for a 400."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class NoTarget(Exception):
    """Every target was filtered out (or none exists); `filtered` tells which."""

    def __init__(self, message: str, filtered: bool):
        super().__init__(message)
        self.filtered = filtered


@dataclass(frozen=True)
class Target:
    id: str  # what users put in `model` and what a response names
    kind: str  # "mesh" | "provider"
    price: float  # USD per 1M completion tokens
    entry: ModelEntry  # what the response builder reads (providers get a stand-in)
    provider: Any = None  # entry/providers.py ProviderTarget for kind "provider"


def provider_entry(target_id: str, model: str) -> ModelEntry:
    return ModelEntry(id=target_id, sha256="", name=model, quantization="", context_size=0, nodes=0)


@dataclass(frozen=True)
class RouteOptions:
    """Per-request adjustments from the body's `mesh.route`."""

    quality: float | None = None
    max_cost: float | None = None
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def permits(self, target_id: str) -> bool:
        if self.allow and not any(fnmatchcase(target_id, p) for p in self.allow):
            return False
        return not any(fnmatchcase(target_id, p) for p in self.deny)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_route_options(body: Mapping[str, Any]) -> RouteOptions:
    """`body["mesh"]["route"]`, checked strictly: a typo must not silently route elsewhere."""
    mesh = body.get("mesh")
    if mesh is None:
        return RouteOptions()
    if not isinstance(mesh, dict):
        raise RouteRequestError("'mesh' must be an object", "mesh")
    unknown = sorted(set(mesh) - {"route"})
    if unknown:
        raise RouteRequestError(f"'mesh' has unknown field(s) {', '.join(unknown)}; expected 'route'", "mesh")
    route = mesh.get("route")
    if route is None:
        return RouteOptions()
    if not isinstance(route, dict):
        raise RouteRequestError("'mesh.route' must be an object", "mesh.route")
    unknown = sorted(set(route) - _ROUTE_KEYS)
    if unknown:
        raise RouteRequestError(f"'mesh.route' has unknown field(s) {', '.join(unknown)}; "
                                f"expected {', '.join(sorted(_ROUTE_KEYS))}", "mesh.route")
    q = route.get("quality")
    if q is not None and (not _num(q) or not 0 < q <= 1):
        raise RouteRequestError(f"'mesh.route.quality' must be a number in (0, 1], got {q!r}", "mesh.route.quality")
    c = route.get("max_cost")
    if c is not None and (not _num(c) or c < 0):
        raise RouteRequestError(f"'mesh.route.max_cost' must be a number >= 0 (USD per 1M completion tokens), got {c!r}",
                                "mesh.route.max_cost")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("allow", "deny"):
        v = route.get(key, [])
        if v is None:
            v = []
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v) or len(v) > 64:
            raise RouteRequestError(f"'mesh.route.{key}' must be a list of at most 64 model ids or patterns",
                                    f"mesh.route.{key}")
        lists[key] = tuple(v)
    return RouteOptions(None if q is None else float(q), None if c is None else float(c), lists["allow"], lists["deny"])


@dataclass
class Route:
    """One request's routing: targets in the order to try, and what `mesh.route` shows."""

    targets: list[Target]
    info: dict[str, Any]
    best_single_price: float | None = None
    task: str | None = None


@dataclass
class RouterStatus:
    source: str = "none"  # "state router" | "state table" | "shipped table <name>" | "none"
    path: str | None = None
    fitted_at: float | None = None
    rows: int = 0
    models: tuple[str, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"fitted": self.source != "none", "source": self.source, "path": self.path,
                "fitted_at": None if self.fitted_at is None else int(self.fitted_at), "rows": self.rows,
                "models": list(self.models), "error": self.error}


@dataclass
class AutoRouting:
    """The entry's routing state: config, providers, the fitted router and its table."""

    config: RoutingConfig = field(default_factory=RoutingConfig)
    providers: Mapping[str, Any] = field(default_factory=dict)  # target id -> ProviderTarget
    state_dir: Path | None = None  # STATE_DIR/routing
    shipped_table: Path | None = None  # used when the state dir has neither router nor table
    weight_of: Callable[[ModelEntry], float] = lambda m: 0.0  # credit weight of a mesh model
    router: Any = None
    status: RouterStatus = field(default_factory=RouterStatus)
    table_rows: list = field(default_factory=list)  # routing.tables.ScoreRow
    stats: dict[str, Any] = field(default_factory=dict)  # per model latency/tokens from the benchmark
    _task_of: dict[str, str] = field(default_factory=dict)

    # --- names -------------------------------------------------------------------------

    def is_auto(self, name: str) -> bool:
        return name == AUTO or name.startswith(AUTO + ":")

    def policy(self, name: str) -> RoutingPolicy:
        """`auto` -> the default policy, `auto:<name>` -> [entry.routing.policies.<name>]."""
        pname = DEFAULT_POLICY if name == AUTO else name[len(AUTO) + 1:]
        p = self.config.policy(pname)
        if p is None:
            known = ", ".join(["auto"] + [f"auto:{n}" for n in sorted(self.config.policies)])
            raise RouteRequestError(f"unknown routing policy {name!r}; this entry has {known}", "model")
        return p

    def model_names(self) -> list[str]:
        return [AUTO] + [f"{AUTO}:{n}" for n in sorted(self.config.policies) if n != DEFAULT_POLICY]

    # --- targets -----------------------------------------------------------------------

    def mesh_price(self, m: ModelEntry) -> float:
        return self.config.mesh_prices(self.weight_of(m)).output_per_mtok

    def targets(self, models: Iterable[ModelEntry]) -> list[Target]:
        out = [Target(m.id, "mesh", self.mesh_price(m), m) for m in models if m.nodes > 0]
        out += [Target(tid, "provider", p.prices.output_per_mtok, provider_entry(tid, p.model), p)
                for tid, p in self.providers.items()]
        return out

    def provider_target(self, name: str) -> Target | None:
        p = self.providers.get(name)
        return None if p is None else Target(name, "provider", p.prices.output_per_mtok, provider_entry(name, p.model), p)

    # --- deciding (may run in a worker thread: reads only immutable state) --------------

    def decide(self, text: str, policy: RoutingPolicy, opts: RouteOptions, targets: Sequence[Target]) -> Route:
        quality = opts.quality if opts.quality is not None else policy.quality
        max_cost = opts.max_cost if opts.max_cost is not None else policy.max_cost
        if not targets:
            raise NoTarget("no model is available right now: no node serves one and no provider is configured", False)
        why: dict[str, str] = {}
        ok: list[Target] = []
        for t in targets:
            if not policy.permits(t.id):
                why[t.id] = f"not permitted by policy {policy.name!r}"
            elif not opts.permits(t.id):
                why[t.id] = "not permitted by mesh.route allow/deny"
            elif max_cost is not None and t.price > max_cost:
                why[t.id] = f"price {t.price:g} over max_cost {max_cost:g}"
            else:
                ok.append(t)
        if not ok:
            raise NoTarget("no model satisfies the routing constraints: "
                           + "; ".join(f"{m}: {w}" for m, w in why.items()), True)
        by_id = {t.id: t for t in ok}
        router = self.router
        info: dict[str, Any] = {"policy": policy.name, "quality": quality, "max_cost": max_cost,
                                "task": self.task_of(text)}
        decision = None
        if router is not None:
            from routing import Policy, RoutingError

            try:
                decision = router.route(text, list(by_id), Policy.cheapest_within(quality),
                                        {t.id: t.price for t in ok})
            except RoutingError as e:
                info["router_error"] = str(e)
        if decision is not None:
            pred = dict(decision.predicted)
            floor = quality * max(pred.values())
            rest = sorted((m for m in pred if m != decision.model),
                          key=lambda m: (pred[m] < floor, by_id[m].price, -pred[m]))
            unknown = sorted((t for t in ok if t.id not in pred), key=lambda t: (t.price, t.id))
            ordered = [by_id[decision.model]] + [by_id[m] for m in rest] + unknown
            info.update(reason="router: cheapest model predicted within quality x the best",
                        predicted_quality=round(pred[decision.model], 4),
                        predicted={m: round(q, 4) for m, q in pred.items()},
                        best_single=decision.best_single, cost_vs_best_single=decision.cost_vs_best_single)
            best_price = decision.best_single_price
        else:
            ordered = sorted(ok, key=lambda t: (t.price, t.id))
            err = info.pop("router_error", None)
            reason = (f"the router could not decide ({err}): cheapest available model" if err
                      else "no router fitted: cheapest available model")
            info.update(reason=reason, predicted_quality=None, best_single=None, cost_vs_best_single=None)
            best_price = None
        info["price"] = ordered[0].price
        info["candidates"] = [t.id for t in ordered]
        if why:
            info["excluded"] = why
        return Route(ordered, info, best_price, info["task"])

    def task_of(self, text: str) -> str | None:
        """The suite task of a prompt the router was trained on (exact text), else None."""
        return self._task_of.get(text)

    # --- loading and fitting ------------------------------------------------------------

    def load(self) -> None:
        """Load or fit the router from the state dir, else from the shipped table. Failures are
        logged and leave `auto` on the cheapest-target rule: routing must not stop the entry."""
        from routing import RoutingError, TableError, fit_router, load_router, load_table

        d = self.state_dir
        candidates: list[tuple[str, Path]] = []
        if d is not None:
            candidates += [("state router", d / ROUTER_FILE), ("state table", d / TABLE_FILE)]
        if self.shipped_table is not None:
            candidates.append((f"shipped table {self.shipped_table.name}", self.shipped_table))
        if d is not None and (d / STATS_FILE).is_file():
            try:
                self.stats = json.loads((d / STATS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                log.warning("cannot read %s: %s", d / STATS_FILE, e)
        # A state table newer than the router wins (a benchmark wrote it, the fit was lost).
        for source, path in candidates:
            if not path.is_file():
                continue
            try:
                if path.suffix == ".pkl":
                    table = d / TABLE_FILE if d is not None else None
                    if table is not None and table.is_file() and table.stat().st_mtime > path.stat().st_mtime:
                        continue
                    router = load_router(path)
                    rows = load_table(table) if table is not None and table.is_file() else []
                else:
                    rows = load_table(path)
                    router = fit_router(rows)
            except (RoutingError, TableError, OSError) as e:
                self.status = RouterStatus(error=f"{path}: {e}")
                log.warning("routing: %s: %s", path, e)
                continue
            self._install(router, rows, RouterStatus(source, str(path), path.stat().st_mtime, router.n_train,
                                                      tuple(router.models)))
            log.info("routing: router from %s (%d rows, models %s)", path, router.n_train, ", ".join(router.models))
            return

    def _install(self, router: Any, rows: list, status: RouterStatus) -> None:
        self.router, self.table_rows, self.status = router, list(rows), status
        self._task_of = {r.text: r.task for r in rows if r.task}

    def refit(self, rows: list, stats: Mapping[str, Any], *, merge: bool = True) -> RouterStatus:
        """Store a benchmark's score table and stats in the state dir, fit and save the router.
        Blocking (fitting takes a moment): call from a worker thread."""
        from routing import fit_router
        from routing.tables import write_table

        if merge:
            # Rows of earlier runs stay, unless this run scored the same prompt again.
            new_ids = {r.id for r in rows}
            rows = [r for r in self.table_rows if r.id not in new_ids] + list(rows)
        router = fit_router(rows)
        now = time.time()
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / (TABLE_FILE + ".tmp")
            write_table(rows, tmp, append=False)
            tmp.replace(self.state_dir / TABLE_FILE)
            tmp = self.state_dir / (ROUTER_FILE + ".tmp")
            router.save(tmp)
            tmp.replace(self.state_dir / ROUTER_FILE)
            merged = {**self.stats, **stats}
            (self.state_dir / STATS_FILE).write_text(json.dumps(merged, indent=1), encoding="utf-8")
            self.stats = merged
        else:
            self.stats = {**self.stats, **stats}
        path = None if self.state_dir is None else str(self.state_dir / ROUTER_FILE)
        self._install(router, rows, RouterStatus("benchmark", path, now, router.n_train, tuple(router.models)))
        return self.status

    # --- the routing view ---------------------------------------------------------------

    def _task_choice(self, texts: list[str], policy: RoutingPolicy, targets: Sequence[Target]) -> str | None:
        """The model a policy picks most often on these prompts: the same rule as decide(),
        with the predictions batched (one call per task, not one per prompt)."""
        ok = [t for t in targets if policy.permits(t.id)
              and (policy.max_cost is None or t.price <= policy.max_cost)]
        if not ok:
            return None
        known = [t for t in ok if self.router is not None and t.id in self.router.models]
        if not known:
            return min(ok, key=lambda t: (t.price, t.id)).id
        pred = self.router.predict(texts)
        col = {m: j for j, m in enumerate(self.router.models)}
        counts: dict[str, int] = {}
        for i in range(len(texts)):
            q = {t.id: float(pred[i, col[t.id]]) for t in known}
            floor = policy.quality * max(q.values()) - 1e-12
            chosen = min((t for t in known if q[t.id] >= floor), key=lambda t: (t.price, -q[t.id])).id
            counts[chosen] = counts.get(chosen, 0) + 1
        return max(counts, key=lambda k: counts[k])

    def view(self, targets: Sequence[Target]) -> dict[str, Any]:
        """For GET /v1/mesh/routing: per task and model the mean quality on the table, price,
        latency; the current choice per policy (on each task's prompts); the router's status."""
        prices = {t.id: t.price for t in targets}
        tasks: dict[str, dict[str, list[float]]] = {}
        texts: dict[str, list[str]] = {}
        for r in self.table_rows:
            task = r.task or "unknown"
            texts.setdefault(task, []).append(r.text)
            for m, s in r.scores.items():
                tasks.setdefault(task, {}).setdefault(m, []).append(s)
        models = sorted(set(prices) | {m for per in tasks.values() for m in per})
        out_tasks = []
        policies = [DEFAULT_POLICY] + sorted(p for p in self.config.policies if p != DEFAULT_POLICY)
        for task in sorted(tasks):
            per = tasks[task]
            row: dict[str, Any] = {"task": task, "prompts": len(texts[task]), "models": {}}
            for m in models:
                scores = per.get(m)
                st = self.stats.get(m, {}) if isinstance(self.stats.get(m), dict) else {}
                row["models"][m] = {"quality": round(sum(scores) / len(scores), 4) if scores else None,
                                    "price": prices.get(m), "available": m in prices,
                                    "latency_p50_s": st.get("latency_p50_s")}
            row["choice"] = {}
            for pname in policies:
                name = AUTO if pname == DEFAULT_POLICY else f"{AUTO}:{pname}"
                row["choice"][name] = self._task_choice(texts[task], self.config.policy(pname), targets)
            out_tasks.append(row)
        return {"object": "mesh.routing", "router": self.status.to_json(),
                "mesh_price_per_credit": self.config.mesh_price_per_credit,
                "targets": [{"id": t.id, "kind": t.kind, "price": t.price,
                             "latency_p50_s": (self.stats.get(t.id) or {}).get("latency_p50_s")
                             if isinstance(self.stats.get(t.id), dict) else None} for t in targets],
                "tasks": out_tasks}

