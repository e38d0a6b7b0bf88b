"""The web chat in a real headless Chromium (Debian's `chromium`; skipped where it is not
installed), against the fake backend: models load, an answer streams in with the node kind
and token counts, Stop closes the generation on the backend, and a keyed entry asks for a key.
Driven over the DevTools protocol with trio-websocket, so no driver binary is needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from entry.api.apikeys import ApiKeyStore
from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS
from tests.support.fake_backend import DESCRIPTION, FakeBackend, running_api

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_message(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.get_message())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    async def wait_for(self, expr: str):
        """Poll until `expr` is truthy (the caller's fail_after bounds it)."""
        while not (value := await self.js(f"(() => {{ try {{ return {expr}; }} catch (e) {{ return null; }} }})()")):
            await trio.sleep(0.05)
        return value


async def open_page(nursery, profile: Path, url: str) -> Page:
    # Chromium lives in the caller's nursery: cancelling it kills the browser.
    await nursery.start(lambda task_status: trio.run_process(
        [CHROMIUM, *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, task_status=task_status))
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
        await trio.sleep(0.05)
    port = port_file.read_text().splitlines()[0]
    async with httpx.AsyncClient() as c:
        targets = (await c.get(f"http://127.0.0.1:{port}/json")).json()
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    ws = await nursery.start(_hold_websocket, ws_url)
    page = Page(ws)
    await page.call("Page.enable")
    await page.call("Page.navigate", url=url)
    # Navigation answers before the new document exists.
    await page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")
    return page


async def _hold_websocket(url, *, task_status):
    async with open_websocket_url(url, max_message_size=50_000_000) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_webchat_streams_an_answer_and_stops(tmp_path):
    backend = FakeBackend(delay=0.02)
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path, api.base_url + "/")
            assert await page.wait_for("document.querySelector('#model option')?.textContent") == "fake-model (2 nodes)"

            await page.js("""(() => { const p = document.getElementById('prompt'); p.value = 'Hello there';
                p.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true})); })()""")
            meta = await page.wait_for("document.querySelector('.msg.assistant:not(.streaming) .meta')?.textContent")
            assert await page.js("document.querySelector('.msg.assistant .text').textContent") == "Hello, I am a fake model. Nice to meet you!"
            assert DESCRIPTION in meta and "13 completion tokens" in meta
            spec = backend.specs[-1]
            assert spec.params.max_tokens == 512 and spec.params.temperature == 0.7
            assert [m.content for m in spec.messages] == ["Hello there"]

            # Second turn: the history goes along; Stop closes the generation on the backend.
            backend.hang_after = 2
            await page.js("document.getElementById('prompt').value = 'Again'; document.getElementById('composer').requestSubmit()")
            await backend.hanging.wait()
            await page.wait_for("document.querySelectorAll('.msg.assistant')[1]?.querySelector('.text').textContent === 'Hello,'")
            await page.js("document.getElementById('stop').click()")
            await backend.closed_event.wait()
            assert [m.content for m in backend.specs[-1].messages] == ["Hello there", "Hello, I am a fake model. Nice to meet you!", "Again"]
            assert await page.wait_for("document.querySelectorAll('.msg.stopped').length") == 1
            assert await page.js("document.getElementById('stop').hidden")

            await page.js("document.getElementById('new-chat').click()")
            assert await page.js("document.querySelectorAll('.msg').length") == 0
            nursery.cancel_scope.cancel()


async def test_webchat_asks_for_a_key_on_a_keyed_entry(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.db")
    _, key = store.create("browser")
    with trio.fail_after(60):
        async with running_api(open_mode=False, keys=store) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            error = await page.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
            assert "API key" in error
            assert await page.js("document.getElementById('settings').open")
            await page.js(f"document.getElementById('api-key').value = {json.dumps(key)}; document.getElementById('save-key').click()")
            assert await page.wait_for("document.querySelector('#model option')?.value") == "fake-model"
            assert await page.js("document.getElementById('error').hidden")
            nursery.cancel_scope.cancel()
    store.close()
