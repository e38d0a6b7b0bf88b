"""The node console: a page on 127.0.0.1 for the volunteer who runs this node.

What the node served (requests, tokens, over the last hour), its load, its credits as each
configured entry's signed statement reports them next to the receipts the node kept, the
entries' verification verdicts, and a "stop serving" button that drains like `mesh node stop`.

Served from the daemon's own trio loop (hypercorn's trio worker) and bound to 127.0.0.1 only.
Stopping is a state change on a local port any web page could aim a form at, so it needs the
per-start token the page carries (a header, which a cross-site form cannot set), an Origin of
this console if the browser sends one, and every request needs a Host naming this console (a
DNS-rebinding page cannot read or post either).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import time
import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.credits_cli import _entry_peer, compare, fetch_statement
from node.receipt_log import FILE_NAME as RECEIPTS_FILE
from node.receipt_log import ReceiptLog
from protocol.errors import RecordError
from protocol.records import WorkReceipt, _open, _typed
from web import PAGE_HEADERS, content_type, page_files, vendor_files
from web.series import RollingSeries

if TYPE_CHECKING:
    from node.daemon import NodeDaemon

log = logging.getLogger("mesh.node.console")
PAGE_DIR = Path(__file__).parent / "console_page"
HOST = "127.0.0.1"
TOKEN_HEADER = "X-Mesh-Console-Token"
SAMPLE_S = 2.0  # how often the served counters are read into the series
# Entries are asked again after this long, or sooner (but not within STATEMENTS_MIN_S) once the
# node has served more: a statement changes when work is booked, and later when it vests.
STATEMENTS_CACHE_S = 30.0
STATEMENTS_MIN_S = 3.0
STATEMENT_TIMEOUT_S = 10.0
MAX_PROBLEMS = 50  # discrepancies listed per entry on the page


class NodeConsole:
    def __init__(self, daemon: NodeDaemon, entries: list[str] | tuple[str, ...] = ()):
        self.daemon = daemon
        self.entries = list(entries)
        self.token = secrets.token_urlsafe(32)  # per start: a page from an earlier start cannot stop this one
        self.port = 0
        self.requests, self.tokens, self.failed = RollingSeries(), RollingSeries(), RollingSeries()
        self._last: tuple[int, int, int] | None = None
        # Asked in the background, so a slow or unreachable entry never holds up the page.
        self._statements: list[dict] = [{"url": u, "pending": True} for u in self.entries]
        self._asked: tuple[float, int] | None = None  # (monotonic time, requests served) of the last round
        self._asking = False
        self._nursery: trio.Nursery | None = None
        self.files = page_files(PAGE_DIR)
        self.vendor = vendor_files()
        self.receipts = ReceiptTally(daemon.cfg.state_path() / RECEIPTS_FILE)

    # --- serving ------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/console/{name}", self.file, methods=["GET"]),
            Route("/vendor/{name}", self.vendor_file, methods=["GET"]),
            Route("/api/state", self.state, methods=["GET"]),
            Route("/api/stop", self.stop, methods=["POST"]),
        ])

    async def serve(self, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1:port (0: any free port) until cancelled; reports the bound port."""
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"{HOST}:{port}"]
        config.accesslog = None
        config.include_server_header = False
        config.graceful_timeout = 1.0
        app = _HostCheck(self.app(), self)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
            self.port = int(binds[0].rsplit(":", 1)[1])
            self._nursery = nursery
            nursery.start_soon(self._sample_loop)
            log.info("node console listening", extra={"url": self.url})
            task_status.started(self.port)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def allowed_hosts(self) -> set[str]:
        return {f"{HOST}:{self.port}", f"localhost:{self.port}"}

    # --- pages --------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        # The token rides in a meta tag: the page's script (no inline script under the CSP)
        # reads it, a page of another origin cannot.
        html = self.files["index.html"].replace(b"{{CSRF_TOKEN}}", self.token.encode())
        return Response(html, media_type="text/html; charset=utf-8", headers={**PAGE_HEADERS, "Cache-Control": "no-store"})

    async def file(self, request: Request) -> Response:
        return self._serve(self.files, request.path_params["name"])

    async def vendor_file(self, request: Request) -> Response:
        return self._serve(self.vendor, request.path_params["name"])

    def _serve(self, files: dict[str, bytes], name: str) -> Response:
        data = files.get(name)
        if data is None or name == "index.html":
            return JSONResponse({"error": {"message": f"no such file: {name}"}}, status_code=404)
        return Response(data, media_type=content_type(name), headers=PAGE_HEADERS)

    # --- data ---------------------------------------------------------------------------------

    def _sample(self) -> None:
        st = self.daemon.stats
        now = (st.requests_served, st.tokens_served, st.requests_failed)
        if self._last is not None:
            for series, new, old in zip((self.requests, self.tokens, self.failed), now, self._last):
                if new > old:
                    series.add(new - old)
        self._last = now

    async def _sample_loop(self) -> None:
        self._sample()
        while True:
            await trio.sleep(SAMPLE_S)
            self._sample()

    async def state(self, request: Request) -> Response:
        self._sample()
        status = self.daemon.status_dict()
        t = time.time()
        points = {k: s.points(t) for k, s in (("requests", self.requests), ("tokens", self.tokens), ("failed", self.failed))}
        return JSONResponse({
            "object": "mesh.node.console",
            "time": round(t, 3),
            "status": {k: v for k, v in status.items() if k not in ("ok", "addrs")},
            "series": {"bucket_s": self.requests.bucket_s, "t": [p for p, _ in points["tokens"]],
                       **{k: [v for _, v in p] for k, p in points.items()}},
            "receipts": self.receipts.by_entry(),
            "entries": self._entry_statements(),
        })

    def _entry_statements(self) -> list[dict]:
        """The latest statements; starts a new round of queries when they are stale."""
        if self.entries and not self._asking and self._nursery is not None:
            now, served = time.monotonic(), self.daemon.stats.requests_served
            last = self._asked
            if last is None or now - last[0] >= STATEMENTS_CACHE_S or (served != last[1] and now - last[0] >= STATEMENTS_MIN_S):
                self._asking = True
                self._asked = (now, served)
                self._nursery.start_soon(self._ask_entries)
        return self._statements

    async def _ask_entries(self) -> None:
        try:
            results: list[dict] = [{}] * len(self.entries)

            async def ask(i: int, url: str) -> None:
                results[i] = await trio.to_thread.run_sync(self._statement, url, abandon_on_cancel=True)

            async with trio.open_nursery() as nursery:
                for i, url in enumerate(self.entries):
                    nursery.start_soon(ask, i, url)
            self._statements = results
        finally:
            self._asking = False

    def _statement(self, url: str) -> dict[str, Any]:
        """One entry's signed statement compared with our receipts (as `mesh node credits`)."""
        try:
            statement = fetch_statement(url, self.daemon.identity, timeout=STATEMENT_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            return {"url": url, "error": f"the entry answered {e.code}"}
        except (urllib.error.URLError, OSError, ValueError) as e:
            return {"url": url, "error": f"cannot reach the entry: {getattr(e, 'reason', e)}"}
        receipts = ReceiptLog(self.daemon.cfg.state_path() / RECEIPTS_FILE).receipts()
        entry_peer = statement.get("entry") or _entry_peer(statement, receipts)
        result = compare(statement, receipts, entry_peer)
        verdicts: dict[str, int] = {}
        for r in statement.get("requests", []):
            v = r.get("verify") or "not checked"
            verdicts[v] = verdicts.get(v, 0) + 1
        return {"url": url, "entry": entry_peer, "totals": result["totals"], "booked": result["booked"],
                "receipts": result["receipts"], "problems": result["problems"][:MAX_PROBLEMS],
                "problem_count": len(result["problems"]), "verdicts": verdicts}

    # --- stopping -----------------------------------------------------------------------------

    async def stop(self, request: Request) -> Response:
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _forbidden("missing or wrong console token: reload the console page")
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") not in {f"http://{h}" for h in self.allowed_hosts()}:
            return _forbidden("this request comes from another site")
        log.info("stop requested from the node console")
        self.daemon.request_stop()
        a = self.daemon.service.admission
        return JSONResponse({"ok": True, "stopping": True, "in_flight": a.active, "grace_s": self.daemon.cfg.drain_seconds})


class ReceiptTally:
    """Receipts and tokens per entry from the node's receipts log, read incrementally: the log
    only grows (one signed line per request), and checking every signature again on each poll
    would cost a long-serving node seconds of CPU every 2 s."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.tally: dict[str, dict] = {}

    def by_entry(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self.offset:  # replaced or truncated: count it again
            self.offset, self.tally = 0, {}
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            for line in data[:end].splitlines():
                r = _receipt(line)
                if r is not None:
                    d = self.tally.setdefault(r.entry, {"entry": r.entry, "receipts": 0, "tokens": 0})
                    d["receipts"] += 1
                    d["tokens"] += r.completion_tokens
            self.offset += end
        return sorted(self.tally.values(), key=lambda d: -d["receipts"])


def _receipt(line: bytes) -> WorkReceipt | None:
    """One line of the log, as ReceiptLog.receipts reads it (None: torn or foreign)."""
    try:
        blob = base64.b64decode(line, validate=True)
        return WorkReceipt(**_typed(_open(blob, WorkReceipt.KIND), WorkReceipt._SPEC))
    except (binascii.Error, ValueError, RecordError):
        return None


def _forbidden(message: str) -> Response:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": "forbidden"}}, status_code=403)


class _HostCheck:
    """Every request must name this console in Host: a DNS-rebinding page (evil.example
    resolving to 127.0.0.1) reaches the socket but says its own name."""

    def __init__(self, app, console: NodeConsole):
        self.app, self.console = app, console

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            if host not in self.console.allowed_hosts():
                await _forbidden(f"this console answers to {HOST}:{self.console.port} only")(scope, receive, send)
                return
        await self.app(scope, receive, send)
