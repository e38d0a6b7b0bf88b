"""The entry console (/console, /v1/mesh/console): the JSON it serves and its key rules
against the fake backend, the rolling series behind its charts, and the page in a real headless
Chromium against a real local mesh (an in-process entry and two synthetic node processes over
libp2p on 127.0.0.1): the nodes appear, a chart updates after traffic. Screenshots are saved
under the test's tmp_path."""

from __future__ import annotations

import re

import pytest
import trio

from entry.api.apikeys import ApiKeyStore
from entry.api.metrics import Metrics
from tests.support.browser import CHROMIUM
from tests.support.fake_backend import FakeBackend, running_api
from web import vendor_files
from web.series import RollingSeries

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")


def test_rolling_series_is_bounded_and_zero_filled():
    s = RollingSeries(bucket_s=10, buckets=6, clock=lambda: 1000.0)
    s.add(2, t=945)  # bucket 94
    s.add(3, t=999)
    s.add(1, t=991)  # same bucket as 999
    s.add(5, t=900)  # older than the newest bucket: dropped, the series only appends
    pts = s.points(now=1000)
    assert [t for t, _ in pts] == [950, 960, 970, 980, 990, 1000]
    assert [v for _, v in pts] == [0, 0, 0, 0, 4, 0]  # bucket 94 (t=940) fell out of the window
    for i in range(100):
        s.add(1, t=1000 + 10 * i)
    assert len(s._data) == 6 and s.total(now=1990) == 6


def test_metrics_track_feeds_only_matching_labels_even_when_registered_later():
    m = Metrics()
    gen = m.track("reqs", lambda labels: labels["endpoint"] == "/gen")
    c = m.counter("reqs", "requests", ("endpoint",))
    c.inc(endpoint="/gen")
    c.inc(2, endpoint="/other")
    c.inc(3, endpoint="/gen")
    assert gen.total() == 4 and c.value(endpoint="/other") == 2
    assert m.track("reqs").total() == 0  # a series counts from when it was made


async def test_console_json_counts_generations_not_its_own_polls():
    async with running_api() as api:
        for _ in range(3):
            r = await api.client.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
        await api.client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        await api.client.get("/v1/mesh/console")
        s = (await api.client.get("/v1/mesh/console")).json()
        assert s["object"] == "mesh.console"
        assert [n["node"] for n in s["nodes"]] == ["amber-fox", "blue-owl"]
        assert all(n["path"] == "direct" for n in s["nodes"])
        assert "peer" not in str(s["nodes"]).lower()  # pseudonyms only
        assert s["totals"]["requests"] == 4 and s["totals"]["completion_tokens"] == 39
        assert sum(s["series"]["requests"]) == 4 and sum(s["series"]["errors"]) == 1
        assert sum(s["series"]["tokens"]) == 39
        assert len(s["series"]["t"]) == len(s["series"]["tokens"]) == 360 and s["series"]["bucket_s"] == 10
        assert s["totals"]["queue"] is None  # no entry queue metric exists (yet): the page hides the tile
        assert s["routing"]["table"] is not None and s["routing"]["cost_saved_usd"] == 0


class QueueingBackend(FakeBackend):
    def metrics(self) -> dict[str, float]:
        return super().metrics() | {"mesh_queue_waiting": 3}  # as the relay reports its queue


async def test_console_shows_what_other_parts_of_the_entry_count():
    async with running_api(QueueingBackend()) as api:
        m = api.metrics
        checks = m.counter("mesh_verify_checks_total", "verdicts", ("outcome", "kind"))  # as the verifier registers it
        checks.inc(2, outcome="pass", kind="sampled")
        checks.inc(outcome="pass", kind="canary")
        checks.inc(outcome="fail", kind="sampled")
        m.counter("mesh_routed_requests_total", "routed", ("model", "task")).inc(4, model="fake-model", task="math")
        m.counter("mesh_routing_cost_saved_total", "saved").inc(0.25)
        s = (await api.client.get("/v1/mesh/console")).json()
        assert s["totals"]["queue"] == 3
        assert s["verification"] == {"fail": 1, "pass": 3}
        assert s["routing"]["routed"] == [{"model": "fake-model", "task": "math", "requests": 4}]
        assert s["routing"]["cost_saved_usd"] == 0.25


