"""The web chat in a real headless Chromium (Debian's `chromium`; skipped where it is not
installed), against the fake backend: models load, an answer streams in with the node kind
and token counts, Stop closes the generation on the backend, and a keyed entry asks for a key;
llama.cpp's sampling guards go out by default and the settings panel changes them; a message
typed while an answer streams is queued and sent after it; Markdown renders and no HTML from
the model reaches the page; the conversation survives a reload until "New chat".
Driven over the DevTools protocol with trio-websocket, so no driver binary is needed.
Screenshots go under each test's tmp_path."""

from __future__ import annotations

import json

import pytest
import trio

from entry.api.apikeys import ApiKeyStore
from entry.backend import DoneEvent, MeshUnavailable, ServedPart, TokenEvent
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
            assert await page.js("document.querySelector('.msg.assistant .text').textContent.trim()") == "Hello, I am a fake model. Nice to meet you!"
            assert DESCRIPTION in meta and "13 completion tokens" in meta
            spec = backend.specs[-1]
            assert spec.params.max_tokens == 512 and spec.params.temperature == 0.7
            # llama.cpp's front-end guards against loops, by default.
            assert (spec.params.top_k, spec.params.top_p, spec.params.min_p) == (40, 0.95, 0.05)
            assert (spec.params.repeat_penalty, spec.params.repeat_last_n) == (1.1, 64)
            assert [m.content for m in spec.messages] == ["Hello there"]

            # Second turn: the history goes along; Stop closes the generation on the backend.
            backend.hang_after = 2
            await page.js("document.getElementById('prompt').value = 'Again'; document.getElementById('composer').requestSubmit()")
            await backend.hanging.wait()
            await page.wait_for("document.querySelectorAll('.msg.assistant')[1]?.querySelector('.text').textContent.trim() === 'Hello,'")
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


async def type_and_send(page, text: str) -> None:
    await page.js(f"document.getElementById('prompt').value = {json.dumps(text)}; "
                  "document.getElementById('composer').requestSubmit()")


async def test_webchat_settings_panel_changes_sampling_and_is_remembered(tmp_path):
    backend = FakeBackend()
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            await page.wait_for("!!document.querySelector('#model option')")
            await page.js("""(() => { document.getElementById('settings').open = true;
                for (const [id, v] of [['top-k', '10'], ['min-p', '0.1'], ['repeat-penalty', '1.3'], ['max-tokens', '5']]) {
                  const el = document.getElementById(id); el.value = v; el.dispatchEvent(new Event('change')); } })()""")
            await page.screenshot(tmp_path / "webchat-settings.png")
            await type_and_send(page, "Hi")
            await page.wait_for("document.querySelector('.msg.assistant:not(.streaming) .meta')?.textContent")
            p = backend.specs[-1].params
            assert (p.top_k, p.min_p, p.repeat_penalty, p.max_tokens, p.repeat_last_n) == (10, 0.1, 1.3, 5, 64)
            await page.reload()
            assert await page.js("document.getElementById('top-k').value") == "10"
            await page.js("document.getElementById('reset-settings').click()")
            assert await page.js("document.getElementById('top-k').value") == "40"
            assert await page.js("document.getElementById('max-tokens').value") == "512"
            nursery.cancel_scope.cancel()


async def test_webchat_queues_a_message_typed_while_an_answer_streams(tmp_path):
    backend = FakeBackend(hang_after=3)
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            await page.wait_for("!!document.querySelector('#model option')")
            await type_and_send(page, "First")
            await backend.hanging.wait()
            assert await page.js("document.getElementById('send').textContent") == "Queue"
            await type_and_send(page, "Second")
            pending = await page.wait_for("document.querySelector('.msg.user.pending .meta')?.textContent")
            assert "queued" in pending
            assert len(backend.specs) == 1  # not sent while the first answer streams
            await page.screenshot(tmp_path / "webchat-queued.png")
            backend.hang_after = None
            await page.js("document.getElementById('stop').click()")  # the first answer ends (stopped)...
            # ...and the queued message goes out with the history so far.
            await page.wait_for("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 2 && "
                                "!document.querySelector('.msg.pending')")
            assert [m.content for m in backend.specs[-1].messages] == ["First", "Hello, I", "Second"]
            texts = await page.js("[...document.querySelectorAll('.msg .text')].map(e => e.textContent.trim())")
            assert texts == ["First", "Hello, I", "Second", "Hello, I am a fake model. Nice to meet you!"]
            nursery.cancel_scope.cancel()


class FailingMidStream(FakeBackend):
    """Two tokens, then waits for `release`, then fails as a mesh that lost every node does."""

    def __init__(self):
        super().__init__()
        self.release = trio.Event()

    def generate(self, spec, model=None):
        self.specs.append(spec)
        return self._failing()

    async def _failing(self):
        yield TokenEvent(ids=[1], text="Hello")
        yield TokenEvent(ids=[2], text=",")
        self.hanging.set()
        await self.release.wait()
        raise MeshUnavailable("every node serving this model failed", retry_after=3)


