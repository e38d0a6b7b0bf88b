"""/mesh/model/1 with libp2p hosts in this process (127.0.0.1): a real transfer, tampering and
stalling peers, a peer that dies mid-transfer, a resume from verified chunks, a wrong whole
file, a full disk. A generated 10 MiB file (3 chunks) stands in for a model: the bytes don't
matter here. Every wait is bounded."""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from engine.model_file import file_manifest
from node.model_fetch import FetchError, PartFile, choose, fetch_file, parse_model_spec
from node.model_share import ModelShare, TokenBucket
from protocol.framing import FrameReader, FrameWriter
from protocol.identity import Identity
from protocol.model_transfer import (
    CHUNK_SIZE,
    MODEL_PROTOCOL_ID,
    PIECE_SIZE,
    Manifest,
    Piece,
    manifest_to_wire,
    parse_reply,
    parse_request,
    piece_to_wire,
)
from transport.host import open_mesh_host

SIZE = 2 * CHUNK_SIZE + 2 * PIECE_SIZE + 12345  # 3 chunks, the last one short


@pytest.fixture
def model(tmp_path) -> tuple[Path, Manifest]:
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(SIZE))
    return path, file_manifest(path, tmp_path / "cache")


class FlipBytes(ModelShare):
    """Serves every chunk with one byte flipped."""

    def _read(self, index: int) -> bytes:
        data = bytearray(super()._read(index))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)


class LyingManifest(ModelShare):
    """Claims other chunk hashes (so another root) than the file has."""

    def __init__(self, path, manifest, **kw):
        super().__init__(path, replace(manifest, hashes=bytes(len(manifest.hashes))), **kw)


class Scripted:
    """A peer whose answer to a chunk request is `behaviour`: "short" sends half the chunk and
    closes, "stall" sends nothing and keeps the stream open, "die" sends one piece and then
    `on_die` is called (the test closes the host)."""

    def __init__(self, path: Path, manifest: Manifest, behaviour: str):
        self.path, self.m, self.behaviour = path, manifest, behaviour
        self.chunks_asked = 0
        self.died = trio.Event()

    async def handle_stream(self, stream, remote: str) -> None:
        reader, writer = FrameReader(stream), FrameWriter(stream, max_frame=4 << 20)
        while (frame := await reader.read_frame()) is not None:
            req = parse_request(frame)
            if not hasattr(req, "index"):
                await writer.write_frame(manifest_to_wire(self.m))
                continue
            self.chunks_asked += 1
            off, length = self.m.span(req.index)
            data = self.path.read_bytes()[off : off + length]
            if self.behaviour == "short":
                await writer.write_frame(piece_to_wire(Piece(req.index, 0, data[:PIECE_SIZE])))
                return
            if self.behaviour == "die":
                await writer.write_frame(piece_to_wire(Piece(req.index, 0, data[:PIECE_SIZE])))
                self.died.set()
                await trio.sleep(30)
            await trio.sleep(30)  # stall


@asynccontextmanager
async def mesh(handlers: list):
    """A downloader host and one serving host per handler, connected."""
    async with AsyncExitStack() as stack:
        dl = await stack.enter_async_context(open_mesh_host(Identity.generate()))
        servers = []
        for h in handlers:
            s = await stack.enter_async_context(open_mesh_host(Identity.generate()))
            s.set_stream_handler(MODEL_PROTOCOL_ID, h.handle_stream)
            await dl.connect(s.peer_id, s.listen_addrs)
            servers.append(s)
        yield dl, servers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_transfer_from_two_peers_verifies_and_renames(model, tmp_path):
    path, m = model
    shares = [ModelShare(path, m, rate_mb=1000), ModelShare(path, m, rate_mb=1000)]
    dest = tmp_path / "dl" / f"{m.sha256}.gguf"
    seen = []
    async with mesh(shares) as (dl, servers):
        with trio.fail_after(60):
            res = await fetch_file(dl, m.sha256, m.root, [s.peer_id for s in servers], dest, on_progress=seen.append)
    assert not res.reused and res.dropped == {}
    assert sha(dest) == m.sha256 and dest.stat().st_size == SIZE
    assert not dest.with_name(dest.name + ".part").exists() and not dest.with_name(dest.name + ".part.chunks").exists()
    assert seen[-1].finished and seen[-1].done_bytes == SIZE
    assert sum(s.stats.chunks_sent for s in shares) == 3
    # A second fetch finds the file and asks nobody.
    async with mesh([]) as (dl, _):
        with trio.fail_after(30):
            again = await fetch_file(dl, m.sha256, m.root, [], dest)
    assert again.reused


