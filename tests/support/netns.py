"""Home-NAT test networks built from Linux network namespaces (iproute2 + nftables + conntrack).

    lab = NatLab.create()            # a "public" namespace: a bridge on 198.51.100.0/24
    home = lab.add_home()            # a router namespace + a home namespace behind it
    lab.spawn(lab.pub, tmp, "e1", ...)   # processes inside a namespace, ended by pid
    home.router_reset()              # conntrack flushed: every NAT mapping forgotten
    home.cut_uplink() / home.restore_uplink()
    lab.close()                      # processes ended, namespaces (and their veths) removed

The public net uses 198.51.100.0/24 (TEST-NET-2, documentation addresses: not private in the
mesh's sense, see transport/addrs.py), each home 192.168.1.0/24 behind its own router. A
router masquerades its home subnet on its WAN port and drops every unsolicited inbound packet
(a new connection from the WAN, or one conntrack can't place), as a home router does.
nf_conntrack_tcp_loose=0 in the router: after a flush, mid-stream packets of old connections
are not adopted (a rebooted router forgets them), so those connections are dead both ways.
A symmetric NAT maps every new connection to a random source port (`masquerade random`).
Otherwise masquerade keeps a home's source port when it is free, whatever the destination
(endpoint-independent mapping), and conntrack admits only packets of connections the home
started: a typical home router, through which two homes can hole-punch a TCP connection by
dialling each other at once (tests/netns/test_lab.py; transport/dcutr.py relies on it).

Namespace names carry the test process's pid; namespaces left by a killed run are removed
the next time a lab is made (their pid is gone). Nothing here touches the root namespace's
network: every interface is created inside a namespace of the lab.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.node_procs import REPO, NodeProc

PUBLIC_NET = "198.51.100"
HOME_NET = "192.168.1"
PREFIX = "meshnat"
_counter = itertools.count(1)
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


class NetnsUnavailable(Exception):
    """Namespaces can't be made here (not root, no iproute2/nftables/conntrack, no netns)."""


