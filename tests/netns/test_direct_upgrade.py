"""Direct connection upgrade (transport/dcutr.py) of relayed connections, between bare peers
(tests/netns/relay_peer.py) in the NAT lab: hole punching between two port-preserving NATs,
connection reversal to a public peer, and a symmetric NAT where it can't work and nothing breaks.

The lab's routers (tests/support/netns.py) map endpoint-independently and filter by conntrack,
as typical home routers do; test_lab.py checks that a raw TCP simultaneous open gets through
them and not through a symmetric one."""

from __future__ import annotations

from tests.netns.mesh_lab import read_json_line, relay_peer, start_entry

GRACE_S = 3.0  # the relayed connection's grace period after an upgrade, in these tests
WAIT_S = 40.0  # how long the dialer waits for a direct connection (3 attempts take ~25 s)


def _listener(lab, tmp_path, ns: str, entry, *extra: str):
    p = relay_peer(lab, ns, "--bootstrap", entry.p2p, "--grace", str(GRACE_S), *extra, "listen", log_dir=tmp_path)
    info = read_json_line(p, "the listener's relayed address")
    assert info["addr"] and info["addr"].endswith("/p2p-circuit"), info
    return p, info


def _dial(lab, tmp_path, ns: str, entry, info, *extra: str) -> dict:
    p = relay_peer(lab, ns, "--bootstrap", entry.p2p, *extra, "--wait-direct", str(WAIT_S), "dial",
                   f"{info['peer_id']}={info['addr']}", log_dir=tmp_path)
    result = read_json_line(p, "the dialer's result", timeout=2 * WAIT_S + 60)
    assert result["ok"], result
    return result


def test_two_natted_peers_punch_a_direct_connection(lab, tmp_path):
    """Both behind port-preserving NATs, the listener with a relay slot at the entry: after a
    relayed stream they hole-punch a direct connection (its far end is the other router's WAN
    address, not the relay), new streams take it, and the circuit is closed after the grace."""
    h1, h2 = lab.add_home(), lab.add_home()
    e1 = start_entry(lab, tmp_path, "e1", lab.pub_ip, 4001)
    listener, info = _listener(lab, tmp_path, h1.ns, e1)
    result = _dial(lab, tmp_path, h2.ns, e1, info)
    assert result["kind_first"] == "relayed", result
    assert result["kind"] == "direct" and result["remote"].startswith(f"{h1.wan_ip}:"), result
    assert result["carrier"] == "direct" and result["relayed_closed"] is True, result
    outcome = read_json_line(listener, "the listener's upgrade outcome")["upgrade"]
    assert outcome["result"] == "direct" and outcome["via"] == "hole-punch" and outcome["attempts"] <= 3, outcome
    assert outcome["remote"].startswith(f"{h2.wan_ip}:"), outcome
    print(f"direct after {result['direct_after_s']}s, {outcome['attempts']} attempt(s); round trip "
          f"{result['rtt_ms']} ms relayed (first, with setup) -> {result['rtt_ms_after']} ms direct")


def test_natted_peer_reverses_a_relayed_connection_to_a_public_peer(lab, tmp_path):
    """A public peer reaches a NAT'd one through the relay; the NAT'd side dials it back
    directly (connection reversal) and the connection ends up direct."""
    home = lab.add_home()
    e1 = start_entry(lab, tmp_path, "e1", lab.pub_ip, 4001)
    listener, info = _listener(lab, tmp_path, home.ns, e1)
    public_ns, public_ip = lab.add_public_host(1)
    result = _dial(lab, tmp_path, public_ns, e1, info, "--listen-host", public_ip)
    assert result["kind"] == "direct" and result["remote"].startswith(f"{home.wan_ip}:"), result
    assert result["carrier"] == "direct" and result["relayed_closed"] is True, result
    outcome = read_json_line(listener, "the listener's upgrade outcome")["upgrade"]
    assert outcome["result"] == "direct" and outcome["via"] == "reversal" and outcome["attempts"] == 0, outcome
    assert outcome["remote"].startswith(f"{public_ip}:"), outcome


def test_symmetric_nat_stays_relayed_after_bounded_attempts(lab, tmp_path):
    """Behind a symmetric NAT (a random port per destination) no hole punch can work: the
    listener tries 3 times, reports it once, and the relayed connection keeps carrying streams."""
    h1, h2 = lab.add_home(symmetric=True), lab.add_home()
    e1 = start_entry(lab, tmp_path, "e1", lab.pub_ip, 4001)
    listener, info = _listener(lab, tmp_path, h1.ns, e1)
    result = _dial(lab, tmp_path, h2.ns, e1, info)
    assert result["kind"] == "relayed" and result["remote"] is None and result["carrier"] == "relayed", result
    assert result["rtt_ms_after"] > 0, result  # streams still work, through the relay
    outcome = read_json_line(listener, "the listener's upgrade outcome")["upgrade"]
    assert outcome == {"peer": outcome["peer"], "result": "relayed", "via": None, "attempts": 3}, outcome
    # Once: no second outcome (a retry loop would print one per round).
    import queue
    try:
        extra = listener.lines.get(timeout=3)
    except queue.Empty:
        extra = None
    assert extra is None, extra
    print(f"stayed relayed after 3 attempts; round trip {result['rtt_ms_after']} ms through the relay")
