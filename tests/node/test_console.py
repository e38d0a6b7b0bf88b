"""The node console (`mesh node start --console-port`): a real entry daemon and a synthetic node
process over libp2p on 127.0.0.1, the console in a real headless Chromium. It renders, shows
the requests the node served after traffic, the entry's signed credit statement next to the
node's receipts (and an unreachable entry as such), refuses a stop without the page's token, from another Origin or under another
Host name, and its stop button drains the node until it exits. Screenshots go under tmp_path."""

from __future__ import annotations

import argparse

import httpx
import pytest
import trio

from node.config import NodeConfig
from runtime import ready_file
from tests.support.browser import CHROMIUM
from tests.support.node_procs import spawn_entry, start_node

MODEL = "synth-node-console"


def test_console_flags_reach_the_config_and_are_checked():
    from node.cli import add_parser
    from node.config import load_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["node", "start", "--console-port", "8470", "--console-entry", "http://127.0.0.1:8000",
                              "--console-entry", "http://127.0.0.1:8001"])
    from node.cli import _START_KEYS

    cfg = load_config(None, {k: getattr(args, k) for k in _START_KEYS})
    assert cfg.console_port == 8470 and cfg.console_entries == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    assert NodeConfig().console_port is None  # off by default
    with pytest.raises(ValueError, match="console-port"):
        NodeConfig(console_port=70000).validate()
    with pytest.raises(ValueError, match="base URL"):
        NodeConfig(console_entries=["127.0.0.1:8000"]).validate()


def test_receipt_tally_reads_only_what_was_appended(tmp_path):
    from node.console import ReceiptTally
    from node.receipt_log import ReceiptLog
    from protocol.identity import Identity
    from protocol.records import WorkReceipt

    node = Identity.generate()
    log = ReceiptLog(tmp_path / "receipts.log")
    tally = ReceiptTally(log.path)
    assert tally.by_entry() == []  # no log yet

    def receipt(rid: str, entry: str, tokens: int) -> bytes:
        return WorkReceipt(rid, "a" * 64, 3, tokens, b"d" * 32, node.peer_id, entry, 1.0).sign(node)

    log.append(receipt("r1", "entry-a", 5))
    log.append(receipt("r2", "entry-b", 7))
    assert tally.by_entry() == [{"entry": "entry-a", "receipts": 1, "tokens": 5}, {"entry": "entry-b", "receipts": 1, "tokens": 7}]
    log.append(receipt("r3", "entry-a", 1))
    with open(log.path, "ab") as f:
        f.write(b"half a li")  # a line being written: counted once it is complete
    assert tally.by_entry()[0] == {"entry": "entry-a", "receipts": 2, "tokens": 6}
    assert tally.offset < log.path.stat().st_size
    log.path.write_bytes(b"")  # a new log: counted from scratch
    assert tally.by_entry() == []


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")
async def test_node_console_shows_work_and_credits_and_its_stop_button_drains(tmp_path):
    from tests.support.cdp import open_page

    entry = spawn_entry(tmp_path, "entry", "--open", "--log-level", "warning")
    node = None
    try:
        with trio.fail_after(240):
            info = await ready_file.wait_async(ready_file.path_in(entry.state_dir), entry.proc, 60, name="entry",
                                               log_tail=lambda: entry.log()[-3000:])
            url = info["url"]
            node = await start_node(tmp_path, "n1", "--synthetic", MODEL, "--synthetic-rate", "400", "--skip-benchmark",
                                    "--bootstrap", info["p2p_addrs"][0], "--advert-interval", "1", "--drain-seconds", "20",
                                    "--console-port", "0", "--console-entry", url,
                                    "--console-entry", "http://127.0.0.1:9")  # nothing listens there
            console = ready_file.read(ready_file.path_in(node.state_dir))["console_url"]
            assert console.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(timeout=30) as client:
                while True:  # the entry finds the node through the DHT
                    models = (await client.get(url + "/v1/models")).json()["data"]
                    if any(m["id"] == MODEL and m["nodes"] for m in models):
                        break
                    await trio.sleep(0.1)

                # The stop endpoint refuses what a foreign page could send.
                stop = console + "api/stop"
                assert (await client.post(stop)).status_code == 403
                page_html = (await client.get(console)).text
                token = page_html.split('name="mesh-console-token" content="')[1].split('"')[0]
                assert len(token) >= 32
                r = await client.post(stop, headers={"X-Mesh-Console-Token": token, "Origin": "http://evil.example"})
                assert r.status_code == 403 and "another site" in r.json()["error"]["message"]
                r = await client.post(stop, headers={"X-Mesh-Console-Token": token, "Host": "evil.example"})
                assert r.status_code == 403
                assert (await client.get(console + "api/state", headers={"Host": "rebound.example:80"})).status_code == 403
                assert node.proc.poll() is None

                async with trio.open_nursery() as nursery:
                    page = await open_page(nursery, tmp_path / "profile", console)
                    assert await page.wait_for("document.getElementById('state').textContent === 'serving'")
                    assert await page.js("typeof Chart") == "function"
                    assert await page.js("document.getElementById('t-requests').textContent") == "0"
                    for i in range(3):
                        r = await client.post(url + "/v1/chat/completions", json={
                            "model": MODEL, "max_tokens": 30, "messages": [{"role": "user", "content": f"hi {i}"}]})
                        assert r.status_code == 200, r.text
                    assert await page.wait_for("document.getElementById('t-requests').textContent === '3'")
                    chart_sum = "Chart.getChart('chart-requests').data.datasets[0].data.reduce((a, b) => a + b, 0)"
                    assert await page.wait_for(f"{chart_sum} === 3")
                    assert await page.wait_for("document.querySelectorAll('#receipts tbody tr').length === 1")
                    assert await page.js("document.querySelector('#receipts tbody tr').cells[1].textContent") == "3"
                    # The entry's statement, asked with the node's signature: 3 booked, 3 receipts, nothing missing.
                    await page.wait_for("document.querySelector('#credits tbody tr')?.cells[4].textContent === '3'")
                    row = await page.js("[...document.querySelector('#credits tbody tr').cells].map(c => c.textContent)")
                    assert row[0] == url and row[5] == "3" and row[6] == "none", row
                    # An entry that cannot be reached says so, and holds nothing else up.
                    down = await page.js("document.querySelectorAll('#credits tbody tr')[1].cells[1].textContent")
                    assert "cannot reach the entry" in down
                    await page.screenshot(tmp_path / "node-console.png")

                    await page.js("document.getElementById('stop').click()")
                    assert node.proc.poll() is None  # one click only arms the button
                    await page.js("document.getElementById('stop').click()")
                    assert await node.wait_exit(60) == 0
                    assert "stop requested from the node console" in node.log()
                    assert await page.wait_for("document.body.dataset.nodeGone === '1'")
                    assert await page.js("document.getElementById('state').textContent") == "stopped"
                    await page.screenshot(tmp_path / "node-console-stopped.png")
                    nursery.cancel_scope.cancel()
    finally:
        if node is not None:
            node.stop()
        entry.stop()
