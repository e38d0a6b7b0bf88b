"""Teacher-forced replay: prompt + claimed tokens through our own llama.cpp in one prefill,
reading one logits row per claimed token.

llama.cpp computes logits only for the batch positions flagged for output, so only the rows
we need (the last prompt position onwards) pay for the output layer, and nothing else in the
llama-cpp-python wrapper copies them (its `logits_all` mode copies every row into a Python-side
score matrix and needs a context built for it). Rows are handed to the caller one at a time
as views of llama.cpp's buffer: a long output's rows would not fit in memory together.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from node.engine import Engine


def replay(engine: Engine, prompt: Sequence[int], output: Sequence[int], consume: Callable[[int, np.ndarray], None]) -> None:
    """Call consume(i, row) for i = 0..len(output): row i is the distribution the model
    predicts for output[i] (i = len(output): for the token after the last one). Rows are
    views valid only during the call. Holds the engine's lock throughout (one llama.cpp
    context must never be used from two threads)."""
    lc = engine._lc
    seq = list(prompt) + list(output)
    first = len(prompt) - 1  # the last prompt position predicts output[0]
    if first < 0:
        raise ValueError("empty prompt")
    if len(seq) > engine.n_ctx:
        raise ValueError(f"{len(seq)} tokens do not fit the verifier's context of {engine.n_ctx}")
    with engine._lock:
        llm = engine._llm
        if llm is None:
            raise RuntimeError("engine is closed")
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # reset() alone leaves the KV cache in place
        batch = llm._batch
        try:
            for start in range(0, len(seq), llm.n_batch):
                chunk = seq[start:start + llm.n_batch]
                batch.set_batch(batch=chunk, n_past=start, logits_all=False)
                wanted = [j for j in range(len(chunk)) if start + j >= first]
                for j in range(len(chunk)):
                    batch.batch.logits[j] = start + j >= first
                llm._ctx.decode(batch)
                llm.n_tokens = start + len(chunk)
                for j in wanted:
                    ptr = lc.llama_get_logits_ith(llm.ctx, j)
                    consume(start + j - first, np.ctypeslib.as_array(ptr, shape=(engine.n_vocab,)))
        finally:
            llm.reset()  # the next user of this engine starts from a clean context
