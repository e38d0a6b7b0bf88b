"""A different model with SmolLM2's tokenizer: a copy of its GGUF with noise in tensor data.

What a cheating node would serve instead of the model it advertises (a cheaper or damaged
model). Only the 4-bit quants of some Q4_1 blocks are randomised; the blocks' f16 scale and
minimum stay, so every weight stays within its block's original range: the model loads,
runs and writes plausible-looking text, just not SmolLM2's text. (Random bytes in the
scales could make inf/NaN weights and produce nothing but garbage, an easier case.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

Q4_1_BLOCK = 20  # bytes per 32 weights: f16 d, f16 m, 16 bytes of nibbles


def noised_copy(src: str | Path, dst: str | Path, *, fraction: float, tensors: str = r"ffn_down", seed: int = 0) -> Path:
    """Copy src to dst with the quants of `fraction` of the Q4_1 blocks of every tensor whose
    name matches the regex `tensors` replaced by random nibbles."""
    import gguf

    dst = Path(dst)
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(str(src))
    rng = np.random.default_rng(seed)
    pattern = re.compile(tensors)
    with open(dst, "r+b") as f:
        for t in reader.tensors:
            if not pattern.search(t.name) or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
                continue
            n_blocks = int(t.n_bytes) // Q4_1_BLOCK
            for b in np.flatnonzero(rng.random(n_blocks) < fraction):
                f.seek(int(t.data_offset) + int(b) * Q4_1_BLOCK + 4)
                f.write(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    return dst
