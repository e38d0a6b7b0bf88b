"""The web chat offers "auto" (chosen by default when the mesh serves several models) and
says which model answered each message."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from tests.entry.test_webchat import open_page
from tests.support.browser import CHROMIUM
from tests.support.fake_backend import MODEL, FakeBackend, running_api

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")


async def test_webchat_defaults_to_auto_and_names_the_model_that_answered(tmp_path):
    small = dataclasses.replace(MODEL, id="small", sha256="11" * 32)
    big = dataclasses.replace(MODEL, id="big", sha256="22" * 32)
    with trio.fail_after(60):
        async with running_api(FakeBackend(models_list=[small, big])) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path, api.base_url + "/")
            assert await page.wait_for("document.querySelector('#model').value === 'auto' ? 'auto' : null") == "auto"
            options = await page.js("[...document.querySelectorAll('#model option')].map(o => o.textContent).join('|')")
            await page.js("""(() => { const p = document.getElementById('prompt'); p.value = 'Hello there';
                p.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true})); })()""")
            meta = await page.wait_for("document.querySelector('.msg.assistant:not(.streaming) .meta')?.textContent")
            nursery.cancel_scope.cancel()
    assert options == "small (2 nodes)|big (2 nodes)|auto (picks a model per message)"
    # No router and no prices: the first cheapest by name.
    assert "answered by big (routed)" in meta
