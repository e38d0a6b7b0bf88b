"""Per-key request and token rate limits."""

from __future__ import annotations

import pytest

from entry.api.ratelimit import RateLimited, RateLimits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_bucket_refills():
    clock = Clock()
    limits = RateLimits(rpm=3, clock=clock)
    for _ in range(3):
        limits.acquire("k")
    with pytest.raises(RateLimited) as e:
        limits.acquire("k")
    assert e.value.retry_after == 20
    limits.acquire("other")  # separate subject
    clock.now += 20
    limits.acquire("k")
    with pytest.raises(RateLimited):
        limits.acquire("k")


def test_token_bucket_allows_debt_then_waits():
    clock = Clock()
    limits = RateLimits(tpm=60, clock=clock)
    limits.acquire("k")
    limits.spend_tokens("k", 90)  # 30 in debt
    with pytest.raises(RateLimited) as e:
        limits.acquire("k")
    assert e.value.retry_after == 31
    clock.now += 31
    limits.acquire("k")


def test_per_key_limits_override_defaults_and_none_is_unlimited():
    clock = Clock()
    limits = RateLimits(rpm=1, clock=clock)
    limits.acquire("a", rpm=5)
    limits.acquire("a", rpm=5)
    unlimited = RateLimits(clock=clock)
    for _ in range(1000):
        unlimited.acquire("x")
    unlimited.spend_tokens("x", 10**9)
    unlimited.acquire("x")
