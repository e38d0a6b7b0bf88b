"""Entries and nodes as real daemons inside a NatLab (tests/support/netns.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Home, NatLab
from tests.support.node_procs import REPO, NodeProc, wait_ready_sync

MODEL = "nat-model"


@dataclass
class Entry:
    proc: NodeProc
    ns: str
    url: str
    peer_id: str
    p2p: str  # full multiaddr with /p2p/


def start_entry(lab: NatLab, tmp: Path, name: str, ip: str, port: int, *bootstrap: str, ns: str | None = None) -> Entry:
    ns = ns or lab.pub
    args = ["entry", "start", "--open", "--http-host", "127.0.0.1", "--http-port", "0", "--listen-host", ip,
            "--p2p-port", str(port), "--canary-interval", "0"]
    for b in bootstrap:
        args += ["--bootstrap", b]
    proc = lab.spawn(ns, tmp, name, *args)
    info = wait_ready_sync(proc, 60)
    p2p = next(a for a in info["p2p_addrs"] if f"/{ip}/" in a)
    full = p2p if "/p2p/" in p2p else f"{p2p}/p2p/{info['peer_id']}"
    return Entry(proc, ns, info["url"], info["peer_id"], full)


def start_node(lab: NatLab, tmp: Path, name: str, home: Home | str, *bootstrap: str, advert_interval: float = 5.0,
               listen: str = "0.0.0.0", extra: tuple[str, ...] = ()) -> NodeProc:
    """A synthetic node in `home` (or in the namespace named by a string)."""
    args = ["node", "start", "--synthetic", MODEL, "--synthetic-rate", "200", "--skip-benchmark",
            "--listen-host", listen, "--advert-interval", str(advert_interval), *extra]
    for b in bootstrap:
        args += ["--bootstrap", b]
    proc = lab.spawn(home if isinstance(home, str) else home.ns, tmp, name, *args)
    info = wait_ready_sync(proc, 60)
    proc.peer_id, proc.addrs = info["peer_id"], info["addrs"]
    return proc


def node_status(node: NodeProc) -> dict:
    r = subprocess.run([sys.executable, "-m", "mesh_cli", "node", "status", "--json", "--state-dir", str(node.state_dir)],
                       capture_output=True, text=True, timeout=20, cwd=REPO)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def mesh_nodes(lab: NatLab, entry: Entry) -> list[dict]:
    status, _, body = lab.http_get(entry.ns, f"{entry.url}/v1/mesh/nodes")
    if status != 200:
        return []
    data = json.loads(body)
    return data.get("data", data.get("nodes", [])) if isinstance(data, dict) else data


def serving(lab: NatLab, entry: Entry) -> bool:
    return any(n.get("state") in ("ready", "busy") for n in mesh_nodes(lab, entry))


def complete(lab: NatLab, entry: Entry, max_tokens: int = 4, timeout: float = 10.0) -> tuple[int, dict, str]:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens})
    return lab.http_post(entry.ns, f"{entry.url}/v1/completions", body, timeout=timeout)


def wait_until(cond: Callable[[], bool], limit: float, what: str, step: float = 0.25,
               context: Callable[[], str] = lambda: "") -> float:
    """Seconds until cond() held; fails after `limit` with `context()` in the message."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"timed out after {limit}s waiting for {what}\n{context()}")


def logs(*procs: NodeProc, tail: int = 2500) -> str:
    return "\n".join(f"--- {p.state_dir.name} ---\n{p.log()[-tail:]}" for p in procs)


def relay_peer(lab: NatLab, ns: str, *args: str, log_dir: Path) -> subprocess.Popen:
    """tests/netns/relay_peer.py inside namespace `ns` (killed by lab.close()); its stdout
    lines are collected by a thread, for read_json_line(); its log goes to a file (a pipe
    nobody drains would block it), p.log() reads it."""
    import queue
    import threading

    path = log_dir / f"relay_peer-{len(lab.extra_procs)}.log"
    with open(path, "w") as log:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(REPO / "tests/netns/relay_peer.py"), *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    lab.extra_procs.append(p)
    p.log = lambda tail=3000: path.read_text(errors="replace")[-tail:]
    p.lines = queue.Queue()

    def pump() -> None:
        for line in p.stdout:  # ends when the process does
            p.lines.put(line)
        p.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return p


def read_json_line(p: subprocess.Popen, what: str, timeout: float = 60.0) -> dict:
    """The next line `p` prints, as JSON; fails with its stderr if it ends or stays silent."""
    import queue

    try:
        line = p.lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line with {what} after {timeout}s\n{p.log()}") from None
    if line is None:
        p.wait(5)
        raise AssertionError(f"no line with {what}: exited {p.returncode}\n{p.log()}")
    return json.loads(line)
