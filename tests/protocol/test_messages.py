"""Message validation: valid messages round trip; invalid ones raise InvalidMessage, never crash."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION
from protocol.errors import InvalidMessage, ProtocolError, UnsupportedVersion
from protocol.framing import HEADER_SIZE, decode_body, encode_frame
from protocol.messages import (
    Cancel,
    ChatMessage,
    Error,
    Final,
    InferRequest,
    Leaving,
    SamplingParams,
    StatusQuery,
    StatusReply,
    TokenChunk,
    parse_message,
    to_wire,
)

SHA = "ab" * 32


def wire_round_trip(msg):
    return parse_message(decode_body(encode_frame(to_wire(msg))[HEADER_SIZE:]))


@pytest.mark.parametrize(
    "msg",
    [
        InferRequest("req-000001", SHA, "chat", SamplingParams(temperature=0.7, seed=3, stop=["\n"]), [ChatMessage("user", "hi")]),
        InferRequest("req-000002", SHA, "completion", SamplingParams(), prompt="Once upon", continuation=[1, 2, 3], logprobs=True, top_logprobs=5),
        TokenChunk("req-000001", [5, 6], "ab", [-0.1, -2.0], [[[5, -0.1, b"a"]], [[6, -2.0, b"b"], [7, -3.0, b"\xe2\x82"]]],
                   [b"a", b"b"]),
        Final("req-000001", "length", 10, 2, b"receipt-bytes", seed=42),
        Error("busy", "all slots taken", "req-000001", retry_after=1.5),
        Cancel("req-000001"),
        Leaving(5.0),
        StatusQuery(),
        StatusReply(SHA, "smol", 2, 1, 0, 8, 900.0, 100.0, 12345, False, 2048),
    ],
)
def test_round_trip(msg):
    assert wire_round_trip(msg) == msg


def base_request(**over):
    d = to_wire(InferRequest("req-000001", SHA, "chat", SamplingParams(), [ChatMessage("user", "hi")]))
    d.update(over)
    return d


@pytest.mark.parametrize(
    "over",
    [
        {"id": "short"},
        {"id": "has spaces in it"},
        {"model": "nothex"},
        {"kind": "embedding"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": "hi"},
        {"params": {"temperature": -1}},
        {"params": {"temperature": float("nan")}},
        {"params": {"max_tokens": 0}},
        {"params": {"max_tokens": 10**9}},
        {"params": {"top_p": True}},
        {"params": {"stop": ["x"] * 50}},
        {"params": {"stop": [""]}},
        {"params": "greedy"},
        {"cont": [-1]},
        {"cont": ["a"]},
        {"top_logprobs": 100},
        {"logprobs": "yes"},
        {"messages": [{"role": "user", "content": "x" * 300_000}]},
    ],
)
def test_invalid_requests_refused(over):
    with pytest.raises(InvalidMessage):
        parse_message(base_request(**over))


def test_unknown_type_and_version():
    with pytest.raises(InvalidMessage):
        parse_message({"t": "launch-missiles", "v": PROTOCOL_VERSION})
    with pytest.raises(UnsupportedVersion):
        parse_message({**base_request(), "v": 99})
    with pytest.raises(UnsupportedVersion):
        parse_message({"t": "req"})


@pytest.mark.parametrize("over", [
    {"top": [[[5, -0.1]]]},  # version 1's alternatives carried no bytes
    {"top": [[[5, -0.1, "a"]]]},
    {"top": [[[5, -0.1, b"x" * 1025]]]},
    {"top": [[[True, -0.1, b"a"]]]},
    {"tb": [b"a", b"b"]},
    {"tb": ["a"]},
])
def test_token_chunk_alternatives_carry_their_bytes(over):
    frame = {**to_wire(TokenChunk("req-000001", [5], "a", [-0.1])), **over}
    with pytest.raises(InvalidMessage):
        parse_message(frame)


def test_an_older_peer_is_refused():
    """Version 2 changed TokenChunk's alternatives: an older peer's frame is refused, not misread."""
    assert PROTOCOL_VERSION >= 2
    old = {**to_wire(TokenChunk("req-000001", [5], "a", [-0.1], [[[5, -0.1]]])), "v": PROTOCOL_VERSION - 1}
    with pytest.raises(UnsupportedVersion, match=f"version {PROTOCOL_VERSION - 1} is not supported"):
        parse_message(old)


def test_token_chunk_logprobs_must_match_ids():
    with pytest.raises(InvalidMessage):
        parse_message(to_wire(TokenChunk("req-000001", [1, 2], "x", [-0.5])))
    with pytest.raises(InvalidMessage):
        parse_message(to_wire(TokenChunk("req-000001", [1], "x", [0.5])))


@given(st.dictionaries(st.sampled_from(["t", "v", "id", "model", "kind", "messages", "prompt", "params", "cont", "ids", "text", "lp", "finish", "receipt", "code", "message", "grace"]),
                       st.none() | st.integers() | st.text(max_size=20) | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3) | st.sampled_from(["req", "tok", "fin", "err", "cancel", "leaving", "status?", "status", 1])))
@settings(max_examples=1000, deadline=None)
def test_fuzz_parse_never_crashes(frame):
    try:
        parse_message(frame)
    except ProtocolError:
        pass
