"""Signed credit-statement queries: a window of about a minute, each query accepted once."""

from __future__ import annotations

import pytest

from protocol.credit_query import (
    ACCEPTED,
    FULL,
    INVALID,
    MAX_AGE,
    MAX_AHEAD,
    REPLAYED,
    ReplayGuard,
    check_query,
    sign_query,
)
from protocol.identity import Identity

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def node() -> Identity:
    return Identity.generate()


@pytest.mark.parametrize(("offset", "ok"), [
    (0, True), (-MAX_AGE, True), (-MAX_AGE - 1, False), (MAX_AHEAD, True), (MAX_AHEAD + 1, False),
    (299, False),  # accepted before: the window was +-300 s, about ten minutes of replay
    (-299, False),
])
def test_only_a_short_window_is_accepted(node, offset, ok):
    assert check_query(node.peer_id, sign_query(node, now=NOW + offset), now=NOW) is ok


def test_each_query_is_accepted_once(node):
    guard = ReplayGuard()
    header = sign_query(node, now=NOW)
    ts, _, sig = header.partition(".")
    assert guard.accept(node.peer_id, header, now=NOW) == ACCEPTED
    assert guard.accept(node.peer_id, header, now=NOW + 30) == REPLAYED
    # Other spellings of the same signed query are the same query.
    assert guard.accept(node.peer_id, f"{ts}.{sig.upper()}", now=NOW + 1) == REPLAYED
    assert guard.accept(node.peer_id, f"0{ts}.{sig}", now=NOW + 1) == REPLAYED
    # Once too old to be accepted anyway, it is forgotten (and still refused).
    assert guard.accept(node.peer_id, header, now=NOW + MAX_AGE + 1) == INVALID
    assert guard.accept(node.peer_id, sign_query(node, now=NOW + MAX_AGE + 1), now=NOW + MAX_AGE + 1) == ACCEPTED
    assert len(guard._seen) == 1
    other = Identity.generate()
    assert guard.accept(node.peer_id, sign_query(other, now=NOW + 62), now=NOW + 62) == INVALID
    assert guard.accept(other.peer_id, sign_query(other, now=NOW + 62), now=NOW + 62) == ACCEPTED


def test_guard_memory_is_bounded_and_refuses_rather_than_forgets(node):
    guard = ReplayGuard(capacity=3)
    for i in range(3):
        assert guard.accept(node.peer_id, sign_query(node, now=NOW + i), now=NOW + 3) == ACCEPTED
    assert guard.full
    assert guard.accept(node.peer_id, sign_query(node, now=NOW + 3), now=NOW + 3) == FULL
    assert guard.accept(node.peer_id, sign_query(node, now=NOW), now=NOW + 3) == REPLAYED
    # The oldest expire first and make room.
    later = NOW + MAX_AGE + 0.5
    assert guard.accept(node.peer_id, sign_query(node, now=later), now=later) == ACCEPTED


@pytest.mark.parametrize("header", [None, "", "12", "x.00", "١٢٣.00", "+12.00", " 12.00", "1_2.00", "12." + "0" * 300])
def test_malformed_headers_are_refused(node, header):
    assert ReplayGuard().accept(node.peer_id, header, now=NOW) == INVALID
