"""The node's handling of a request's grammar (protocol 2) and of peers that speak protocol 1."""

import pytest
import trio

from protocol import PROTOCOL_VERSION
from protocol.framing import FrameReader, FrameWriter
from protocol.messages import ERR_INVALID, MAX_GRAMMAR, InferRequest, SamplingParams, parse_message, to_wire
from tests.support.node_harness import collect, connect, make_service, request
from transport.node_client import NodeError


@pytest.fixture
def service(tiny_gguf):
    return make_service(tiny_gguf)


def test_protocol_version_is_2_and_the_grammar_round_trips():
    assert PROTOCOL_VERSION == 2
    req = InferRequest("req-000001", "ab" * 32, "completion", SamplingParams(),
                       prompt="x", grammar='root ::= "a"')
    assert parse_message(to_wire(req)).grammar == 'root ::= "a"'
    no_grammar = to_wire(InferRequest("req-000001", "ab" * 32, "completion", req.params, prompt="x"))
    assert "grammar" not in no_grammar and parse_message(no_grammar).grammar == ""


async def test_grammar_constrains_the_nodes_output(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service, max_tokens=8)
        req.grammar = 'root ::= "a"+'
        ids, text, call = await collect(s, req)
        assert text == "a" * len(text) and 0 < len(ids) <= 8
        await s.close()


@pytest.mark.parametrize("grammar, words", [("root ::= nothing", "does not parse"), ('root ::= "a"{1,99999}', "repetition")])
async def test_unusable_grammar_is_refused_and_the_node_keeps_serving(service, grammar, words):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service)
        req.grammar = grammar
        with pytest.raises(NodeError) as e:
            await collect(s, req)
        assert e.value.code == ERR_INVALID and words in str(e.value)
        ids, _, _ = await collect(s, request(service, max_tokens=3))
        assert len(ids) == 3
        await s.close()


async def test_oversized_grammar_is_refused_by_the_protocol(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        req = request(service)
        req.grammar = 'root ::= "' + "a" * MAX_GRAMMAR + '"'
        await FrameWriter(s).write_frame(to_wire(req))
        with trio.fail_after(10):
            err = parse_message(await FrameReader(s).read_frame())
        assert err.code == ERR_INVALID and "'grammar'" in err.message
        await s.close()


async def test_a_protocol_1_peer_gets_a_clean_refusal(service):
    async with trio.open_nursery() as n:
        s = connect(n, service)
        old = to_wire(request(service))
        old["v"] = 1
        await FrameWriter(s).write_frame(old)
        with trio.fail_after(10):
            err = parse_message(await FrameReader(s).read_frame())
        assert err.code == ERR_INVALID and "protocol version 1 is not supported" in err.message
        await s.close()
