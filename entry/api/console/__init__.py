"""The entry console: the live mesh, traffic over the last hour, verification and routing, as
one page at /console fed by GET /v1/mesh/console (polled every few seconds).

Nodes appear by pseudonym only, as in /v1/mesh/nodes. The JSON endpoint is under /v1 and
follows its key rules (open mode: none); the page itself is static, like the web chat, and
sends the key the browser keeps (localStorage, shared with the chat).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from entry.api.parsing import ApiError
from web import PAGE_HEADERS, content_type, page_files, vendor_files

if TYPE_CHECKING:
    from entry.api.app import _Handlers

log = logging.getLogger("mesh.entry.console")
PAGE_DIR = Path(__file__).parent
GENERATION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
ROUTING_CACHE_S = 30.0  # the routing view runs the router over its table: not on every poll
# The entry's queue (entry/mesh/queue.py) reports its length among the backend's gauges; a
# backend without a queue leaves it out and the page hides the tile.
QUEUE_GAUGE = "mesh_queue_waiting"


def _samples(metric) -> list[tuple[dict[str, str], float]]:
    return metric.samples() if metric is not None else []


def _sum(metric) -> float:
    return sum(v for _, v in _samples(metric))


def path_of(node: dict) -> str:
    """How peers reach a node, from the node view's `reachability` (entry/mesh/view.py):
    direct, relayed, or unreachable-direct (only over connections the node opened itself,
    which is how an entry serves a node behind NAT)."""
    reach = node.get("reachability")
    return reach if isinstance(reach, str) else "direct"


class Console:
    def __init__(self, h: _Handlers):
        self.h = h
        m = h.s.metrics
        self.requests = m.track("mesh_entry_requests_total", lambda labels: labels["endpoint"] in GENERATION_ENDPOINTS)
        self.errors = m.track("mesh_entry_requests_total", lambda labels: labels["endpoint"] in GENERATION_ENDPOINTS
                              and not labels["status"].startswith("2"))
        self.tokens = m.track("mesh_entry_completion_tokens_total")
        self.failovers = m.track("mesh_entry_failovers_total")
        self.files = page_files(PAGE_DIR)
        self.vendor = vendor_files()
        self._routing: tuple[float, Any] | None = None
        self._routing_lock = trio.Lock()  # several open consoles compute it once

    def routes(self) -> list[Route]:
        return [
            Route("/console", self.page, methods=["GET"]),
            Route("/console/{name}", self.file, methods=["GET"]),
            Route("/vendor/{name}", self.vendor_file, methods=["GET"]),
            Route("/v1/mesh/console", self.state, methods=["GET"]),
        ]

    # --- static files -----------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return self._serve(self.files, "index.html")

    async def file(self, request: Request) -> Response:
        return self._serve(self.files, request.path_params["name"])

    async def vendor_file(self, request: Request) -> Response:
        return self._serve(self.vendor, request.path_params["name"])

    def _serve(self, files: dict[str, bytes], name: str) -> Response:
        data = files.get(name)
        if data is None or name.endswith(".py"):
            raise ApiError(404, f"no such file: {name}", code="unknown_url")
        return Response(data, media_type=content_type(name), headers=PAGE_HEADERS)

    # --- the data ---------------------------------------------------------------------------

    async def state(self, request: Request) -> Response:
        self.h.authenticate(request)
        s = self.h.s
        now = time.time()
        metrics = s.metrics
        nodes = []
        for n in s.backend.nodes_view():
            nodes.append({**n, "path": path_of(n)})
        verdicts: dict[str, float] = {}
        for labels, v in _samples(metrics.get("mesh_verify_checks_total")):  # the verifier's, by outcome and kind
            outcome = labels.get("outcome", "unknown")
            verdicts[outcome] = verdicts.get(outcome, 0) + v
        queue = s.backend.metrics().get(QUEUE_GAUGE)
        in_flight = metrics.get("mesh_entry_generations_in_flight")
        routed = metrics.get("mesh_routed_requests_total")
        series = {"requests": self.requests, "errors": self.errors, "tokens": self.tokens, "failovers": self.failovers}
        points = {k: v.points(now) for k, v in series.items()}
        return JSONResponse({
            "object": "mesh.console",
            "time": round(now, 3),
            "nodes": nodes,
            "totals": {
                "nodes": len(nodes),
                "serving": sum(1 for n in nodes if n.get("state") in ("ready", "busy")),
                "requests": sum(v for labels, v in _samples(metrics.get("mesh_entry_requests_total"))
                                if labels.get("endpoint") in GENERATION_ENDPOINTS),
                "completion_tokens": _sum(metrics.get("mesh_entry_completion_tokens_total")),
                "failovers": _sum(metrics.get("mesh_entry_failovers_total")),
                "in_flight": _sum(in_flight),
                "queue": queue,
                "demoted": sum(1 for n in nodes if n.get("demoted")),
            },
            "series": {
                "bucket_s": self.tokens.bucket_s,
                "t": [t for t, _ in points["tokens"]],
                **{k: [v for _, v in p] for k, p in points.items()},
            },
            "verification": verdicts,
            "routing": {
                "cost_saved_usd": _sum(metrics.get("mesh_routing_cost_saved_total")),
                "routed": [{**labels, "requests": v} for labels, v in routed.samples()] if routed is not None else [],
                "table": await self._routing_view(),
            },
        })

    async def _routing_view(self) -> Any:
        async with self._routing_lock:
            now = time.monotonic()
            if self._routing is not None and now - self._routing[0] < ROUTING_CACHE_S:
                return self._routing[1]
            auto, backend = self.h.s.auto, self.h.s.backend
            try:
                targets = auto.targets(backend.models())
                view = await trio.to_thread.run_sync(auto.view, targets, limiter=self.h.route_limiter)
            except Exception:  # noqa: BLE001 - the rest of the console still matters
                log.exception("the routing view for the console failed")
                view = None
            self._routing = (now, view)
            return view
