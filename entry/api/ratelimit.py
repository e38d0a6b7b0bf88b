"""Token buckets for requests/minute and tokens/minute (prompt + completion, as OpenAI counts).

Buckets live in memory only and are keyed by API key id, or by one shared subject in open
mode: never by client address, so nothing here can link requests to a person, and a restart
forgets everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

OPEN_SUBJECT = "open"  # the single shared bucket when the entry runs without keys


class RateLimited(Exception):
    """retry_after None: waiting does not help (the request alone is over the limit)."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float, per_minute: float) -> None:
        # A limit changed (key edited) takes effect on the next request.
        self.capacity = per_minute
        self.level = min(self.capacity, self.level + (now - self.stamp) * per_minute / 60.0)
        self.stamp = now


@dataclass
class RateLimits:
    """Default limits (None = unlimited) for keys that set none of their own, and for the
    shared open-mode bucket. A full minute's allowance may be spent in a burst."""

    rpm: int | None = None
    tpm: int | None = None
    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, _Bucket] = field(default_factory=dict, repr=False)
    _tokens: dict[str, _Bucket] = field(default_factory=dict, repr=False)

    def _bucket(self, table: dict[str, _Bucket], subject: str, per_minute: float) -> _Bucket:
        now = self.clock()
        b = table.get(subject)
        if b is None:
            b = table[subject] = _Bucket(per_minute, per_minute, now)
        else:
            b.refill(now, per_minute)
        return b

    def acquire(self, subject: str, *, rpm: int | None = None, tpm: int | None = None, tokens: int = 0) -> Reservation:
        """Take one request and reserve `tokens` (the most the request can use: prompt
        estimate + max_tokens per choice) from `subject`'s allowance, or raise RateLimited
        and take nothing. `rpm`/`tpm` override the defaults (a key's own limits). Reserving
        before generating is what bounds parallel requests and n > 1: checking the allowance
        and charging only afterwards let 8 parallel requests through on one minute's tokens.
        Settle the reservation with what the request used once it ends, however it ends."""
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        tb = rb = None
        if tpm is not None:
            if tokens > tpm:
                raise RateLimited(f"this request may use up to {tokens} tokens (prompt estimate + max_tokens per choice), "
                                  f"more than the limit of {tpm} tokens per minute: lower max_tokens or n", None)
            tb = self._bucket(self._tokens, subject, float(tpm))
            # Without a reservation the allowance must at least not be in debt.
            need = max(float(tokens), 1.0)
            if tb.level < need:
                wait = (need - tb.level) * 60.0 / max(tpm, 1e-9)
                raise RateLimited(f"token limit of {tpm} tokens per minute reached", _ceil(wait))
        if rpm is not None:
            rb = self._bucket(self._requests, subject, float(rpm))
            if rb.level < 1:
                wait = (1 - rb.level) * 60.0 / max(rpm, 1e-9)
                raise RateLimited(f"request limit of {rpm} requests per minute reached", _ceil(wait))
        if rb is not None:
            rb.level -= 1
        if tb is None:
            return Reservation(self, subject, None, 0)
        tb.level -= tokens
        return Reservation(self, subject, tpm, tokens)

    def spend_tokens(self, subject: str, n: int, *, tpm: int | None = None) -> None:
        """Charge n tokens (n < 0 refunds, up to a full bucket)."""
        tpm = self.tpm if tpm is None else tpm
        if tpm is None or n == 0:
            return
        b = self._bucket(self._tokens, subject, float(tpm))
        # Debt is allowed: a prompt longer than estimated may overshoot, then the key waits it out.
        b.level = min(b.capacity, b.level - n)


@dataclass
class Reservation:
    """Tokens taken from a subject's allowance for one request, until `settle`."""

    limits: RateLimits
    subject: str
    tpm: int | None
    tokens: int
    settled: bool = False

    def settle(self, used: int) -> None:
        """The request ended having used `used` tokens: refund the rest of the reservation
        (or charge the excess). Only the first call counts."""
        if self.settled:
            return
        self.settled = True
        if self.tpm is not None:
            self.limits.spend_tokens(self.subject, used - self.tokens, tpm=self.tpm)


def _ceil(seconds: float) -> float:
    # Retry-After is whole seconds; rounding down would invite a retry that fails again.
    return float(max(1, math.ceil(seconds)))
