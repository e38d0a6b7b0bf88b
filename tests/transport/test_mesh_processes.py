"""Real libp2p hosts in separate processes on 127.0.0.1: a bootstrap, two providers of a
model with signed adverts, and this test process as the finder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from transport.discovery import discover_model
from transport.host import open_mesh_host

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = REPO / "tests" / "support" / "p2p_peer.py"
TEST_PROTOCOL = "/mesh/test-echo/1"
MODEL = "5e" * 32
ADVERT_TTL = 4.0  # short so a killed provider's advert expires quickly
ADVERT_REFRESH = 1.0
START_TIMEOUT = 30.0  # a peer process: ~1 s of imports, then join and first advert


class Peer:
    def __init__(self, proc: trio.Process, log_path: Path):
        self.proc = proc
        self.log_path = log_path
        self.peer_id = ""
        self.addrs: list[str] = []
        self._buf = b""

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    async def read_announcement(self) -> None:
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"peer exited before announcing:\n{self.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        info = json.loads(line)
        self.peer_id, self.addrs = info["peer_id"], info["addrs"]


async def start_peer(tmp_path: Path, name: str, *args: str) -> Peer:
    log_path = tmp_path / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(PEER_SCRIPT), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=str(REPO), env=env,
        )
    return Peer(proc, log_path)


async def stop_all(peers: list[Peer]) -> None:
    # Only the processes this test started, by their own handles.
    with trio.CancelScope(shield=True):
        for p in peers:
            if p.proc.returncode is None:
                p.proc.kill()
        for p in peers:
            with trio.move_on_after(10):
                await p.proc.wait()


async def ask(host, peer_id: str, addrs: list[str], req: int) -> dict:
    stream = await host.open_stream(peer_id, TEST_PROTOCOL, addrs)
    try:
        reader, writer = FrameReader(stream), FrameWriter(stream)
        await writer.write_frame({"req": req})
        reply = await reader.read_frame()
        await stream.close_write()
        assert await reader.read_frame() is None  # the server ends the stream cleanly
        return reply
    finally:
        await stream.close()


async def test_two_providers_found_used_and_killed_one_drops_out(tmp_path):
    peers: list[Peer] = []
    try:
        boot = await start_peer(tmp_path, "bootstrap", "bootstrap")
        peers.append(boot)
        await boot.read_announcement()
        provider_args = ["provider", "--bootstrap", boot.addrs[0], "--model", MODEL,
                         "--ttl", str(ADVERT_TTL), "--refresh", str(ADVERT_REFRESH)]
        p1 = await start_peer(tmp_path, "provider1", *provider_args)
        p2 = await start_peer(tmp_path, "provider2", *provider_args)
        peers += [p1, p2]
        await p1.read_announcement()
        await p2.read_announcement()

        async with open_mesh_host(Identity.generate(), bootstrap=boot.addrs) as finder:
            # Both providers are visible, each with a verified advert.
            with trio.fail_after(20):
                while True:
                    adverts = await discover_model(finder, MODEL, timeout=5)
                    if {a.node for a in adverts} == {p1.peer_id, p2.peer_id}:
                        break
                    await trio.sleep(0.2)
            assert len(adverts) == 2
            assert all(a.model_sha256 == MODEL and a.expires_at > a.issued_at for a in adverts)

            # A request and a reply on our own protocol with each, over FrameReader/Writer.
            with trio.fail_after(15):
                for i, adv in enumerate(adverts):
                    reply = await ask(finder, adv.node, adv.addrs, i)
                    assert reply == {"reply_to": i, "server": adv.node, "client": finder.peer_id}

            # Kill provider 1 (SIGKILL: no goodbye). It must drop out once its last advert
            # expires: bounded by the TTL plus lookups, polled against a deadline.
            p1.proc.kill()
            with trio.fail_after(10):
                await p1.proc.wait()
            with trio.fail_after(ADVERT_TTL + 20):
                while True:
                    nodes = {a.node for a in await discover_model(finder, MODEL, timeout=5)}
                    if p1.peer_id not in nodes:
                        break
                    await trio.sleep(0.5)
            # ...while the live provider is still found and still answers.
            with trio.fail_after(20):
                while p2.peer_id not in {a.node for a in await discover_model(finder, MODEL, timeout=5)}:
                    await trio.sleep(0.2)
                reply = await ask(finder, p2.peer_id, p2.addrs, 99)
            assert reply["server"] == p2.peer_id
    except BaseException:
        for p in peers:
            print(f"--- {p.log_path.name} ---\n{p.log_tail()}")
        raise
    finally:
        await stop_all(peers)
