"""A random-weight llama GGUF that never ends on its own, for failover tests.

tests/tiny_model.py's model decodes ~10k tok/s and hits its end token after ~100-200
tokens, so a generation is over before a test can kill the serving node. Failover tests
need the opposite: a generation that runs for seconds, so "kill the node after the first
token" reliably lands mid-stream. Wider layers slow decoding down; zeroed output rows for the
control tokens keep their logits at 0 while the byte tokens' logits spread widely, so greedy
(and sampled) decoding never picks an end token and runs to max_tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf

from tests.tiny_model import vocab


def write_endless_llama(path: str | Path, *, n_embd: int = 256, n_layer: int = 4, n_ff: int = 1024,
                        n_head: int = 4, ctx: int = 4096, seed: int = 1) -> Path:
    path = Path(path)
    tokens, merges, types, bos, eos = vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("endless-random-llama")
    writer.add_context_length(ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)

    output = w(n_vocab, n_embd, scale=1.0)
    output[bos:] = 0.0  # every control token (BOS, EOS, chat markers) scores exactly 0
    # numpy shapes are (rows, cols) = reversed ggml ne.
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name + ".weight", w(n_embd, n_embd))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
