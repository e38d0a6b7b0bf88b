from protocol.identity import Identity
from transport.addrs import is_private, private_mesh, public_only

PEER = Identity.generate().peer_id


def test_private_addresses():
    for a in ("/ip4/0.0.0.0/tcp/1", "/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.2/tcp/1", "/ip4/10.1.2.3/tcp/1",
              "/ip4/172.20.0.1/tcp/1", "/ip4/100.64.1.1/tcp/1", "/ip4/169.254.1.1/tcp/1", "/ip6/::1/tcp/1",
              "/ip6/fd00::1/tcp/1", "/ip6/::/tcp/1"):
        assert is_private(a), a
    for a in ("/ip4/198.51.100.1/tcp/1", "/ip4/8.8.8.8/tcp/1", "/ip6/2001:db8::1/tcp/1", "/dns4/example.org/tcp/1",
              f"/ip4/198.51.100.1/tcp/1/p2p/{PEER}/p2p-circuit"):
        assert not is_private(a), a
    assert public_only(["/ip4/0.0.0.0/tcp/1", "/ip4/198.51.100.1/tcp/2"]) == ["/ip4/198.51.100.1/tcp/2"]


def test_private_mesh_decided_by_listen_host_and_bootstrap_peers():
    assert private_mesh("127.0.0.1", [])
    assert private_mesh("127.0.0.1", [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"])
    assert not private_mesh("0.0.0.0", [f"/ip4/198.51.100.1/tcp/4001/p2p/{PEER}"])
    assert not private_mesh("198.51.100.1", [])


def test_dial_back_candidates_only_at_the_requesters_own_address():
    from transport.reachability import MAX_CANDIDATES, candidates

    got = candidates("198.51.100.11", [4001, 70000, "x"], [
        f"/ip4/198.51.100.11/tcp/4001/p2p/{PEER}",  # ours: kept (as a transport address)
        "/ip4/198.51.100.99/tcp/22",  # someone else's host: never dialled for us
        "/ip4/192.168.1.2/tcp/4001",  # private
        f"/ip4/198.51.100.1/tcp/1/p2p/{PEER}/p2p-circuit",  # relayed
    ])
    assert got == ["/ip4/198.51.100.11/tcp/4001"]
    assert len(candidates("198.51.100.11", list(range(1000, 1010)), [])) == MAX_CANDIDATES
    assert candidates("10.0.0.1", [4001], []) == []  # seen from a private address: nothing public to check
