"""Helpers for the verification tests: an in-process entry that verifies and keeps a ledger,
and cheating node processes (tests/support/cheating_node.py)."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from entry.credits.ledger import Ledger, VestingPolicy
from entry.mesh.relay import open_mesh_backend
from entry.verify.verifier import Verifier, VerifierConfig
from protocol.identity import Identity
from tests.support.mesh_nodes import FAST, VIEW_OPTIONS, stop_nodes
from tests.support.node_procs import NodeProc, spawn, start_node, wait_ready
from transport.host import open_mesh_host

CHEATER = Path(__file__).with_name("cheating_node.py")


def spawn_cheater(tmp: Path, name: str, cheat: str, *args: str, claim: Path | None = None) -> NodeProc:
    claim_args = ["--claim-model", str(claim)] if claim else []
    return spawn(tmp, name, lambda state: [sys.executable, str(CHEATER), "--cheat", cheat, *claim_args, "--",
                                           "node", "start", "--state-dir", str(state), *args])


class Entry:
    """What a verifying entry is made of, for tests to poke at."""

    def __init__(self, host, backend, verifier: Verifier, ledger: Ledger, nodes: list[NodeProc], tmp: Path):
        self.host, self.backend, self.verifier, self.ledger, self.nodes, self.tmp = host, backend, verifier, ledger, nodes, tmp

    @property
    def bootstrap(self) -> str:
        return self.host.listen_addrs[0]

    async def add_node(self, name: str, model: Path, *args: str, threads: int = 1) -> NodeProc:
        node = await start_node(self.tmp, name, "--model", str(model), "--bootstrap", self.bootstrap, *FAST[:1],
                                "--threads", str(threads), *FAST[3:], *args)
        self.nodes.append(node)
        return node

    async def add_cheater(self, name: str, cheat: str, model: Path, *args: str, claim: Path | None = None) -> NodeProc:
        node = spawn_cheater(self.tmp, name, cheat, "--model", str(model), "--bootstrap", self.bootstrap, *FAST, *args,
                             claim=claim)
        self.nodes.append(node)
        return await wait_ready(node)

    def state(self, node: NodeProc):
        return next((n for n in self.backend.view.all_nodes() if n.peer_id == node.peer_id), None)


@asynccontextmanager
async def verifying_entry(tmp: Path, verify_model: Path, *, rate: float = 1.0, policy: VestingPolicy | None = None,
                          config: VerifierConfig | None = None):
    """An entry (host + mesh backend) with a verifier for `verify_model` and a ledger file;
    node processes added through it are stopped on exit."""
    ledger = Ledger(tmp / "credits.db", policy=policy)
    verifier = Verifier(ledger=ledger, config=config or VerifierConfig(rate=rate, new_rate=rate, suspicious_rate=1.0))
    await trio.to_thread.run_sync(verifier.load_model, verify_model)
    nodes: list[NodeProc] = []
    try:
        async with open_mesh_host(Identity.generate()) as host:
            async with open_mesh_backend(host, on_generation_done=verifier.on_generation_done, **VIEW_OPTIONS) as backend:
                verifier.view = backend.view
                backend.model_pins = verifier.pins()
                backend.admit = verifier.admits
                async with trio.open_nursery() as nursery:
                    await nursery.start(verifier.run)
                    try:
                        yield Entry(host, backend, verifier, ledger, nodes, tmp)
                    finally:
                        with trio.CancelScope(shield=True):
                            await stop_nodes(nodes)
                        nursery.cancel_scope.cancel()
    finally:
        verifier.close()
        ledger.close()
