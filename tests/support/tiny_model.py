"""A tiny random-weight llama GGUF for fast engine tests.

llama.cpp loads it in milliseconds, so unit tests exercise the real decode path (KV cache,
batching, logits) without a real model. Random weights emit arbitrary bytes: compare token
ids, never text.

The vocabulary is GPT-2 style byte-level BPE: the 256 byte symbols, a few merges (llama.cpp
refuses a BPE vocabulary without a merges array), and BOS/EOS control tokens.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
CTX_TRAIN = 4096

# A ChatML-like template so the chat path (jinja rendering + special tokens) is exercised.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {}
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocab() -> tuple[list[str], list[str], list[int], int, int]:
    """(tokens, merges, token_types, bos_id, eos_id). Token id b < 256 is the byte b."""
    sym = _byte_symbols()
    tokens = list(sym)
    types = [gguf.TokenType.NORMAL] * 256
    merges = []
    for a, b in (("h", "e"), ("l", "l"), (sym[ord(" ")], "t")):
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bos = len(tokens)
    tokens += specials
    types += [gguf.TokenType.CONTROL] * len(specials)
    return tokens, merges, [int(t) for t in types], bos, bos + 1


def write_tiny_llama(path: str | Path, *, seed: int = 0, chat_template: bool = True, name: str = "tiny-random-llama",
                     n_embd: int = N_EMBD, n_layer: int = N_LAYER, n_ff: int = N_FF, n_head: int = N_HEAD,
                     ctx: int = CTX_TRAIN, endless: bool = False) -> Path:
    """endless: the output rows of every control token (BOS, EOS, chat markers) are zero, so
    their logits stay exactly 0 while the byte tokens' spread widely: decoding never picks
    an end token and runs to max_tokens (see tests/support/endless_model.py)."""
    path = Path(path)
    tokens, merges, types, bos, eos = vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
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
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are (rows, cols) = reversed ggml ne: a weight mapping n_in -> n_out is (n_out, n_in).
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    output = w(n_vocab, n_embd, scale=1.0)
    if endless:
        output[bos:] = 0.0
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name_ in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name_ + ".weight", w(n_embd, n_embd))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