def _run(*cmd: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def ns_exec(ns: str, *cmd: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return _run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


def unavailable_reason() -> str | None:
    """Why namespace tests can't run here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (CI and the dev machine run as root)"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs iproute2, nftables, conntrack)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", "") or str(e)
        return f"cannot create a network namespace: {err.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Remove namespaces of lab runs whose process is gone (a killed test run)."""
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
            _run("ip", "netns", "del", name, check=False)


@dataclass
class Home:
    lab: NatLab
    index: int
    router: str  # namespace names
    ns: str
    wan_ip: str
    ip: str = f"{HOME_NET}.2"
    symmetric: bool = False

    def router_reset(self) -> None:
        """A router reboot, as far as NAT goes: every mapping forgotten."""
        ns_exec(self.router, "conntrack", "-F", check=False)

    def cut_uplink(self) -> None:
        """Packets through the router vanish (no error comes back), as in an ISP outage."""
        ns_exec(self.router, "nft", "add rule inet cut forward drop")

    def restore_uplink(self) -> None:
        ns_exec(self.router, "nft", "flush chain inet cut forward")

    def mappings(self) -> str:
        """The router's NAT table (conntrack -L), for test failure messages and the bench."""
        return ns_exec(self.router, "conntrack", "-L", check=False).stdout


@dataclass
class NatLab:
    tag: str
    pub: str
    pub_ip: str = f"{PUBLIC_NET}.1"
    homes: list[Home] = field(default_factory=list)
    procs: list[NodeProc] = field(default_factory=list)
    extra_procs: list = field(default_factory=list)  # other subprocess.Popen started in the lab
    _namespaces: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> NatLab:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        sweep_stale()
        tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        lab = cls(tag=tag, pub=f"{tag}-pub")
        try:
            lab._add_ns(lab.pub)
            ns_exec(lab.pub, "ip", "link", "add", "br0", "type", "bridge")
            ns_exec(lab.pub, "ip", "addr", "add", f"{lab.pub_ip}/24", "dev", "br0")
            ns_exec(lab.pub, "ip", "link", "set", "br0", "up")
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        ns_exec(name, "ip", "link", "set", "lo", "up")

    def add_public_host(self, n: int) -> tuple[str, str]:
        """A host of its own on the public net (no NAT): (namespace, address). Its own
        namespace, so the connections it opens come from its address."""
        ns, ip = f"{self.tag}-p{n}", f"{PUBLIC_NET}.{100 + n}"
        self._add_ns(ns)
        ns_exec(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"pub{n}", "netns", self.pub)
        ns_exec(self.pub, "ip", "link", "set", f"pub{n}", "master", "br0", "up")
        ns_exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns_exec(ns, "ip", "link", "set", "eth0", "up")
        return ns, ip

    def add_home(self, *, symmetric: bool = False) -> Home:
        k = len(self.homes) + 1
        home = Home(self, k, router=f"{self.tag}-r{k}", ns=f"{self.tag}-h{k}", wan_ip=f"{PUBLIC_NET}.{10 + k}",
                    symmetric=symmetric)
        self._add_ns(home.router)
        self._add_ns(home.ns)
        # WAN: router <-> the public bridge. Both ends are created inside their namespaces.
        ns_exec(home.router, "ip", "link", "add", "wan", "type", "veth", "peer", "name", f"up{k}", "netns", self.pub)
        ns_exec(self.pub, "ip", "link", "set", f"up{k}", "master", "br0", "up")
        ns_exec(home.router, "ip", "addr", "add", f"{home.wan_ip}/24", "dev", "wan")
        ns_exec(home.router, "ip", "link", "set", "wan", "up")
        # LAN: router <-> the home.
        ns_exec(home.router, "ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", home.ns)
        ns_exec(home.router, "ip", "addr", "add", f"{HOME_NET}.1/24", "dev", "lan")
        ns_exec(home.router, "ip", "link", "set", "lan", "up")
        ns_exec(home.ns, "ip", "addr", "add", f"{home.ip}/24", "dev", "eth0")
        ns_exec(home.ns, "ip", "link", "set", "eth0", "up")
        ns_exec(home.ns, "ip", "route", "add", "default", "via", f"{HOME_NET}.1")
        ns_exec(home.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masq = "masquerade random" if symmetric else "masquerade"
        rules = f"""
table ip nat {{
    chain postrouting {{ type nat hook postrouting priority 100; oifname "wan" {masq}; }}
}}
table inet home {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state invalid drop
        iifname "lan" oifname "wan" accept
        iifname "wan" oifname "lan" ct state established,related accept
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
}}
table inet cut {{
    chain forward {{ type filter hook forward priority -10; policy accept; }}
}}
"""
        subprocess.run(["ip", "netns", "exec", home.router, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True, timeout=10)
        # Loaded with the ct rules above; per namespace.
        ns_exec(home.router, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        self.homes.append(home)
        return home

    # -- processes ----------------------------------------------------------------------

    def spawn(self, ns: str, tmp: Path, name: str, *args: str) -> NodeProc:
        """`mesh ARGS` inside namespace `ns`, with its own state dir and log under tmp.
        `ip netns exec` execs the command, so the pid we hold is the daemon's own."""
        from tests.support.node_procs import mesh_cmd, spawn

        proc = spawn(tmp, name, lambda state: ["ip", "netns", "exec", ns,
                                               *mesh_cmd(*_with_state(args, state))])
        self.procs.append(proc)
        return proc

    def http_get(self, ns: str, url: str, timeout: float = 5.0) -> tuple[int, dict, str]:
        """GET from inside a namespace (our process lives in the root one): status, headers,
        body."""
        r = ns_exec(ns, "curl", "-s", "-i", "--max-time", str(timeout), url, check=False, timeout=timeout + 5)
        return _parse_curl(r.stdout)

    def http_post(self, ns: str, url: str, body: str, timeout: float = 20.0) -> tuple[int, dict, str]:
        r = ns_exec(ns, "curl", "-s", "-i", "--max-time", str(timeout), "-H", "content-type: application/json",
                    "-d", body, url, check=False, timeout=timeout + 5)
        return _parse_curl(r.stdout)

    def close(self) -> None:
        for ep in self.extra_procs:
            if ep.poll() is None:
                ep.kill()  # by pid: a process this lab started
                ep.wait(5)
        for p in self.procs:
            try:
                p.stop()
            except Exception as e:  # keep tearing down: the namespaces must go
                warnings.warn(f"could not stop a lab process: {e}", stacklevel=1)
        for ns in reversed(self._namespaces):
            _run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()


def _with_state(args: tuple[str, ...], state: Path) -> list[str]:
    # `mesh node start ...` / `mesh entry start ...`: --state-dir right after the subcommand.
    return [*args[:2], "--state-dir", str(state), *args[2:]]


def _parse_curl(out: str) -> tuple[int, dict, str]:
    if not out:
        return 0, {}, ""
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, {}, out
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def lab_or_skip():
    """A NatLab, or a LOUD skip: pytest.skip with the reason and a warning in the summary."""
    import pytest

    try:
        return NatLab.create()
    except NetnsUnavailable as e:
        warnings.warn(f"NAT namespace tests SKIPPED: {e}", stacklevel=2)
        pytest.skip(f"network namespaces unavailable: {e}")


__all__ = ["NatLab", "Home", "NetnsUnavailable", "lab_or_skip", "ns_exec", "unavailable_reason", "REPO"]
