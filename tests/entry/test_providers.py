"""entry/providers.py against hand-written misbehaving servers: a tiny trio TCP server on
127.0.0.1 per test that answers exactly the bytes a test gives it (or nothing at all). The
real third-party server is in test_providers_server.py."""

from __future__ import annotations

import json
import socket
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from entry.backend import DoneEvent, GenerationSpec, TokenEvent
from entry.providers import ProviderClient, ProviderDoneEvent, ProviderError, open_providers
from entry.routing_config import parse_providers
from protocol.messages import ChatMessage, SamplingParams

KEY = "operator-secret"


@dataclass
class Fake:
    """What the fake server got, and what it answers: `answer(request_no)` -> bytes to send
    (None: send nothing and keep the connection open)."""

    port: int = 0
    requests: list[dict] = field(default_factory=list)
    connections: int = 0
    client_closed: trio.Event = field(default_factory=trio.Event)


WAIT_EOF = "wait for the client to close"


async def _read_request(stream) -> dict | None:
    buf = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buf += data
            assert len(buf) < 1 << 20
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += await stream.receive_some(65536)
    return {"line": lines[0], "headers": headers, "body": json.loads(body) if body else None}


@asynccontextmanager
async def fake_server(answer):
    fake = Fake()

    async def handle(stream):
        fake.connections += 1
        req = await _read_request(stream)
        if req is None:
            return
        fake.requests.append(req)
        out = answer(len(fake.requests))
        if out is None:
            await trio.sleep_forever()  # accepted, never answers
        for part in out if isinstance(out, list) else [out]:
            if isinstance(part, float):
                await trio.sleep(part)  # a pause inside the answer
            elif part == WAIT_EOF:
                while await stream.receive_some(65536):
                    pass
                fake.client_closed.set()
            else:
                await stream.send_all(part)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        fake.port = listener.socket.getsockname()[1]
        yield fake
        nursery.cancel_scope.cancel()


