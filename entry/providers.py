"""External OpenAI-compatible providers as generation targets.

A ProviderTarget is one model of one provider ([[entry.providers]], entry/routing_config.py),
with the same `generate(spec)` shape as the mesh backend: TokenEvents, then one DoneEvent. It
always asks the provider for a stream (`stream: true`, `stream_options.include_usage`), so a
non-streamed API answer is the events collected.

What goes to the provider: the messages or prompt, temperature, top_p, max_tokens, stop,
seed, presence/frequency penalties, n = 1, and the operator's API key. Never the user's
identity: no `user` field, none of the user's headers, no cookies kept between requests (a
provider's cookie would link different users' requests). top_k, min_p and repeat_penalty are
not OpenAI parameters (OpenAI refuses unknown ones), so they are not sent; logprobs need token
ids a provider does not give, so a spec asking for them is refused before any request.

Every failure is a ProviderError with one readable line: connection refused, no answer within
the timeout (connect, first byte, and between events), HTTP 4xx/5xx (with the provider's
OpenAI-shaped error message when it sends one), a body that is not an event stream, an event
that is not the JSON of a completion chunk, or a stream that ends without `data: [DONE]`.
`tokens_delivered` tells a caller whether it can still fall back to another target without
the user seeing text twice.

Consumers must close the event iterator (`async with contextlib.aclosing(...)`) when they
stop early: that closes the HTTP response, which makes the provider stop generating.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import httpx_sse
import trio

from entry.backend import DoneEvent, GenerationSpec, ServedPart, TokenEvent
from entry.routing_config import Prices, ProviderConfig

_ERROR_BODY_MAX = 64 * 1024  # of an error answer, enough for any provider's message
_USER_AGENT = "inference-mesh"
_CHARS_PER_TOKEN = 4  # rough average of English text in BPE tokenizers, for estimates only


class ProviderError(Exception):
    """A provider could not produce (the rest of) a generation. str() is one line."""

    def __init__(self, message: str, *, provider: str, status: int | None = None, retryable: bool = True,
                 tokens_delivered: int = 0, retry_after: float | None = None):
        super().__init__(message)
        self.provider = provider
        self.status = status  # HTTP status when the provider answered with an error
        self.retryable = retryable  # False: the request itself was refused (4xx other than 408/409/429)
        self.tokens_delivered = tokens_delivered  # text chunks the caller already got from this attempt
        self.retry_after = retry_after


@dataclass
class ProviderDoneEvent(DoneEvent):
    """DoneEvent from a provider; usage_estimated: the provider sent no usage, the token
    counts are estimates from the text's length."""

    usage_estimated: bool = False