async def test_webchat_hands_queued_text_back_when_the_answer_fails(tmp_path):
    backend = FailingMidStream()
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            await page.wait_for("!!document.querySelector('#model option')")
            await type_and_send(page, "First")
            await backend.hanging.wait()
            await type_and_send(page, "Second")
            await page.wait_for("!!document.querySelector('.msg.pending')")
            backend.release.set()
            # The answer broke off: the queued message is not sent into the same failure but
            # handed back, with the reason.
            error = await page.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
            assert "every node serving this model failed" in error and "not sent" in error
            assert await page.js("document.getElementById('prompt').value") == "Second"
            assert await page.js("document.querySelectorAll('.msg.pending').length") == 0
            assert len(backend.specs) == 1
            nursery.cancel_scope.cancel()


class ScriptedBackend(FakeBackend):
    """Answers every request with `pieces` (token texts), whatever was asked."""

    def __init__(self, pieces: list[str]):
        super().__init__()
        self.pieces = pieces

    def generate(self, spec, model=None):
        self.specs.append(spec)
        return self._scripted()

    async def _scripted(self):
        for i, text in enumerate(self.pieces):
            yield TokenEvent(ids=[i], text=text)
        yield DoneEvent(finish_reason="stop", prompt_tokens=3, completion_tokens=len(self.pieces),
                        served_by=[ServedPart("amber-fox", DESCRIPTION, len(self.pieces))])


HOSTILE = ["Here is **bold** and `code`.\n\n", "<img src=x onerror=\"window.__pwned=1\">", " <script>window.__pwned=2</script>\n\n",
           "```python\nprint('<b>hi</b>')\n```\n\n", "[click](javascript:window.__pwned=3) ", "<a href=\"javascript:window.__pwned=4\">x</a> ",
           "![tracker](http://127.0.0.1:9/pixel.png)\n\n", "- one\n- two\n"]


async def test_webchat_renders_markdown_and_no_model_html(tmp_path):
    backend = ScriptedBackend(HOSTILE)
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            await page.wait_for("!!document.querySelector('#model option')")
            assert await page.js("typeof marked === 'object' && typeof DOMPurify === 'function'"), "vendored libraries missing"
            await type_and_send(page, "Show me markdown")
            await page.wait_for("document.querySelector('.msg.assistant:not(.streaming) .meta')?.textContent")
            body = "document.querySelector('.msg.assistant .text')"
            assert await page.js(f"{body}.querySelector('strong')?.textContent") == "bold"
            assert await page.js(f"{body}.querySelector('pre code')?.textContent") == "print('<b>hi</b>')\n"
            assert await page.js(f"{body}.querySelectorAll('li').length") == 2
            # Nothing the model wrote became live HTML: no image, script, handler or javascript: link.
            assert await page.js(f"{body}.querySelectorAll('img, script, b, [onerror]').length") == 0
            assert await page.js(f"[...{body}.querySelectorAll('a')].every(a => !/^javascript:/i.test(a.getAttribute('href') || ''))")
            text = await page.js(f"{body}.textContent")
            assert '<img src=x onerror="window.__pwned=1">' in text and "<script>" in text  # shown as text
            await trio.sleep(0.2)  # a handler that was going to run would have by now
            assert await page.js("window.__pwned === undefined")
            await page.screenshot(tmp_path / "webchat-markdown.png")
            # The user's own text is never parsed at all.
            assert await page.js("document.querySelector('.msg.user .text').innerHTML") == "Show me markdown"
            nursery.cancel_scope.cancel()


async def test_webchat_keeps_the_conversation_across_a_reload_until_new_chat(tmp_path):
    backend = FakeBackend()
    with trio.fail_after(60):
        async with running_api(backend) as api, trio.open_nursery() as nursery:
            page = await open_page(nursery, tmp_path / "profile", api.base_url + "/")
            await page.wait_for("!!document.querySelector('#model option')")
            await type_and_send(page, "Remember me")
            await page.wait_for("document.querySelector('.msg.assistant:not(.streaming) .meta')?.textContent")
            await page.reload()
            texts = await page.wait_for("[...document.querySelectorAll('.msg .text')].map(e => e.textContent.trim())")
            assert texts == ["Remember me", "Hello, I am a fake model. Nice to meet you!"]
            assert DESCRIPTION in await page.js("document.querySelector('.msg.assistant .meta').textContent")
            assert await page.js("document.getElementById('empty').hidden")
            # The next turn carries the restored history.
            await page.wait_for("!!document.querySelector('#model option')")
            await type_and_send(page, "Again")
            await page.wait_for("document.querySelectorAll('.msg.assistant:not(.streaming) .meta').length === 2")
            assert [m.content for m in backend.specs[-1].messages] == ["Remember me", "Hello, I am a fake model. Nice to meet you!", "Again"]
            await page.screenshot(tmp_path / "webchat-restored.png")

            await page.js("document.getElementById('new-chat').click()")
            await page.reload()
            assert await page.js("document.querySelectorAll('.msg').length") == 0
            assert not await page.js("document.getElementById('empty').hidden")
            nursery.cancel_scope.cancel()
