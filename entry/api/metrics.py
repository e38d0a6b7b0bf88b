"""A tiny Prometheus text-exposition registry: counters, gauges, fixed-bucket histograms.

Our own rather than prometheus_client because the entry needs a few dozen series, one process
and one event loop: no locks, no multiprocess mode, no global default registry that tests
would share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

from web.series import RollingSeries

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# A whole sample key as backends hand them over: name{label="value",...}
_SAMPLE_KEY = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:\s*[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"\s*,?)*\})?$')

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _labels_text(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        for n in self.labelnames:
            if not _LABEL.match(n) or n == "le":
                raise ValueError(f"bad label name {n!r}")

    def _key(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]


LabelFilter = Callable[[Mapping[str, str]], bool]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self.tracks: list[tuple[LabelFilter | None, RollingSeries]] = []  # Metrics.track

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount
        for where, series in self.tracks:
            if amount and (where is None or where(labels)):
                series.add(amount)

    def samples(self) -> list[tuple[dict[str, str], float]]:
        """Every label set with its value, for pages that show the counts."""
        return [(dict(zip(self.labelnames, k)), v) for k, v in sorted(self._values.items())]

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        values = self._values or ({(): 0.0} if not self.labelnames else {})  # an unlabelled counter starts at 0
        return self.header() + [f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}" for k, v in sorted(values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[dict[str, str], float]]:
        return [(dict(zip(self.labelnames, k)), v) for k, v in sorted(self._values.items())]

    def clear(self) -> None:
        self._values.clear()

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}" for k, v in sorted(self._values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label set: [count per bucket (non-cumulative, last = +Inf)], sum, count
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        counts[i] += 1
        total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for b, c in zip(self.buckets + (math.inf,), counts):
                cumulative += c
                le = f'le="{float(b)!r}"' if not math.isinf(b) else 'le="+Inf"'  # 1.0, as Prometheus clients write it
                lines.append(f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels_text(self.labelnames, key)} {format_value(total[0])}")
            lines.append(f"{self.name}_count{_labels_text(self.labelnames, key)} {cumulative}")
        return lines


class Metrics:
    """A registry. `counter`/`gauge`/`histogram` return the existing metric of that name, so
    two parts of the entry can share one without passing objects around."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._tracks: dict[str, list[tuple[LabelFilter | None, RollingSeries]]] = {}

    def _get(self, cls, name: str, *args, **kwargs):
        existing = self._metrics.get(name)
        if existing is not None:
            if not isinstance(existing, cls):
                raise ValueError(f"{name} is already registered as a {existing.kind}")
            return existing
        metric = cls(name, *args, **kwargs)
        if isinstance(metric, Counter):
            metric.tracks = self._tracks.setdefault(name, [])
        self._metrics[name] = metric
        return metric

    def names(self) -> list[str]:
        return sorted(self._metrics)

    def get(self, name: str) -> _Metric | None:
        """The metric registered under `name`, if any part of the entry registered it."""
        return self._metrics.get(name)

    def track(self, counter: str, where: LabelFilter | None = None, *, bucket_s: float = 10.0,
              buckets: int = 360) -> RollingSeries:
        """A rolling series of what the counter named `counter` counts from now on (only label
        sets `where` accepts), whether it is registered yet or later: the console charts the
        last hour without a sampling task. Bounded: `buckets` sums of `bucket_s` seconds."""
        series = RollingSeries(bucket_s, buckets)
        self._tracks.setdefault(counter, []).append((where, series))
        return series

    def counter(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._get(Counter, name, help_text, labelnames)

    def gauge(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._get(Gauge, name, help_text, labelnames)

    def histogram(self, name: str, help_text: str, labelnames: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help_text, labelnames, buckets)

    def render(self, extra_gauges: Mapping[str, float] | None = None) -> str:
        """The exposition text. `extra_gauges` are samples computed elsewhere (the mesh
        backend's view), keyed `name{label="v"}`; keys that are not valid sample syntax or
        that clash with a registered metric are dropped so one bad key cannot make the whole
        page unparseable for the scraper."""
        lines: list[str] = []
        for name in sorted(self._metrics):
            lines.extend(self._metrics[name].render())
        grouped: dict[str, list[str]] = {}
        for key, value in (extra_gauges or {}).items():
            m = _SAMPLE_KEY.match(key.strip()) if isinstance(key, str) else None
            if m is None or m.group(1) in self._metrics or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            grouped.setdefault(m.group(1), []).append(f"{key.strip()} {format_value(float(value))}")
        for name in sorted(grouped):
            lines.append(f"# TYPE {name} gauge")
            lines.extend(sorted(grouped[name]))
        return "\n".join(lines) + "\n"
