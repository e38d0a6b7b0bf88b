"""The entry API's parts on their own: the key store and its CLI, rate limits, metrics."""

from __future__ import annotations

import argparse
import math
import os
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from entry.apikeys import ApiKeyError, ApiKeyStore
from entry.keys_cli import add_keys_parser
from entry.metrics import Metrics
from entry.ratelimit import RateLimited, RateLimits
from mesh_cli.main import CliError

# --- key store ---------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_verified(tmp_path):
    path = tmp_path / "sub" / "keys.db"
    with ApiKeyStore(path) as store:
        info, key = store.create("ops laptop", rpm=60, tpm=1000)
        assert key.startswith("mesh-") and len(key) > 40
        assert info.hint == key[:9] and (info.rpm, info.tpm) == (60, 1000)
        assert store.verify(key) == info
        assert store.verify(key + "x") is None
        assert store.verify("") is None
        assert store.verify("x" * 10_000) is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("sub/keys.db*"))
    assert key.encode() not in raw and key[9:].encode() not in raw


def test_keys_list_and_revoke_are_seen_by_another_connection(tmp_path):
    path = tmp_path / "keys.db"
    running = ApiKeyStore(path)  # as the entry holds it
    with ApiKeyStore(path) as cli:  # as `mesh entry keys` opens it
        a, key_a = cli.create("a")
        b, _ = cli.create("b")
        assert running.verify(key_a) is not None
        cli.revoke(a.id)
        assert cli.revoke(a.id).revoked is not None  # revoking twice is harmless
        with pytest.raises(ApiKeyError, match="no key with id 99"):
            cli.revoke(99)
        listed = cli.list()
    assert [k.name for k in listed] == ["a", "b"]
    assert not listed[0].active and listed[1].active
    assert running.verify(key_a) is None
    assert [k.id for k in running.list(include_revoked=False)] == [b.id]
    running.close()


@pytest.mark.parametrize(("name", "kw"), [("", {}), ("x" * 101, {}), ("ok", {"rpm": 0}), ("ok", {"tpm": -5})])
def test_key_create_rejects_bad_input(tmp_path, name, kw):
    with ApiKeyStore(tmp_path / "k.db") as store, pytest.raises(ApiKeyError):
        store.create(name, **kw)


# --- CLI -------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mesh entry")
    add_keys_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_keys_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "keys.db")
    assert run_cli(["keys", "create", "--name", "alice", "--rpm", "30", "--db", db]) == 0
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    assert key.startswith("mesh-")
    assert "created key 1 (alice)" in out and "requests/min: 30" in out

    assert run_cli(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and key not in listing

    assert run_cli(["keys", "revoke", "1", "--db", db]) == 0
    assert "revoked key 1" in capsys.readouterr().out
    assert run_cli(["keys", "list", "--json", "--db", db]) == 0
    assert '"revoked": null' not in capsys.readouterr().out

    with pytest.raises(CliError, match="no key with id 7"):
        run_cli(["keys", "revoke", "7", "--db", db])
    with pytest.raises(SystemExit):
        run_cli(["keys", "create", "--name", "x", "--rpm", "0", "--db", db])
    with pytest.raises(CliError, match="no key database at"):
        run_cli(["keys", "list", "--db", str(tmp_path / "typo.db")])
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(CliError, match="cannot open key database"):
        run_cli(["keys", "create", "--name", "x", "--db", str(tmp_path)])  # a directory


def test_keys_cli_default_path_follows_mesh_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    assert run_cli(["keys", "create", "--name", "bob"]) == 0
    assert (tmp_path / "entry" / "keys.db").exists()


# --- rate limits -----------------------------------------------------------------------------------


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


# --- metrics ---------------------------------------------------------------------------------------


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
