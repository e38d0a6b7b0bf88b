"""The NAT lab itself behaves like a home router: outbound works and is masqueraded, unsolicited
inbound is dropped, a reset kills established connections, a symmetric NAT randomizes ports."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.support.netns import ns_exec

# A one-shot TCP server: prints the peer address of each connection and echoes one line.
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(20)
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    c, a = s.accept(); print(f"{a[0]}:{a[1]}", flush=True)
    c.sendall(c.recv(100)); c.close()
"""
# Connect, send, read the echo; prints ok or the error.
CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.sendall(b"hi"); print("ok" if c.recv(10) == b"hi" else "bad")
except OSError as e:
    print(type(e).__name__)
"""


def _server(ns: str, ip: str, port: int, n: int) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, ip, str(port), str(n)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


def _client(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    return ns_exec(ns, sys.executable, "-c", CLIENT, ip, str(port), str(timeout), timeout=timeout + 10).stdout.strip()


def test_outbound_masqueraded_inbound_dropped(lab):
    home = lab.add_home()
    srv = _server(lab.pub, lab.pub_ip, 4001, 1)
    try:
        assert _client(home.ns, lab.pub_ip, 4001) == "ok"
        assert srv.stdout.readline().strip().startswith(home.wan_ip + ":")  # masqueraded
    finally:
        srv.kill()
        srv.wait(5)
    srv = _server(home.ns, "0.0.0.0", 4002, 1)
    try:
        t0 = time.monotonic()
        assert _client(lab.pub, home.wan_ip, 4002, timeout=1.0) == "TimeoutError"  # dropped, not refused
        assert time.monotonic() - t0 >= 0.9
        assert _client(lab.pub, home.ip, 4002, timeout=1.0) != "ok"  # the home subnet is not routed
    finally:
        srv.kill()
        srv.wait(5)


def test_symmetric_nat_randomizes_ports(lab):
    plain, sym = lab.add_home(), lab.add_home(symmetric=True)
    srv = _server(lab.pub, lab.pub_ip, 4003, 8)
    try:
        ports: dict[str, set[str]] = {"plain": set(), "sym": set()}
        for name, home in (("plain", plain), ("sym", sym)):
            for _ in range(4):
                # The same source port each time: a port-preserving NAT keeps it.
                out = ns_exec(home.ns, sys.executable, "-c",
                              "import socket; c=socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                              f"c.bind(('0.0.0.0', 40500)); c.connect(('{lab.pub_ip}', 4003)); c.sendall(b'x');"
                              "c.recv(5); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00'); c.close()")
                assert out.returncode == 0, out.stderr
                ports[name].add(srv.stdout.readline().strip().split(":")[1])
        assert ports["plain"] == {"40500"}
        assert len(ports["sym"]) > 1 or ports["sym"] != {"40500"}
    finally:
        srv.kill()
        srv.wait(5)


# TCP simultaneous open: bind a fixed port, connect to the other home's router at that port,
# retrying for a few seconds (the first SYN usually dies at the other router, which has no
# mapping yet); prints ok and the peer, or the last error.
PUNCH = r"""
import socket, sys, time
port, dst = int(sys.argv[1]), sys.argv[2]
deadline, last = time.monotonic() + 8, "none"
while time.monotonic() < deadline:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", port)); c.settimeout(2)
    try:
        c.connect((dst, port)); c.sendall(b"hi"); assert c.recv(2) == b"hi"
        print("ok", c.getpeername()[0], flush=True); sys.exit(0)
    except OSError as e:
        last = type(e).__name__; c.close(); time.sleep(0.2)
print(last, flush=True)
"""


def _punch(a, b, port: int = 4600) -> tuple[str, str]:
    pa = subprocess.Popen(["ip", "netns", "exec", a.ns, sys.executable, "-c", PUNCH, str(port), b.wan_ip],
                          stdout=subprocess.PIPE, text=True)
    pb = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, "-c", PUNCH, str(port), a.wan_ip],
                          stdout=subprocess.PIPE, text=True)
    try:
        return pa.communicate(timeout=20)[0].strip(), pb.communicate(timeout=20)[0].strip()
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_tcp_simultaneous_open_through_two_nats_but_not_a_symmetric_one(lab):
    """What hole punching (transport/dcutr.py) relies on: the routers map a home's port to the
    same WAN port for every destination and let in packets of a connection the home started,
    so two homes dialling each other's WAN address at once meet in one TCP connection. A
    symmetric NAT maps each destination to a random port, which the other side can't know."""
    h1, h2, sym = lab.add_home(), lab.add_home(), lab.add_home(symmetric=True)
    assert _punch(h1, h2) == (f"ok {h2.wan_ip}", f"ok {h1.wan_ip}")
    assert _punch(h1, sym, 4601) == ("TimeoutError", "TimeoutError")


def test_cut_and_restore_uplink(lab):
    home = lab.add_home()
    srv = _server(lab.pub, lab.pub_ip, 4004, 1)
    try:
        home.cut_uplink()
        assert _client(home.ns, lab.pub_ip, 4004, timeout=1.0) == "TimeoutError"
        home.restore_uplink()
        assert _client(home.ns, lab.pub_ip, 4004) == "ok"
    finally:
        srv.kill()
        srv.wait(5)


def test_namespaces_removed_on_close(lab):
    lab.add_home()
    names = list(lab._namespaces)
    lab.close()
    listed = ns_list()
    assert not [n for n in names if n in listed]


def ns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_unavailable_namespaces_skip_loudly(monkeypatch):
    """Where namespaces can't be made the tests skip with the reason AND a warning, which
    pytest's summary shows even without -rs."""
    import pytest

    from tests.support import netns

    monkeypatch.setattr(netns, "unavailable_reason", lambda: "no namespaces in this sandbox")
    with pytest.warns(UserWarning, match="SKIPPED: no namespaces in this sandbox"), \
            pytest.raises(pytest.skip.Exception, match="no namespaces in this sandbox"):
        netns.lab_or_skip()
