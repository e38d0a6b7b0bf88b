"""The web chat in a real headless Chromium (Debian's `chromium`; skipped where it is not
installed), against the fake backend: models load, an answer streams in with the node kind
and token counts, Stop closes the generation on the backend, and a keyed entry asks for a key.
Driven over the DevTools protocol with trio-websocket, so no driver binary is needed."""

from __future__ import annotations

import json

import pytest
import trio

from entry.api.apikeys import ApiKeyStore
from tests.support.browser import CHROMIUM
from tests.support.cdp import open_page
from tests.support.fake_backend import DESCRIPTION, FakeBackend, running_api

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")


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
