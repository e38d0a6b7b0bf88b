"""The inference engine both node and entry use: llama.cpp (`llama`), the token sampler
(`sampling`), UTF-8 and stop-string handling (`textstream`), GGUF checks (`model_file`) and a
synthetic engine for load tests (`synthetic`).

Everything here blocks: callers run it in a worker thread, one generation per engine at a
time (the engine holds a lock; a llama.cpp context used from two threads at once segfaults).
"""
