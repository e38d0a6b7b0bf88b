"""Grammar-constrained generation (engine/grammar.py + the sampler hook) on the real SmolLM2."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from engine.grammar import MAX_GRAMMAR_CHARS, GrammarError, check_grammar_text, compile_grammar
from engine.llama import BadRequest, Engine
from engine.sampling import TokenSampler
from protocol.messages import ChatMessage, InferRequest, SamplingParams

pytestmark = pytest.mark.slow

SHA = "0" * 64
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(smollm2_path, tmp_path_factory):
    e = Engine(smollm2_path, n_ctx=512, n_threads=1, cache_dir=tmp_path_factory.mktemp("hash-cache"))
    yield e
    e.close()


def chat(text: str, grammar: str, cont=(), **params) -> InferRequest:
    return InferRequest("req-00001", SHA, "chat", SamplingParams(**params), messages=[ChatMessage("user", text)],
                        continuation=list(cont), grammar=grammar)


def collect(gen):
    steps = list(gen)
    return [s.token for s in steps[:-1]], "".join(s.text for s in steps), steps[-1].finish_reason


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.3, top_k=20, seed=3)])
def test_json_object_grammar_output_parses(engine, params):
    prompt = 'Answer with a JSON object with the key "ok" set to true.'
    ids, text, finish = collect(engine.run(chat(prompt, JSON_GBNF, max_tokens=60, **params)))
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", [1, 2])
def test_schema_grammar_output_validates(engine, seed):
    grammar = json_schema_to_gbnf(json.dumps(SCHEMA))
    _, text, finish = collect(engine.run(chat("A person.", grammar, max_tokens=80, temperature=0.7, seed=seed)))
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_unconstrained_output_differs(engine):
    # The sanity check that the grammar did the work: without it the model writes prose.
    _, text, _ = collect(engine.run(chat("Describe a cat as JSON.", "", max_tokens=12)))
    with pytest.raises(ValueError):
        json.loads(text)


def test_max_tokens_first_gives_length(engine):
    _, text, finish = collect(engine.run(chat("A person.", json_schema_to_gbnf(json.dumps(SCHEMA)), max_tokens=4)))
    assert finish == "length" and text.startswith("{")


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.9, seed=11)])
def test_continuation_resumes_the_same_constrained_generation(engine, params):
    req = chat("Describe a dog as JSON.", JSON_GBNF, max_tokens=12, **params)
    ids, text, _ = collect(engine.run(req))
    assert len(ids) > 6
    ids2, _, _ = collect(engine.run(chat("Describe a dog as JSON.", JSON_GBNF, cont=ids[:5], max_tokens=12, **params)))
    assert ids[:5] + ids2 == ids


def test_continuation_the_grammar_rejects_is_a_bad_request(engine):
    bad = engine.tokenize("hello")
    with pytest.raises(BadRequest, match="not allowed by the grammar"):
        engine.run(chat("x", JSON_GBNF, cont=bad))


@pytest.mark.parametrize("text", ["root ::= foo", "root ::= root \"a\"", "not a grammar", "x ::= \"a\""])
def test_unparsable_grammar_is_a_bad_request(engine, text):
    with pytest.raises(BadRequest, match="grammar"):
        engine.run(chat("x", text))


@pytest.mark.parametrize("text", ["", "root ::= \"a\"{1,100000}", "root ::= \"a\"" + " " * MAX_GRAMMAR_CHARS, "root ::= \"\x00\""])
def test_grammar_text_checks(text):
    with pytest.raises(GrammarError):
        check_grammar_text(text)


def test_complete_grammar_allows_only_end(engine):
    g = compile_grammar(engine, 'root ::= "yes"')
    g.feed(engine.tokenize("yes"))
    allowed = np.flatnonzero(g.allowed_mask())
    assert len(allowed) and all(engine.is_end(int(t)) for t in allowed)
    end = int(allowed[0])
    g.accept(end)  # never reaches llama.cpp, which would abort
    assert not g.allowed_mask().any()
    with pytest.raises(GrammarError):
        g.mask(np.zeros(engine.n_vocab, dtype=np.float32))


def test_end_is_refused_while_the_grammar_is_incomplete(engine):
    g = compile_grammar(engine, 'root ::= "yes"')
    end = engine._llm.token_eos()
    assert not g.allows(end)
    with pytest.raises(GrammarError):
        g.accept(end)  # an unchecked accept would abort the process
    g.feed(engine.tokenize("yes"))
    assert g.allows(end)


def test_sampler_feeds_history_past_the_prompt_and_masks(engine):
    prompt = engine.tokenize("whatever prompt", add_bos=True)
    g = compile_grammar(engine, 'root ::= "ab" [0-9]+')
    s = TokenSampler(SamplingParams(temperature=0.0), constraint=g, prompt_len=len(prompt))
    logits = np.zeros(engine.n_vocab, dtype=np.float32)
    logits[engine.tokenize("hello")[0]] = 100.0  # the raw favourite is forbidden
    first = s.choose(logits, prompt)
    assert engine.token_bytes(first) in (b"a", b"ab")
    history = prompt + engine.tokenize("ab")
    nxt = s.choose(logits, history)  # the sampler catches up with tokens another loop added
    assert engine.token_bytes(nxt).isdigit() and g.accepted == len(history) - len(prompt)
