"""Streamed choices that a mesh serves one after another (a one-slot node and n=2)."""

from __future__ import annotations

import trio

from tests.support.fake_backend import WORDS, FakeBackend, parse_sse, running_api


class OneAtATime(FakeBackend):
    """Runs one generation at a time, as a node with one slot does."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = trio.Lock()

    def generate(self, spec, model=None):
        inner = super().generate(spec, model)

        async def serialized():
            async with self.lock:
                async for ev in inner:
                    yield ev
        return serialized()


async def test_a_choice_that_ends_before_the_next_starts_is_streamed_whole():
    with trio.fail_after(20):
        async with running_api(OneAtATime()) as api:
            r = await api.client.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 3,
                "stream": True})
    assert r.status_code == 200, r.text
    chunks = parse_sse(r.text)[:-1]
    text = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i)
            for i in (0, 1)}
    assert text == {0: "".join(WORDS[:3]), 1: "".join(WORDS[:3])}
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1]
