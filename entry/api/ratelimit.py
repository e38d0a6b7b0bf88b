"""Token buckets for requests/minute and completion tokens/minute.

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
    def __init__(self, message: str, retry_after: float):
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

    def acquire(self, subject: str, *, rpm: int | None = None, tpm: int | None = None) -> None:
        """Take one request from `subject`'s allowance or raise RateLimited. `rpm`/`tpm`
        override the defaults (a key's own limits). Tokens are only checked here (the
        allowance must not be in debt) and charged afterwards with `spend_tokens`, since a
        generation's length is known only when it ends."""
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        if tpm is not None:
            tb = self._bucket(self._tokens, subject, float(tpm))
            if tb.level <= 0:
                wait = (1 - tb.level) * 60.0 / max(tpm, 1e-9)
                raise RateLimited(f"token limit of {tpm} completion tokens per minute reached", _ceil(wait))
        if rpm is not None:
            rb = self._bucket(self._requests, subject, float(rpm))
            if rb.level < 1:
                wait = (1 - rb.level) * 60.0 / max(rpm, 1e-9)
                raise RateLimited(f"request limit of {rpm} requests per minute reached", _ceil(wait))
            rb.level -= 1

    def spend_tokens(self, subject: str, n: int, *, tpm: int | None = None) -> None:
        tpm = self.tpm if tpm is None else tpm
        if tpm is None or n <= 0:
            return
        # Debt is allowed: one long generation may overshoot, then the key waits it out.
        self._bucket(self._tokens, subject, float(tpm)).level -= n


def _ceil(seconds: float) -> float:
    # Retry-After is whole seconds; rounding down would invite a retry that fails again.
    return float(max(1, math.ceil(seconds)))
