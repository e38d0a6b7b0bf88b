"""A per-request GBNF grammar over a model's vocabulary: which tokens may come next.

llama.cpp's grammar engine does the parsing (through llama-cpp-python's C bindings); we only
ask it for a mask and keep drawing with engine.sampling, so seeded draws stay ours and a
verifier can replay them under the same mask.

Two llama.cpp behaviours shape this module:
- accepting a token the grammar does not allow is not an error it returns: it throws a C++
  exception through the C API (or aborts, for an end-of-generation token while the grammar
  is incomplete), which kills the process. So every accept is checked first, and
  end-of-generation tokens are never accepted (generation ends there anyway);
- an end-of-generation token is allowed exactly when the grammar can be complete, so once the
  grammar is complete and nothing can extend it, only end-of-generation remains.

A Grammar keeps parse state: one per request, fed tokens in order.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# GBNF text a node accepts. JSON-schema grammars of realistic tool sets are a few KiB; the
# cap bounds the parser's work and memory before anything is built from hostile text.
MAX_GRAMMAR_CHARS = 64 * 1024
# llama.cpp expands x{n,m} into n + (m - n) copies of rules: a huge count is a memory bomb.
MAX_REPETITION = 1000
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class GrammarError(ValueError):
    """Grammar text that cannot be used, or a token sequence the grammar rejects."""


def check_grammar_text(text: str) -> None:
    """Cheap checks before llama.cpp sees the text (size, repetition counts)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("the grammar is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar has {len(text)} characters; at most {MAX_GRAMMAR_CHARS} are accepted")
    if "\x00" in text:
        raise GrammarError("the grammar contains a NUL character")
    for m in _REPEAT.finditer(text):
        if any(g and int(g) > MAX_REPETITION for g in m.groups()):
            raise GrammarError(f"repetition counts above {MAX_REPETITION} are not accepted")


class Grammar:
    """A compiled grammar bound to one model's vocabulary (llama_vocab pointer).

    vocab must outlive this object (the engine that owns the model does). `is_end` says which
    tokens end a generation."""

    def __init__(self, lc: Any, vocab: Any, n_vocab: int, text: str, is_end: Callable[[int], bool]) -> None:
        check_grammar_text(text)
        self._lc = lc
        self.text = text
        self.n_vocab = n_vocab
        self._is_end = is_end
        smpl = lc.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not smpl:
            raise GrammarError("the grammar does not parse (GBNF with a 'root' rule is expected)")
        self._smpl = smpl
        # One reusable candidate array over the whole vocabulary: ids fixed, logits reset per
        # use (the grammar only writes -inf into rejected entries and never reorders them).
        self._full = (lc.llama_token_data * n_vocab)()
        self._full_np = np.ctypeslib.as_array(ctypes.cast(self._full, ctypes.POINTER(ctypes.c_float)),
                                              shape=(n_vocab * 3,)).reshape(n_vocab, 3)
        self._full_np.view(np.int32)[:, 0] = np.arange(n_vocab, dtype=np.int32)
        self._full_arr = lc.llama_token_data_array(data=self._full, size=n_vocab, selected=-1, sorted=False)
        self._one = (lc.llama_token_data * 1)()
        self._one_arr = lc.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self.accepted = 0  # tokens fed so far
        self._done = False  # an end token was seen: nothing may follow

    def close(self) -> None:
        smpl, self._smpl = getattr(self, "_smpl", None), None
        if smpl:
            self._lc.llama_sampler_free(smpl)

    def __del__(self) -> None:
        self.close()

    def _live(self) -> Any:
        if not self._smpl:
            raise GrammarError("the grammar is closed")
        return self._smpl

    def allows(self, token: int) -> bool:
        """May `token` come next?"""
        if not 0 <= token < self.n_vocab or self._done:
            return False
        self._one[0].id = token
        self._one[0].logit = 0.0
        self._one_arr.size = 1
        self._one_arr.selected = -1
        self._lc.llama_sampler_apply(self._live(), ctypes.byref(self._one_arr))
        return bool(self._one[0].logit == 0.0)

    def allowed_mask(self) -> np.ndarray:
        """Boolean array over the vocabulary: True where the token may come next."""
        if self._done:
            return np.zeros(self.n_vocab, dtype=bool)
        self._full_np[:, 1] = 0.0
        self._full_arr.size = self.n_vocab
        self._full_arr.selected = -1
        self._lc.llama_sampler_apply(self._live(), ctypes.byref(self._full_arr))
        ok: np.ndarray = self._full_np[:, 1] == 0.0
        return ok

    def accept(self, token: int) -> None:
        """Advance past `token`; GrammarError (state unchanged) if the grammar rejects it."""
        if not self.allows(token):
            raise GrammarError(f"token {token} is not allowed by the grammar at position {self.accepted}")
        if self._is_end(token):
            self._done = True  # never into llama.cpp: see the module docstring
        else:
            self._lc.llama_sampler_accept(self._live(), token)
        self.accepted += 1

    def feed(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.accept(int(t))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of `logits` with every disallowed token at -inf."""
        ok = self.allowed_mask()
        if not ok.any():
            # Sampling would treat an all -inf row as uniform and pick a forbidden token.
            raise GrammarError(f"no token can continue the grammar at position {self.accepted}")
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~ok] = -np.inf
        return out


def compile_grammar(engine: Any, text: str) -> Grammar:
    """A Grammar for an engine.llama.Engine's model."""
    return Grammar(engine._lc, engine._vocab, engine.n_vocab, text, engine.is_end)
