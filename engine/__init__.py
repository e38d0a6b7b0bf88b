"""The inference engine both node and entry use: llama.cpp (`llama`: one context, one
generation at a time; the entry's verifier replays with it), the node's batched engine
(`batched`: one model, every slot a sequence of one context, stepped together by a scheduler
thread, with prompt-prefix reuse), the token sampler (`sampling`), UTF-8 and stop-string
handling (`textstream`), GGUF checks (`model_file`) and a synthetic engine for load tests
(`synthetic`).

Everything here blocks: callers run it in worker threads. A llama.cpp context used from two
threads at once segfaults, so Engine holds a lock per generation and BatchedEngine touches its
context only from its scheduler thread.
"""
