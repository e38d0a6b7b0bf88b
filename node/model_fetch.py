"""The downloading side of /mesh/model/1: fetch the GGUF a node will serve from the nodes that
serve it already.

`resolve` turns `sha256:<hex>` or a model name into the model's digest, the manifest root most
advertisers commit to (protocol/model_transfer.py) and the peers to fetch from. `fetch_file`
then takes the manifest from any of them, checks it against the root, and fetches missing
chunks from several peers in parallel. Each chunk is checked against the manifest, written at
its offset into `<sha256>.gguf.part`, fsync'd, and only then listed in the `.chunks` sidecar
(fsync'd too), so a download killed at any point resumes from chunks known to be on disk. A
peer that sends a bad chunk, a wrong manifest, too few bytes or nothing for too long is
dropped and its chunk fetched elsewhere. The file gets its final name only once its whole
sha256 matches; nothing half-written ever carries it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from engine.model_file import ModelFileError, file_sha256, remember_sha256
from protocol.errors import ProtocolError
from protocol.framing import FrameReader, FrameWriter
from protocol.model_transfer import (
    MAX_MANIFEST_FRAME,
    MODEL_PROTOCOL_ID,
    ChunkRequest,
    Manifest,
    ManifestRequest,
    Piece,
    TransferError,
    parse_reply,
    request_to_wire,
)

log = logging.getLogger("mesh.node.fetch")

CONCURRENCY = 6  # chunks in flight, all peers together
PER_PEER = 2  # chunks in flight per peer: one being sent while the next is asked for
CHUNK_TIMEOUT_S = 120.0  # a whole 4 MiB chunk (35 kB/s): slower peers are dropped
STALL_TIMEOUT_S = 20.0  # no byte from a peer for this long: dropped
MANIFEST_TIMEOUT_S = 15.0
FETCH_ROUNDS = 3  # look the peers up again this often when all of them were dropped
DISK_MARGIN = 16 << 20  # keep this much free beyond the model itself
_SHA_SPEC = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class FetchError(ModelFileError):
    """The model could not be fetched; str() is one line for the operator."""


class PeersExhausted(FetchError):
    """Every peer was dropped before the file was complete; verified chunks are kept."""


class PeerFailed(Exception):
    """A peer broke the transfer (bad data, short chunk, stall, gone): drop it."""


# --- what to fetch ------------------------------------------------------------------------------


def parse_model_spec(spec: str | None) -> tuple[str, str] | None:
    """("sha256", hex) or ("name", name) when --model asks for a model from the mesh; None for a
    path (or no --model: the bundled model). A value naming an existing file, holding a path
    separator or ending in .gguf is a path."""
    if not spec:
        return None
    m = _SHA_SPEC.match(spec)
    if m:
        return ("sha256", m.group(1).lower())
    if spec.startswith("sha256:"):
        raise FetchError(f"--model {spec!r}: a sha256 is 64 hex characters")
    if os.path.exists(spec) or "/" in spec or os.sep in spec or spec.endswith(".gguf"):
        return None
    return ("name", spec)


@dataclass
class Resolved:
    sha256: str
    name: str
    root: str
    peers: list[str]  # peer ids advertising this root, majority first
    roots_seen: dict[str, int] = field(default_factory=dict)  # root -> advertisers


def choose(adverts: list, spec: tuple[str, str], self_peer: str = "") -> Resolved:
    """Pick digest, root and peers from verified adverts (pure, so it is tested alone).

    A name maps to the digest most distinct nodes advertise under it, a tie is an error (the
    operator must say which). Of that digest's manifest roots the one most nodes commit to
    wins; the whole-file sha256 at the end decides whether they told the truth."""
    kind, value = spec
    adverts = [a for a in adverts if a.node != self_peer]
    if kind == "name":
        shas = Counter(a.model_sha256 for a in adverts if a.model_name == value)
        if not shas:
            known = sorted({a.model_name for a in adverts})
            raise FetchError(f"no node in the mesh serves a model named {value!r}"
                             + (f" (served now: {', '.join(known[:10])})" if known else ""))
        ranked = shas.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            raise FetchError(f"model name {value!r} is served with {len(ranked)} different files; "
                             f"say which with --model sha256:<hex> ({', '.join(s[:16] for s, _ in ranked[:4])}...)")
        sha = ranked[0][0]
    else:
        sha = value
    mine = [a for a in adverts if a.model_sha256 == sha]
    if not mine:
        raise FetchError(f"no node in the mesh serves model sha256:{sha}")
    roots = Counter(a.manifest_root for a in mine if a.manifest_root)
    if not roots:
        raise FetchError(f"the {len(mine)} node(s) serving sha256:{sha[:16]}... don't share the model file "
                         "(--no-share-model, or a version without model sharing)")
    root = roots.most_common(1)[0][0]
    names = Counter(a.model_name for a in mine)
    name = value if kind == "name" else names.most_common(1)[0][0]
    return Resolved(sha, name, root, [a.node for a in mine if a.manifest_root == root], dict(roots))


async def resolve(host, spec: tuple[str, str], *, limit: float = 30.0) -> Resolved:
    """Look the model up in the mesh (signed adverts), retrying while nothing is found yet:
    a node that just joined needs a lookup or two before the DHT answers."""
    from transport.discovery import discover_all, discover_model

    deadline = trio.current_time() + limit
    err: FetchError | None = None
    while True:
        left = deadline - trio.current_time()
        if spec[0] == "sha256":
            adverts = await discover_model(host, spec[1], timeout=max(2.0, min(10.0, left)))
        else:
            adverts = await discover_all(host, timeout=max(2.0, min(10.0, left)))
        try:
            return choose(adverts, spec, host.peer_id)
        except FetchError as e:
            err = e
        if trio.current_time() + 1.0 >= deadline:
            raise err
        await trio.sleep(1.0)


# --- progress ----------------------------------------------------------------------------------


@dataclass
class Progress:
    done_bytes: int
    total_bytes: int
    resumed_bytes: int
    rate_bps: float  # over the last few seconds
    peers: int
    eta_s: float | None
    finished: bool = False


class _Meter:
    def __init__(self, total: int, done: int, on_progress: Callable[[Progress], None] | None):
        self.total, self.done, self.resumed = total, done, done
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])
        self._cb = on_progress
        self.peers = 0

    def add(self, n: int, peers: int) -> None:
        self.peers = peers
        self.done += n
        now = time.monotonic()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        self.report(peers)

    def snapshot(self, peers: int, finished: bool = False) -> Progress:
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        rate = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return Progress(self.done, self.total, self.resumed, rate, peers, eta, finished)

    def report(self, peers: int, finished: bool = False) -> None:
        if self._cb is not None:
            self._cb(self.snapshot(peers, finished))


# --- the part file and its sidecar ---------------------------------------------------------------


class PartFile:
    """`<final>.part` (chunks at their offsets) and `<final>.part.chunks` (a JSON header line,
    then one verified chunk index per line). A chunk is listed only after its bytes are fsync'd,
    so whatever the sidecar lists is on disk, whenever the process died."""

    def __init__(self, final: Path, manifest: Manifest):
        self.final = final
        self.part = final.with_name(final.name + ".part")
        self.sidecar = final.with_name(final.name + ".part.chunks")
        self.m = manifest
        self._header = json.dumps({"sha256": manifest.sha256, "root": manifest.root, "size": manifest.size,
                                   "chunk_size": manifest.chunk_size}, sort_keys=True)
        self.fd = -1
        self._side = None

    def open(self) -> set[int]:
        """Lock the part file, reserve its space, and return the chunks already verified."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        done = self._read_sidecar()
        if not done:
            for p in (self.part, self.sidecar):
                p.unlink(missing_ok=True)
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FetchError(f"another process is downloading this model into {self.final.parent}") from None
        try:
            self._check_space()
            try:
                # Reserve every byte now: a disk that fills up is refused here, not half-way.
                os.posix_fallocate(self.fd, 0, self.m.size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise FetchError(f"not enough disk space in {self.final.parent} for the model "
                                     f"({_mb(self.m.size)}): {e.strerror}") from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        except BaseException:
            self.close()
            if not done:  # nothing worth keeping: leave no empty .part behind
                self.part.unlink(missing_ok=True)
            raise
        done = {i for i in done if self._verify_on_disk(i)}
        # Rewritten whole (then renamed): a line the kill cut short must not merge with the
        # next one appended.
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(f"{line}\n" for line in [self._header, *sorted(done)]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar)
        self._side = open(self.sidecar, "a")
        return done

    def _read_sidecar(self) -> set[int]:
        try:
            lines = self.sidecar.read_text().split("\n")
        except (OSError, UnicodeDecodeError):
            return set()
        if not lines or lines[0] != self._header or not self.part.exists():
            return set()  # another model or another manifest: start over
        done = set()
        for line in lines[1:]:  # the last line may be cut short by a kill: skipped
            if line.isdigit() and int(line) < self.m.chunks:
                done.add(int(line))
        return done

    def _verify_on_disk(self, index: int) -> bool:
        off, length = self.m.span(index)
        return self.m.check_chunk(index, os.pread(self.fd, length, off))

    def _check_space(self) -> None:
        have = os.fstat(self.fd).st_blocks * 512
        need = max(0, self.m.size - have)
        free = shutil.disk_usage(self.final.parent).free
        if free < need + DISK_MARGIN:
            raise FetchError(f"not enough disk space in {self.final.parent}: the model needs {_mb(need)} more, "
                             f"{_mb(free)} free")

    def write_chunk(self, index: int, data: bytes) -> None:
        """Worker thread: bytes first, durable; then the sidecar line, durable."""
        off, _ = self.m.span(index)
        os.pwrite(self.fd, data, off)
        os.fdatasync(self.fd)
        assert self._side is not None
        self._side.write(f"{index}\n")
        self._side.flush()
        os.fsync(self._side.fileno())

    def whole_sha256(self) -> str:
        h = hashlib.sha256()
        for off in range(0, self.m.size, 8 << 20):
            h.update(os.pread(self.fd, min(8 << 20, self.m.size - off), off))
        return h.hexdigest()

    def commit(self) -> None:
        os.fsync(self.fd)
        os.replace(self.part, self.final)
        dfd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.close()
        self.sidecar.unlink(missing_ok=True)

    def discard(self) -> None:
        self.close()
        for p in (self.part, self.sidecar):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._side is not None:
            self._side.close()
            self._side = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# --- talking to one peer -----------------------------------------------------------------------


class _PeerLink:
    """One stream to one peer; requests go one at a time."""

    def __init__(self, stream):
        self.stream = stream
        self.reader = FrameReader(stream, max_frame=MAX_MANIFEST_FRAME)
        self.writer = FrameWriter(stream)

    async def _reply(self, stall: float) -> Manifest | Piece | TransferError:
        with trio.move_on_after(stall):
            try:
                frame = await self.reader.read_frame()
            except ProtocolError as e:
                raise PeerFailed(f"broke the protocol: {e}") from None
            except Exception as e:  # resets and closed streams surface as many types
                raise PeerFailed(f"stream failed: {type(e).__name__}") from None
            if frame is None:
                raise PeerFailed("closed the stream")
            try:
                return parse_reply(frame)
            except ProtocolError as e:
                raise PeerFailed(f"sent an invalid reply: {e}") from None
        raise PeerFailed(f"sent nothing for {stall:g} s")

    async def manifest(self, sha: str, timeout: float) -> Manifest:
        await self._send(ManifestRequest(sha))
        reply = await self._reply(timeout)
        if isinstance(reply, TransferError):
            raise PeerFailed(f"refused the manifest: {reply.code}: {reply.message}")
        if not isinstance(reply, Manifest):
            raise PeerFailed("answered a manifest request with something else")
        return reply

    async def chunk(self, m: Manifest, index: int, stall: float, limit: float) -> bytes:
        await self._send(ChunkRequest(m.sha256, index))
        _, length = m.span(index)
        buf = bytearray()
        with trio.move_on_after(limit):
            while len(buf) < length:
                reply = await self._reply(stall)
                if isinstance(reply, TransferError):
                    raise PeerFailed(f"refused chunk {index}: {reply.code}: {reply.message}")
                if not isinstance(reply, Piece) or reply.index != index or reply.offset != len(buf) \
                        or len(buf) + len(reply.data) > length:
                    raise PeerFailed(f"sent a piece that does not fit chunk {index}")
                buf += reply.data
            return bytes(buf)
        raise PeerFailed(f"did not send chunk {index} within {limit:g} s")

    async def _send(self, req: ManifestRequest | ChunkRequest) -> None:
        try:
            await self.writer.write_frame(request_to_wire(req))
        except Exception as e:
            raise PeerFailed(f"stream failed: {type(e).__name__}") from None

    async def close(self) -> None:
        self.reader.release()
        with trio.move_on_after(1):
            await self.stream.close()


async def _open_link(host, peer: str, timeout: float) -> _PeerLink:
    from transport.host import DialError

    try:
        return _PeerLink(await host.open_stream(peer, MODEL_PROTOCOL_ID, timeout=timeout))
    except DialError as e:
        raise PeerFailed(str(e)) from None


# --- the download ------------------------------------------------------------------------------


@dataclass
class FetchResult:
    path: Path
    reused: bool  # the file was there already
    resumed_chunks: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # peer -> why


async def get_manifest(host, sha: str, root: str, peers: list[str], dropped: dict[str, str],
                       timeout: float = MANIFEST_TIMEOUT_S) -> Manifest:
    """The manifest from the first peer whose copy hashes to `root`; liars are dropped."""
    for peer in peers:
        try:
            link = await _open_link(host, peer, min(timeout, 10.0))
            try:
                m = await link.manifest(sha, timeout)
            finally:
                await link.close()
        except PeerFailed as e:
            dropped[peer] = str(e)
            log.warning("peer dropped", extra={"peer": peer, "reason": str(e)})
            continue
        if m.sha256 != sha or m.root != root:
            dropped[peer] = "sent a manifest that disagrees with the advertised root"
            log.warning("peer dropped", extra={"peer": peer, "reason": dropped[peer]})
            continue
        return m
    raise PeersExhausted(f"no peer sent a valid manifest for sha256:{sha[:16]}... ({len(peers)} tried)")


async def fetch_file(
    host,
    sha: str,
    root: str,
    peers: list[str],
    dest: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    concurrency: int = CONCURRENCY,
    per_peer: int = PER_PEER,
    stall_timeout: float = STALL_TIMEOUT_S,
    chunk_timeout: float = CHUNK_TIMEOUT_S,
) -> FetchResult:
    """Fetch the file with digest `sha` into `dest` (its final path) from `peers`."""
    if dest.is_file():
        try:
            if await trio.to_thread.run_sync(file_sha256, dest) == sha:
                return FetchResult(dest, reused=True)
        except ModelFileError:
            pass
        raise FetchError(f"{dest} exists but its sha256 is not {sha[:16]}...: move it away to download the model")
    dropped: dict[str, str] = {}
    m = await get_manifest(host, sha, root, peers, dropped)
    part = PartFile(dest, m)
    done = await trio.to_thread.run_sync(part.open)
    resumed = len(done)
    if resumed:
        log.info("resuming download", extra={"chunks_verified": resumed, "chunks": m.chunks})
    try:
        meter = _Meter(m.size, sum(m.span(i)[1] for i in done), on_progress)
        pending = deque(i for i in range(m.chunks) if i not in done)
        live = [p for p in peers if p not in dropped]
        in_flight = 0
        changed = trio.Event()
        limiter = trio.CapacityLimiter(max(1, concurrency))

        def poke() -> None:
            nonlocal changed
            changed.set()
            changed = trio.Event()

        async def worker(peer: str) -> None:
            nonlocal in_flight
            link: _PeerLink | None = None  # its own stream: a stream carries one request at a time
            try:
                while pending or in_flight:
                    if peer in dropped:
                        return
                    if not pending:
                        ev = changed
                        with trio.move_on_after(1.0):
                            await ev.wait()
                        continue
                    index = pending.popleft()
                    in_flight += 1
                    try:
                        async with limiter:
                            if link is None:
                                link = await _open_link(host, peer, 10.0)
                            data = await link.chunk(m, index, stall_timeout, chunk_timeout)
                        if not await trio.to_thread.run_sync(m.check_chunk, index, data):
                            raise PeerFailed(f"sent chunk {index} that does not match the manifest")
                        await trio.to_thread.run_sync(part.write_chunk, index, data)
                        done.add(index)
                        meter.add(len(data), len(live))
                    except PeerFailed as e:
                        pending.appendleft(index)
                        if peer not in dropped:
                            dropped[peer] = str(e)
                            live.remove(peer)
                            log.warning("peer dropped", extra={"peer": peer, "reason": str(e)})
                        return
                    finally:
                        in_flight -= 1
                        poke()
            finally:
                if link is not None:
                    await link.close()

        async with trio.open_nursery() as nursery:
            for p in list(live):
                for _ in range(max(1, per_peer)):
                    nursery.start_soon(worker, p)
        if pending or len(done) < m.chunks:
            reasons = "; ".join(f"{p[:12]}...: {r}" for p, r in list(dropped.items())[:3])
            raise PeersExhausted(f"download incomplete ({len(done)}/{m.chunks} chunks kept for a resume): "
                             f"every peer failed ({reasons})")
        whole = await trio.to_thread.run_sync(part.whole_sha256)
        if whole != sha:
            # Every chunk matched the manifest the advertisers committed to, so they all lied
            # together; nothing from them is kept.
            await trio.to_thread.run_sync(part.discard)
            raise FetchError(f"the downloaded file hashes to {whole[:16]}..., not {sha[:16]}...: the peers "
                             f"committing to manifest {root[:16]}... lied; nothing was kept")
        await trio.to_thread.run_sync(part.commit)
        remember_sha256(dest, sha)
        meter.report(meter.peers, finished=True)
        return FetchResult(dest, reused=False, resumed_chunks=resumed, dropped=dropped)
    finally:
        part.close()


# --- the node's entry point --------------------------------------------------------------------


def models_dir(state: Path) -> Path:
    return state / "models"


def _saved_name(final: Path) -> str | None:
    try:
        name = json.loads(final.with_suffix(".json").read_text()).get("name")
        return name if isinstance(name, str) and 0 < len(name) <= 128 else None
    except (OSError, ValueError, AttributeError):
        return None


async def fetch_for_node(cfg, identity, spec: tuple[str, str]) -> tuple[Path, str]:
    """What `mesh node start --model sha256:<hex>|<name>` does before loading: return the local
    path of the model file (fetched if needed) and the name the mesh serves it under."""
    dest_dir = models_dir(cfg.state_path())
    if spec[0] == "sha256":
        final = dest_dir / f"{spec[1]}.gguf"
        if final.is_file() and await trio.to_thread.run_sync(file_sha256, final) == spec[1]:
            log.info("model file already here", extra={"path": str(final)})
            return final, _saved_name(final) or spec[1][:16]
    from transport.host import open_mesh_host

    if not cfg.bootstrap:
        raise FetchError("--model sha256:<hex> or <name> fetches the model from the mesh: give --bootstrap")
    async with open_mesh_host(identity, listen_host=cfg.listen_host, listen_port=0, bootstrap=cfg.bootstrap) as host:
        report = progress_reporter(cfg.log_format)
        for round_ in range(1, FETCH_ROUNDS + 1):
            res = await resolve(host, spec)
            final = dest_dir / f"{res.sha256}.gguf"
            log.info("fetching model from the mesh", extra={"model": res.name, "sha256": res.sha256[:16],
                                                              "peers": len(res.peers), "root": res.root[:16]})
            try:
                result = await fetch_file(host, res.sha256, res.root, res.peers, final, on_progress=report)
                break
            except PeersExhausted as e:
                # Peers come and go: the ones serving now may differ, and the verified chunks stay.
                if round_ == FETCH_ROUNDS:
                    raise
                log.warning(f"{e}; looking for peers again", extra={"round": round_ + 1})
                await trio.sleep(2.0)
    if result.reused:
        log.info("model file already here", extra={"path": str(final)})
    else:
        log.info("model downloaded", extra={"path": str(final), "resumed_chunks": result.resumed_chunks,
                                            "peers_dropped": len(result.dropped)})
    try:
        final.with_suffix(".json").write_text(json.dumps({"name": res.name, "sha256": res.sha256}))
    except OSError:
        pass  # only a convenience for the next start without the network
    return final, res.name


def progress_reporter(log_format: str, stream=None) -> Callable[[Progress], None]:
    """A bar on a terminal (text logs), else a progress log line every few seconds."""
    stream = stream or sys.stderr
    bar = log_format == "text" and stream.isatty()
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        final = p.done_bytes >= p.total_bytes
        if not final and now - last[0] < (0.2 if bar else 2.0):
            return
        last[0] = now
        frac = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        if bar:
            filled = int(frac * 30)
            stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {frac * 100:5.1f}% {_mb(p.done_bytes)}/{_mb(p.total_bytes)} "
                         f"{p.rate_bps / 1e6:6.1f} MB/s ETA {eta:>5} peers {p.peers} ")
            if final:
                stream.write("\n")
            stream.flush()
        else:
            log.info("model download", extra={"done_bytes": p.done_bytes, "total_bytes": p.total_bytes,
                                              "percent": round(frac * 100, 1), "rate_mbps": round(p.rate_bps / 1e6, 2),
                                              "eta_s": None if p.eta_s is None else round(p.eta_s, 1), "peers": p.peers})

    return report
