"""A bounded rolling time series: sums per fixed bucket over a window (e.g. 10 s x 360 = 1 h).

Fed by counters as they count (entry/api/metrics.py) or by sampling (node/console.py); read by
the consoles' charts. Memory is fixed by the window, whatever the traffic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class RollingSeries:
    def __init__(self, bucket_s: float = 10.0, buckets: int = 360, clock: Callable[[], float] = time.time):
        if bucket_s <= 0 or buckets < 1:
            raise ValueError("bucket_s must be > 0 and buckets >= 1")
        self.bucket_s, self.size, self.clock = bucket_s, buckets, clock
        self._data: deque[tuple[int, float]] = deque(maxlen=buckets)  # (bucket index, sum), oldest first

    def _index(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def add(self, amount: float, t: float | None = None) -> None:
        i = self._index(self.clock() if t is None else t)
        if self._data and self._data[-1][0] == i:
            self._data[-1] = (i, self._data[-1][1] + amount)
        elif not self._data or self._data[-1][0] < i:
            self._data.append((i, amount))
        # A late sample for an older bucket (a clock step back) is dropped: the series only
        # appends, so its memory stays bounded and its order stays right.

    def points(self, now: float | None = None) -> list[tuple[float, float]]:
        """(bucket start, unix s; sum) for every bucket of the window up to now, zeros included,
        oldest first, so a chart's x axis is the whole window."""
        last = self._index(self.clock() if now is None else now)
        first = last - self.size + 1
        sums = {i: v for i, v in self._data if i >= first}
        return [(i * self.bucket_s, sums.get(i, 0.0)) for i in range(first, last + 1)]

    def total(self, now: float | None = None) -> float:
        return sum(v for _, v in self.points(now))
