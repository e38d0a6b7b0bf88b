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


def test_tokens_are_reserved_up_front_and_the_rest_refunded():
    clock = Clock()
    limits = RateLimits(tpm=100, clock=clock)
    a = limits.acquire("k", tokens=40)
    b = limits.acquire("k", tokens=40)
    # Before reservations both checks passed on a full bucket and any number more would too.
    with pytest.raises(RateLimited) as e:
        limits.acquire("k", tokens=40)
    assert e.value.retry_after == 12  # 20 left, 40 needed: 20 tokens at 100/min
    a.settle(10)
    a.settle(10)  # only the first settle counts
    c = limits.acquire("k", tokens=40)  # 20 + 30 refunded
    b.settle(40)
    c.settle(70)  # a prompt longer than estimated: charged in full, into debt
    with pytest.raises(RateLimited):
        limits.acquire("k", tokens=1)
    clock.now += 72  # 20 in debt, then 120 refilled: full again
    limits.acquire("k", tokens=100)


def test_a_request_larger_than_the_limit_is_refused_without_retry_after():
    limits = RateLimits(tpm=100, clock=Clock())
    with pytest.raises(RateLimited) as e:
        limits.acquire("k", tokens=101)
    assert e.value.retry_after is None and "lower max_tokens" in str(e.value)
    limits.acquire("k", tokens=100)  # nothing was taken by the refusal


def test_a_refused_request_takes_nothing():
    limits = RateLimits(rpm=1, tpm=100, clock=Clock())
    with pytest.raises(RateLimited):
        limits.acquire("k", tokens=500)
    r = limits.acquire("k", tokens=50)  # the request allowance is still there
    with pytest.raises(RateLimited):
        limits.acquire("k", tokens=10)  # rpm now, not tokens
    r.settle(0)
    # Refunds never fill a bucket past its capacity.
    clock = Clock()
    tokens_only = RateLimits(tpm=100, clock=clock)
    long_one = tokens_only.acquire("z", tokens=100)
    clock.now += 60  # refilled while the request ran
    long_one.settle(0)
    tokens_only.acquire("z", tokens=100)
    with pytest.raises(RateLimited):
        tokens_only.acquire("z", tokens=1)
