"""The verifier stays quiet on a batched node: honest generations made 4 at a time by the
node's batched engine (slots=4, prefix reuse on, some failover continuations), re-scored by
the entry's verifier. The small CI version of scripts/bench_verify_batch.py (500+)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.batched import BatchedEngine
from entry.verify.verifier import Verifier, VerifierConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_verify_batch import generate_honest, verify_all  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_no_false_positives_on_batched_generations_with_prefix_reuse(smollm2_path):
    verifier = Verifier(config=VerifierConfig())
    sha = verifier.load_model(smollm2_path).sha256
    engine = BatchedEngine(smollm2_path, slots=4, n_ctx=1024, n_threads=1, prefix_cache_tokens=2048)
    try:
        records, counts = generate_honest(engine, sha, 40, seed=5, max_tokens=(12, 16, 24))
    finally:
        engine.close()
    assert len(records) == 40 and counts["failover"] >= 4 and counts["turn2"] >= 3 and counts["reused_tokens"] > 0
    result = verify_all(verifier, records)
    verifier.close()
    assert result["false_positives"] == 0, result["flagged"]
