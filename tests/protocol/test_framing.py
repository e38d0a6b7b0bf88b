"""Frame codec: round trips, strictness, and a fuzz of the decoder on random and mutated bytes."""

import struct

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import FrameTooLarge, MalformedFrame, ProtocolError
from protocol.framing import (
    HEADER_SIZE,
    SMALL_HOLDING,
    BufferBudget,
    BufferFull,
    FrameReader,
    FrameWriter,
    OversizedFrame,
    decode_body,
    encode_frame,
)


class MemoryStream:
    """A byte stream over a fixed buffer that hands out at most `chunk` bytes per read,
    counting reads so tests can check buffering."""

    def __init__(self, data: bytes = b"", chunk: int = 1 << 30):
        self.data = bytearray(data)
        self.chunk = chunk
        self.reads = 0
        self.written = bytearray()
        self.largest_request = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        self.largest_request = max(self.largest_request, n)
        out = bytes(self.data[: min(n, self.chunk)])
        del self.data[: len(out)]
        return out

    async def write(self, data: bytes) -> None:
        self.written += data


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=50) | st.binary(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=10), json_like, max_size=8))
@settings(max_examples=200, deadline=None)
def test_round_trip(message):
    body = encode_frame(message)[HEADER_SIZE:]
    assert decode_body(body) == message


async def test_reader_reads_many_frames_with_few_reads():
    frames = [{"t": "tok", "i": i, "text": "x" * 10} for i in range(500)]
    stream = MemoryStream(b"".join(encode_frame(f) for f in frames))
    reader = FrameReader(stream)
    got = []
    while (f := await reader.read_frame()) is not None:
        got.append(f)
    assert got == frames
    assert stream.reads <= 3  # buffered: not one read per frame


async def test_reader_handles_one_byte_reads():
    frames = [{"a": 1}, {"b": [1, 2, 3]}]
    reader = FrameReader(MemoryStream(b"".join(encode_frame(f) for f in frames), chunk=1))
    assert [await reader.read_frame(), await reader.read_frame(), await reader.read_frame()] == frames + [None]


async def test_writer_batches_frames_into_one_write():
    stream = MemoryStream()
    await FrameWriter(stream).write_frames([{"a": i} for i in range(16)])
    reader = FrameReader(MemoryStream(bytes(stream.written)))
    assert [await reader.read_frame() for _ in range(16)] == [{"a": i} for i in range(16)]


async def test_oversized_length_refused_before_reading_body():
    stream = MemoryStream(struct.pack(">I", 50_000_000) + b"\x80")
    reader = FrameReader(stream, max_frame=1 << 20)
    with pytest.raises(FrameTooLarge):
        await reader.read_frame()
    assert stream.largest_request <= 65536  # never asked for the announced 50 MB


def test_encoder_refuses_oversized_message():
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": "y" * 2000}, max_frame=1000)


@pytest.mark.parametrize(
    "body,why",
    [
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb({1: "x"}), "non-string key"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"xx")}), "ext type"),
        (msgpack.packb({"a": 1}) + b"\x01", "trailing bytes"),
        (b"\xc1", "reserved byte"),
        (b"\x81\xa1a", "truncated"),
        (b"", "empty"),
    ],
)
def test_malformed_bodies_refused(body, why):
    with pytest.raises(MalformedFrame):
        decode_body(body)


async def test_stream_ending_mid_frame_is_an_error_not_a_hang():
    whole = encode_frame({"a": "b" * 100})
    for cut in (2, HEADER_SIZE + 5):
        with pytest.raises(MalformedFrame):
            await FrameReader(MemoryStream(whole[:cut])).read_frame()


@given(st.binary(max_size=2048))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_random_bodies_never_crash(data):
    try:
        assert isinstance(decode_body(data, max_frame=4096), dict)
    except ProtocolError:
        pass


@given(st.binary(min_size=0, max_size=600), st.integers(1, 64))
@settings(max_examples=600, deadline=None)
def test_fuzz_random_streams_never_crash_or_overallocate(data, chunk):
    async def run():
        stream = MemoryStream(data, chunk=chunk)
        reader = FrameReader(stream, max_frame=1024)
        with trio.fail_after(5):
            for _ in range(len(data) + 2):  # every frame consumes >= 4 bytes, so this bounds the loop
                try:
                    if await reader.read_frame() is None:
                        break
                except ProtocolError:
                    break
        assert len(reader._buf) <= 1024 + HEADER_SIZE + 65536

    trio.run(run)


