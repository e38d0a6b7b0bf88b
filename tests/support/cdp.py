"""Drive Debian's headless Chromium over the DevTools protocol with trio-websocket (no driver
binary): open a page, evaluate JS, poll for a condition, take screenshots."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS


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

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        # Navigation answers before the new document exists.
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    async def reload(self) -> None:
        await self.js("window.__old = true")
        await self.call("Page.reload")
        await self.wait_for("!window.__old && document.readyState === 'complete'")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the window), for a person to look at."""
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


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
    await page.navigate(url)
    return page


async def _hold_websocket(url, *, task_status):
    async with open_websocket_url(url, max_message_size=50_000_000) as ws:
        task_status.started(ws)
        await trio.sleep_forever()
