"""Engine, sampling, text stream and model-file tests on the tiny random model (fast)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from engine import model_file
from engine.llama import FALLBACK_CHAT_STOP, BadRequest, Engine, RequestTooLong
from engine.model_file import ModelFileError, inspect_model
from engine.sampling import TokenSampler, _top_set, log_softmax_at, logprob_report, top_logprobs
from engine.textstream import TextStream
from protocol.messages import ChatMessage, InferRequest, SamplingParams
from tests.support.tiny_model import write_tiny_llama

SHA = "0" * 64


@pytest.fixture(scope="module")
def engine(tiny_gguf, tmp_path_factory):
    e = Engine(tiny_gguf, n_ctx=256, n_threads=1, cache_dir=tmp_path_factory.mktemp("hash-cache"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.tokenize("hello there", add_bos=True)


def ids_of(gen) -> tuple[list[int], str, str]:
    steps = list(gen)
    assert steps[-1].token is None and all(s.token is not None for s in steps[:-1])
    return [s.token for s in steps[:-1]], "".join(s.text for s in steps), steps[-1].finish_reason


def run(engine, prompt, **kw):
    extra = {k: kw.pop(k) for k in ("continuation", "logprobs", "top_logprobs", "cancel") if k in kw}
    return ids_of(engine.generate(prompt, SamplingParams(**kw), **extra))


# --- engine on the tiny model -----------------------------------------------------------


def test_engine_describes_model(engine):
    info = engine.info
    assert (info.architecture, info.quantization, info.vocab_size) == ("llama", "F32", engine.n_vocab)
    assert info.context_length == 4096 and info.chat_template and len(info.sha256) == 64
    assert engine.n_ctx == 256 and isinstance(engine.gpu_offload, bool)
    assert engine.load_seconds < 5


def test_greedy_is_deterministic(engine, prompt):
    a = run(engine, prompt, max_tokens=40)
    b = run(engine, prompt, max_tokens=40)
    assert a == b and len(a[0]) == 40 and a[2] == "length"


def test_seeded_sampling_is_reproducible(engine, prompt):
    kw = dict(temperature=1.0, top_p=0.95, top_k=100, repeat_penalty=1.2, max_tokens=40)
    a = run(engine, prompt, seed=7, **kw)
    assert a == run(engine, prompt, seed=7, **kw)
    assert a[0] != run(engine, prompt, seed=8, **kw)[0]
    gen = engine.generate(prompt, SamplingParams(**kw))  # no seed: one is chosen and reported
    first = ids_of(gen)
    assert 0 <= gen.seed < 2**63 and run(engine, prompt, seed=gen.seed, **kw) == first


@pytest.mark.parametrize("split", [0, 1, 7, 23, 39])
def test_continuation_reproduces_uninterrupted_greedy(engine, prompt, split):
    ids, text, _ = run(engine, prompt, max_tokens=40)
    rest, rest_text, reason = run(engine, prompt, max_tokens=40, continuation=ids[:split])
    assert ids[:split] + rest == ids and reason == "length"
    # The text already delivered is not sent again; what follows matches exactly.
    steps = list(engine.generate(prompt, SamplingParams(max_tokens=40)))
    assert "".join(s.text for s in steps[:split]) + rest_text == text


def test_continuation_reproduces_seeded_sampling(engine, prompt):
    kw = dict(temperature=0.9, min_p=0.02, seed=3, max_tokens=30)
    ids, _, _ = run(engine, prompt, **kw)
    rest, _, _ = run(engine, prompt, continuation=ids[:11], **kw)
    assert ids[:11] + rest == ids


def test_continuation_at_max_tokens_finishes_at_once(engine, prompt):
    ids, _, _ = run(engine, prompt, max_tokens=5)
    assert run(engine, prompt, max_tokens=5, continuation=ids) == ([], "", "length")


def test_cancel_stops_promptly(engine, prompt):
    cancel = threading.Event()
    cancel.set()
    assert run(engine, prompt, max_tokens=50, cancel=cancel) == ([], "", "cancelled")
    cancel = threading.Event()
    gen = engine.generate(prompt, SamplingParams(max_tokens=200), cancel=cancel)
    produced = 0
    for step in gen:
        if step.token is not None:
            produced += 1
            if produced == 3:
                cancel.set()
        last = step
    assert last.finish_reason == "cancelled" and produced == 3 and gen.completion_tokens == 3


def test_abandoned_generation_releases_the_engine(engine, prompt):
    gen = engine.generate(prompt, SamplingParams(max_tokens=50))
    next(gen)
    gen.close()
    assert len(run(engine, prompt, max_tokens=3)[0]) == 3  # would deadlock if the lock leaked


def test_context_full_ends_with_length(engine, prompt):
    ids, _, reason = run(engine, prompt, max_tokens=1000)
    assert reason == "length" and len(prompt) + len(ids) == engine.n_ctx + 1


def test_request_too_long(engine):
    long_prompt = "hello there " * 300
    req = InferRequest("req-00001", SHA, "completion", SamplingParams(), prompt=long_prompt)
    with pytest.raises(RequestTooLong, match="do not fit"):
        engine.prompt_tokens(req)
    with pytest.raises(RequestTooLong):
        engine.generate(list(range(10)), SamplingParams(), continuation=[5] * 250)
    assert issubclass(RequestTooLong, ValueError)


def test_bad_token_ids_are_rejected(engine, prompt):
    with pytest.raises(BadRequest, match="vocabulary"):
        engine.generate(prompt, SamplingParams(), continuation=[engine.n_vocab + 5])


def test_stop_string_spanning_tokens(engine, prompt):
    ids, text, _ = run(engine, prompt, max_tokens=60)
    # A stop string cut out of the real output, starting mid-output and spanning tokens.
    start = next(i for i in range(len(text) // 3, len(text) - 4) if "\ufffd" not in text[i : i + 4])
    stop = text[start : start + 4]
    sids, stext, reason = run(engine, prompt, max_tokens=60, stop=[stop, "never-seen"])
    assert reason == "stop" and stext == text[: text.find(stop)]
    assert sids == ids[: len(sids)] and len(sids) < len(ids)


def test_eos_is_not_yielded(engine, prompt, monkeypatch):
    from engine import llama as engine_mod

    eos = engine.info.eos_token_id
    assert engine.is_end(eos)

    class EosOnThird(engine_mod.TokenSampler):
        calls = 0

        def choose(self, logits, history=()):
            EosOnThird.calls += 1
            return eos if EosOnThird.calls == 3 else super().choose(logits, history)

    monkeypatch.setattr(engine_mod, "TokenSampler", EosOnThird)
    ids, _, reason = run(engine, prompt, max_tokens=20)
    assert reason == "stop" and len(ids) == 2 and eos not in ids


def test_logprobs_are_raw_log_softmax(engine, prompt):
    steps = list(engine.generate(prompt, SamplingParams(max_tokens=10), logprobs=True, top_logprobs=5))[:-1]
    for s in steps:
        assert s.logprob <= 0 and len(s.top) == 5
        assert s.top[0][0] == s.token and s.top[0][1] == pytest.approx(s.logprob)
        assert [lp for _, lp in s.top] == sorted((lp for _, lp in s.top), reverse=True)
        assert sum(np.exp(lp) for _, lp in s.top) <= 1 + 1e-9
    # top without the chosen-token logprob
    steps = list(engine.generate(prompt, SamplingParams(max_tokens=3), top_logprobs=2))[:-1]
    assert all(s.logprob is None and len(s.top) == 2 for s in steps)


def test_chat_prompt_uses_template_and_special_tokens(engine):
    req = InferRequest("req-00001", SHA, "chat", SamplingParams(), messages=[ChatMessage("user", "hi")])
    ids = engine.prompt_tokens(req)
    im_start = engine.tokenize("<|im_start|>")
    assert ids[0] == engine.bos_id and len(im_start) == 1 and ids.count(im_start[0]) == 2
    assert engine.request_stops(req) == []
    gen = engine.run(req)
    assert ids_of(gen)[2] in ("length", "stop")


def test_chat_without_template_uses_fallback(tmp_path):
    path = write_tiny_llama(tmp_path / "no-template.gguf", chat_template=False)
    e = Engine(path, n_ctx=128, cache_dir=tmp_path)
    req = InferRequest("req-00001", SHA, "chat", SamplingParams(max_tokens=5), messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi")])
    assert not e.has_chat_template and e.info.chat_template is None
    assert e.render_chat(req.messages) == "System: be brief\n\nUser: hi\n\nAssistant:"
    assert e.request_stops(req) == [FALLBACK_CHAT_STOP]
    assert len(ids_of(e.run(req))[0]) <= 5
    e.close()


def test_generations_from_two_threads_are_serialised(engine, prompt):
    expected = run(engine, prompt, max_tokens=30)
    results = []

    def worker():
        results.append(run(engine, prompt, max_tokens=30))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [expected] * 3


def test_measure_speed(engine):
    seen = []
    prefill, decode = engine.measure_speed(lambda f, m: seen.append((f, m)), n_prompt=64, n_decode=16)
    assert prefill > 0 and decode > 0
    assert seen[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in seen)


# --- sampling -----------------------------------------------------------------------------


def _reference_choose(params, logits, history, u):
    """The documented semantics, written the slow obvious way."""
    x = logits.astype(np.float64)
    if params.repeat_last_n > 0:
        window = list(history)[-params.repeat_last_n :]
        for t in set(window):
            c = window.count(t)
            v = x[t]
            v = v / params.repeat_penalty if v > 0 else v * params.repeat_penalty
            x[t] = v - c * params.frequency_penalty - params.presence_penalty
    x /= params.temperature
    keep = np.ones(x.shape[0], bool)
    if 0 < params.top_k < x.shape[0]:
        keep &= x >= np.sort(x)[::-1][params.top_k - 1]
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    if params.top_p < 1.0:
        s = np.sort(p[keep])[::-1]
        cum = np.cumsum(s)
        thr = s[min(int(np.searchsorted(cum, params.top_p * p[keep].sum())), s.shape[0] - 1)]
        keep &= p >= thr
    if params.min_p > 0:
        keep &= p >= params.min_p * p[keep].max()
    ids = np.flatnonzero(keep)
    cum = np.cumsum(p[ids])
    return int(ids[min(int(np.searchsorted(cum, u * cum[-1], side="right")), ids.shape[0] - 1)])


def test_sampler_matches_reference_semantics():
    rng = np.random.default_rng(1)
    for case in range(60):
        n = int(rng.choice([50, 300, 5000]))
        logits = (rng.standard_normal(n) * rng.uniform(0.5, 6)).astype(np.float32)
        if case % 5 == 0:
            logits[rng.integers(0, n, 20)] = logits.max()  # ties at the top
        params = SamplingParams(
            temperature=float(rng.uniform(0.2, 2.0)),
            top_k=int(rng.choice([0, 1, 5, 40, n + 3])),
            top_p=float(rng.choice([1.0, 0.95, 0.5, 0.0])),
            min_p=float(rng.choice([0.0, 0.05, 0.3])),
            repeat_penalty=float(rng.choice([1.0, 1.3, 0.8])),
            frequency_penalty=float(rng.choice([0.0, 0.5])),
            presence_penalty=float(rng.choice([0.0, -0.4])),
            repeat_last_n=int(rng.choice([0, 8, 64])),
            seed=case,
        )
        history = list(rng.integers(0, n, 40))
        sampler = TokenSampler(params)
        draws = np.random.Generator(np.random.PCG64(case)).random(5)
        for u in draws:
            assert sampler.choose(logits, history) == _reference_choose(params, logits, history, u), (case, params)


def test_sampler_matches_reference_on_a_full_size_vocabulary():
    # Flat distributions push top_p past the fast candidate sets (every tier is exercised).
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(49152) * 3).astype(np.float32)
    for i, (temp, top_p) in enumerate([(0.7, 0.9), (1.5, 0.99), (5.0, 0.999), (3.0, 0.6)]):
        params = SamplingParams(temperature=temp, top_p=top_p, seed=i)
        sampler = TokenSampler(params)
        for u in np.random.Generator(np.random.PCG64(i)).random(3):
            assert sampler.choose(logits) == _reference_choose(params, logits, [], u)


def test_greedy_ignores_penalties_and_seed():
    logits = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    s = TokenSampler(SamplingParams(temperature=0.0, repeat_penalty=5.0))
    assert s.choose(logits, [1, 1, 1]) == 1  # argmax, lowest id on ties


def test_penalties_follow_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    params = SamplingParams(temperature=1.0, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, top_k=1, seed=0)
    # token 0: 2/2 - 2*0.5 - 0.25 = -0.25; token 1: -2*2 - 0.5 - 0.25 = -4.75; token 2 untouched: 1.0
    assert TokenSampler(params).choose(logits, [0, 0, 1]) == 2
    # repeat_penalty 0 (allowed on the wire) would divide by zero: it means "off"
    params = SamplingParams(temperature=1.0, repeat_penalty=0.0, top_k=1, seed=0)
    assert TokenSampler(params).choose(logits, [0, 1]) == 0


def test_skip_advances_like_sampling():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = np.zeros(1000, np.float32)
    a, b = TokenSampler(params), TokenSampler(params)
    seq = [a.choose(logits) for _ in range(6)]
    b.skip(4)
    assert [b.choose(logits) for _ in range(2)] == seq[4:]


def test_top_set_and_logprob_helpers():
    rng = np.random.default_rng(3)
    for n in (10, 200, 49152):
        v = rng.standard_normal(n).astype(np.float32)
        v[rng.integers(0, n, 5)] = v.max()
        for k in (1, 3, 20):
            got = _top_set(v, k)
            kth = np.sort(v)[::-1][min(k, n) - 1]
            assert got.tolist() == np.flatnonzero(v >= kth).tolist()
        ref = v.astype(np.float64) - np.log(np.exp(v.astype(np.float64)).sum())
        assert log_softmax_at(v, 7) == pytest.approx(ref[7], abs=1e-9)
        top = top_logprobs(v, 4)
        order = sorted(range(n), key=lambda i: (-v[i], i))[:4]
        assert [t for t, _ in top] == order and [lp for _, lp in top] == pytest.approx([ref[i] for i in order])
        lp, top2 = logprob_report(v, 7, 4)
        assert lp == pytest.approx(ref[7]) and top2 == top


# --- text stream ------------------------------------------------------------------------


def feed(ts: TextStream, pieces) -> list[str]:
    return [ts.push(p) for p in pieces]


def test_textstream_never_splits_a_character():
    ts = TextStream()
    euro = "€".encode()  # 3 bytes
    assert feed(ts, [b"a" + euro[:1], euro[1:2], euro[2:] + b"b"]) == ["a", "", "€b"]
    assert ts.flush() == ""
    ts = TextStream()
    assert ts.push(euro[:2]) == "" and ts.flush() == "\ufffd"  # dangling half character


def test_textstream_stop_spanning_tokens():
    ts = TextStream(["END"])
    out = feed(ts, [b"hello E", b"N", b"D and more"])
    assert out == ["hello ", "", ""] and ts.stopped and ts.flush() == ""
    assert ts.push(b"later") == ""


def test_textstream_releases_false_alarm():
    ts = TextStream(["END"])
    assert feed(ts, [b"x E", b"Nx"]) == ["x ", "ENx"]
    ts = TextStream(["END"])
    assert feed(ts, [b"ab EN"]) == ["ab "] and ts.flush() == "EN" and not ts.stopped


def test_textstream_stop_across_multibyte_split():
    ts = TextStream(["é!"])
    e = "é".encode()
    assert feed(ts, [b"caf" + e[:1], e[1:], b"!tail"]) == ["caf", "", ""] and ts.stopped


def test_textstream_earliest_stop_wins():
    ts = TextStream(["bcd", "c"])
    assert ts.push(b"abcdef") == "a" and ts.stopped
    ts = TextStream(["bcd", "abc"])
    assert ts.push(b"xabcd") == "x"


def test_textstream_invalid_bytes_become_replacement():
    ts = TextStream()
    assert ts.push(b"\xff\xfeok") == "\ufffd\ufffdok"


# --- model files ----------------------------------------------------------------------------


def _one_line_error(path, cache):
    with pytest.raises(ModelFileError) as ei:
        inspect_model(path, cache)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 400
    return msg


def test_model_file_errors_are_one_line(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    assert "not found" in _one_line_error(tmp_path / "missing.gguf", tmp_path)
    (tmp_path / "random.gguf").write_bytes(os.urandom(5000))
    assert "not a GGUF" in _one_line_error(tmp_path / "random.gguf", tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "not a GGUF" in _one_line_error(tmp_path / "empty.gguf", tmp_path)
    (tmp_path / "cut-data.gguf").write_bytes(data[: len(data) // 2])
    assert "truncated" in _one_line_error(tmp_path / "cut-data.gguf", tmp_path)
    (tmp_path / "cut-header.gguf").write_bytes(data[:1500])
    assert "damaged" in _one_line_error(tmp_path / "cut-header.gguf", tmp_path)
    (tmp_path / "noise.gguf").write_bytes(data[:24] + os.urandom(3000))
    _one_line_error(tmp_path / "noise.gguf", tmp_path)
    assert "not a regular file" in _one_line_error(tmp_path, tmp_path)
    with pytest.raises(ModelFileError):
        Engine(tmp_path / "cut-data.gguf", cache_dir=tmp_path)


def test_sha256_is_cached(tiny_gguf, tmp_path, monkeypatch):
    import hashlib

    calls = []
    real = model_file._hash_file
    monkeypatch.setattr(model_file, "_hash_file", lambda p: calls.append(p) or real(p))
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    first = inspect_model(path, tmp_path / "cache")
    assert first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and len(calls) == 1
    assert inspect_model(path, tmp_path / "cache").sha256 == first.sha256 and len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten file: re-hash
    inspect_model(path, tmp_path / "cache")
    assert len(calls) == 2


def test_bundled_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_file.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFileError, match="scripts/setup.sh"):
        model_file.bundled_model_path()
