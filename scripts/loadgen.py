"""A lean HTTP load generator for the entry: N concurrent streamed completions (SSE), bounded.

    .venv/bin/python scripts/loadgen.py --url http://127.0.0.1:8000 --model NAME --streams 64 \
        --duration 10 [--max-tokens 512] [--prompt-prefix p] [--warmup 1]

Each of --streams workers keeps one HTTP/1.1 keep-alive connection and sends streamed
/v1/completions back to back until --duration seconds have passed (a request running at the
deadline finishes; none starts after it, and each is bounded by --request-timeout). It speaks
HTTP over raw trio sockets with a minimal chunked/SSE parser, so its own cost per event is a
few microseconds and it is not what limits a benchmark; its CPU time is reported so that can be
checked. Prints one JSON object on stdout:

  requests, failed, errors (first few), tokens (from each answer's usage), events (SSE data
  events with text), elapsed_s, tok_per_s, ttft_ms p50/p99, gap_ms p50/p99/max (time between
  consecutive text events within a stream: what a reader sees as a pause), cpu_s (this
  process), tokens_per_event.

Samples from the first --warmup seconds are dropped (connections opening, nodes warming up);
failures are counted from the start. --expect-full counts a short answer as a failure.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from urllib.parse import urlsplit

import trio

_USAGE = re.compile(rb'"completion_tokens":(\d+)')


class HttpError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection with a read buffer."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        s = await trio.open_tcp_stream(host, port)
        return cls(s)

    async def fill(self) -> None:
        data = await self.stream.receive_some(262144)
        if not data:
            raise HttpError("connection closed")
        self.buf += data

    async def read_until(self, sep: bytes) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            await self.fill()

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def close(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


class Stats:
    def __init__(self, warm_until: float, expect_tokens: int = 0):
        self.warm_until = warm_until
        self.expect_tokens = expect_tokens
        self.requests = 0
        self.failed = 0
        self.errors: list[str] = []
        self.tokens = 0
        self.events = 0
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.first_at: float | None = None
        self.last_at: float = 0.0


async def one_request(conn: Conn, host_hdr: str, body: bytes, stats: Stats) -> bool:
    """Send one streamed completion; returns whether the connection may be reused."""
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host_hdr}\r\nContent-Type: application/json\r\n"
           f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    t0 = time.perf_counter()
    await conn.stream.send_all(req)
    head = await conn.read_until(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in rest.split(b"\r\n"):
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
    if not chunked:
        n = int(headers.get(b"content-length", b"0") or 0)
        data = await conn.read_exact(n)
        raise HttpError(f"HTTP {status}: {data[:200]!r}")
    if status != 200:
        raise HttpError(f"HTTP {status}")
    # Chunked body of SSE events; each event ends with a blank line.
    sse = bytearray()
    last_event: float | None = None
    tokens = 0
    done = False
    measured = t0 >= stats.warm_until
    while True:
        size_line = await conn.read_until(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await conn.read_until(b"\r\n")  # no trailers: the final CRLF
            break
        chunk = await conn.read_exact(size + 2)
        now = time.perf_counter()
        sse += chunk[:-2]
        while True:
            i = sse.find(b"\n\n")
            if i < 0:
                break
            ev = bytes(sse[:i])
            del sse[: i + 2]
            if ev == b"data: [DONE]":
                done = True
                continue
            if b'"usage":{' in ev:
                m = _USAGE.search(ev)
                if m:
                    tokens = int(m.group(1))
                continue
            if b'"error"' in ev[:20]:
                raise HttpError(f"stream error: {ev[:200]!r}")
            if b'"text":""' in ev or b'"finish_reason":null' not in ev:
                continue  # role/final chunks carry no text
            if measured:
                if last_event is None:
                    stats.ttft.append(now - t0)
                else:
                    stats.gaps.append(now - last_event)
                stats.events += 1
            last_event = now
    if not done:
        raise HttpError("stream ended without [DONE]")
    if stats.expect_tokens and tokens != stats.expect_tokens:
        raise HttpError(f"answer has {tokens} tokens, not {stats.expect_tokens}")
    if measured:
        stats.requests += 1
        stats.tokens += tokens
        if stats.first_at is None:
            stats.first_at = t0
        stats.last_at = time.perf_counter()
    return headers.get(b"connection", b"").lower() != b"close"


async def worker(i: int, args, host: str, port: int, stats: Stats, deadline: float) -> None:
    conn: Conn | None = None
    n = 0
    while time.perf_counter() < deadline and (args.requests == 0 or n < args.requests):
        body = json.dumps({"model": args.model, "prompt": f"{args.prompt_prefix} stream {i} request {n}",
                           "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        n += 1
        try:
            with trio.fail_after(args.request_timeout):
                if conn is None:
                    conn = await Conn.open(host, port)
                keep = await one_request(conn, f"{host}:{port}", body, stats)
            if not keep:
                await conn.close()
                conn = None
        except (HttpError, OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as e:
            stats.failed += 1  # counted from the start: a warm-up failure is still a failure
            if len(stats.errors) < 10:
                stats.errors.append(f"{type(e).__name__}: {e}"[:300])
            if conn is not None:
                await conn.close()
                conn = None
            await trio.sleep(0.05)
    if conn is not None:
        await conn.close()


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


async def run(args) -> dict:
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    start = time.perf_counter()
    stats = Stats(start + args.warmup, args.max_tokens if args.expect_full else 0)
    deadline = start + args.duration
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with trio.move_on_after(args.duration + args.request_timeout + 5):
        async with trio.open_nursery() as nursery:
            for i in range(args.streams):
                nursery.start_soon(worker, i, args, host, port, stats, deadline)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = (stats.last_at - stats.first_at) if stats.first_at is not None else 0.0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "streams": args.streams,
        "requests": stats.requests,
        "failed": stats.failed,
        "errors": stats.errors,
        "tokens": stats.tokens,
        "events": stats.events,
        "elapsed_s": round(elapsed, 3),
        "tok_per_s": round(stats.tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "tokens_per_event": round(stats.tokens / stats.events, 2) if stats.events else None,
        "ttft_ms_p50": ms(pct(stats.ttft, 50)),
        "ttft_ms_p99": ms(pct(stats.ttft, 99)),
        "gap_ms_p50": ms(pct(stats.gaps, 50)),
        "gap_ms_p99": ms(pct(stats.gaps, 99)),
        "gap_ms_max": ms(max(stats.gaps) if stats.gaps else None),
        "cpu_s": round(cpu, 3),
        "cpu_share": round(cpu / (time.perf_counter() - start), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds to start requests for")
    ap.add_argument("--requests", type=int, default=0, help="at most this many requests per stream (0 = until --duration)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of samples to drop at the start")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--prompt-prefix", default="bench")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--expect-full", action="store_true",
                    help="count an answer with fewer than --max-tokens tokens as failed (synthetic nodes always fill it)")
    args = ap.parse_args(argv)
    if not 1 <= args.streams <= 1024 or not 0 < args.duration <= 3600:
        ap.error("--streams must be 1-1024 and --duration 0-3600 s")
    result = trio.run(run, args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
