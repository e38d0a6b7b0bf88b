"""The Prometheus text rendering of /metrics."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from entry.api.metrics import Metrics


def test_metrics_render_parses_and_escapes():
    m = Metrics()
    c = m.counter("demo_requests_total", "Requests\nby path", ("path",))
    c.inc(path='we"ird\\path\n')
    c.inc(2, path="/x")
    assert m.counter("demo_requests_total", "again", ("path",)) is c
    g = m.gauge("demo_level", "A level")
    g.set(1.5)
    h = m.histogram("demo_seconds", "Durations", ("kind",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v, kind="a")
    text = m.render({'ext_nodes{model="a\\"b"}': 3, "ext_plain": 1, "bad name!": 2, "demo_level": 9,
                     "ext_nan": math.nan, 'ext_lbl{x="1"': 1})
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("demo_requests_total", (("path", 'we"ird\\path\n'),))] == 1
    assert samples[("demo_requests_total", (("path", "/x"),))] == 2
    assert samples[("demo_level", ())] == 1.5  # a backend key cannot override a registered metric
    assert samples[("demo_seconds_bucket", (("kind", "a"), ("le", "0.1")))] == 1
    assert samples[("demo_seconds_bucket", (("kind", "a"), ("le", "1.0")))] == 2
    assert samples[("demo_seconds_bucket", (("kind", "a"), ("le", "+Inf")))] == 3
    assert samples[("demo_seconds_count", (("kind", "a"),))] == 3
    assert samples[("demo_seconds_sum", (("kind", "a"),))] == pytest.approx(5.55)
    assert samples[("ext_nodes", (("model", 'a"b'),))] == 3
    assert samples[("ext_plain", ())] == 1
    assert math.isnan(samples[("ext_nan", ())])
    assert "bad name" not in text and "ext_lbl" not in text
    assert fams["demo_seconds"].type == "histogram" and fams["ext_nodes"].type == "gauge"


def test_metrics_reject_misuse():
    m = Metrics()
    c = m.counter("x_total", "x", ("a",))
    with pytest.raises(ValueError):
        c.inc(-1, a="1")
    with pytest.raises(ValueError):
        c.inc(b="1")
    with pytest.raises(ValueError):
        m.gauge("x_total", "clash")
    with pytest.raises(ValueError):
        m.counter("bad-name", "x")
