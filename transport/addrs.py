"""Which addresses a peer can dial, and which a host may advertise.

A volunteer behind a home router listens on 0.0.0.0 or 192.168.x.y: addresses nobody outside
its home can dial. Advertised to the public mesh they cost every dialler a timeout (an entry's
discovery round, a DHT lookup), and a private address could even reach the wrong host on the
dialler's own LAN. So in a public mesh a host neither advertises nor dials such addresses;
peers that have none are reached over the connection they opened themselves.

"Private" here: unspecified, loopback, link-local, RFC 1918, carrier-grade NAT (100.64/10),
IPv6 unique-local. Documentation ranges (198.51.100.0/24 etc.) are public here, so the NAT
test lab (tests/support/netns.py) can stand for the Internet without real addresses.

A mesh that runs entirely on loopback or a LAN (tests, `mesh demo`, a home cluster) is a
"private mesh": there, private addresses are the only ones, and are used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from multiaddr import Multiaddr

_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10",
))


def addr_ip(addr: str | Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of an /ip4 or /ip6 multiaddr; None for DNS names, relays or garbage."""
    try:
        ma = addr if isinstance(addr, Multiaddr) else Multiaddr(addr)
        for proto in ("ip4", "ip6"):
            try:
                value = ma.value_for_protocol(proto)
            except Exception:
                value = None
            if value:
                return ipaddress.ip_address(value)
    except Exception:
        return None
    return None


def is_relayed(addr: str | Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


def is_private(addr: str | Multiaddr) -> bool:
    """An address nobody outside this host's LAN can dial (relayed addresses are not: they
    name the relay's address)."""
    if is_relayed(addr):
        return False
    ip = addr_ip(addr)
    if ip is None:
        return False
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


def is_host_private(host: str) -> bool:
    """For a bare listen host ("0.0.0.0", "127.0.0.1", "198.51.100.1")."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


def public_only(addrs: Iterable[str]) -> list[str]:
    return [a for a in addrs if not is_private(a)]


def private_mesh(listen_host: str, peers: Iterable[str]) -> bool:
    """Is this a mesh on loopback/LAN only? Yes when we listen on a private address and every
    peer we were told of (bootstrap addresses) is private too. A public bootstrap peer means a
    public mesh: our private addresses are useless to it."""
    if not is_host_private(listen_host):
        return False
    return all(is_private(p) for p in peers)