async def test_console_json_follows_the_v1_key_rules(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("ops")
    try:
        async with running_api(open_mode=False, keys=store) as api:
            r = await api.client.get("/v1/mesh/console")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await api.client.get("/v1/mesh/console", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            page = await api.client.get("/console")  # static, like the chat: it holds no data
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        store.close()


async def test_console_pages_load_nothing_from_the_internet():
    async with running_api() as api:
        html = (await api.client.get("/console")).text
        assert (await api.client.get("/console")).headers["content-security-policy"].startswith("default-src 'self'")
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and all(not re.match(r"^[a-z]+:", ref) for ref in refs), refs
        for ref in refs:
            r = await api.client.get("/" + ref)
            assert r.status_code == 200 or (ref.startswith("vendor/") and not vendor_files()), ref
            if ref.endswith((".js", ".css")) and not ref.startswith("vendor/"):
                assert not re.search(r"https?://", r.text), ref
        assert (await api.client.get("/console/__init__.py")).status_code == 404
        assert (await api.client.get("/vendor/../app.py")).status_code == 404


def test_vendored_libraries_and_licences_are_there():
    files = vendor_files()
    if not files:
        pytest.fail("web/vendor/ is empty: run scripts/vendor_js.sh (scripts/setup.sh does)")
    for name in ("chart.umd.min.js", "chart.js.LICENSE.md", "kurkle-color.LICENSE.md", "marked.umd.js", "marked.LICENSE",
                 "purify.min.js", "dompurify.LICENSE"):
        assert name in files, name


@needs_chromium
@pytest.mark.slow
async def test_console_in_chromium_shows_a_real_mesh_and_charts_traffic(tmp_path):
    import httpx

    from entry.api.app import create_app, serve_api
    from entry.api.ratelimit import RateLimits
    from entry.mesh.relay import open_mesh_backend
    from protocol.identity import Identity
    from tests.support.cdp import open_page
    from tests.support.mesh_nodes import VIEW_OPTIONS, stop_nodes, wait_for
    from tests.support.node_procs import start_node
    from transport.host import open_mesh_host

    nodes = []
    with trio.fail_after(180):
        async with open_mesh_host(Identity.generate()) as host, open_mesh_backend(host, **VIEW_OPTIONS) as backend:
            try:
                async with trio.open_nursery() as nursery:
                    for name in ("n1", "n2"):
                        async def start(name=name):
                            nodes.append(await start_node(tmp_path, name, "--synthetic", "synth-console", "--synthetic-rate", "400",
                                                          "--bootstrap", host.listen_addrs[0], "--advert-interval", "1",
                                                          "--log-level", "warning"))
                        nursery.start_soon(start)
                await wait_for(lambda: sum(n["state"] == "ready" for n in backend.nodes_view()) == 2, 60, "two ready nodes")
                app = create_app(backend, keys=None, open_mode=True, limits=RateLimits(), metrics=Metrics())
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(serve_api, app, "127.0.0.1", 0)
                    base = f"http://127.0.0.1:{port}"
                    page = await open_page(nursery, tmp_path / "profile", base + "/console")
                    assert await page.wait_for("document.querySelectorAll('#nodes tbody tr').length === 2")
                    names = await page.js("[...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[0].textContent)")
                    assert sorted(names) == sorted(n["node"] for n in backend.nodes_view())
                    assert await page.js("document.querySelector('#nodes tbody tr').cells[3].textContent") == "direct"
                    assert await page.js("typeof Chart") == "function", "the vendored chart library did not load"
                    total = "Chart.getChart('chart-throughput').data.datasets[0].data.reduce((a, b) => a + b, 0)"
                    assert await page.js(total) == 0
                    await page.screenshot(tmp_path / "console-idle.png")

                    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                        for i in range(4):
                            r = await client.post("/v1/chat/completions", json={
                                "model": "synth-console", "max_tokens": 40, "messages": [{"role": "user", "content": f"hello {i}"}]})
                            assert r.status_code == 200, r.text
                    # The page polls: the chart and the tiles move without a reload.
                    polls = await page.js("Number(document.body.dataset.polls)")
                    assert await page.wait_for(f"{total} > 0")
                    assert await page.wait_for("Chart.getChart('chart-requests').data.datasets[0].data.reduce((a, b) => a + b, 0) === 4")
                    assert await page.js("Number(document.body.dataset.polls)") > polls
                    assert await page.wait_for("document.getElementById('t-requests').textContent === '4'")
                    served = await page.js("[...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[8].textContent)")
                    assert sum(int(s.split()[0]) for s in served) >= 4
                    await page.screenshot(tmp_path / "console-traffic.png")
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await stop_nodes(nodes)


@needs_chromium
async def test_console_page_asks_for_a_key_on_a_keyed_entry(tmp_path):
    from tests.support.cdp import open_page

    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("ops")
    try:
        with trio.fail_after(60):
            async with running_api(open_mode=False, keys=store) as api, trio.open_nursery() as nursery:
                page = await open_page(nursery, tmp_path / "profile", api.base_url + "/console")
                error = await page.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
                assert "API key" in error and not await page.js("document.getElementById('key-form').hidden")
                assert await page.js("document.querySelectorAll('#nodes tbody tr').length") == 0
                await page.js(f"document.getElementById('api-key').value = {key!r}; "
                              "document.getElementById('key-form').requestSubmit()")
                assert await page.wait_for("document.querySelectorAll('#nodes tbody tr').length === 2")
                assert await page.js("document.getElementById('error').hidden && document.getElementById('key-form').hidden")
                nursery.cancel_scope.cancel()
    finally:
        store.close()