def _no_cookies() -> CookieJar:
    # A jar, not an httpx.Cookies: the client copies a Cookies object into a jar with the
    # default (accept-all) policy, while it keeps a jar as given.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class ProviderClient:
    """One configured provider: its HTTP connection pool and its targets (one per model)."""

    def __init__(self, cfg: ProviderConfig, api_key: str | None, *, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg = cfg
        headers = {"User-Agent": _USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        t = cfg.timeout
        self._http = httpx.AsyncClient(
            headers=headers, cookies=_no_cookies(), follow_redirects=False, transport=transport,
            timeout=httpx.Timeout(connect=t, read=t, write=t, pool=t),
        )
        self.targets = [ProviderTarget(self, m.id, m.prices) for m in cfg.models]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


@asynccontextmanager
async def open_providers(providers: Iterable[ProviderConfig], environ=None) -> AsyncIterator[dict[str, ProviderTarget]]:
    """Clients for every configured provider; yields {target id: ProviderTarget}."""
    async with AsyncExitStack() as stack:
        targets: dict[str, ProviderTarget] = {}
        for cfg in providers:
            client = await stack.enter_async_context(ProviderClient(cfg, cfg.api_key(environ)))
            targets.update({t.id: t for t in client.targets})
        yield targets


class ProviderTarget:
    """One model of one provider, generating like the mesh backend does."""

    supports_logprobs = False

    def __init__(self, client: ProviderClient, model: str, prices: Prices):
        self._client = client
        self.provider = client.cfg.name
        self.model = model  # the provider's id, sent as `model`
        self.id = client.cfg.target_id(model)  # what the entry calls it: "provider/model"
        self.prices = prices

    def __repr__(self) -> str:
        return f"ProviderTarget({self.id!r})"

    def _error(self, message: str, **kw) -> ProviderError:
        return ProviderError(f"provider {self.provider!r}: {message}", provider=self.provider, **kw)

    def request_body(self, spec: GenerationSpec) -> tuple[str, dict]:
        """(path, JSON body) of the provider call for this spec."""
        p = spec.params
        body: dict = {"model": self.model}
        if spec.kind == "chat":
            path = "/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in spec.messages]
        elif spec.kind == "completion":
            path = "/completions"
            body["prompt"] = spec.prompt
        else:
            raise self._error(f"unknown request kind {spec.kind!r}", retryable=False)
        body.update(stream=True, stream_options={"include_usage": True}, n=1, max_tokens=p.max_tokens,
                    temperature=p.temperature, top_p=p.top_p)
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        return path, body

    async def generate(self, spec: GenerationSpec) -> AsyncIterator[TokenEvent | DoneEvent]:
        if spec.logprobs or spec.top_logprobs:
            raise self._error("logprobs are not available from external providers", retryable=False)
        path, body = self.request_body(spec)
        timeout = self._client.cfg.timeout
        url = self._client.cfg.base_url + path
        delivered = 0
        chunks, text_chars = 0, 0
        finish, usage = None, None
        async with AsyncExitStack() as stack:
            try:
                with trio.fail_after(timeout):  # connect + send + response headers
                    response = await stack.enter_async_context(self._client._http.stream(
                        "POST", url, json=body, headers={"Accept": "text/event-stream", "Cache-Control": "no-store"}))
            except trio.TooSlowError:
                raise self._error(f"no answer from {url} within {timeout:g} s") from None
            except httpx.HTTPError as e:
                raise self._transport_error(e, url, 0) from None
            if response.status_code >= 400:
                raise await self._http_error(response)
            if response.status_code != 200:
                raise self._error(f"answered HTTP {response.status_code}, expected 200 with an event stream")
            events = httpx_sse.EventSource(response).aiter_sse()
            stack.push_async_callback(events.aclose)
            while True:
                try:
                    with trio.fail_after(timeout):  # first byte, then between events
                        event = await events.__anext__()
                except StopAsyncIteration:
                    raise self._error("the stream ended without data: [DONE] (cut off?)", tokens_delivered=delivered) from None
                except trio.TooSlowError:
                    what = "its first event" if chunks == 0 and finish is None else "the next event"
                    raise self._error(f"sent nothing for {timeout:g} s (waiting for {what})", tokens_delivered=delivered) from None
                except httpx_sse.SSEError:
                    ctype = response.headers.get("content-type", "none")
                    raise self._error(f"answered 200 with Content-Type {ctype!r}, not an event stream") from None
                except httpx.HTTPError as e:
                    raise self._transport_error(e, url, delivered) from None
                data = event.data
                if data.strip() == "[DONE]":
                    break
                if not data.strip():
                    continue  # keep-alive or an event without data
                chunk = self._parse_chunk(data, delivered)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                text, reason = self._choice(chunk, spec.kind, delivered)
                if reason:
                    finish = reason
                if text:
                    chunks += 1
                    text_chars += len(text)
                    delivered += 1
                    yield TokenEvent(ids=[], text=text)
        yield self._done(spec, finish, usage, chunks, text_chars)

    # --- parsing ---------------------------------------------------------------------------

    def _parse_chunk(self, data: str, delivered: int) -> dict:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._error(f"sent an event that is not JSON: {_snippet(data)}", tokens_delivered=delivered) from None
        if not isinstance(chunk, dict):
            raise self._error(f"sent an event that is not a JSON object: {_snippet(data)}", tokens_delivered=delivered)
        if "error" in chunk:  # OpenAI reports failures after the 200 as an error event
            raise self._error(f"failed mid-stream: {_error_message(chunk) or _snippet(data)}", tokens_delivered=delivered)
        return chunk

    def _choice(self, chunk: dict, kind: str, delivered: int) -> tuple[str, str | None]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or (not choices and not isinstance(chunk.get("usage"), dict)):
            raise self._error(f"sent a chunk without choices: {_snippet(json.dumps(chunk))}", tokens_delivered=delivered)
        if not choices:
            return "", None  # the usage chunk
        c = choices[0]
        if not isinstance(c, dict):
            raise self._error("sent a choice that is not a JSON object", tokens_delivered=delivered)
        if kind == "chat":
            delta = c.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = c.get("text")
        if text is not None and not isinstance(text, str):
            raise self._error(f"sent text that is not a string: {_snippet(json.dumps(text))}", tokens_delivered=delivered)
        reason = c.get("finish_reason")
        return text or "", reason if isinstance(reason, str) else None

    def _done(self, spec: GenerationSpec, finish: str | None, usage: dict | None, chunks: int,
              text_chars: int) -> ProviderDoneEvent:
        prompt_tokens = _count(usage, "prompt_tokens")
        completion_tokens = _count(usage, "completion_tokens")
        estimated = prompt_tokens is None or completion_tokens is None
        if prompt_tokens is None:
            prompt_tokens = _estimate_tokens(_prompt_chars(spec))
        if completion_tokens is None:
            # Most providers send one token per chunk; some send several: take the larger.
            completion_tokens = max(chunks, _estimate_tokens(text_chars))
        reason = finish if finish in ("stop", "length", "content_filter") else "stop"
        part = ServedPart(pseudonym=self.provider, description=f"{self.model} at provider {self.provider}",
                          completion_tokens=completion_tokens)
        return ProviderDoneEvent(finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 served_by=[part], usage_estimated=estimated)

    # --- errors ----------------------------------------------------------------------------

    def _transport_error(self, e: httpx.HTTPError, url: str, delivered: int) -> ProviderError:
        t = self._client.cfg.timeout
        if isinstance(e, httpx.ConnectTimeout):
            msg = f"{url} did not accept a connection within {t:g} s"
        elif isinstance(e, httpx.TimeoutException):
            msg = f"sent nothing for {t:g} s"
        elif isinstance(e, httpx.ConnectError):
            msg = f"cannot connect to {url}: {_first_line(e) or 'connection refused'}"
        elif isinstance(e, httpx.RemoteProtocolError):
            msg = f"broke the HTTP protocol or closed the connection mid-answer: {_first_line(e)}"
        else:
            msg = f"request to {url} failed: {type(e).__name__}: {_first_line(e)}"
        return self._error(msg, tokens_delivered=delivered)

    async def _http_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        raw = b""
        try:
            with trio.move_on_after(self._client.cfg.timeout):
                async for part in response.aiter_bytes():
                    raw += part
                    if len(raw) >= _ERROR_BODY_MAX:
                        break
        except httpx.HTTPError:
            pass  # the status alone still says what happened
        text = raw[:_ERROR_BODY_MAX].decode("utf-8", errors="replace")
        try:
            detail = _error_message(json.loads(text))
        except ValueError:
            detail = None
        detail = detail or _snippet(text) or response.reason_phrase
        retry_after = _retry_after(response.headers.get("retry-after"))
        # A refused request stays refused elsewhere at this provider; overload and outages don't.
        retryable = status in (408, 409, 429) or status >= 500
        return self._error(f"answered HTTP {status}: {detail}", status=status, retryable=retryable, retry_after=retry_after)


def _error_message(obj) -> str | None:
    """The message of an OpenAI-shaped error ({"error": {"message": ...}}) or of FastAPI's
    {"detail": ...}, whichever the provider sent."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        code = err.get("code") or err.get("type")
        if isinstance(msg, str) and msg.strip():
            line = _first_line(msg)
            return f"{line} ({code})" if isinstance(code, str) and code else line
    if isinstance(err, str) and err.strip():
        return _first_line(err)
    detail = obj.get("detail")
    if isinstance(detail, str) and detail.strip():
        return _first_line(detail)
    return None


def _first_line(x) -> str:
    lines = str(x).strip().splitlines()
    return lines[0][:300] if lines else ""


def _snippet(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return repr(text[:n] + ("…" if len(text) > n else "")) if text else ""


def _retry_after(v: str | None) -> float | None:
    try:
        f = float(v) if v is not None else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) and f >= 0 else None


def _count(usage: dict | None, key: str) -> int | None:
    v = usage.get(key) if usage else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _prompt_chars(spec: GenerationSpec) -> int:
    if spec.kind == "chat":
        return sum(len(m.content) for m in spec.messages)
    return len(spec.prompt)


def _estimate_tokens(chars: int) -> int:
    return -(-chars // _CHARS_PER_TOKEN)