def http(status: int, body: bytes, ctype: str = "text/event-stream", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    return head.encode() + body


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def chunk(text=None, finish=None, kind="chat") -> dict:
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return {"id": "x", "object": "chat.completion.chunk", "choices": [choice]}


GOOD = sse(chunk("Hel"), chunk("lo"), chunk(None, "stop"), b"[DONE]")


def client_for(port: int, timeout: float = 5.0, key: str | None = KEY, models=("m1",)) -> ProviderClient:
    [cfg] = parse_providers([{"name": "fake", "base_url": f"http://127.0.0.1:{port}/v1", "timeout": timeout,
                              "input_per_mtok": 1.0, "output_per_mtok": 2.0, "models": list(models),
                              **({"api_key_env": "FAKE_KEY"} if key else {})}])
    return ProviderClient(cfg, key)


def chat_spec(**params) -> GenerationSpec:
    return GenerationSpec(model="fake/m1", kind="chat", params=SamplingParams(**params),
                          messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Say hello")])


async def collect(target, spec) -> tuple[list[TokenEvent], DoneEvent]:
    toks: list[TokenEvent] = []
    done = None
    async with aclosing(target.generate(spec)) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                toks.append(ev)
            else:
                done = ev
    assert done is not None
    return toks, done


async def fails(target, spec, limit: float = 10.0) -> tuple[ProviderError, list[TokenEvent], float]:
    toks: list[TokenEvent] = []
    t0 = time.monotonic()
    with trio.fail_after(limit):
        with pytest.raises(ProviderError) as ei:
            async with aclosing(target.generate(spec)) as events:
                async for ev in events:
                    toks.append(ev)
    return ei.value, toks, time.monotonic() - t0


# --- what is sent -------------------------------------------------------------------------


async def test_request_carries_the_spec_and_the_operator_key_and_nothing_about_the_user():
    async with fake_server(lambda n: http(200, GOOD, extra="Set-Cookie: track=user-1; Path=/\r\n")) as fake:
        async with client_for(fake.port) as client:
            [target] = client.targets
            spec = chat_spec(temperature=0.7, top_p=0.9, max_tokens=33, stop=["\n\n", "END"], seed=7, top_k=40,
                             min_p=0.1, presence_penalty=0.5)
            toks, done = await collect(target, spec)
            await collect(target, chat_spec())
    assert "".join(t.text for t in toks) == "Hello" and all(t.ids == [] for t in toks)
    first, second = fake.requests
    assert first["line"] == "POST /v1/chat/completions HTTP/1.1"
    assert first["body"] == {
        "model": "m1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        "stream": True, "stream_options": {"include_usage": True}, "n": 1, "max_tokens": 33, "temperature": 0.7,
        "top_p": 0.9, "stop": ["\n\n", "END"], "seed": 7, "presence_penalty": 0.5,
    }  # no `user`; top_k and min_p are no OpenAI parameters
    h = first["headers"]
    assert h["authorization"] == f"Bearer {KEY}" and h["user-agent"] == "inference-mesh"
    assert h["accept"] == "text/event-stream"
    assert set(h) <= {"host", "authorization", "user-agent", "accept", "accept-encoding", "connection", "content-type",
                      "content-length", "cache-control"}
    # A provider's cookie must not link one user's request to the next one's.
    assert "cookie" not in second["headers"]
    assert second["body"]["temperature"] == 0.0 and "stop" not in second["body"] and "seed" not in second["body"]


async def test_keyless_provider_sends_no_authorization_and_completions_go_to_completions():
    body = sse(chunk("4,", kind="completion"), chunk(" 5", "length", kind="completion"), b"[DONE]")
    async with fake_server(lambda n: http(200, body)) as fake:
        async with client_for(fake.port, key=None) as client:
            spec = GenerationSpec(model="fake/m1", kind="completion", params=SamplingParams(max_tokens=2), prompt="1, 2, 3,")
            toks, done = await collect(client.targets[0], spec)
    [req] = fake.requests
    assert req["line"].startswith("POST /v1/completions ") and req["body"]["prompt"] == "1, 2, 3,"
    assert "authorization" not in req["headers"] and "messages" not in req["body"]
    assert [t.text for t in toks] == ["4,", " 5"] and done.finish_reason == "length"


async def test_logprobs_are_refused_before_any_request():
    async with fake_server(lambda n: http(200, GOOD)) as fake:
        async with client_for(fake.port) as client:
            spec = chat_spec()
            spec.logprobs = True
            err, _, _ = await fails(client.targets[0], spec)
    assert "logprobs" in str(err) and not err.retryable and fake.connections == 0


# --- usage --------------------------------------------------------------------------------


async def test_usage_from_the_provider_is_used_and_prices_come_from_the_config():
    usage = {"id": "x", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
    body = sse(chunk("Hel"), chunk("lo", "stop"), usage, b"[DONE]")
    async with fake_server(lambda n: http(200, body)) as fake:
        async with client_for(fake.port) as client:
            target = client.targets[0]
            _, done = await collect(target, chat_spec())
    assert isinstance(done, ProviderDoneEvent) and not done.usage_estimated
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (11, 2, "stop")
    assert done.served_by[0].pseudonym == "fake" and done.served_by[0].completion_tokens == 2
    assert target.id == "fake/m1" and target.prices.cost(11, 2) == pytest.approx((11 * 1.0 + 2 * 2.0) / 1e6)


async def test_missing_usage_is_estimated_and_marked():
    async with fake_server(lambda n: http(200, GOOD)) as fake:
        async with client_for(fake.port) as client:
            _, done = await collect(client.targets[0], chat_spec())
    assert done.usage_estimated
    assert done.completion_tokens == 2  # two chunks with text ("Hel", "lo")
    assert done.prompt_tokens == 5  # "Be brief." + "Say hello": 18 characters / 4, rounded up


# --- failures -----------------------------------------------------------------------------


async def test_provider_down_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client_for(port, timeout=30) as client:
        err, toks, took = await fails(client.targets[0], chat_spec(), limit=5)
    assert "cannot connect" in str(err) and "'fake'" in str(err) and err.retryable and not toks
    assert took < 2


async def test_provider_that_accepts_and_never_answers_times_out():
    async with fake_server(lambda n: None) as fake:
        async with client_for(fake.port, timeout=0.5) as client:
            err, toks, took = await fails(client.targets[0], chat_spec(), limit=10)
    assert "within 0.5 s" in str(err) and err.retryable and err.tokens_delivered == 0
    assert 0.4 < took < 5


async def test_provider_that_stalls_between_chunks_times_out_and_says_what_was_delivered():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    async with fake_server(lambda n: [head, sse(chunk("Hel")), 60.0]) as fake:
        async with client_for(fake.port, timeout=0.5) as client:
            err, toks, took = await fails(client.targets[0], chat_spec(), limit=10)
    assert [t.text for t in toks] == ["Hel"] and err.tokens_delivered == 1
    assert "sent nothing for 0.5 s" in str(err) and took < 5


@pytest.mark.parametrize("answer, message", [
    (http(200, b"<html>Welcome to nginx!</html>", ctype="text/html"), "not an event stream"),
    (http(200, b"data: {not json\n\n"), "not JSON"),
    (http(200, sse([1, 2])), "not a JSON object"),
    (http(200, sse({"id": "x", "object": "chat.completion.chunk"})), "without choices"),
    (http(200, sse({"choices": [{"delta": {"content": 5}}]})), "not a string"),
    (http(200, sse(chunk("Hel"), chunk("lo"))), "without data: [DONE]"),
    (http(200, b"garbage without any event\n"), "without data: [DONE]"),
    (http(200, sse(chunk("Hel"), {"error": {"message": "overloaded", "type": "server_error"}})), "overloaded"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 500\r\n\r\n" + sse(chunk("Hi")), "closed the connection"),
    (b"\x00\x01 not http at all\r\n\r\n", "HTTP protocol"),
])
async def test_garbage_answers_are_provider_errors(answer, message):
    async with fake_server(lambda n: answer) as fake:
        async with client_for(fake.port) as client:
            err, _, _ = await fails(client.targets[0], chat_spec())
    assert message in str(err) and str(err).startswith("provider 'fake': ") and "\n" not in str(err)


async def test_http_errors_carry_the_providers_message_and_whether_to_retry():
    bodies = {
        1: http(500, json.dumps({"error": {"message": "The server had an error\nsecond line", "type": "server_error"}}).encode(),
                ctype="application/json"),
        2: http(400, json.dumps({"error": {"message": "Invalid 'max_tokens'", "code": "invalid_value"}}).encode(),
                ctype="application/json"),
        3: http(401, json.dumps({"detail": "Invalid API key"}).encode(), ctype="application/json"),
        4: http(429, b"slow down", ctype="text/plain", extra="Retry-After: 7\r\n"),
    }
    errors = []
    async with fake_server(lambda n: bodies[n]) as fake:
        async with client_for(fake.port) as client:
            for _ in bodies:
                errors.append((await fails(client.targets[0], chat_spec()))[0])
    e500, e400, e401, e429 = errors
    assert (e500.status, e500.retryable) == (500, True)
    assert str(e500) == "provider 'fake': answered HTTP 500: The server had an error (server_error)"
    assert (e400.status, e400.retryable) == (400, False) and "Invalid 'max_tokens' (invalid_value)" in str(e400)
    assert (e401.status, e401.retryable) == (401, False) and "Invalid API key" in str(e401)
    assert (e429.status, e429.retryable, e429.retry_after) == (429, True, 7.0) and "slow down" in str(e429)


async def test_closing_the_events_early_closes_the_connection():
    """A client that went away must stop the provider's generation: the connection closes."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    async with fake_server(lambda n: [head, sse(chunk("Hel")), WAIT_EOF]) as fake:
        async with client_for(fake.port) as client:
            with trio.fail_after(10):
                async with aclosing(client.targets[0].generate(chat_spec())) as events:
                    async for ev in events:
                        assert ev.text == "Hel"
                        break
                await fake.client_closed.wait()  # while the client (its pool) is still open
    assert len(fake.requests) == 1


async def test_open_providers_reads_keys_and_names_targets(monkeypatch):
    cfgs = parse_providers([
        {"name": "a", "base_url": "https://a.example/v1", "api_key_env": "A_KEY", "input_per_mtok": 1, "output_per_mtok": 2,
         "models": ["x", {"id": "y", "output_per_mtok": 5}]},
        {"name": "local", "base_url": "http://127.0.0.1:9/v1", "input_per_mtok": 0, "output_per_mtok": 0, "models": ["x"]},
    ])
    async with open_providers(cfgs, environ={"A_KEY": "k"}) as targets:
        assert sorted(targets) == ["a/x", "a/y", "local/x"]
        assert targets["a/y"].prices.output_per_mtok == 5 and targets["a/y"].prices.input_per_mtok == 1
        assert targets["a/x"]._client._http.headers["authorization"] == "Bearer k"
        assert "authorization" not in targets["local/x"]._client._http.headers