@pytest.mark.parametrize("bad", ["flip", "short", "stall"])
async def test_a_tampering_or_stalling_peer_is_dropped_and_its_chunk_refetched(model, tmp_path, bad):
    path, m = model
    liar = FlipBytes(path, m, rate_mb=1000) if bad == "flip" else Scripted(path, m, bad)
    honest = ModelShare(path, m, rate_mb=1000)
    dest = tmp_path / "dl" / "m.gguf"
    async with mesh([liar, honest]) as (dl, (bad_host, good_host)):
        with trio.fail_after(60):
            res = await fetch_file(dl, m.sha256, m.root, [bad_host.peer_id, good_host.peer_id], dest,
                                   per_peer=1, stall_timeout=1.0)
    assert sha(dest) == m.sha256
    assert list(res.dropped) == [bad_host.peer_id]
    expected = {"flip": "does not match the manifest", "short": "closed the stream", "stall": "sent nothing"}[bad]
    assert expected in res.dropped[bad_host.peer_id]


async def test_a_peer_lying_in_its_manifest_is_dropped(model, tmp_path):
    path, m = model
    liar, honest = LyingManifest(path, m, rate_mb=1000), ModelShare(path, m, rate_mb=1000)
    dest = tmp_path / "dl" / "m.gguf"
    async with mesh([liar, honest]) as (dl, (bad_host, good_host)):
        with trio.fail_after(60):
            res = await fetch_file(dl, m.sha256, m.root, [bad_host.peer_id, good_host.peer_id], dest)
    assert sha(dest) == m.sha256
    assert "disagrees" in res.dropped[bad_host.peer_id]
    assert honest.stats.chunks_sent == 3  # nothing was taken from the liar


async def test_a_peer_killed_mid_transfer_is_replaced(model, tmp_path):
    path, m = model
    dying, honest = Scripted(path, m, "die"), ModelShare(path, m, rate_mb=1000)
    dest = tmp_path / "dl" / "m.gguf"
    async with AsyncExitStack() as stack:
        dl = await stack.enter_async_context(open_mesh_host(Identity.generate()))
        good = await stack.enter_async_context(open_mesh_host(Identity.generate()))
        good.set_stream_handler(MODEL_PROTOCOL_ID, honest.handle_stream)
        await dl.connect(good.peer_id, good.listen_addrs)
        result = []
        async with open_mesh_host(Identity.generate()) as bad:
            bad.set_stream_handler(MODEL_PROTOCOL_ID, dying.handle_stream)
            await dl.connect(bad.peer_id, bad.listen_addrs)
            async with trio.open_nursery() as n:
                async def run():
                    result.append(await fetch_file(dl, m.sha256, m.root, [bad.peer_id, good.peer_id], dest, per_peer=1))

                with trio.fail_after(60):
                    n.start_soon(run)
                    await dying.died.wait()
                    await bad.close()  # the peer goes away with a chunk half sent
        # (the nursery waited for the download to finish)
    assert sha(dest) == m.sha256
    assert bad.peer_id in result[0].dropped


async def test_all_advertisers_lying_together_fail_cleanly(model, tmp_path):
    """Peers agreeing on a manifest of another file: every chunk checks out against it, but
    the whole file's sha256 does not; nothing is kept, nothing is renamed into place."""
    path, m = model
    other = tmp_path / "other.gguf"
    other.write_bytes(os.urandom(SIZE))
    om = file_manifest(other, tmp_path / "cache")
    forged = replace(om, sha256=m.sha256)  # the other file's manifest, claimed for our digest
    share = ModelShare(other, forged, rate_mb=1000)
    dest = tmp_path / "dl" / "m.gguf"
    async with mesh([share]) as (dl, (host,)):
        with trio.fail_after(60), pytest.raises(FetchError, match="lied; nothing was kept"):
            await fetch_file(dl, m.sha256, forged.root, [host.peer_id], dest)
    assert sorted(os.listdir(dest.parent)) == []


async def test_resume_keeps_verified_chunks_and_rechecks_them(model, tmp_path):
    path, m = model
    dest = tmp_path / "dl" / "m.gguf"
    # A previous run wrote chunks 0 and 2, then died; chunk 2 was damaged on disk since.
    part = PartFile(dest, m)
    assert part.open() == set()
    data = path.read_bytes()
    part.write_chunk(0, data[: CHUNK_SIZE])
    part.write_chunk(2, b"\0" * m.span(2)[1])
    part.close()
    with open(part.sidecar, "a") as f:
        f.write("1")  # a line cut short by the kill: not a finished record
    share = ModelShare(path, m, rate_mb=1000)
    async with mesh([share]) as (dl, (host,)):
        with trio.fail_after(60):
            res = await fetch_file(dl, m.sha256, m.root, [host.peer_id], dest)
    assert sha(dest) == m.sha256
    assert res.resumed_chunks == 1 and share.stats.chunks_sent == 2


def test_a_cut_short_sidecar_line_does_not_merge_with_the_next(model, tmp_path):
    path, m = model
    dest = tmp_path / "dl" / "m.gguf"
    part = PartFile(dest, m)
    part.open()
    part.write_chunk(0, path.read_bytes()[:CHUNK_SIZE])
    part.close()
    with open(part.sidecar, "a") as f:
        f.write("1")  # killed while writing "1\n"
    again = PartFile(dest, m)
    assert again.open() == {0}
    again.write_chunk(2, path.read_bytes()[2 * CHUNK_SIZE :])
    again.close()
    assert part.sidecar.read_text().splitlines()[1:] == ["0", "2"]


