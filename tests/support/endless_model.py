"""A random-weight llama GGUF that never ends on its own, for failover tests.

tests/support/tiny_model.py's model decodes ~10k tok/s and hits its end token after ~100-200
tokens, so a generation is over before a test can kill the serving node. Failover tests
need the opposite: a generation that runs for seconds, so "kill the node after the first
token" reliably lands mid-stream. Wider layers slow decoding down; zeroed output rows for the
control tokens keep their logits at 0 while the byte tokens' logits spread widely, so greedy
(and sampled) decoding never picks an end token and runs to max_tokens.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_model import write_tiny_llama


def write_endless_llama(path: str | Path, *, n_embd: int = 256, n_layer: int = 4, n_ff: int = 1024,
                        n_head: int = 4, ctx: int = 4096, seed: int = 1) -> Path:
    return write_tiny_llama(path, seed=seed, chat_template=False, name="endless-random-llama", n_embd=n_embd,
                            n_layer=n_layer, n_ff=n_ff, n_head=n_head, ctx=ctx, endless=True)
