"""Re-scoring under a grammar (in process, real SmolLM2 on both sides): an honest constrained
generation passes, including one split by a failover; output that ignores the grammar, JSON not
drawn from the model, and a claimed end the grammar forbids are caught."""

from __future__ import annotations

import json

import pytest
from llama_cpp.llama_grammar import JSON_GBNF

from engine.llama import Engine
from entry.api.structured import schema_grammar
from entry.mesh.relay import GenerationRecord, PartRecord
from entry.verify.verifier import Verifier, VerifierConfig
from protocol.messages import ChatMessage, InferRequest, SamplingParams

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def node(smollm2_path):
    e = Engine(smollm2_path, n_ctx=512, n_threads=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def verifier(smollm2_path):
    v = Verifier(config=VerifierConfig(n_ctx=512))
    m = v.load_model(smollm2_path)
    yield v, m.sha256
    v.close()


def request(sha: str, grammar: str, max_tokens: int = 40, **params) -> InferRequest:
    return InferRequest("req-000001", sha, "chat", SamplingParams(max_tokens=max_tokens, **params),
                        [ChatMessage("user", "Describe a person as JSON.")], grammar=grammar)


def generate(node: Engine, req: InferRequest) -> tuple[list[int], str, str, int]:
    gen = node.run(req)
    steps = list(gen)
    return [s.token for s in steps[:-1]], "".join(s.text for s in steps), steps[-1].finish_reason, gen.prompt_tokens


def record(req, parts: list[list[int]], finish: str, prompt_tokens: int) -> GenerationRecord:
    return GenerationRecord(req, [PartRecord(f"peer-{k}", f"node-{k}", ids, None, k == len(parts) - 1, 512)
                                  for k, ids in enumerate(parts)], finish, prompt_tokens)


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, seed=5), dict(temperature=0.7, top_p=0.9, seed=9)])
def test_honest_constrained_generations_pass(node, verifier, params):
    v, sha = verifier
    req = request(sha, schema_grammar(SCHEMA), **params)
    ids, text, finish, n_prompt = generate(node, req)
    assert finish == "stop" and json.loads(text)
    verdicts = v.check(record(req, [ids], finish, n_prompt))
    assert [x.passed for x in verdicts] == [True], verdicts
    # Split as a failover would split it: both parts pass.
    verdicts = v.check(record(req, [ids[:4], ids[4:]], finish, n_prompt))
    assert [x.passed for x in verdicts] == [True, True], verdicts


def test_ignoring_the_grammar_is_caught(node, verifier):
    v, sha = verifier
    req = request(sha, JSON_GBNF, max_tokens=12)
    ids, text, finish, n_prompt = generate(node, request(sha, "", max_tokens=12))  # an honest model, no grammar
    assert not text.startswith("{")
    [verdict] = v.check(record(req, [ids], finish, n_prompt))
    assert not verdict.passed and verdict.reason == "grammar_violation"


def test_ignoring_the_grammar_after_a_failover_blames_the_second_node(node, verifier):
    v, sha = verifier
    req = request(sha, JSON_GBNF, max_tokens=12)
    ids, _, _, n_prompt = generate(node, req)
    plain = node.tokenize(" plain words")
    verdicts = v.check(record(req, [ids[:5], plain], "length", n_prompt))
    assert [(x.passed, x.reason) for x in verdicts] == [(True, ""), (False, "grammar_violation")]


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, seed=5)])
def test_valid_json_not_drawn_from_the_model_is_caught(node, verifier, params):
    v, sha = verifier
    req = request(sha, schema_grammar(SCHEMA), **params)
    _, _, _, n_prompt = generate(node, request(sha, "", max_tokens=1))
    fake = node.tokenize('{"name": "Zyxwvut Qq", "age": 98765}')
    [verdict] = v.check(record(req, [fake], "stop", n_prompt))
    assert not verdict.passed and verdict.reason in ("token_mismatch", "too_many_deviations", "unlikely_tokens"), verdict


def test_claiming_an_end_the_grammar_forbids_is_caught(node, verifier):
    v, sha = verifier
    req = request(sha, JSON_GBNF)
    ids, _, _, n_prompt = generate(node, req)
    [verdict] = v.check(record(req, [ids[:3]], "stop", n_prompt))  # '{' ... then "the model ended"
    assert not verdict.passed and verdict.reason == "early_stop"