async def test_full_disk_is_a_clear_error_before_any_transfer(model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: mounting a small tmpfs needs root (CI runs as root)")
    path, m = model
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        share = ModelShare(path, m, rate_mb=1000)
        async with mesh([share]) as (dl, (host,)):
            with trio.fail_after(30), pytest.raises(FetchError, match="not enough disk space"):
                await fetch_file(dl, m.sha256, m.root, [host.peer_id], mnt / "m.gguf")
        assert share.stats.chunks_sent == 0
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def test_old_version_and_other_model_get_clean_refusals(model):
    path, m = model
    share = ModelShare(path, m, rate_mb=1000)
    async with mesh([share]) as (dl, (host,)):
        with trio.fail_after(30):
            s = await dl.open_stream(host.peer_id, MODEL_PROTOCOL_ID)
            w, r = FrameWriter(s), FrameReader(s, max_frame=4 << 20)
            await w.write_frame({"t": "manifest?", "v": 1, "sha256": "ab" * 32})
            assert parse_reply(await r.read_frame()).code == "unknown_model"
            await w.write_frame({"t": "manifest?", "v": 2, "sha256": m.sha256})
            reply = parse_reply(await r.read_frame())
            assert reply.code == "unsupported_version" and "speaks 1" in reply.message
            assert await r.read_frame() is None  # and the stream ends


async def test_token_bucket_paces_to_the_rate():
    bucket = TokenBucket(rate=1e6, burst=100_000)
    t0 = trio.current_time()
    with trio.fail_after(10):
        for _ in range(6):
            await bucket.take(100_000)
    # 600 kB at 1 MB/s with a 100 kB burst: at least 0.5 s.
    assert trio.current_time() - t0 >= 0.45


async def test_uploads_slow_down_while_the_node_generates(model, tmp_path):
    """busy() true (a generation runs): the share sends at BUSY_FRACTION of its rate."""
    path, m = model
    share = ModelShare(path, m, rate_mb=40, busy=lambda: True)  # 4 MB/s while busy
    async with mesh([share]) as (dl, (host,)):
        with trio.fail_after(60):
            t0 = trio.current_time()
            await fetch_file(dl, m.sha256, m.root, [host.peer_id], tmp_path / "dl" / "m.gguf")
            took = trio.current_time() - t0
    assert took >= (SIZE - PIECE_SIZE) / 4e6 * 0.95  # the first piece rides the burst


async def test_token_bucket_at_a_fraction_of_its_rate():
    bucket = TokenBucket(rate=1e6, burst=10_000)
    t0 = trio.current_time()
    with trio.fail_after(10):
        for _ in range(6):
            await bucket.take(10_000, fraction=0.1)
    assert trio.current_time() - t0 >= 0.45


def test_model_spec_parsing(tmp_path):
    assert parse_model_spec(None) is None
    assert parse_model_spec("sha256:" + "AB" * 32) == ("sha256", "ab" * 32)
    assert parse_model_spec("SmolLM2-135M-Instruct") == ("name", "SmolLM2-135M-Instruct")
    assert parse_model_spec("models/x.gguf") is None and parse_model_spec("x.gguf") is None
    f = tmp_path / "plain"
    f.write_text("")
    assert parse_model_spec(str(f)) is None
    with pytest.raises(FetchError, match="64 hex"):
        parse_model_spec("sha256:abc")


class _Adv:
    def __init__(self, node, sha, name, root):
        self.node, self.model_sha256, self.model_name, self.manifest_root = node, sha, name, root


def test_choose_takes_the_majority_root_and_refuses_ambiguous_names():
    a, b = "aa" * 32, "bb" * 32
    advs = [_Adv("n1", a, "m", "r1"), _Adv("n2", a, "m", "r1"), _Adv("n3", a, "m", "r2"), _Adv("n4", a, "m", "")]
    r = choose(advs, ("name", "m"))
    assert (r.sha256, r.root, r.peers) == (a, "r1", ["n1", "n2"])
    assert choose(advs, ("sha256", a), self_peer="n1").peers == ["n2"]
    with pytest.raises(FetchError, match="different files"):
        choose([_Adv("n1", a, "m", "r"), _Adv("n2", b, "m", "r")], ("name", "m"))
    with pytest.raises(FetchError, match="don't share"):
        choose([_Adv("n4", a, "m", "")], ("sha256", a))
    with pytest.raises(FetchError, match="no node .* named 'x'"):
        choose(advs, ("name", "x"))


def test_progress_bar_on_a_terminal_shows_bytes_rate_eta_and_peers():
    import io

    from node.model_fetch import Progress, progress_reporter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    report = progress_reporter("text", out)
    report(Progress(50_000_000, 100_000_000, 0, 12.5e6, 3, 4.0))
    report(Progress(100_000_000, 100_000_000, 0, 12.5e6, 3, 0.0, finished=True))
    text = out.getvalue()
    assert "50.0 MB/100.0 MB" in text and "12.5 MB/s" in text and "ETA    4s" in text and "peers 3" in text
    assert text.endswith("\n") and "100.0%" in text