valid_frames = st.lists(st.dictionaries(st.text(max_size=8), json_like, max_size=4), min_size=1, max_size=4)


@given(valid_frames, st.data())
@settings(max_examples=400, deadline=None)
def test_fuzz_mutated_valid_streams(frames, data):
    raw = bytearray(b"".join(encode_frame(f) for f in frames))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))

    async def run():
        reader = FrameReader(MemoryStream(bytes(raw), chunk=7), max_frame=2048)
        with trio.fail_after(5):
            for _ in range(len(raw) + 2):
                try:
                    if await reader.read_frame() is None:
                        break
                except ProtocolError:
                    break

    trio.run(run)


async def test_frame_ready_tells_whether_a_whole_frame_is_buffered():
    data = encode_frame({"t": "a"}) + encode_frame({"t": "b"}) + encode_frame({"t": "c"})[:3]
    reader = FrameReader(MemoryStream(data, chunk=len(data)))
    assert not reader.frame_ready()  # nothing read yet
    assert (await reader.read_frame())["t"] == "a"
    assert reader.frame_ready()
    assert (await reader.read_frame())["t"] == "b"
    assert not reader.frame_ready()  # only part of the third is here


async def test_budget_holds_what_the_reader_buffers_and_gets_it_back():
    budget = BufferBudget(1 << 20)
    frames = [{"i": i, "pad": "x" * 3000} for i in range(20)]
    big = encode_frame({"big": "y" * 200_000})
    stream = MemoryStream(b"".join(encode_frame(f) for f in frames) + big[:100_000], chunk=7000)  # ends mid-frame
    reader = FrameReader(stream, budget=budget)
    for f in frames:
        assert await reader.read_frame() == f
        assert budget.used == reader.buffered == 0  # nothing read ahead, nothing held between frames
    with pytest.raises(MalformedFrame):
        await reader.read_frame()
    assert budget.used == reader.buffered == 100_000  # what arrived, not what the header announced
    reader.release()
    assert budget.used == 0 and reader.buffered == 0
    reader.release()  # twice is harmless
    assert budget.used == 0 and budget.peak == 100_000


async def test_readers_sharing_a_budget_never_hold_more_than_it():
    budget = BufferBudget(400_000, reserve=50_000)
    partial = encode_frame({"big": "y" * 200_000})[:150_000]  # a frame that never completes
    unfinished, refused = [], []
    for _ in range(5):
        reader = FrameReader(MemoryStream(partial, chunk=10_000), budget=budget)
        try:
            await reader.read_frame()
        except BufferFull:
            refused.append(reader)
        except MalformedFrame:
            unfinished.append(reader)  # all its bytes buffered, then its stream ended mid-frame
        assert budget.used <= budget.limit
    assert (len(unfinished), len(refused)) == (2, 3)
    # The third was cut off where large holdings end (limit - reserve); the last two got only
    # what the reserve allows a reader holding little (its header and one 10 kB read).
    assert budget.used == 2 * 150_000 + (4 + 40_000) + 2 * (4 + 10_000)
    for reader in refused:  # as the node does with a refused stream
        reader.release()
    assert budget.used == 300_000
    # A small frame still gets in near the cap: the reserve is for readers holding little...
    budget.take(budget.limit - budget.reserve - budget.used)  # large holdings fill their part
    small = FrameReader(MemoryStream(encode_frame({"x": "z" * (SMALL_HOLDING - 100)}), chunk=5000), budget=budget)
    assert await small.read_frame()
    large = FrameReader(MemoryStream(encode_frame({"x": "z" * 20_000})), budget=budget)
    with pytest.raises(BufferFull):  # ...not for a large frame
        await large.read_frame()
    for reader in [large, *unfinished]:
        reader.release()
    assert budget.used == budget.limit - budget.reserve - 300_000  # what this test took by hand


async def test_oversized_frame_error_names_length_and_limit():
    reader = FrameReader(MemoryStream(struct.pack(">I", 5000) + b"x" * 5000), max_frame=4096)
    with pytest.raises(OversizedFrame) as e:
        await reader.read_frame()
    assert (e.value.length, e.value.limit) == (5000, 4096) and isinstance(e.value, FrameTooLarge)


def test_budget_settings_checked():
    for limit, reserve in ((0, 0), (10, 10), (10, -1)):
        with pytest.raises(ValueError):
            BufferBudget(limit, reserve)
